"""diffusers entry points: attention processors for ``model.set_attn_processor``.

    import visattn
    transformer = pipe.transformer                   # Wan, CogVideoX, HunyuanVideo, Flux, SD3
    processor = visattn.diffusers.SparseVideoAttnProcessor(transformer, strategy="tile_topk", keep=0.1)
    transformer.set_attn_processor(processor)
    ...
    transformer.set_attn_processor(processor.stock_processors)   # stock again
    processor.detach()                                            # and its hooks removed

The same for ``TomeAttnProcessor(unet_or_dit, ratio=0.5, scope="attention" or "block")`` (ToMe-SD; UNets, PixArt,
SD3, Flux), ``IsolationAttnProcessor(unet_or_flux, target_regions=..., reference_regions=...)`` and
``InspectAttnProcessor(model, layers=[3])`` (its maps in ``processor.handle``). Each takes the method's options,
gives what ``visattn.apply`` gives (which installs the same processors), and is
:class:`visattn.frameworks.diffusers_layers.LayerProcessor`.

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

from .processors.inspect import InspectAttnProcessor
from .processors.isolation import IsolationAttnProcessor
from .processors.sparse_video import SparseVideoAttnBackend, SparseVideoAttnProcessor, sparse_video_attention
from .processors.tome.diffusers import TomeAttnProcessor

__all__ = ["InspectAttnProcessor", "IsolationAttnProcessor", "SparseVideoAttnBackend", "SparseVideoAttnProcessor",
           "TomeAttnProcessor", "sparse_video_attention"]
