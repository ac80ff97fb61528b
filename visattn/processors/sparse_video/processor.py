"""``sparse_video`` as a diffusers attention processor (``install="processor"``): :class:`SparseVideoAttnProcessor`
runs each layer's stock processor and answers its self/joint-attention SDPA call with the sparse attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn
from torch import Tensor

from ...core.layout import TokenLayout
from ...frameworks.base import SDPAIntercept
from ...frameworks.diffusers_layers import LayerProcessor, StockLayer
from ...patching import Patcher
from .attention import sparse_video_attention
from .config import SparseVideoConfig
from .schedule import SparseVideoSchedule


def _sparse_sdpa(layout: Callable[[int], TokenLayout | None], config: SparseVideoConfig) -> SDPAIntercept:
    """An SDPA interception that answers the layer's self/joint-attention call with :func:`sparse_video_attention`
    (``layout(n)``: the layout of a sequence of ``n`` tokens, ``None`` to leave the call stock)."""

    def answer(call: dict[str, Any]) -> Tensor | None:
        q, k = call["query"], call["key"]
        if q.shape[-2] != k.shape[-2] or call.get("is_causal") or call.get("dropout_p"):
            return None
        chosen = layout(q.shape[-2])
        if chosen is None:
            return None
        return sparse_video_attention(q, k, call["value"], chosen, config, scale=call.get("scale"),
                                      attn_mask=call.get("attn_mask"))

    return SDPAIntercept(answer)


class SparseVideoAttnProcessor(LayerProcessor):
    """A diffusers attention processor running ``sparse_video`` (package doc) in the layers of one model.

    ``model.set_attn_processor(SparseVideoAttnProcessor(model, strategy="tile_topk", keep=0.1))`` —
    or ``visattn.apply(model_or_pipe, "sparse_video", ...)``, which does the same and can be undone with
    ``visattn.remove``. The processor is made for one model (the denoiser), because a diffusers
    processor call alone does not carry the token grid, the denoising step or the layer index:
    construction records each attention layer's current (stock) processor and installs forward
    hooks on the model that read the grid and text length of each call (:class:`SparseVideoSchedule`).
    ``stock_processors`` gives the processors back for ``model.set_attn_processor(...)``; ``detach()``
    removes the hooks (:class:`visattn.frameworks.diffusers.LayerProcessor`).

    Why stock processors are kept rather than re-implemented: each call runs the layer's own
    stock processor — projections, norms, rotary embeddings, the text/image concatenation, output
    projections all exactly as stock — inside a ``TorchFunctionMode`` that answers its one
    self/joint-attention SDPA call (directly or through ``dispatch_attention_fn``'s native backends)
    with :func:`sparse_video_attention` on the very q, k, v that SDPA would get. Layers that are not
    self/joint attention over a grid (Wan's cross-attention, HunyuanVideo's token refiner) run
    their stock processor untouched; a layer that never reaches SDPA (a non-native attention backend)
    raises :class:`~visattn.errors.UnsupportedModelError`. The attention itself,
    :func:`sparse_video_attention`, is a plain function of ``[B, H, N, D]`` tensors and a layout; it also
    serves as a diffusers attention backend (:mod:`visattn.processors.sparse_video.backend`, the way to
    run under context parallelism). Under ``torch.compile`` it adds no graph break from torch 2.14 on; dynamo
    before 2.14 (tested: 2.11) breaks on Tensor methods called inside the ``TorchFunctionMode``, where the
    attention backend compiles whole (README, "Fast paths").
    """

    method = "sparse_video"
    other_ways = ", or install='attention_backend'"

    def __init__(self, model: nn.Module, *, patcher: Patcher | None = None, config: SparseVideoConfig | None = None,
                 **options: Any) -> None:
        self.config = SparseVideoConfig.resolve(config, options)
        super().__init__(model, patcher)

    def setup(self) -> None:
        self._schedule = SparseVideoSchedule(self._model, self.config, self._patcher)

    def sparse_layers(self) -> list[int]:
        """Indices (in attention-layer order) of the layers whose attention this processor makes sparse."""
        return sorted(self._schedule.eligible)

    def run(self, layer: StockLayer, attn: nn.Module, hidden_states: Tensor, kwargs: dict[str, Any]) -> Any:
        if self._schedule.layout(layer.index, None, hidden_states.device) is None:
            return layer.stock(attn, hidden_states, **kwargs)
        mode = _sparse_sdpa(lambda n: self._schedule.layout(layer.index, n, hidden_states.device), self.config)
        return self.run_answered(layer, attn, hidden_states, kwargs, mode)
