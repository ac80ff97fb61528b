"""Attention recall: the share of dense attention mass that a routing decision keeps (a quality measure).

For each grid query, recall is the softmax mass of dense attention that falls on the keys its block
visits (the routed grid blocks and the always-attended text keys); 1 means the sparse output equals the
dense one. It needs the dense attention matrix, so it is meant for the testbed's sizes (thousands of
tokens), not for Wan at 32K tokens. :func:`attention_recall` measures it on given q and k;
:class:`RecallMeter` on the self-attention layers of a stock diffusers model as it runs (the routing each
config would choose on the stock model's own q and k, e.g. along a stock sampling trajectory).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ...core.attention import per_query_head
from ...core.layout import TokenLayout
from ...errors import UnsupportedModelError
from ...patching import Patcher
from .config import FAMILIES, SparseVideoConfig
from .permutation import permute_grid
from .routing import geometry, route_blocks
from .schedule import SparseVideoSchedule


def attention_recall(q: Tensor, k: Tensor, layout: TokenLayout, config: SparseVideoConfig, *,
                     scale: float | None = None) -> Tensor:
    """Mean recall of the grid queries of ``q``, ``k`` ``[B, H, N, D]`` (laid out as ``layout``) per sample and
    head, ``[B, H]`` float32, under ``config``'s routing (without an attention mask)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    geo = geometry(tuple(layout.grid), layout.grid_start, q.shape[2], config.tile_for(layout.grid), q.device)
    ng, nb = geo.num_grid, geo.num_blocks
    k = per_query_head(k, q.shape[1], "attention_recall")
    with torch.no_grad():
        qp, kp = (t.index_select(2, geo.perm) for t in (q, k))
        qg = qp[:, :, :ng]
        if config.permute != "none":
            _, qg, (kp,) = permute_grid(config.permute, qg, (kp,), geo.block, scale)
        kg = kp[:, :, :ng]
        idx, cnt = route_blocks(qg, kg, config, geo, scale)
        b, h = q.shape[:2]
        idx, cnt = idx.expand(b, h, *idx.shape[2:]).long(), cnt.expand(b, h, nb)
        listed = torch.arange(idx.shape[-1], device=q.device) < cnt[..., None]
        kept = torch.zeros(b, h, nb, nb + 1, device=q.device)
        kept.scatter_(-1, torch.where(listed, idx, nb), 1.0)
        p = torch.matmul(qg.float() * scale, kp.float().transpose(-1, -2))
        p = p.softmax(-1)
        block_of = torch.arange(ng, device=q.device) // geo.block
        per_block = torch.zeros(b, h, ng, nb, device=q.device).index_add_(-1, block_of, p[..., :ng])
        recall = (per_block * kept[:, :, block_of, :nb]).sum(-1) + p[..., ng:].sum(-1)
    return recall.mean(-1)


class RecallMeter:
    """The mean :func:`attention_recall` of several routing configs on a stock diffusers model's self-attention.

    ``with RecallMeter(model, {"keep=0.25": config, ...}) as meter:`` then run the model (stock: the meter only
    observes, nothing is changed); ``meter.means()`` gives each label's recall averaged over every observed
    self-attention call, head and sample (the first ``samples`` samples of each call). A call that a config's
    schedule runs dense (``dense_steps``, ``dense_layers``, an identity setting; :class:`SparseVideoSchedule`)
    counts as recall 1. The model must be of a family ``sparse_video`` supports and its self-attention must call
    SDPA (the stock processors do).
    """

    def __init__(self, model: nn.Module, configs: Mapping[str, SparseVideoConfig], samples: int = 1) -> None:
        if type(model).__name__ not in FAMILIES:
            raise UnsupportedModelError(f"RecallMeter: {type(model).__name__} is not a family sparse_video supports "
                                        f"({', '.join(FAMILIES)})")
        if samples < 1:
            raise ValueError(f"RecallMeter: samples must be >= 1 (got {samples})")
        self._model, self._configs, self._samples = model, dict(configs), samples
        self._sums = {label: 0.0 for label in self._configs}
        self._count = 0
        self._patcher: Patcher | None = None

    def __enter__(self) -> RecallMeter:
        from ...frameworks import diffusers as fw

        self._patcher = Patcher()
        schedules = {label: SparseVideoSchedule(self._model, c, self._patcher) for label, c in self._configs.items()}

        def observer(layer: int, q: Tensor, k: Tensor, scale: float, mask: Tensor | None) -> None:
            q, k = q[:self._samples], k[:self._samples]
            for label, schedule in schedules.items():
                layout = schedule.layout(layer, q.shape[2], q.device)
                self._sums[label] += (q.shape[0] * q.shape[1] if layout is None else float(
                    attention_recall(q, k, layout, schedule.config, scale=scale).sum()))
            self._count += q.shape[0] * q.shape[1]

        layers = sorted(next(iter(schedules.values())).eligible) if schedules else []
        fw.observe_attention(self._model, self._patcher, layers, observer)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._patcher is not None:
            self._patcher.undo()
            self._patcher = None

    def means(self) -> dict[str, float]:
        """Each label's recall averaged over the observed calls, heads and samples (NaN if none was observed)."""
        return {label: total / self._count if self._count else float("nan") for label, total in self._sums.items()}
