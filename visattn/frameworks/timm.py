"""timm: finding attention layers, observing them, swapping them in place, and the factory flags.

timm's ``Attention`` (``timm.layers.Attention``, used by ``VisionTransformer`` and its deit3,
DINOv2-style, register and qk-norm variants) computes ``q, k = q_norm(q), k_norm(k)`` right before
attention. Observation hooks those two submodules, so the stock forward runs untouched. Methods
that change the computation swap the module's class for a subclass (same parameters, same names,
so checkpoints keep loading) through :func:`swap_attention`; methods that act between a block's
attention and its MLP (merging, pruning) get the block step of :func:`step_blocks`. Models can
also be built with the factory flags ``attn_layer=`` (names registered in
``timm.models.vision_transformer.ATTN_LAYERS`` by :func:`register_attn_layer`).

EVA-style attention (EVA02, DINOv3, PE, the RoPE ViTs) applies rotary embeddings and BEiT a relative
position bias inside the layer: both are observed, and answered, at the layer's SDPA call
(:func:`answer_sdpa`). Once a block step has merged or pruned tokens, each token keeps the position
of its ``origin``: its rotary entry (:func:`follow_rope`) or its bias rows and columns
(:func:`follow_bias`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial, wraps
from typing import Any, NamedTuple

import timm.layers
import torch
import torch.nn as nn
from timm.layers import Attention, apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Block as BeitBlock
from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import Block

from ..core.layout import TokenLayout
from ..errors import OptionError, ShapeError, UnsupportedModelError
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


class _Kind(NamedTuple):
    """A block class whose forward the block step replaces: its stock forward, its attention branch (without the
    residual, which the step adds: :meth:`StepCall.step`) and its MLP half, as its forward computes them.
    ``extra`` is the rotary embedding of the current tokens (EVA-style blocks) or BEiT's shared relative position
    bias."""

    stock: Callable[[Any, torch.Tensor, torch.Tensor | None, bool, Any], torch.Tensor]
    attend: Callable[[Any, torch.Tensor, torch.Tensor | None, Any], torch.Tensor]
    feed: Callable[[Any, torch.Tensor], torch.Tensor]


_KINDS: dict[type, _Kind] = {
    Block: _Kind(lambda b, x, mask, causal, extra: Block.forward(b, x, attn_mask=mask, is_causal=causal),
                 lambda b, x, mask, extra: b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=mask))),
                 lambda b, x: x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))),
    EvaBlock: _Kind(lambda b, x, mask, causal, rope: EvaBlock.forward(b, x, rope=rope, attn_mask=mask,
                                                                        is_causal=causal),
                    lambda b, x, mask, rope: b.drop_path1(_scaled(b.gamma_1, b.attn(b.norm1(x), rope=rope,
                                                                                          attn_mask=mask))),
                    lambda b, x: x + b.drop_path2(_scaled(b.gamma_2, b.mlp(b.norm2(x))))),
    EvaBlockPostNorm: _Kind(lambda b, x, mask, causal, rope: EvaBlockPostNorm.forward(b, x, rope=rope, attn_mask=mask,
                                                                                        is_causal=causal),
                            lambda b, x, mask, rope: b.drop_path1(b.norm1(b.attn(x, rope=rope, attn_mask=mask))),
                            lambda b, x: x + b.drop_path2(b.norm2(b.mlp(x)))),
    BeitBlock: _Kind(lambda b, x, mask, causal, shared: BeitBlock.forward(b, x, shared_rel_pos_bias=shared),
                     lambda b, x, mask, shared: b.drop_path1(_scaled(b.gamma_1, b.attn(
                         b.norm1(x), shared_rel_pos_bias=shared))),
                     lambda b, x: x + b.drop_path2(_scaled(b.gamma_2, b.mlp(b.norm2(x))))),
}


def vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of a timm ``VisionTransformer``-style, EVA-style or BEiT model, in execution order.

    Only modules whose class is exactly ``timm.models.vision_transformer.Block`` (pre-norm, a timm ``Attention``,
    optional LayerScale), ``EvaBlock`` or ``EvaBlockPostNorm`` (rotary embeddings) or BEiT's ``Block`` (a relative
    position bias) count, since methods that work between a block's attention and its MLP replace that block's
    ``forward``; raises if there are none, or if some blocks are of another kind (``block_fn=`` variants).
    """
    blocks = [(n, m) for n, m in model.named_modules()
              if type(m) in _KINDS and isinstance(m.attn, (Attention, BeitAttention, *ROTARY))]
    others = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, tuple(_KINDS)) and type(m) not in _KINDS})
    if not blocks or others:
        found = f" (it has {', '.join(others)} blocks)" if others else ""
        raise UnsupportedModelError(
            f"the timm model {type(model).__name__} is not built from the blocks of timm's VisionTransformer, "
            f"EVA-style models or BEiT{found}; supported: VisionTransformer models (ViT, DeiT, DeiT3, DINOv2-style "
            f"with registers), EVA-style models (EVA02, DINOv3, PE, the RoPE ViTs) and BEiT")
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


def follow_bias(bias: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """BEiT's relative position bias ``[b, H, N0, N0]`` of the first block's tokens taken at the current tokens,
    ``[B, H, N, N]``: the row and column of each token's ``origin``; a token fused from many (origin -1) gets no
    bias (0), as it has no position."""
    batch, n = origin.shape
    index = origin.clamp_min(0)
    bias = bias.expand(batch, -1, -1, -1)
    heads, n0 = bias.shape[1], bias.shape[-1]
    rows = bias.gather(2, index[:, None, :, None].expand(-1, heads, -1, n0))
    out = rows.gather(3, index[:, None, None, :].expand(-1, heads, n, -1))
    fused = origin < 0
    return out.masked_fill(fused[:, None, :, None] | fused[:, None, None, :], 0.0)


def _biased_sdpa(block: nn.Module, call: StepCall, captured: dict[str, torch.Tensor] | None) -> SDPAIntercept:
    """BEiT's attention once tokens have changed, or where the step reads it: the relative position bias it passes
    SDPA taken at the current tokens (:func:`follow_bias`), plus the step's mask (ToMe's log sizes); q, k and that
    bias kept in ``captured`` for the step."""
    if not block.attn.fused_attn:
        raise UnsupportedModelError(
            "BEiT attention computed without torch.nn.functional.scaled_dot_product_attention (fused_attn=False; "
            "TIMM_FUSED_ATTN=0 or timm.layers.set_fused_attn(False)) builds its relative position bias for the "
            "full grid, which visattn takes at the current tokens only at the SDPA call")

    def answer(args: dict[str, Any]) -> torch.Tensor:
        q, k = args["query"], args["key"]
        bias = args.get("attn_mask")
        if bias is not None and call.origin is not None:
            bias = follow_bias(bias, call.origin)
        if captured is not None:
            captured.update(q=q, k=k, bias=bias)
        mask = call.mask(q.dtype)
        if mask is not None:
            bias = mask if bias is None else bias + mask
        return torch.nn.functional.scaled_dot_product_attention(q, k, args["value"], attn_mask=bias,
                                                                dropout_p=args.get("dropout_p", 0.0))

    return SDPAIntercept(answer)


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
    return _step_block(self, x, attn_mask, is_causal, None)


def _stepped_eva_forward(self: Any, x: torch.Tensor, rope: torch.Tensor | None = None,
                         attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    return _step_block(self, x, attn_mask, is_causal, rope)


def _stepped_beit_forward(self: Any, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None
                          ) -> torch.Tensor:
    return _step_block(self, x, None, False, shared_rel_pos_bias)


_STEPPED = {Block: _stepped_forward, EvaBlock: _stepped_eva_forward, EvaBlockPostNorm: _stepped_eva_forward,
            BeitBlock: _stepped_beit_forward}


def _step_block(self: Any, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, extra: Any
                ) -> torch.Tensor:
    step: BlockStep = self._visattn_step
    layer: int = self._visattn_layer
    calls: PerThread[StepCall] = self._visattn_calls
    call = calls.set(step.start(attn_mask)) if layer == 0 else calls.get()
    captured = self._visattn_qk.get() if "_visattn_qk" in self.__dict__ else {}
    return _run_step(self, step, call, layer, captured, x, attn_mask, is_causal, extra)


def _run_step(self: Any, step: BlockStep, call: StepCall, layer: int, captured: dict[str, torch.Tensor],
              x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, extra: Any = None) -> torch.Tensor:
    """Block ``layer`` (``self``) of a forward with ``call``: stock, or attention, the step, then the MLP. Once
    tokens have changed, an EVA-style block's rotary embedding (``extra``, of the first block's tokens) is taken at
    the current tokens (:func:`follow_rope`), and a BEiT block's relative position bias at its SDPA call
    (:func:`_biased_sdpa`)."""
    kind = _KINDS[self._visattn_base]
    call.token_counts.append(x.shape[1])
    stock = call.stock(layer, x.shape[1])
    npt = getattr(self.attn, "num_prefix_tokens", 0)
    rotary = isinstance(self.attn, ROTARY)
    if rotary and extra is not None and call.origin is not None:
        extra = follow_rope(extra, call.origin, npt)
    if isinstance(self.attn, BeitAttention) and (call.origin is not None or not stock):
        context, mask = _biased_sdpa(self, call, None if stock else captured), None  # the mask joins at the SDPA call
    else:
        context, mask = nullcontext(), call.mask(x.dtype)
    with context:
        if stock:
            return kind.stock(self, x, mask, is_causal, extra)
        if is_causal:
            raise ShapeError(f"{step.method}: causal attention cannot follow {step.verb}d tokens")
        branch = kind.attend(self, x, mask, extra)
    q, k, bias = captured.pop("q", None), captured.pop("k", None), captured.pop("bias", None)
    if k is not None and rotary and extra is not None:  # the keys as attention used them: rotated (not the prefix)
        half = getattr(self.attn, "rotate_half", False)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], extra, half=half).type_as(k)], dim=2)
    if q is not None and k is not None and k.shape[1] != q.shape[1]:  # grouped-query attention: a key per head
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    x = call.step(layer, x, branch, q, k, self.attn.scale, bias)
    return kind.feed(self, x)


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
        patcher.swap_class(block, stepped_class(type(block), _STEPPED[type(block)]))
        if step.captures(layer):
            captured: PerThread[dict[str, torch.Tensor]] = PerThread(dict)
            patcher.set_attr(block, "_visattn_qk", captured)
            if isinstance(block.attn, BeitAttention):
                continue  # read at its SDPA call (_biased_sdpa)
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


FLAGS = ("attn_layer", "block_fn")


def _visattn_flag(value: Any) -> bool:
    """Whether a factory flag's value is visattn's (a registered name, or a class visattn configured)."""
    return (isinstance(value, str) and value.startswith("visattn_")) or \
        (isinstance(value, type) and value.__module__.split(".")[0] == "visattn")


def check_factory_flags(model_name: str, model: nn.Module, flags: dict[str, Any], build: Callable[..., nn.Module],
                        kwargs: dict[str, Any]) -> None:
    """Raise :class:`OptionError` unless ``model``, built by ``timm.create_model(model_name, **flags, **kwargs)``,
    holds what each of visattn's ``flags`` names, and has the stock model's parameter names (the stock model is
    built with ``build``, on the meta device where it can be; LePE's ``attn.lepe.*`` may be added). Some timm
    models ignore ``attn_layer`` (parallel blocks build their own attention) or set their own
    (``attn_layer="diff"``), and ``block_fn`` replaces whatever blocks a model has: both would be silent without
    this check."""
    from timm.models import vision_transformer

    shown = ", ".join(f"{k}={v if isinstance(v, str) else v.__name__}" for k, v in flags.items())
    for flag, value in flags.items():
        cls = vision_transformer.ATTN_LAYERS.get(value) if isinstance(value, str) else value
        if cls is None or not any(isinstance(m, cls) for m in model.modules()):
            raise OptionError(
                f"timm.create_model({model_name!r}, {shown}): this {type(model).__name__}'s {_built(model)} never "
                f"build the {flag} they are given, so the model would be the stock one; use "
                f"visattn.apply(model, ...) on the stock model, which serves it or says why not")
    stock_kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "checkpoint_path")}
    try:
        with torch.device("meta"):  # no memory, no initialisation
            stock = build(model_name, pretrained=False, **stock_kwargs)
    except Exception:  # a model whose construction reads values (meta tensors have none): built on the CPU
        stock = build(model_name, pretrained=False, **stock_kwargs)
    names, stock_names = set(model.state_dict()), set(stock.state_dict())
    missing, added = sorted(stock_names - names), sorted(n for n in names - stock_names if ".attn.lepe." not in n)
    if missing or added:
        changes = "; ".join(f"{len(found)} {what}, e.g. {found[0]}" for what, found in
                            (("of the stock model's missing", missing), ("added", added)) if found)
        raise OptionError(
            f"timm.create_model({model_name!r}, {shown}) changes the model's parameter names ({changes}): it "
            f"replaces the stock model's {_built(stock)}, so its checkpoints would not load; use "
            f"visattn.apply(model, ...) on the stock model instead")


def _built(model: nn.Module) -> str:
    """What a timm model's blocks are, in words: their classes and their attention's."""
    blocks = list(getattr(model, "blocks", ()))
    attention = sorted({type(b.attn).__name__ for b in blocks if hasattr(b, "attn")})
    return f"{', '.join(sorted({type(b).__name__ for b in blocks}))} blocks" + \
        (f" with {', '.join(attention)}" if attention else "")


def guard_factory() -> None:
    """Make ``timm.create_model`` check visattn's factory flags (:func:`check_factory_flags`) whenever one is
    passed; calls without them run timm's function unchanged. Done once, when ``visattn.timm`` is imported."""
    import timm.models
    import timm.models._factory as factory

    stock = factory.create_model
    if getattr(stock, "_visattn_checked", False):
        return

    @wraps(stock)
    def create_model(model_name: str, *args: Any, **kwargs: Any) -> nn.Module:
        flags = {k: kwargs[k] for k in FLAGS if _visattn_flag(kwargs.get(k))}
        model = stock(model_name, *args, **kwargs)
        if flags:
            check_factory_flags(model_name, model, flags, stock, {k: v for k, v in kwargs.items() if k not in flags})
        return model

    create_model._visattn_checked = True  # type: ignore[attr-defined]
    for module in (timm, timm.models, factory):
        module.create_model = create_model


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
