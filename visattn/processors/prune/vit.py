"""``prune``: token pruning by attention importance.

``strategy="cls"`` is EViT (Liang et al., 2022, "Not All Patches are What You Need: Expediting
Vision Transformers via Token Reorganizations"): at the chosen blocks, between attention and MLP,
the image tokens are ranked by the head-averaged attention of the class token,
``a = mean_h softmax(q_cls k^T / sqrt(d))``, computed from ``q_cls`` and the keys alone (a
``[B, H, 1, N]`` product, never the full map); the ``ceil(keep * N_img)`` most attended image tokens
are kept in their order and the rest are fused into one token ``x_fused = sum_{i not kept} a_i x_i``
placed after them (:func:`visattn.core.merge.keep_top_and_fuse`). Prefix tokens (class, registers)
are always kept. Models without a class token are refused.

As for ``tome``, the stock modules keep running: :class:`PruneStep` is the block step that the timm
and open_clip adapters run between a block's attention and its MLP
(:func:`visattn.frameworks.base.step_blocks`, which also supplies q and k), and boolean key masks
(``[B, 1, 1, N]``, True = attend) follow the kept tokens. Works on timm ``VisionTransformer`` models
(DeiT distilled too: its class and distillation tokens are both kept), EVA-style timm models (rotary
embeddings: the keys are ranked rotated, as attention used them; kept tokens keep their rotary entries,
the fused token, which has no position, gets none), BEiT (the ranking includes its relative position
bias, which follows the kept tokens), NaFlexVit image batches with a class token and open_clip visual
towers.

Options: ``strategy`` ("cls"), ``keep`` (fraction of image tokens kept at each chosen block, in
(0, 1]; identity 1.0), ``layers`` (None = EViT's schedule: blocks depth/4, depth/2 and 3*depth/4,
i.e. 3, 6, 9 of 12). At ``keep=1.0`` every block runs its stock forward: bit-identical outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...core.merge import cls_attention, follow_origin, keep_top_and_fuse, key_mask, num_kept
from ...errors import ShapeError
from ...frameworks import Target
from ...frameworks.base import PerThread, step_blocks, vit_blocks
from ...patching import Handle, Patcher


class PruneStep:
    """The :class:`~visattn.frameworks.base.BlockStep` of ``prune`` on ViTs: which blocks prune, how much."""

    method, verb = "prune", "prune"

    def __init__(self, keep: float, num_prefix: int, layers: set[int]) -> None:
        self.keep = keep
        self.num_prefix = num_prefix
        self.layers = layers  # the blocks that prune (none at keep=1.0)

    def start(self, attn_mask: Tensor | None) -> PruneCall:
        return PruneCall(self, attn_mask)

    def captures(self, layer: int) -> bool:
        return layer in self.layers

    def prunes(self, num_tokens: int) -> bool:
        n_img = num_tokens - self.num_prefix
        return num_kept(self.keep, n_img) < n_img


class PruneCall:
    """What one forward carries from block to block (a :class:`~visattn.frameworks.base.StepCall`): the key
    mask of the current tokens."""

    def __init__(self, prune: PruneStep, attn_mask: Tensor | None) -> None:
        self.prune = prune
        self.current_mask = attn_mask
        self.origin: Tensor | None = None
        self.token_counts: list[int] = []

    def stock(self, layer: int, num_tokens: int) -> bool:
        return not (layer in self.prune.layers and self.prune.prunes(num_tokens))

    def mask(self, dtype: torch.dtype) -> Tensor | None:
        return self.current_mask

    def step(self, layer: int, x: Tensor, branch: Tensor, q: Tensor | None, k: Tensor | None, scale: float,
             bias: Tensor | None = None) -> Tensor:
        """Keep the most attended image tokens of ``x + branch`` ``[B, N, C]``, fuse the rest (EViT); the class
        token's attention includes the layer's ``bias``."""
        x = x + branch
        n, num_prefix = x.shape[1], self.prune.num_prefix
        valid = None
        if self.current_mask is not None:
            try:
                valid = key_mask(self.current_mask, x.shape[0], n)
            except ShapeError as exc:
                raise ShapeError(f"prune: {exc}") from None
        bias = None if bias is None else bias[:, :, :1]
        if valid is not None:
            padding = torch.zeros(valid.shape, device=x.device).masked_fill(~valid, float("-inf"))[:, None, None, :]
            bias = padding if bias is None else bias + padding
        importance = cls_attention(q[:, :, :1], k, scale, bias)[:, num_prefix:]
        select = keep_top_and_fuse(importance, num_kept(self.prune.keep, n - num_prefix), num_prefix=num_prefix)
        if valid is not None:
            self.current_mask = (select(valid[..., None].float())[..., 0] > 0)[:, None, None, :]
        kept = getattr(select, "kept", None)  # (not hasattr: dynamo before torch 2.14 answers it False)
        if kept is not None:  # the fused token has no position: origin -1
            prefix = torch.arange(num_prefix, device=x.device).expand(x.shape[0], -1)
            origin = follow_origin(self.origin, torch.cat([prefix, kept + num_prefix], dim=1), n)
            self.origin = torch.cat([origin, origin.new_full((x.shape[0], 1), -1)], dim=1)
        return select(x)


class PruneHandle(Handle):
    """Handle of ``prune``; ``token_counts`` lists the tokens entering each block in the last forward (this
    thread's, or, read from a thread that ran none, any thread's)."""

    def __init__(self, *args: Any, calls: PerThread[PruneCall], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._calls = calls

    @property
    def token_counts(self) -> list[int]:
        return list(self._calls.latest().token_counts)


def install(target: Target, patcher: Patcher, options: dict[str, Any]) -> PruneHandle:
    """``prune`` (EViT) on a timm ViT or open_clip visual tower: :class:`PruneStep` in every block."""
    depth = len(vit_blocks(target))
    chosen = options["layers"]
    if chosen is None:
        chosen = sorted({depth // 4, depth // 2, 3 * depth // 4})
    model = target.model
    layers = set(chosen) if options["keep"] < 1.0 else set()
    prune = PruneStep(options["keep"], int(getattr(model, "num_prefix_tokens", 1)), layers)
    return PruneHandle("prune", model, options, patcher, calls=step_blocks(target, patcher, prune))
