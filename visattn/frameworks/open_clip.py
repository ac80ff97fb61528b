"""open_clip: the visual tower's ``nn.MultiheadAttention`` layers.

open_clip's ``VisionTransformer`` runs ``ResidualAttentionBlock``s whose attention is a torch
``nn.MultiheadAttention`` called with ``need_weights=False`` (the fused path). Observation
recomputes q and k from the layer's own input projection in a forward pre-hook, so the stock call
runs untouched. Methods that act between a block's attention and its MLP get the block step of
:func:`step_blocks`. (open_clip models built on a timm trunk are detected as timm models.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ShapeError, UnsupportedModelError
from ..patching import Patcher
from .base import BlockStep, Observer, PerThread, StepCall, stepped_class


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not layers:
        raise UnsupportedModelError(
            f"the open_clip model {type(model).__name__} has no nn.MultiheadAttention layers; supported: "
            f"open_clip VisionTransformer towers built from ResidualAttentionBlock")
    return layers


def mha_query_key(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head q and k ``[B, H, N, D]`` that ``mha`` computes from its inputs."""
    if not mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q, b_k = (mha.in_proj_bias[:e], mha.in_proj_bias[e:2 * e]) if mha.in_proj_bias is not None else (None, None)
    q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
    split = lambda x: x.unflatten(-1, (h, e // h)).transpose(1, 2)  # noqa: E731
    return split(q), split(k)


def vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """open_clip ``ResidualAttentionBlock``s (self-attention through ``nn.MultiheadAttention``), in
    execution order; raises if the model has none."""
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "ResidualAttentionBlock"
              and isinstance(getattr(m, "attn", None), nn.MultiheadAttention)]
    if not blocks:
        raise UnsupportedModelError(
            f"the open_clip model {type(model).__name__} has no ResidualAttentionBlock; supported: open_clip "
            f"VisionTransformer towers")
    return blocks


def mha_self_attention(mha: nn.MultiheadAttention, x: torch.Tensor, bias: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention of ``mha`` on batch-first ``x`` ``[B, N, E]`` through fused SDPA.

    ``bias`` is an additive float mask broadcastable to ``[B, H, N, N]`` (or a boolean mask, True =
    attend, as SDPA takes it). Returns the output ``[B, N, E]`` and the per-head q and k
    ``[B, H, N, D]``. Computes what ``mha(x, x, x, need_weights=False)`` computes, for layers with
    a packed input projection and no ``bias_k``/``add_zero_attn``.
    """
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedModelError("nn.MultiheadAttention with separate q/k/v projections, bias_k or "
                                    "add_zero_attn is not supported")
    b, n, e = x.shape
    h = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=mha.dropout if mha.training else 0.0)
    out = F.linear(out.transpose(1, 2).reshape(b, n, e), mha.out_proj.weight, mha.out_proj.bias)
    return out, q, k


def _stepped_forward(self: Any, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                     attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    step: BlockStep = self._visattn_step
    layer: int = self._visattn_layer
    calls: PerThread[StepCall] = self._visattn_calls
    call = calls.set(step.start(None)) if layer == 0 else calls.get()
    batch_first = self.attn.batch_first
    n = q_x.shape[1 if batch_first else 0]
    call.token_counts.append(n)
    if call.stock(layer, n):
        return self._visattn_base.forward(self, q_x, k_x, v_x, attn_mask)
    if k_x is not None or v_x is not None or attn_mask is not None:
        raise ShapeError(f"{step.method}: open_clip blocks {step.verb} tokens in self-attention without attn_mask "
                         f"only")
    x = q_x if batch_first else q_x.transpose(0, 1)
    out, q, k = mha_self_attention(self.attn, self.ln_1(x), call.mask(x.dtype))
    x = call.step(layer, x, self.ls_1(out), q, k, q.shape[-1] ** -0.5)
    x = x + self.ls_2(self.mlp(self.ln_2(x)))
    return x if batch_first else x.transpose(0, 1)


def step_blocks(model: nn.Module, patcher: Patcher, step: BlockStep) -> PerThread[StepCall]:
    """:func:`visattn.frameworks.base.step_blocks` for open_clip: each ``ResidualAttentionBlock``'s class
    becomes a subclass running ``step`` between attention and MLP (q and k from fused SDPA's projections)."""
    calls: PerThread[StepCall] = PerThread(lambda: step.start(None))
    for layer, (_, block) in enumerate(vit_blocks(model)):
        patcher.set_attr(block, "_visattn_step", step)
        patcher.set_attr(block, "_visattn_layer", layer)
        patcher.set_attr(block, "_visattn_calls", calls)
        patcher.swap_class(block, stepped_class(type(block), _stepped_forward))
    return calls


def observe_attention(model: nn.Module, patcher: Patcher, layers: Sequence[int], observer: Observer) -> None:
    modules = attention_layers(model)
    for idx in layers:
        mha = modules[idx][1]

        def pre(module: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any], idx: int = idx) -> None:
            query = kwargs.get("query", args[0] if args else None)
            key = kwargs.get("key", args[1] if len(args) > 1 else query)
            mask = kwargs.get("attn_mask", args[4] if len(args) > 4 else None)
            if kwargs.get("is_causal") and mask is None:
                n = query.shape[1 if module.batch_first else 0]
                mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            elif mask is not None and mask.dtype == torch.bool:
                mask = ~mask  # torch MHA: True = masked out; observers take True = attend
            q, k = mha_query_key(module, query, key)
            observer(idx, q, k, (module.embed_dim // module.num_heads) ** -0.5, mask)

        patcher.add_hook(mha.register_forward_pre_hook(pre, with_kwargs=True))
