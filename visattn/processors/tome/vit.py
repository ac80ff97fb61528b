"""``tome``: Token Merging (ToMe; Bolya et al., 2023, "Token Merging: Your ViT But Faster").

In every block, between attention and MLP, bipartite soft matching on the keys averaged over
heads merges ``r`` pairs of similar image tokens into their size-weighted average
(``x_G = sum_i s_i x_i / s_G``, ``s_G = sum_i s_i``; :mod:`visattn.core.merge`), so the MLP and all
later blocks run on fewer tokens. Later attention layers use proportional attention,
``softmax(q k^T / sqrt(d) + log s)``: the ``log s`` row goes into the fused SDPA kernel as an
additive float mask, never through a materialised attention map. On CUDA each merge is two Triton
launches (decide, averaging the keys over heads as it reads them; average, reading the residual stream
and the attention branch and summing them as it reads, so the block's residual sum is never written
out; :mod:`visattn.kernels.tome`) with no host synchronisation, so merging costs less than it saves
(ViT-B/16 r=13: 1.44x stock timm on an H100, see BENCHMARKS.md) and the patched model captures in a
CUDA graph. Prefix tokens (class, registers: ``num_prefix_tokens``) are never merged, and the token
count left for the head stays valid.

Unlike the reference implementation, the stock block and attention modules keep running: the
timm and open_clip adapters run :class:`TomeStep`, the merge step, between each block's attention
and its MLP (:func:`visattn.frameworks.base.step_blocks`, which also supplies the keys), so
LayerScale, q/k norms, register tokens, dynamic image sizes and boolean key masks (``[B, 1, 1, N]``,
True = attend; padding tokens are never merged) keep working. Works on timm ``VisionTransformer``
models (ViT, DeiT3, DeiT distilled, DINOv2-style with registers), EVA-style timm models (EVA02,
DINOv3, PE, the RoPE ViTs: a group keeps the rotary entry of its destination, the token it merges
into, and the merge metric is the keys as attention used them, rotated), BEiT (its relative position
bias taken at the destinations, at the SDPA call), NaFlexVit image batches and open_clip visual towers
(``nn.MultiheadAttention``, replaced in merging blocks by the same projections through fused SDPA).

Options: ``r`` (tokens removed per layer: an int, an ``(r, inflect)`` pair or a per-layer list;
identity 0), ``prop_attn`` (True), ``trace_source`` (False: record which patches each token holds,
``handle.source``). Blocks that have nothing to merge and see unmerged tokens run the stock forward,
so ``r=0`` reproduces the stock model bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...core.merge import follow_origin, key_mask, log_size_bias, merge_wavg, parse_r
from ...errors import ShapeError
from ...frameworks import Target
from ...frameworks.base import PerThread, step_blocks, vit_blocks
from ...kernels.tome import bipartite_soft_matching
from ...patching import Handle, Patcher


class TomeStep:
    """The :class:`~visattn.frameworks.base.BlockStep` of ``tome`` on ViTs: the merge schedule and options."""

    method, verb = "tome", "merge"

    def __init__(self, schedule: list[int], num_prefix: int, prop_attn: bool, trace_source: bool,
                 strict: bool = False, beyond: int = 0) -> None:
        self.schedule = schedule  # r per block; blocks past its end remove ``beyond``
        self.beyond = beyond
        self.num_prefix = num_prefix
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.strict = strict

    def start(self, attn_mask: Tensor | None) -> TomeCall:
        return TomeCall(self, attn_mask)

    def r(self, layer: int) -> int:
        """Tokens block ``layer`` removes."""
        return self.schedule[layer] if layer < len(self.schedule) else self.beyond

    def captures(self, layer: int) -> bool:
        return self.r(layer) > 0


class TomeCall:
    """What one forward carries from block to block (a :class:`~visattn.frameworks.base.StepCall`): the
    tokens' sizes and sources, and the key mask."""

    def __init__(self, tome: TomeStep, attn_mask: Tensor | None) -> None:
        self.tome = tome
        self.given_mask = attn_mask
        self.valid: Tensor | None = None
        self.size: Tensor | None = None
        self.source: Tensor | None = None
        self.origin: Tensor | None = None
        self.token_counts: list[int] = []

    def stock(self, layer: int, num_tokens: int) -> bool:
        return self.tome.r(layer) == 0 and not self.merged

    def step(self, layer: int, x: Tensor, branch: Tensor, q: Tensor | None, k: Tensor | None, scale: float,
             bias: Tensor | None = None) -> Tensor:
        r = self.tome.r(layer)
        return self.merge(x, k, r, branch) if r > 0 else x + branch

    @property
    def merged(self) -> bool:
        return self.size is not None

    def mask(self, dtype: torch.dtype) -> Tensor | None:
        """The mask for the next attention: the caller's until tokens merge, then log-size and keys."""
        if not self.merged:
            return self.given_mask
        if not self.tome.prop_attn:
            return None if self.valid is None else self.valid[:, None, None, :]
        bias = log_size_bias(self.size, dtype)
        return bias if self.valid is None else bias.masked_fill(~self.valid[:, None, None, :], -math.inf)

    def merge(self, x: Tensor, keys: Tensor, r: int, branch: Tensor) -> Tensor:
        """Merge ``r`` tokens of ``x + branch`` ``[B, N, C]`` (the residual stream and the attention branch,
        summed inside the merge) by the head-averaged ``keys`` ``[B, H, N, D]``."""
        batch, n, _ = x.shape
        if self.given_mask is not None and self.valid is None:
            try:
                self.valid = key_mask(self.given_mask, x.shape[0], n)
            except ShapeError as exc:
                raise ShapeError(f"tome: {exc}") from None
        merge, _ = bipartite_soft_matching(keys, r, num_prefix=self.tome.num_prefix, size=self.size,
                                           mergeable=self.valid, strict=self.tome.strict)
        if self.tome.trace_source:
            if self.source is None:
                self.source = torch.eye(n, device=x.device)[None].expand(batch, n, n)
            self.source = merge(self.source, "sum")
        if self.valid is not None:
            self.valid = merge(self.valid[..., None].float(), "sum")[..., 0] > 0
        kept = getattr(merge, "kept", None)  # (not hasattr: dynamo before torch 2.14 answers it False)
        if kept is not None:  # a group keeps its destination's position
            self.origin = follow_origin(self.origin, kept, n)
        x, self.size = merge_wavg(merge, x, self.size, branch)
        return x


class TomeHandle(Handle):
    """Handle of ``tome``. After a forward pass (the last one this thread ran, or, read from a thread that
    ran none, the last one of any thread):

    - ``token_counts``: the number of tokens entering each block;
    - ``size``: ``[B, N]`` how many patches each final token holds (``None`` if nothing merged);
    - ``source``: ``[B, N, N0]`` bool, ``source[b, j, i]`` is True when final token ``j`` holds input
      token ``i`` (``trace_source=True`` only; ``None`` if nothing merged).
    """

    def __init__(self, *args: Any, calls: PerThread[TomeCall], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._calls = calls

    @property
    def token_counts(self) -> list[int]:
        return list(self._calls.latest().token_counts)

    @property
    def size(self) -> Tensor | None:
        return self._calls.latest().size

    @property
    def source(self) -> Tensor | None:
        source = self._calls.latest().source
        return None if source is None else source > 0


def install(target: Target, patcher: Patcher, options: dict[str, Any]) -> TomeHandle:
    """``tome`` on a timm ViT or open_clip visual tower: :class:`TomeStep` in every block."""
    blocks = vit_blocks(target)
    schedule = parse_r(options["r"], len(blocks))
    model = target.model
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))  # open_clip towers: the class token
    tome = TomeStep(schedule, num_prefix, options["prop_attn"], options["trace_source"], options["strict"])
    return TomeHandle("tome", model, options, patcher, calls=step_blocks(target, patcher, tome))
