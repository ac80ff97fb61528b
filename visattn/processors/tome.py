"""``tome``: Token Merging (ToMe; Bolya et al., 2023, "Token Merging: Your ViT But Faster").

In every block, between attention and MLP, bipartite soft matching on the keys averaged over
heads merges ``r`` pairs of similar image tokens into their size-weighted average
(``x_G = sum_i s_i x_i / s_G``, ``s_G = sum_i s_i``; :mod:`visattn.core.merge`), so the MLP and all
later blocks run on fewer tokens. Later attention layers use proportional attention,
``softmax(q k^T / sqrt(d) + log s)``: the ``log s`` row goes into the fused SDPA kernel as an
additive float mask, never through a materialised attention map. On CUDA each merge is two Triton
launches (decide, average; :mod:`visattn.kernels.tome`) with no host synchronisation, so merging
costs less than it saves (ViT-B/16 r=13: 1.44x stock timm on an H100, see BENCHMARKS.md) and the
patched model captures in a CUDA graph. Prefix tokens (class, registers:
``num_prefix_tokens``) are never merged, and the token count left for the head stays valid.

Unlike the reference implementation, the stock block and attention modules keep running: the
block's class is swapped for a subclass that only adds the merge step, so LayerScale, q/k norms,
register tokens, dynamic image sizes and boolean key masks (``[B, 1, 1, N]``, True = attend;
padding tokens are never merged) keep working; the keys come from a hook on the attention's
``k_norm``. Works on timm ``VisionTransformer`` models (ViT, DeiT3, DINOv2-style with registers)
and open_clip visual towers (``nn.MultiheadAttention``, replaced in merging blocks by the same
projections through fused SDPA). EVA-style timm models (``timm.models.eva``) are refused: their
rotary position embeddings are laid out per patch position, which a merged token no longer has.

Options: ``r`` (tokens removed per layer: an int, an ``(r, inflect)`` pair or a per-layer list;
identity 0), ``prop_attn`` (True), ``trace_source`` (False: record which patches each token holds,
``handle.source``). Blocks that have nothing to merge and see unmerged tokens run the stock forward,
so ``r=0`` reproduces the stock model bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core.merge import key_mask, log_size_bias, merge_wavg, parse_r
from ..errors import OptionError, ShapeError, UnsupportedModelError
from ..frameworks import Target
from ..frameworks.base import vit_blocks
from ..kernels.tome import bipartite_soft_matching
from ..options import Option, bool_option
from ..patching import Handle, Patcher
from ..registry import Method, register
from . import tome_diffusers


def _check_r(v: Any) -> int | tuple[int, float] | list[int]:
    def is_r(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if is_r(v):
        return v
    if isinstance(v, tuple) and len(v) == 2 and is_r(v[0]) and isinstance(v[1], (int, float)) \
            and not isinstance(v[1], bool) and -1 <= v[1] <= 1:
        return (v[0], float(v[1]))
    if isinstance(v, list) and all(is_r(x) for x in v):
        return list(v)
    raise ValueError


class TomeState:
    """What one forward pass carries from block to block: sizes, sources, the key mask."""

    def __init__(self, schedule: list[int], num_prefix: int, prop_attn: bool, trace_source: bool,
                 strict: bool = False) -> None:
        self.schedule = schedule
        self.num_prefix = num_prefix
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.strict = strict
        self.start(None)

    def start(self, attn_mask: Tensor | None) -> None:
        self.mask = attn_mask
        self.valid: Tensor | None = None
        self.size: Tensor | None = None
        self.source: Tensor | None = None
        self.keys: Tensor | None = None
        self.token_counts: list[int] = []

    @property
    def merged(self) -> bool:
        return self.size is not None

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """The mask for the next attention: the caller's until tokens merge, then log-size and keys."""
        if not self.merged:
            return self.mask
        if not self.prop_attn:
            return None if self.valid is None else self.valid[:, None, None, :]
        bias = log_size_bias(self.size, dtype)
        return bias if self.valid is None else bias.masked_fill(~self.valid[:, None, None, :], -math.inf)

    def merge(self, x: Tensor, keys: Tensor, r: int) -> Tensor:
        """Merge ``r`` tokens of ``x`` ``[B, N, C]`` by the head-averaged ``keys`` ``[B, H, N, D]``."""
        batch, n, _ = x.shape
        if self.mask is not None and self.valid is None:
            try:
                self.valid = key_mask(self.mask, x.shape[0], n)
            except ValueError as exc:
                raise ValueError(f"tome: {exc}") from None
        merge, _ = bipartite_soft_matching(keys.mean(dim=1), r, num_prefix=self.num_prefix, size=self.size,
                                           mergeable=self.valid, strict=self.strict)
        if self.trace_source:
            if self.source is None:
                self.source = torch.eye(n, device=x.device)[None].expand(batch, n, n)
            self.source = merge(self.source, "sum")
        if self.valid is not None:
            self.valid = merge(self.valid[..., None].float(), "sum")[..., 0] > 0
        x, self.size = merge_wavg(merge, x, self.size)
        return x


class TomeHandle(Handle):
    """Handle of ``tome``. After a forward pass:

    - ``token_counts``: the number of tokens entering each block;
    - ``size``: ``[B, N]`` how many patches each final token holds (``None`` if nothing merged);
    - ``source``: ``[B, N, N0]`` bool, ``source[b, j, i]`` is True when final token ``j`` holds input
      token ``i`` (``trace_source=True`` only; ``None`` if nothing merged).
    """

    def __init__(self, *args: Any, state: TomeState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state = state

    @property
    def token_counts(self) -> list[int]:
        return list(self._state.token_counts)

    @property
    def size(self) -> Tensor | None:
        return self._state.size

    @property
    def source(self) -> Tensor | None:
        return None if self._state.source is None else self._state.source > 0


@functools.cache
def _subclass(base: type, forward: Callable[..., Tensor]) -> type:
    return type(f"Tome{base.__name__}", (base,), {"forward": forward, "_visattn_base": base})


def _timm_forward(self: Any, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    state: TomeState = self._visattn_tome
    layer: int = self._visattn_layer
    if layer == 0:
        state.start(attn_mask)
    state.token_counts.append(x.shape[1])
    r = state.schedule[layer]
    if r == 0 and not state.merged:
        return self._visattn_base.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    if is_causal:
        raise ShapeError("tome: causal attention cannot follow merged tokens")
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=state.attn_bias(x.dtype))))
    if r > 0:
        keys, state.keys = state.keys, None
        x = state.merge(x, keys, r)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _open_clip_forward(self: Any, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                       attn_mask: Tensor | None = None) -> Tensor:
    from ..frameworks.open_clip import mha_self_attention

    state: TomeState = self._visattn_tome
    layer: int = self._visattn_layer
    if layer == 0:
        state.start(None)
    batch_first = self.attn.batch_first
    state.token_counts.append(q_x.shape[1 if batch_first else 0])
    r = state.schedule[layer]
    if r == 0 and not state.merged:
        return self._visattn_base.forward(self, q_x, k_x, v_x, attn_mask)
    if k_x is not None or v_x is not None or attn_mask is not None:
        raise ShapeError("tome: open_clip blocks merge tokens in self-attention without attn_mask only")
    x = q_x if batch_first else q_x.transpose(0, 1)
    out, _, keys = mha_self_attention(self.attn, self.ln_1(x), state.attn_bias(x.dtype))
    x = x + self.ls_1(out)
    if r > 0:
        x = state.merge(x, keys, r)
    x = x + self.ls_2(self.mlp(self.ln_2(x)))
    return x if batch_first else x.transpose(0, 1)


@register
class Tome(Method):
    name = "tome"
    summary = "merge similar tokens between attention and MLP (bipartite soft matching, proportional attention)"
    paper = "Bolya et al., 2023, 'Token Merging: Your ViT But Faster' (ICLR 2023)"
    frameworks = ("timm", "open_clip", "diffusers")
    families = {"timm": ("VisionTransformer",), "open_clip": ("VisionTransformer",),
                "diffusers": tome_diffusers.FAMILIES}
    options = tuple(o.scoped(frameworks=("timm", "open_clip")) for o in (
        Option("r", 8, "an int >= 0, an (r, inflect) pair with inflect in [-1, 1], or a list of ints >= 0",
               _check_r, identity=0, doc="tokens removed per layer (clamped to half the image tokens)"),
        bool_option("prop_attn", True, doc="proportional attention: add log(token size) to attention logits"),
        bool_option("trace_source", False, doc="record which patches each token holds (handle.source)"),
        bool_option("strict", False, doc="raise instead of falling back from the merge kernels to PyTorch"),
    )) + tome_diffusers.OPTIONS  # diffusers UNets and DiTs: ToMe for Stable Diffusion (tome_diffusers)

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        if target.framework == "diffusers":
            super().check_target(target, options)
            return tome_diffusers.check(target, options)
        if target.framework == "timm" and target.family == "Eva":
            raise UnsupportedModelError(
                "tome does not support EVA-style timm models (timm.models.eva.Eva): their rotary position "
                "embeddings are laid out per patch position, which merged tokens no longer have; supported "
                "timm models: VisionTransformer (ViT, DeiT3, DINOv2-style with registers)")
        super().check_target(target, options)
        depth = len(vit_blocks(target))
        if isinstance(options["r"], list) and len(options["r"]) > depth:
            raise OptionError(f"tome: r lists {len(options['r'])} layers but this {target.family} has {depth} blocks")

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> Handle:
        if target.framework == "diffusers":
            return tome_diffusers.install(target, patcher, options)
        blocks = vit_blocks(target)
        schedule = parse_r(options["r"], len(blocks))
        model = target.model
        num_prefix = int(getattr(model, "num_prefix_tokens", 1))  # open_clip towers: the class token
        state = TomeState(schedule, num_prefix, options["prop_attn"], options["trace_source"], options["strict"])
        forward = _timm_forward if target.framework == "timm" else _open_clip_forward
        for layer, block in enumerate(blocks):
            patcher.set_attr(block, "_visattn_tome", state)
            patcher.set_attr(block, "_visattn_layer", layer)
            patcher.swap_class(block, _subclass(type(block), forward))
            if schedule[layer] > 0 and target.framework == "timm":
                def keep_keys(module: Any, args: tuple, out: Tensor) -> None:
                    state.keys = out

                patcher.add_hook(block.attn.k_norm.register_forward_hook(keep_keys))
        return TomeHandle(self.name, model, options, patcher, state=state)
