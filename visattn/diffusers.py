"""diffusers entry points: attention processors for ``model.set_attn_processor``.

    import visattn
    transformer = pipe.transformer                   # Wan, CogVideoX, HunyuanVideo, Flux, SD3
    processor = visattn.diffusers.SparseVideoAttnProcessor(transformer, strategy="tile_topk", keep=0.1)
    transformer.set_attn_processor(processor)
    ...
    transformer.set_attn_processor(processor.stock_processors)   # stock again
    processor.detach()                                            # and its hooks removed

``visattn.apply(pipe, "sparse_video", ...)`` installs the same processor and ``visattn.remove(pipe)``
undoes it exactly. Importing this module (``import visattn`` does) does not import diffusers;
making a processor does.
"""

from __future__ import annotations

from .processors.sparse_video import SparseVideoAttnProcessor, sparse_video_attention

__all__ = ["SparseVideoAttnProcessor", "sparse_video_attention"]
