"""Which attention layers of a diffusers model run ``sparse_video`` in the current call: :class:`SparseVideoSchedule`,
which both installations (processor and attention backend) ask.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...core.layout import TokenLayout
from ...errors import ShapeError, UnsupportedModelError
from ...frameworks.base import memo
from ...patching import Patcher
from .config import FAMILIES, SparseVideoConfig
from .routing import geometry, is_dense


class SparseVideoSchedule:
    """Which attention layers of one diffusers model run sparse in the current call, and with what token layout.

    Both installations of ``sparse_video`` — :class:`SparseVideoAttnProcessor` and the attention backend
    (:mod:`visattn.processors.sparse_video.backend`) — ask it, because neither a processor call nor a backend
    call carries the token grid, the denoising step or the layer index. Construction checks the model family
    and the tile, and installs :func:`visattn.frameworks.diffusers.install_context` (hooks undone by
    ``patcher``): the grid and text length of each denoiser call, the running attention layer, the timestep.
    """

    def __init__(self, model: nn.Module, config: SparseVideoConfig, patcher: Patcher) -> None:
        from ...frameworks import diffusers as fw

        family = type(model).__name__
        if family not in FAMILIES:
            raise UnsupportedModelError(f"sparse_video does not support the diffusers model {family}; supported: "
                                        f"{', '.join(FAMILIES)}")
        rank = fw.family_of(model).rank
        if config.tile is not None and len(config.tile) != rank:
            raise ShapeError(f"sparse_video: tile {config.tile} cannot cover the {rank}D token grid of "
                             f"{family}; give a tile with {rank} sides")
        windows = () if config.window is None else (
            config.window if isinstance(config.window[0], tuple) else (config.window,))
        if any(len(w) != rank for w in windows):
            raise ShapeError(f"sparse_video: window {config.window} does not match the {rank}D token grid of "
                             f"{family}; give windows of {rank} sides")
        self.config = config
        self._grids = fw.layer_grids(model)
        self._layouts: dict[tuple, TokenLayout] = {}
        self.eligible: dict[int, int] = {}  # layer index -> position among the layers sparse attention may replace
        for index, ((name, module), kind) in enumerate(zip(fw.attention_layers(model), fw.layer_kinds(model))):
            if kind == "self":
                self.eligible[index] = len(self.eligible)
                heads = getattr(module, "heads", None)
                if len(windows) > 1 and heads is not None and len(windows) != heads:
                    raise ShapeError(f"sparse_video: window gives {len(windows)} per-head windows, and attention "
                                     f"layer {name} has {heads} heads; give one window, or one per head")
        self._contexts = fw.install_context(model, patcher)  # one per thread

    @property
    def running_layer(self) -> int | None:
        """Index of the attention layer running now in this thread (``None`` outside attention layers)."""
        return self._contexts.get().layer

    def layout(self, index: int, num_tokens: int | None, device: torch.device) -> TokenLayout | None:
        """The token layout of layer ``index``'s sequence of ``num_tokens`` tokens (``None``: the grid alone) in the
        current call if it runs sparse now, else ``None``.

        ``None``: not self/joint attention over a grid, no denoiser call seen, a dense layer or step of the
        schedule, or an identity setting on this call's geometry (so that stock attention runs bit for bit).
        """
        eligible = self.eligible.get(index)
        ctx = self._contexts.get()
        extra = ctx.extra
        if (eligible is None or extra is None or eligible < self.config.dense_layers
                or (self.config.dense_steps and ctx.denoising_step() < self.config.dense_steps)):
            return None
        grid = tuple(extra["grid"])
        rule = self._grids[index]
        layout = memo(self._layouts, (index, grid, num_tokens),
                      lambda: rule.layout(grid, num_tokens or math.prod(rule.grid(grid))))
        geo = geometry(tuple(layout.grid), layout.grid_start, layout.num_tokens, self.config.tile_for(layout.grid),
                       device)
        return None if is_dense(self.config, geo) else layout
