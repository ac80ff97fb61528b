"""``prune``: token pruning by attention importance.

``strategy="cls"`` is EViT (Liang et al., 2022, "Not All Patches are What You Need: Expediting
Vision Transformers via Token Reorganizations"): at the chosen blocks, between attention and MLP,
the image tokens are ranked by the head-averaged attention of the class token,
``a = mean_h softmax(q_cls k^T / sqrt(d))``, computed from ``q_cls`` and the keys alone (a
``[B, H, 1, N]`` product, never the full map); the ``ceil(keep * N_img)`` most attended image tokens
are kept in their order and the rest are fused into one token ``x_fused = sum_{i not kept} a_i x_i``
placed after them (:func:`visattn.core.merge.keep_top_and_fuse`). Prefix tokens (class, registers)
are always kept. Models without a class token are refused.

As for ``tome``, the stock modules keep running: :class:`PruneState` is the block step that the timm
and open_clip adapters run between a block's attention and its MLP
(:func:`visattn.frameworks.base.step_blocks`, which also supplies q and k), and boolean key masks
(``[B, 1, 1, N]``, True = attend) follow the kept tokens. Works on timm ``VisionTransformer`` models
and open_clip visual towers.

Options: ``strategy`` ("cls"), ``keep`` (fraction of image tokens kept at each chosen block, in
(0, 1]; identity 1.0), ``layers`` (None = EViT's schedule: blocks depth/4, depth/2 and 3*depth/4,
i.e. 3, 6, 9 of 12). At ``keep=1.0`` every block runs its stock forward: bit-identical outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...core.merge import cls_attention, keep_top_and_fuse, key_mask, num_kept
from ...errors import ShapeError
from ...frameworks import Target
from ...frameworks.base import step_blocks, vit_blocks
from ...patching import Handle, Patcher


class PruneState:
    """The :class:`~visattn.frameworks.base.BlockStep` of ``prune`` on ViTs, and what one forward carries
    from block to block: the key mask of the current tokens."""

    method, verb = "prune", "prune"

    def __init__(self, keep: float, num_prefix: int, layers: set[int]) -> None:
        self.keep = keep
        self.num_prefix = num_prefix
        self.layers = layers  # the blocks that prune (none at keep=1.0)
        self.start(None)

    def start(self, attn_mask: Tensor | None) -> None:
        self.current_mask = attn_mask
        self.token_counts: list[int] = []

    def captures(self, layer: int) -> bool:
        return layer in self.layers

    def stock(self, layer: int, num_tokens: int) -> bool:
        return not (layer in self.layers and self.prunes(num_tokens))

    def mask(self, dtype: torch.dtype) -> Tensor | None:
        return self.current_mask

    def step(self, layer: int, x: Tensor, q: Tensor | None, k: Tensor | None, scale: float) -> Tensor:
        return self.prune(x, q, k, scale)

    def prunes(self, num_tokens: int) -> bool:
        n_img = num_tokens - self.num_prefix
        return num_kept(self.keep, n_img) < n_img

    def prune(self, x: Tensor, q: Tensor, k: Tensor, scale: float) -> Tensor:
        """Keep the most attended image tokens of ``x`` ``[B, N, C]``, fuse the rest (EViT)."""
        n = x.shape[1]
        valid = None
        if self.current_mask is not None:
            try:
                valid = key_mask(self.current_mask, x.shape[0], n)
            except ShapeError as exc:
                raise ShapeError(f"prune: {exc}") from None
        bias = None if valid is None else torch.zeros(valid.shape, device=x.device).masked_fill(
            ~valid, float("-inf"))[:, None, None, :]
        importance = cls_attention(q[:, :, :1], k, scale, bias)[:, self.num_prefix:]
        select = keep_top_and_fuse(importance, num_kept(self.keep, n - self.num_prefix), num_prefix=self.num_prefix)
        if valid is not None:
            self.current_mask = (select(valid[..., None].float())[..., 0] > 0)[:, None, None, :]
        return select(x)


class PruneHandle(Handle):
    """Handle of ``prune``; ``token_counts`` lists the tokens entering each block in the last call."""

    def __init__(self, *args: Any, state: PruneState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = state

    @property
    def token_counts(self) -> list[int]:
        return list(self._state.token_counts)


def install(target: Target, patcher: Patcher, options: dict[str, Any]) -> PruneHandle:
    """``prune`` (EViT) on a timm ViT or open_clip visual tower: :class:`PruneState` in every block."""
    depth = len(vit_blocks(target))
    chosen = options["layers"]
    if chosen is None:
        chosen = sorted({depth // 4, depth // 2, 3 * depth // 4})
    model = target.model
    layers = set(chosen) if options["keep"] < 1.0 else set()
    state = PruneState(options["keep"], int(getattr(model, "num_prefix_tokens", 1)), layers)
    step_blocks(target, patcher, state)
    return PruneHandle("prune", model, options, patcher, state=state)
