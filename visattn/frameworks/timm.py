"""timm: finding attention layers, observing them, swapping them in place, and the factory flags.

timm's ``Attention`` (``timm.layers.Attention``, used by ``VisionTransformer`` and its deit3,
DINOv2-style, register and qk-norm variants) computes ``q, k = q_norm(q), k_norm(k)`` right before
attention. Observation hooks those two submodules, so the stock forward runs untouched. Methods
that change the computation swap the module's class for a subclass (same parameters, same names,
so checkpoints keep loading) through :func:`swap_attention`; methods that act between a block's
attention and its MLP (merging, pruning) get the block step of :func:`step_blocks`. Models can
also be built with the factory flags ``attn_layer=`` (names registered in
``timm.models.vision_transformer.ATTN_LAYERS`` by :func:`register_attn_layer`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import timm.layers
import torch
import torch.nn as nn
from timm.layers import Attention, apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import Block

from ..core.layout import TokenLayout
from ..errors import ShapeError, UnsupportedModelError
from ..patching import Patcher
from .base import BlockStep, Observer, PerThread, SDPAIntercept, StepCall, intercept_sdpa, observe_sdpa, stepped_class

# attention modules observed at their SDPA call: rotary (EVA02, DINOv3, PE, the RoPE ViTs) or a relative position
# bias (BEiT) is applied inside the module, after any submodule a hook could read
ROTARY = tuple(cls for cls in (EvaAttention, getattr(timm.layers, "AttentionRope", None)) if cls)
SDPA_OBSERVED = (*ROTARY, BeitAttention)


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """timm's attention modules in execution order: ``timm.layers.Attention`` and :data:`SDPA_OBSERVED`; raises
    if the model has none."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (Attention, *SDPA_OBSERVED))]
    if not layers:
        raise UnsupportedModelError(
            f"the timm model {type(model).__name__} has no attention layer visattn reads (timm.layers.Attention, "
            f"{', '.join(c.__name__ for c in SDPA_OBSERVED)}); supported: VisionTransformer, EVA-style (EVA02, "
            f"DINOv3, PE, RoPE ViTs), BEiT and other models built from these")
    return layers


def projected_attention(model: nn.Module, method: str) -> None:
    """Raise :class:`UnsupportedModelError` unless every attention layer of ``model`` is ``timm.layers.Attention``
    (which ``method`` replaces) or one of :data:`ROTARY` (whose SDPA call it answers, after the rotary embedding):
    BEiT's relative position bias, a dense table over the whole grid, is refused."""
    others = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for _, m in attention_layers(model)
                     if not isinstance(m, (Attention, *ROTARY))})
    if others:
        raise UnsupportedModelError(
            f"{method} works on timm.layers.Attention and the rotary attention of EVA-style models; this "
            f"{type(model).__name__} attends with {', '.join(others)} (a relative position bias over every pair of "
            f"tokens inside the layer, which {method}'s routed attention does not carry)")


def _scaled(gamma: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if gamma is None else gamma * x


# each block class whose forward the block step replaces: its attention half (with its residual) and its MLP half,
# as its stock forward computes them; EVA-style blocks take the rotary embedding (rope) of the current tokens
_HALVES: dict[type, tuple[Callable[..., torch.Tensor], Callable[[Any, torch.Tensor], torch.Tensor]]] = {
    Block: (lambda b, x, mask, rope: x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=mask))),
            lambda b, x: x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))),
    EvaBlock: (lambda b, x, mask, rope: x + b.drop_path1(_scaled(b.gamma_1, b.attn(b.norm1(x), rope=rope,
                                                                                     attn_mask=mask))),
               lambda b, x: x + b.drop_path2(_scaled(b.gamma_2, b.mlp(b.norm2(x))))),
    EvaBlockPostNorm: (lambda b, x, mask, rope: x + b.drop_path1(b.norm1(b.attn(x, rope=rope, attn_mask=mask))),
                       lambda b, x: x + b.drop_path2(b.norm2(b.mlp(x)))),
}


def vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of a timm ``VisionTransformer``-style or EVA-style model, in execution order.

    Only modules whose class is exactly ``timm.models.vision_transformer.Block`` (pre-norm, a timm ``Attention``,
    optional LayerScale), ``EvaBlock`` or ``EvaBlockPostNorm`` (an ``EvaAttention``, rotary embeddings) count,
    since methods that work between a block's attention and its MLP replace that block's ``forward``; raises if
    there are none, or if some blocks are of another kind (``block_fn=`` variants).
    """
    blocks = [(n, m) for n, m in model.named_modules()
              if type(m) in _HALVES and isinstance(m.attn, (Attention, *ROTARY))]
    others = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, (Block, EvaBlock, EvaBlockPostNorm)) and type(m) not in _HALVES})
    if any(isinstance(m, BeitAttention) for m in model.modules()):
        raise UnsupportedModelError(
            f"the timm model {type(model).__name__} (BEiT) adds a relative position bias inside each attention "
            f"layer, a table over every pair of the full grid's tokens, which merged or pruned tokens no longer "
            f"form; supported: VisionTransformer models and EVA-style models (rotary embeddings)")
    if not blocks or others:
        found = f" (it has {', '.join(others)} blocks)" if others else ""
        raise UnsupportedModelError(
            f"the timm model {type(model).__name__} is not built from timm.models.vision_transformer.Block or "
            f"timm.models.eva.EvaBlock blocks{found}; supported: VisionTransformer models (ViT, DeiT, DeiT3, "
            f"DINOv2-style with registers) and EVA-style models (EVA02, DINOv3, PE, the RoPE ViTs)")
    return blocks


def follow_rope(rope: torch.Tensor, origin: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The rotary embedding of the current image tokens, ``[B, h, M, D]``, from ``rope``, the embedding of the
    first block's image tokens in one of timm's layouts: ``[N, D]`` (one grid), ``[h, N, D]`` (per head, mixed
    mode) or ``[B, h, N, D]`` (per sample, after patch dropout). Each token takes the entry of its ``origin`` (see
    :class:`visattn.frameworks.base.StepCall`); a token fused from many (origin -1) gets the identity rotation
    (sin 0, cos 1: timm's ``[sin, cos]`` layout), as the prefix tokens get none."""
    emb = rope.reshape((1,) * (4 - rope.dim()) + tuple(rope.shape))
    half = emb.shape[-1] // 2
    identity = torch.cat([emb.new_zeros(half), emb.new_ones(half)]).expand(*emb.shape[:2], 1, -1)
    emb = torch.cat([emb, identity], dim=2)
    index = origin[:, num_prefix:] - num_prefix
    index = torch.where(index < 0, emb.shape[2] - 1, index)
    emb = emb.expand(index.shape[0], -1, -1, -1)
    return emb.gather(2, index[:, None, :, None].expand(-1, emb.shape[1], -1, emb.shape[-1]))


def _no_sdpa(verb: str, idx: int, name: str, attn: nn.Module) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"visattn cannot {verb} attention layer {idx} ({name}, {type(attn).__name__}): it ran without "
        f"torch.nn.functional.scaled_dot_product_attention (fused_attn={getattr(attn, 'fused_attn', None)}; "
        f"timm uses SDPA unless TIMM_FUSED_ATTN=0 or timm.layers.set_fused_attn(False))")


def answer_sdpa(model: nn.Module, patcher: Patcher, layers: Sequence[int],
                answer: Callable[[int, dict[str, Any]], torch.Tensor | None], verb: str) -> None:
    """The SDPA call of each selected layer (of :data:`SDPA_OBSERVED`) returns ``answer(layer, call)`` (the call's
    arguments by name; ``None``: SDPA runs as called); a forward that makes no SDPA call raises."""
    modules = attention_layers(model)
    for idx in layers:
        name, attn = modules[idx]
        intercept_sdpa(attn, patcher, lambda idx=idx: SDPAIntercept(partial(answer, idx)),
                       partial(_no_sdpa, verb, idx, name, attn))


def observe_attention(model: nn.Module, patcher: Patcher, layers: Sequence[int], observer: Observer) -> None:
    """``timm.layers.Attention``: hooks on ``q_norm`` and ``k_norm`` (the stock forward untouched); the modules of
    :data:`SDPA_OBSERVED`: their SDPA call (:func:`visattn.frameworks.base.observe_sdpa`)."""
    modules = attention_layers(model)
    for idx in layers:
        name, attn = modules[idx]
        if not isinstance(attn, Attention):
            observe_sdpa(attn, patcher, idx, observer, partial(_no_sdpa, "observe", idx, name, attn))
            continue
        calls: PerThread[dict[str, Any]] = PerThread(dict)  # this layer's call: its mask, then its q

        def pre(module: nn.Module, args: tuple, kwargs: dict, calls: PerThread = calls) -> None:
            calls.set({"mask": kwargs.get("attn_mask", args[1] if len(args) > 1 else None),
                       "causal": kwargs.get("is_causal", args[2] if len(args) > 2 else False)})

        def on_q(module: nn.Module, args: tuple, out: torch.Tensor, calls: PerThread = calls) -> None:
            calls.get()["q"] = out

        def on_k(module: nn.Module, args: tuple, out: torch.Tensor, calls: PerThread = calls, idx: int = idx,
                 attn: nn.Module = attn) -> None:
            state = calls.get()
            q, mask = state.pop("q"), state.get("mask")
            if state.get("causal"):
                n = q.shape[2]
                mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            observer(idx, q, out, attn.scale, mask)

        patcher.add_hook(attn.register_forward_pre_hook(pre, with_kwargs=True))
        patcher.add_hook(attn.q_norm.register_forward_hook(on_q))
        patcher.add_hook(attn.k_norm.register_forward_hook(on_k))


def _stepped_forward(self: Any, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     is_causal: bool = False) -> torch.Tensor:
    return _stepped_eva_forward(self, x, None, attn_mask, is_causal)


def _stepped_eva_forward(self: Any, x: torch.Tensor, rope: torch.Tensor | None = None,
                         attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    step: BlockStep = self._visattn_step
    layer: int = self._visattn_layer
    calls: PerThread[StepCall] = self._visattn_calls
    call = calls.set(step.start(attn_mask)) if layer == 0 else calls.get()
    captured = self._visattn_qk.get() if "_visattn_qk" in self.__dict__ else {}
    return _run_step(self, step, call, layer, captured, x, attn_mask, is_causal, rope)


def _run_step(self: Any, step: BlockStep, call: StepCall, layer: int, captured: dict[str, torch.Tensor],
              x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
              rope: torch.Tensor | None = None) -> torch.Tensor:
    """Block ``layer`` (``self``) of a forward with ``call``: stock, or attention, the step, then the MLP. An
    EVA-style block gets the rotary embedding ``rope`` of the first block's tokens, and runs on the entries of its
    current tokens (:func:`follow_rope`)."""
    base = self._visattn_base
    call.token_counts.append(x.shape[1])
    npt = getattr(self.attn, "num_prefix_tokens", 0)
    if rope is not None and call.origin is not None:
        rope = follow_rope(rope, call.origin, npt)
    extra = {} if base is Block else {"rope": rope}
    if call.stock(layer, x.shape[1]):
        return base.forward(self, x, attn_mask=call.mask(x.dtype), is_causal=is_causal, **extra)
    if is_causal:
        raise ShapeError(f"{step.method}: causal attention cannot follow {step.verb}d tokens")
    attend, feed = _HALVES[base]
    x = attend(self, x, call.mask(x.dtype), rope)
    q, k = captured.pop("q", None), captured.pop("k", None)
    if k is not None and rope is not None:  # the keys as attention used them: rotated (the prefix is not)
        half = getattr(self.attn, "rotate_half", False)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half).type_as(k)], dim=2)
    if q is not None and k is not None and k.shape[1] != q.shape[1]:  # grouped-query attention: a key per head
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    x = call.step(layer, x, q, k, self.attn.scale)
    return feed(self, x)


def step_blocks(model: nn.Module, patcher: Patcher, step: BlockStep) -> PerThread[StepCall]:
    """:func:`visattn.frameworks.base.step_blocks` for timm: each block's class becomes a subclass running
    ``step`` between attention and MLP; q and k come from hooks on the attention's ``q_norm``/``k_norm``
    (kept per thread, like the call's state)."""
    calls: PerThread[StepCall] = PerThread(lambda: step.start(None))
    if naflex(model):  # its patch dictionaries carry a padding mask and patch_valid that tokens would outgrow
        on_images(model, patcher, lambda images: None, step.method)
    for layer, (_, block) in enumerate(vit_blocks(model)):
        patcher.set_attr(block, "_visattn_step", step)
        patcher.set_attr(block, "_visattn_layer", layer)
        patcher.set_attr(block, "_visattn_calls", calls)
        patcher.swap_class(block, stepped_class(type(block), _stepped_forward if type(block) is Block
                                                else _stepped_eva_forward))
        if step.captures(layer):
            captured: PerThread[dict[str, torch.Tensor]] = PerThread(dict)
            patcher.set_attr(block, "_visattn_qk", captured)
            for name in ("q", "k"):
                def keep(module: nn.Module, args: tuple, out: torch.Tensor, name: str = name,
                         captured: PerThread = captured) -> None:
                    captured.get()[name] = out

                patcher.add_hook(getattr(block.attn, f"{name}_norm").register_forward_hook(keep))
    return calls


class _Chain:
    """One thread's forward through blocks built by :func:`block_fn_class`: its call, the next block's index, and
    (weakly) the tensor the last block returned, which the next block of the same forward receives."""

    def __init__(self, call: StepCall) -> None:
        self.call = call
        self.layer = 0
        self.last: weakref.ref | None = None
        self.captured: dict[str, torch.Tensor] = {}


def block_fn_class(step: BlockStep, name: str) -> type:
    """A ``timm.models.vision_transformer.Block`` subclass running ``step`` between attention and MLP, for
    ``timm.create_model(..., block_fn=cls)``: timm's parameter names, so checkpoints load unchanged.

    timm builds the blocks without their index, so a forward is followed instead: a block that receives the
    tensor the previous block returned in this thread continues that forward (its index is the next one),
    any other input starts a new forward at block 0. Blocks must run one after another, as
    ``VisionTransformer`` runs them.
    """
    chains: PerThread[_Chain] = PerThread(lambda: _Chain(step.start(None)))

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        Block.__init__(self, *args, **kwargs)
        for part in ("q", "k"):
            def keep(module: nn.Module, args: tuple, out: torch.Tensor, part: str = part) -> None:
                chains.get().captured[part] = out

            getattr(self.attn, f"{part}_norm").register_forward_hook(keep)

    def forward(self: Any, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        chain = chains.get()
        if chain.last is None or chain.last() is not x:
            chain = chains.set(_Chain(step.start(attn_mask)))
        layer, chain.layer = chain.layer, chain.layer + 1
        out = _run_step(self, step, chain.call, layer, chain.captured, x, attn_mask, is_causal)
        chain.last = weakref.ref(out)
        return out

    return type(name, (Block,), {"__init__": __init__, "forward": forward, "_visattn_base": Block,
                                 "_visattn_step": step, "calls": chains, "__module__": "visattn.timm"})


def naflex(model: nn.Module) -> bool:
    """Whether ``model`` is a ``NaFlexVit`` (image batches, or patch dictionaries of images of any sizes)."""
    return type(model).__name__ == "NaFlexVit" and hasattr(model, "embeds")


def on_images(model: nn.Module, patcher: Patcher, fn: Callable[[torch.Tensor], None], method: str) -> None:
    """Call ``fn(images)`` with the image batch of every forward of ``model`` (positional or ``x=``); a NaFlexVit
    called with patch dictionaries (its naflex mode) is refused."""

    def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        images = args[0] if args else kwargs.get("x")
        if isinstance(images, dict) or kwargs.get("patch_coord") is not None:
            raise ShapeError(f"{method}: NaFlexVit's patch dictionaries (patches, patch_coord, patch_valid: images "
                             f"of several sizes, padded) are not supported; call the model with an image batch")
        if images is None:
            raise ShapeError(f"{method}: call the model with its image batch (positionally or as x=); got keywords "
                             f"{sorted(kwargs)}")
        fn(images)

    patcher.add_hook(model.register_forward_pre_hook(pre, with_kwargs=True))


def swap_attention(model: nn.Module, patcher: Patcher, layers: Sequence[int],
                   make: Callable[[int, nn.Module], type], configure: Callable[[int, nn.Module], dict[str, Any]]
                   ) -> None:
    """Swap the class of each selected ``Attention`` for ``make(idx, module)`` (a subclass adding
    behaviour) and set the attributes ``configure(idx, module)`` returns; all undone by ``patcher``."""
    modules = attention_layers(model)
    for idx in layers:
        module = modules[idx][1]
        for name, value in configure(idx, module).items():
            patcher.set_attr(module, name, value)
        patcher.swap_class(module, make(idx, module))


def register_attn_layer(name: str, cls: type) -> None:
    """Make ``timm.create_model(..., attn_layer=name)`` build ``cls`` (a ``timm.layers.Attention`` subclass)."""
    from timm.models import vision_transformer

    if not issubclass(cls, Attention):
        raise TypeError(f"{cls.__name__} must subclass timm.layers.Attention to keep timm's parameter names")
    vision_transformer.ATTN_LAYERS[name] = cls


def vit_grid(model: nn.Module, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The patch grid ``(h, w)`` a timm ViT makes of an image of ``image_size`` (default: the model's own
    ``img_size``; dynamic sizes included)."""
    if naflex(model):
        if image_size is None:
            raise UnsupportedModelError("a NaFlexVit has no fixed patch grid; its grid is read from each image batch")
        return image_size[0] // model.embeds.patch_size[0], image_size[1] // model.embeds.patch_size[1]
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "grid_size", None) is None:
        raise UnsupportedModelError(f"the timm model {type(model).__name__} has no patch_embed.grid_size (not a ViT)")
    if image_size is not None and getattr(model, "dynamic_img_size", False):
        return tuple(patch_embed.dynamic_feat_size(tuple(image_size)))
    return tuple(patch_embed.grid_size)


def vit_layout(model: nn.Module, num_tokens: int, image_size: tuple[int, int] | None = None) -> TokenLayout:
    """The token layout of a timm ViT sequence: prefix tokens, then the patch grid (for ``image_size``)."""
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    grid = vit_grid(model, image_size) if image_size is not None else getattr(model.patch_embed, "grid_size", None)
    if grid is not None and prefix + grid[0] * grid[1] != num_tokens:
        grid = None  # dynamic size without image_size: infer a square grid
    return TokenLayout.for_vit(num_tokens, prefix, tuple(grid) if grid is not None else None)
