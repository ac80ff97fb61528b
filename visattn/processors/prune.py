"""``prune``: token pruning by attention importance.

``strategy="cls"`` is EViT (Liang et al., 2022, "Not All Patches are What You Need: Expediting
Vision Transformers via Token Reorganizations"): at the chosen blocks, between attention and MLP,
the image tokens are ranked by the head-averaged attention of the class token,
``a = mean_h softmax(q_cls k^T / sqrt(d))``, computed from ``q_cls`` and the keys alone (a
``[B, H, 1, N]`` product, never the full map); the ``ceil(keep * N_img)`` most attended image tokens
are kept in their order and the rest are fused into one token ``x_fused = sum_{i not kept} a_i x_i``
placed after them (:func:`visattn.core.merge.keep_top_and_fuse`). Prefix tokens (class, registers)
are always kept. Models without a class token are refused.

As for ``tome``, the stock modules keep running: the block's class is swapped for a subclass that
adds the selection step, q and k come from hooks on the attention's ``q_norm``/``k_norm`` (timm) or
from the layer's own projections through fused SDPA (open_clip), and boolean key masks
(``[B, 1, 1, N]``, True = attend) follow the kept tokens. Works on timm ``VisionTransformer`` models
and open_clip visual towers.

Options: ``strategy`` ("cls"), ``keep`` (fraction of image tokens kept at each chosen block, in
(0, 1]; identity 1.0), ``layers`` (None = EViT's schedule: blocks depth/4, depth/2 and 3*depth/4,
i.e. 3, 6, 9 of 12). At ``keep=1.0`` every block runs its stock forward: bit-identical outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core.merge import cls_attention, keep_top_and_fuse, key_mask, num_kept
from ..errors import OptionError, ShapeError, UnsupportedModelError
from ..frameworks import Target
from ..frameworks.base import select_layers, vit_blocks
from ..options import choice_option, float_option, int_option, layers_option
from ..patching import Handle, Patcher
from ..registry import Method, register


class PruneState:
    """What one forward pass carries from block to block: the key mask of the current tokens."""

    def __init__(self, keep: float, num_prefix: int) -> None:
        self.keep = keep
        self.num_prefix = num_prefix
        self.start(None)

    def start(self, attn_mask: Tensor | None) -> None:
        self.mask = attn_mask
        self.pruned = False
        self.q: Tensor | None = None
        self.k: Tensor | None = None
        self.token_counts: list[int] = []

    def prunes(self, num_tokens: int) -> bool:
        n_img = num_tokens - self.num_prefix
        return num_kept(self.keep, n_img) < n_img

    def prune(self, x: Tensor, q: Tensor, k: Tensor, scale: float) -> Tensor:
        """Keep the most attended image tokens of ``x`` ``[B, N, C]``, fuse the rest (EViT)."""
        n = x.shape[1]
        valid = None
        if self.mask is not None:
            try:
                valid = key_mask(self.mask, x.shape[0], n)
            except ValueError as exc:
                raise ValueError(f"prune: {exc}") from None
        bias = None if valid is None else torch.zeros(valid.shape, device=x.device).masked_fill(
            ~valid, float("-inf"))[:, None, None, :]
        importance = cls_attention(q[:, :, :1], k, scale, bias)[:, self.num_prefix:]
        select = keep_top_and_fuse(importance, num_kept(self.keep, n - self.num_prefix), num_prefix=self.num_prefix)
        if valid is not None:
            self.mask = (select(valid[..., None].float())[..., 0] > 0)[:, None, None, :]
        self.pruned = True
        return select(x)


class PruneHandle(Handle):
    """Handle of ``prune``; ``token_counts`` lists the tokens entering each block in the last call."""

    def __init__(self, *args: Any, state: PruneState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = state

    @property
    def token_counts(self) -> list[int]:
        return list(self._state.token_counts)


@functools.cache
def _subclass(base: type, forward: Callable[..., Tensor]) -> type:
    return type(f"Prune{base.__name__}", (base,), {"forward": forward, "_visattn_base": base})


def _timm_forward(self: Any, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    state: PruneState = self._visattn_prune
    if self._visattn_layer == 0:
        state.start(attn_mask)
    state.token_counts.append(x.shape[1])
    mask = state.mask if state.pruned else attn_mask
    if not (self._visattn_prune_here and state.prunes(x.shape[1])):
        return self._visattn_base.forward(self, x, attn_mask=mask, is_causal=is_causal)
    if is_causal:
        raise ShapeError("prune: causal attention cannot follow pruned tokens")
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=mask)))
    q, k, state.q, state.k = state.q, state.k, None, None
    x = state.prune(x, q, k, self.attn.scale)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _open_clip_forward(self: Any, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                       attn_mask: Tensor | None = None) -> Tensor:
    from ..frameworks.open_clip import mha_self_attention

    state: PruneState = self._visattn_prune
    if self._visattn_layer == 0:
        state.start(None)
    batch_first = self.attn.batch_first
    n = q_x.shape[1 if batch_first else 0]
    state.token_counts.append(n)
    if not (self._visattn_prune_here and state.prunes(n)):
        return self._visattn_base.forward(self, q_x, k_x, v_x, attn_mask)
    if k_x is not None or v_x is not None or attn_mask is not None:
        raise ShapeError("prune: open_clip blocks prune tokens in self-attention without attn_mask only")
    x = q_x if batch_first else q_x.transpose(0, 1)
    out, q, k = mha_self_attention(self.attn, self.ln_1(x))
    x = x + self.ls_1(out)
    x = state.prune(x, q, k, q.shape[-1] ** -0.5)
    x = x + self.ls_2(self.mlp(self.ln_2(x)))
    return x if batch_first else x.transpose(0, 1)


@register
class Prune(Method):
    name = "prune"
    summary = ("drop the least important image tokens: EViT on ViTs (fused into one token); FastV, VTC-CLS, "
               "STAR, PLPHP, TransPrune on vision-language models (removed from sequence and KV cache)")
    paper = ("strategy 'cls': Liang et al., 2022, 'Not All Patches are What You Need: Expediting Vision "
             "Transformers via Token Reorganizations' (EViT, ICLR 2022); on transformers vision-language models "
             "FastV, VTC-CLS, STAR, PLPHP and TransPrune (visattn.processors.prune_vlm)")
    frameworks = ("timm", "open_clip", "transformers")
    families = {"timm": ("VisionTransformer",), "open_clip": ("VisionTransformer",)}
    options = (
        choice_option("strategy", "cls", ("cls", "fastv", "star", "plphp", "transprune"),
                      doc="how tokens are ranked: 'cls' = [CLS] attention (EViT; VTC-CLS on LLaVA); the others "
                          "are for transformers vision-language models (see visattn.processors.prune_vlm)"),
        float_option("keep", 0.7, low=0.0, high=1.0, low_open=True, identity=1.0,
                     doc="fraction of image tokens kept at each chosen block"),
        layers_option("layers", None, doc="blocks that prune (None: depth/4, depth/2, 3*depth/4, as EViT)"),
        int_option("layer", None, low=0, allow_none=True,
                   doc="transformers: decoder layer before which tokens are dropped (None: 2, as FastV; star: L/2)"),
        layers_option("ensemble_layers", None,
                      doc="transformers, cls/star: vision-tower layers whose [CLS] attention is averaged "
                          "(None: the layer feeding the projector)"),
    )

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        super().check_target(target, options)
        if target.framework == "transformers":
            from . import prune_vlm

            return prune_vlm.check_target(target, options)
        if options["strategy"] != "cls" or options["layer"] is not None or options["ensemble_layers"] is not None:
            raise OptionError(f"prune: on {target.framework} models only strategy 'cls' with options keep and layers "
                              f"applies; strategy {options['strategy']!r}, layer and ensemble_layers are for "
                              f"transformers vision-language models")
        blocks = vit_blocks(target)
        select_layers([str(i) for i in range(len(blocks))], options["layers"], self.name)
        if target.framework == "timm" and getattr(target.model, "cls_token", None) is None:
            raise UnsupportedModelError(
                f"prune: strategy 'cls' ranks tokens by [CLS] attention, and this {target.family} has no class "
                f"token (class_token=False)")

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> Handle:
        if target.framework == "transformers":
            from . import prune_vlm

            return prune_vlm.install(target, patcher, options)
        blocks = vit_blocks(target)
        depth = len(blocks)
        chosen = options["layers"]
        if chosen is None:
            chosen = sorted({depth // 4, depth // 2, 3 * depth // 4})
        model = target.model
        state = PruneState(options["keep"], int(getattr(model, "num_prefix_tokens", 1)))
        forward = _timm_forward if target.framework == "timm" else _open_clip_forward
        for layer, block in enumerate(blocks):
            prune_here = layer in chosen and options["keep"] < 1.0
            patcher.set_attr(block, "_visattn_prune", state)
            patcher.set_attr(block, "_visattn_layer", layer)
            patcher.set_attr(block, "_visattn_prune_here", prune_here)
            patcher.swap_class(block, _subclass(type(block), forward))
            if prune_here and target.framework == "timm":
                def keep_q(module: Any, args: tuple, out: Tensor) -> None:
                    state.q = out

                def keep_k(module: Any, args: tuple, out: Tensor) -> None:
                    state.k = out

                patcher.add_hook(block.attn.q_norm.register_forward_hook(keep_q))
                patcher.add_hook(block.attn.k_norm.register_forward_hook(keep_k))
        return PruneHandle(self.name, model, options, patcher, state=state)
