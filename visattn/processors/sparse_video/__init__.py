"""``sparse_video``: block-sparse attention for video and image DiTs in diffusers.

The method is this package, one module per concern:

- :mod:`.attention`: the options and their schedule (:class:`SparseVideoConfig`, :class:`SparseVideoSchedule`),
  the tile geometry and the routers of the four strategies, :func:`sparse_video_attention` (a plain function of
  ``[B, H, N, D]`` tensors and a layout) and :class:`SparseVideoAttnProcessor`, the diffusers attention
  processor (``install="processor"``); its docstring gives the papers and equations;
- :mod:`.backend`: :class:`SparseVideoAttnBackend`, the same attention as the diffusers attention backend
  ``visattn_sparse`` (``install="attention_backend"``), which context parallelism wraps;
- here: the :class:`SparseVideo` method that ``visattn.apply(model, "sparse_video", ...)`` runs.
"""

from __future__ import annotations

from typing import Any

from ...frameworks import Target
from ...patching import Handle, Patcher
from ...registry import Method, register
from .attention import (
    FAMILIES,
    INSTALL,
    OPTIONS,
    SparseVideoAttnProcessor,
    SparseVideoConfig,
    SparseVideoSchedule,
    geometry,
    route_blocks,
    sparse_video_attention,
)
from .backend import SparseVideoAttnBackend

__all__ = ["SparseVideo", "SparseVideoAttnBackend", "SparseVideoAttnProcessor", "SparseVideoConfig",
           "SparseVideoSchedule", "geometry", "route_blocks", "sparse_video_attention"]


@register
class SparseVideo(Method):
    name = "sparse_video"
    summary = "block-sparse video/image DiT attention: tile top-k (VSA), Rectified SpaAttn, sliding tiles (STA), GRAT"
    paper = ("VSA (Zhang et al., 2025); Rectified SpaAttn (2025); STA, sliding tile attention (2025); "
             "GRAT (2025); XAttention-style top-p selection")
    frameworks = ("diffusers",)
    families = {"diffusers": FAMILIES}
    options = (*OPTIONS, INSTALL)

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> Handle:
        from ...frameworks import diffusers as fw

        config = SparseVideoConfig(**{k: v for k, v in options.items() if k != "install"})  # apply checked them
        if options["install"] == "attention_backend":
            SparseVideoAttnBackend(target.model, patcher=patcher, config=config).select(patcher)
        else:
            processor = SparseVideoAttnProcessor(target.model, patcher=patcher, config=config)
            sparse = set(processor.sparse_layers())
            fw.set_processors(target.model, patcher, lambda idx, name, module: processor if idx in sparse else None)
        return Handle(self.name, target.model, options, patcher)

