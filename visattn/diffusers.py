"""diffusers entry points: attention processors for ``model.set_attn_processor``.

    import visattn
    transformer = pipe.transformer                   # Wan, CogVideoX, HunyuanVideo, Flux, SD3
    processor = visattn.diffusers.SparseVideoAttnProcessor(transformer, strategy="tile_topk", keep=0.1)
    transformer.set_attn_processor(processor)
    ...
    transformer.set_attn_processor(processor.stock_processors)   # stock again
    processor.detach()                                            # and its hooks removed

``visattn.apply(pipe, "sparse_video", ...)`` installs the same processor and ``visattn.remove(pipe)``
undoes it exactly. Under diffusers' context parallelism, sparse attention runs as an attention backend:

    backend = visattn.diffusers.SparseVideoAttnBackend(transformer, strategy="tile_topk", keep=0.1)
    transformer.set_attention_backend("visattn_sparse")
    transformer.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=2))

(``visattn.apply(..., install="attention_backend")`` does the same; see
``visattn.processors.sparse_video.backend`` for what works with Ulysses and ring attention).

Importing this module (``import visattn`` does) does not import diffusers; making a processor or a
backend does.
"""

from __future__ import annotations

from .processors.sparse_video import SparseVideoAttnBackend, SparseVideoAttnProcessor, sparse_video_attention

__all__ = ["SparseVideoAttnBackend", "SparseVideoAttnProcessor", "sparse_video_attention"]
