"""diffusers: finding attention layers, observing them, swapping their processors, per-call context
and token layouts.

Checked against diffusers 0.42.1 and 0.37.0 on the families of :data:`FAMILIES` (tiny random configs):
the UNet, the image DiTs (PixArt, DiT, Sana, SD3 / 3.5, AuraFlow, CogView4, Lumina2, Flux, Chroma, Flux2,
Qwen-Image) and the video DiTs (Wan with its image-to-video and VACE variants, SkyReels-V2, LTX, CogVideoX,
HunyuanVideo and 1.5, Mochi). A family is one :class:`Family` entry: where a call's token grid is read and where
self-attention puts the tokens that are not the grid.

Attention layers are the modules diffusers gives an attention processor: instances of
``diffusers.models.attention_processor.Attention`` and of the ``AttentionModuleMixin`` classes
(``FluxAttention``, ``WanAttention``...), and Mochi's look-alike. Their order is execution order (module
order, except for the children :attr:`Family.order` names).

Observation. Every stock processor of these models ends in
``torch.nn.functional.scaled_dot_product_attention`` (SDPA): directly (``AttnProcessor2_0``,
``JointAttnProcessor2_0``, ``CogVideoXAttnProcessor2_0``) or through ``dispatch_attention_fn``,
whose native backends call it on ``[B, H, N, D]`` tensors. So :func:`observe_attention` leaves the
processors alone: a forward pre-hook on each selected attention module enters a
``TorchFunctionMode`` (thread-local) that hands every SDPA call's q, k, scale and mask to the
observer and then makes that very call; a forward hook leaves it. The observer therefore sees
exactly what SDPA sees, after norms, rotary embeddings and the text/image concatenation of joint
attention, and outputs cannot change. A processor that attends twice in one call (IP-adapter,
Wan image-to-video cross-attention) reports both calls, in order. A layer that runs without SDPA
(``AttnProcessor``, the flash/sage/xformers backends) raises :class:`UnsupportedModelError` rather
than recording nothing. Observation is meant for eager inference (not ``torch.compile``).

Methods that change attention replace processors with :func:`set_processors` (undone by restoring
the very same processor objects), read the denoiser call (timestep, step, current layer) from
:func:`install_context`, and the token layout of a layer from :func:`token_layout`.

Attention backends. ``dispatch_attention_fn`` (``diffusers.models.attention_dispatch``) looks a
backend up by name in ``_AttentionBackendRegistry`` and passes it q, k, v as ``[B, S, H, D]``, the
mask, the scale and the model's ``_parallel_config``; ``model.set_attention_backend(name)`` accepts
only values of the ``AttentionBackendName`` enum. :func:`register_attention_backend` adds a member to
that enum and the function to the registry (once per process; it changes no model), so diffusers'
own ``set_attention_backend`` and ``enable_parallelism`` accept it. Context parallelism is the
backend's job: under a ``ContextParallelConfig`` the backend receives this rank's sequence shard and
hands an attention function to diffusers' templated context-parallel attention, which exchanges the
shards (Ulysses all-to-all: the whole sequence for H / degree heads; ring: k/v shards passed round)
and calls it. :func:`ulysses_attention` does that for functions that need the whole sequence.
:func:`select_attention_backend` points a model's processors at a backend (undone exactly) and
:func:`dense_backends` says which backend each layer used before.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.models import attention_dispatch, attention_processor
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from ..core.layout import TokenLayout
from ..errors import ShapeError, UnsupportedModelError
from ..patching import Patcher
from .base import CallContext, Observer, PerThread, observe_sdpa, sdpa_observer


@dataclass(frozen=True)
class Family:
    """How a diffusers denoiser class lays out its tokens: the one table entry a family needs.

    ``grid``: where a call's token grid is read (:func:`call_grid`): ``"latent"`` (the latent ``[B, C, H, W]``
    or ``[B, C, F, H, W]`` over the config's patch sizes), ``"frames_first"`` (``[B, F, C, H, W]``), ``"ids"``
    (packed latents, the extent of ``img_ids``), ``"img_shapes"`` (packed, Qwen-Image's ``img_shapes``),
    ``"sizes"`` (packed, LTX's ``num_frames``, ``height``, ``width``). ``text``: where self-attention that
    holds more than the grid puts the other tokens (text, registers, image embeddings): ``"before"`` or
    ``"after"`` the grid, ``""`` where self-attention holds the grid alone. ``text_only``: name prefixes of
    attention layers over the text alone (refiners). ``cross``: attribute names of cross-attention layers
    where the module does not say ``is_cross_attention``. ``order``: children whose attention layers run
    in this order rather than in module order.
    """

    rank: int
    grid: str = "latent"
    text: str = ""
    text_only: tuple[str, ...] = ()
    cross: tuple[str, ...] = ()
    order: tuple[str, ...] = ()


_UNET_ORDER = ("down_blocks", "mid_block", "up_blocks")
FAMILIES: dict[str, Family] = {
    "UNet2DConditionModel": Family(2, order=_UNET_ORDER),
    "PixArtTransformer2DModel": Family(2),
    "DiTTransformer2DModel": Family(2),
    "SanaTransformer2DModel": Family(2),
    "SD3Transformer2DModel": Family(2, text="after"),
    "AuraFlowTransformer2DModel": Family(2, text="before"),  # 8 registers, then the text, then the image
    "CogView4Transformer2DModel": Family(2, text="before"),
    "Lumina2Transformer2DModel": Family(2, text="before", text_only=("context_refiner.",),
                                        order=("context_refiner", "noise_refiner", "layers")),
    "FluxTransformer2DModel": Family(2, grid="ids", text="before"),
    "ChromaTransformer2DModel": Family(2, grid="ids", text="before"),
    "Flux2Transformer2DModel": Family(2, grid="ids", text="before"),
    "QwenImageTransformer2DModel": Family(2, grid="img_shapes", text="before"),
    "WanTransformer3DModel": Family(3),
    "WanVACETransformer3DModel": Family(3, order=("vace_blocks", "blocks")),
    "SkyReelsV2Transformer3DModel": Family(3),
    "LTXVideoTransformer3DModel": Family(3, grid="sizes", cross=("attn2",)),
    "CogVideoXTransformer3DModel": Family(3, grid="frames_first", text="before"),
    "HunyuanVideoTransformer3DModel": Family(3, text="after", text_only=("context_embedder.",)),
    "HunyuanVideo15Transformer3DModel": Family(3, text="after", text_only=("context_embedder.",)),
    "MochiTransformer3DModel": Family(3, text="after"),
}
SUPPORTED_MODELS = tuple(FAMILIES)
#: the families tested under diffusers' context parallelism (``sparse_video``'s attention backend and the observers
#: of :func:`parallel_observer`): Wan and LTX-Video attend over the grid alone; Flux, Flux.2 and Qwen-Image join the
#: text to the grid, and diffusers' plans split the text and the grid each across the ranks (:func:`shard_order`).
#: Qwen-Image passes a text mask, which diffusers 0.42.1 gathers under Ulysses and 0.37 does not (its stock model
#: fails); LTX-Video's text mask makes its stock model fail under Ulysses in diffusers 0.42.1 (it runs without one).
PARALLEL_FAMILIES = ("WanTransformer3DModel", "LTXVideoTransformer3DModel", "FluxTransformer2DModel",
                     "Flux2Transformer2DModel", "QwenImageTransformer2DModel")
NATIVE_BACKEND = attention_dispatch.AttentionBackendName.NATIVE  # torch SDPA, diffusers' default


# diffusers' attention modules: Attention, the AttentionModuleMixin classes, and Mochi's look-alike (a plain module
# with a processor); the processors that run linear attention (no softmax), Sana's
ATTENTION_CLASSES = (Attention, AttentionModuleMixin, attention_processor.MochiAttention)
LINEAR_PROCESSORS = tuple(getattr(attention_processor, name) for name in dir(attention_processor)
                          if "LinearAttnProcessor" in name)


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers attention modules (self-, cross- and joint attention) in execution order: module order, except
    for the children a family runs in another order (:attr:`Family.order`: a UNet's ``mid_block``, registered after
    ``up_blocks``, runs before it; WanVACE runs its ``vace_blocks`` first, Lumina2 its text refiner)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ATTENTION_CLASSES)]
    if not layers:
        raise UnsupportedModelError(
            f"the diffusers model {type(model).__name__} has no attention layers (diffusers Attention or "
            f"AttentionModuleMixin modules); supported: {', '.join(SUPPORTED_MODELS)} and other models "
            f"built from them")
    children = list(model._modules)
    family = FAMILIES.get(type(model).__name__)
    order = [c for c in (family.order if family else _UNET_ORDER) if c in children]  # other UNets run as the UNet
    for slot, child in zip(sorted(children.index(c) for c in order), order):
        children[slot] = child
    rank = {name: i for i, name in enumerate(children)}
    return sorted(layers, key=lambda item: rank.get(item[0].split(".")[0], -1))  # stable: module order within


def observe_attention(model: nn.Module, patcher: Patcher, layers: Sequence[int], observer: Observer) -> None:
    """Call ``observer(layer, q, k, scale, mask)`` for each SDPA call of each selected layer (see module doc), with
    every head and token of the call under Ulysses context parallelism (:func:`parallel_observer`)."""
    observer = parallel_observer(model, patcher, observer)
    modules = attention_layers(model)
    for idx in layers:
        name, module = modules[idx]
        observe_sdpa(module, patcher, idx, observer, lambda idx=idx, name=name, module=module: _unobservable(
            idx, name, module.processor))


def context_parallel(model: nn.Module) -> Any:
    """The ``ContextParallelConfig`` that ``model.enable_parallelism`` recorded on ``model``, or ``None``."""
    parallel = getattr(model, "_parallel_config", None)
    return None if parallel is None else parallel.context_parallel_config


def parallel_observer(model: nn.Module, patcher: Patcher, observer: Observer) -> Observer:
    """``observer`` as it sees a call without parallelism, also under diffusers' Ulysses context parallelism.

    After Ulysses' all-to-all an SDPA call holds every token for ``H / degree`` heads, and for the joint families the
    tokens interleaved rank by rank (:func:`shard_order`); cross-attention runs without it, every head for this
    rank's shard of the queries. Under parallelism the returned observer gathers the heads (or the query shards) of
    the Ulysses group and puts the joint attention's tokens back in order, so ``observer`` sees on every rank the q
    and k one process would see. That needs the call's grid: when ``model`` is parallel already,
    :func:`install_context` is installed (hooks undone by ``patcher``); a model made parallel afterwards, ring
    attention, a family not tested under parallelism or a mask over queries (not keys alone) raise
    :class:`UnsupportedModelError`.
    """
    family = type(model).__name__
    contexts, heads, grids = None, [], []
    if context_parallel(model) is not None and family in PARALLEL_FAMILIES:  # what observe reads, read once here
        contexts = install_context(model, patcher)
        heads = [getattr(module, "heads", None) for _, module in attention_layers(model)]  # all: no all-to-all ran
        grids = layer_grids(model)

    def observe(layer: int, q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> None:
        cp = context_parallel(model)
        if cp is None:
            return observer(layer, q, k, scale, mask)
        require_ulysses(cp)
        if contexts is None or (mask is not None and mask.shape[-2] != 1):  # contexts: a tested family, parallel
            late = family in PARALLEL_FAMILIES and contexts is None
            raise UnsupportedModelError(
                f"visattn observes attention under Ulysses context parallelism in {', '.join(PARALLEL_FAMILIES)}, "
                f"with a key mask at most, applied after model.enable_parallelism(...) (got {family}"
                f"{', applied before' if late else ''}{', a mask over queries' if mask is not None else ''})")
        group = cp._ulysses_mesh.get_group()
        if q.shape[1] == heads[layer]:
            # every head, this rank's shard of the queries: diffusers runs cross-attention without the all-to-all
            return observer(layer, _all_gather(q, cp.ulysses_degree, group, dim=2), k, scale, mask)
        q, k = (_all_gather(t, cp.ulysses_degree, group, dim=1) for t in (q, k))
        ctx = contexts.get()
        if grids[layer].kind == "self" and grids[layer].text:  # joint attention: tokens interleaved rank by rank
            order = shard_order(grids[layer].layout(tuple(ctx.extra["grid"]), q.shape[2]), cp.ulysses_degree, q.device)
            q, k, mask = q[:, :, order], k[:, :, order], None if mask is None else mask[..., order]
        return observer(layer, q, k, scale, mask)

    return observe


def _all_gather(t: torch.Tensor, degree: int, group: Any, dim: int) -> torch.Tensor:
    """The ``degree`` ranks' ``t`` of ``group`` joined along ``dim`` in rank order (heads or query tokens)."""
    parts = [torch.empty_like(t) for _ in range(degree)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _unobservable(idx: int, name: str, processor: Any) -> UnsupportedModelError:
    backend = getattr(processor, "_attention_backend", None)
    return UnsupportedModelError(
        f"visattn cannot observe attention layer {idx} ({name}): it ran without "
        f"torch.nn.functional.scaled_dot_product_attention (processor {type(processor).__name__}, attention "
        f"backend {backend or 'default'}); use an SDPA processor and a native backend (native, _native_cudnn, "
        f"_native_efficient, _native_flash, _native_math)")


def observed(index: int, name: str, processor: Any, observer: Observer, call: Callable[[], Any]) -> Any:
    """``call()`` (attention layer ``index``, ``name``, running ``processor``) with each of its SDPA calls reported
    to ``observer`` as :func:`observe_attention` reports them; raises :class:`UnsupportedModelError` if it made
    none."""
    tap = sdpa_observer(index, observer)
    with tap:
        out = call()
    if tap.seen == 0:
        raise _unobservable(index, name, processor)
    return out


def flux_joint_qkv(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flux's joint q, k, v ``[B, S, H, D]`` as its stock processor builds them, before rotary embeddings:
    projections and q/k norms, text tokens (dual-stream blocks) first, then the image tokens."""
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, text_q, text_k, text_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if attn.added_kv_proj_dim is not None:
        text_q, text_k, text_v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (text_q, text_k, text_v))
        q = torch.cat([attn.norm_added_q(text_q), q], dim=1)
        k = torch.cat([attn.norm_added_k(text_k), k], dim=1)
        v = torch.cat([text_v, v], dim=1)
    return q, k, v


def flux_joint_output(attn: nn.Module, out: torch.Tensor, hidden_states: torch.Tensor,
                      encoder_hidden_states: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What Flux's stock processor returns for the joint attention output ``out`` ``[B, S, H * D]`` (text first):
    the sequence as is in single-stream blocks, else the projected image and text parts."""
    if encoder_hidden_states is None:
        return out
    text, image = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
    return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


def set_processors(model: nn.Module, patcher: Patcher, make: Callable[[int, str, nn.Module], Any]) -> None:
    """Give attention layer ``idx`` (named ``name``) the processor ``make(idx, name, module)``; ``None`` keeps it.

    The new processor is set as a plain instance attribute (not through ``set_processor``), so
    ``model.attn_processors`` reports it and undo restores the very same processor object. A replaced
    processor that is an ``nn.Module`` (an IP-adapter's) stays registered as a submodule meanwhile,
    and a new one is not registered: ``state_dict()`` never changes.
    """
    for idx, (name, module) in enumerate(attention_layers(model)):
        processor = make(idx, name, module)
        if processor is not None:
            patcher.set_attr(module, "processor", processor)


def on_call(model: nn.Module, patcher: Patcher, fn: Callable[[dict[str, Any]], None]) -> None:
    """Call ``fn(inputs)`` before every forward of the denoiser ``model``, ``inputs`` being the call's
    arguments by name (bound to the class's ``forward``: instance forwards may be wrapped)."""
    signature = inspect.signature(type(model).forward)

    def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        fn(signature.bind_partial(module, *args, **kwargs).arguments)

    patcher.add_hook(model.register_forward_pre_hook(pre, with_kwargs=True))


def around_call(module: nn.Module, patcher: Patcher, before: Callable[[tuple, dict[str, Any]], Any] | None = None,
                after: Callable[[Any], Any] | None = None, always: bool = False) -> None:
    """Run ``before(args, kwargs)`` before every forward of ``module`` (a returned ``(args, kwargs)``
    replaces the call's) and ``after(output)`` after it (a returned value replaces the output);
    ``always``: ``after`` runs even when the forward raises (its output is then ``None``)."""
    if before is not None:
        patcher.add_hook(module.register_forward_pre_hook(lambda m, args, kwargs: before(args, kwargs),
                                                          with_kwargs=True))
    if after is not None:
        patcher.add_hook(module.register_forward_hook(lambda m, args, output: after(output), always_call=always))


def install_context(model: nn.Module, patcher: Patcher) -> PerThread[CallContext]:
    """The :class:`CallContext` of the denoiser ``model``'s calls, one per thread, kept by hooks (undone by
    ``patcher``).

    At each call of ``model`` in a thread: that thread's ``step`` goes up by one, ``timestep`` is the call's
    ``timestep`` argument, and for the families of :data:`FAMILIES` ``extra`` is ``{"grid": ...}`` (see
    :func:`call_grid`), so ``token_layout(model, ctx.layer, ctx.extra["grid"], n)`` is the layout of the
    current layer's sequence of ``n`` tokens. While an attention layer runs, ``layer`` is its index in
    :func:`attention_layers` (``None`` otherwise). Hooks rather than attention kwargs, because Wan
    and HunyuanVideo do not pass attention kwargs down to their blocks.
    """
    contexts: PerThread[CallContext] = PerThread(CallContext)
    family = type(model).__name__

    def start(inputs: dict[str, Any]) -> None:
        extra = {"grid": call_grid(model, inputs)[0]} if family in SUPPORTED_MODELS else None
        ctx = contexts.get()  # after the grid: Flux's host read breaks a compiled graph before the state changes
        ctx.step += 1
        ctx.timestep = inputs.get("timestep")
        ctx.extra = extra

    on_call(model, patcher, start)
    for idx, (_, module) in enumerate(attention_layers(model)):
        def enter(module: nn.Module, args: tuple, idx: int = idx) -> None:
            contexts.get().layer = idx

        def leave(module: nn.Module, args: tuple, output: Any) -> None:
            contexts.get().layer = None

        patcher.add_hook(module.register_forward_pre_hook(enter))
        patcher.add_hook(module.register_forward_hook(leave, always_call=True))
    return contexts


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` entry of ``model``'s class; :class:`UnsupportedModelError` for a class not in the table."""
    family = FAMILIES.get(type(model).__name__)
    if family is None:
        raise UnsupportedModelError(f"visattn does not know the token layout of the diffusers model "
                                    f"{type(model).__name__}; known: {', '.join(SUPPORTED_MODELS)}")
    return family


def _patch_sizes(cfg: Any, rank: int) -> tuple[int, ...]:
    """The config's patch size per grid axis (1 where it names none: a UNet's latent is its grid)."""
    patch = cfg.get("patch_size") or 1
    if isinstance(patch, (tuple, list)):
        return tuple(patch)[-rank:]
    return (cfg.get("patch_size_t") or 1, patch, patch)[-rank:]


def _packed_grid(ids: torch.Tensor) -> tuple[int, int]:
    """``(h, w)`` of packed latents from their position ids (``[N, A]`` or ``[B, N, A]``, axis 1 = row, 2 = column)."""
    h, w = (ids.reshape(-1, ids.shape[-1])[:, 1:3].amax(0) + 1).tolist()  # one host read (a graph break)
    return int(h), int(w)


def call_grid(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[tuple[int, ...], int]:
    """The token grid at the model's input and the number of text tokens of one denoiser call.

    ``inputs`` maps the names of ``model.forward``'s arguments to the call's values; :attr:`Family.grid` says which
    are read. The grid is ``(h, w)`` or ``(t, h, w)`` in tokens (latent size divided by the patch size; for packed
    latents, the extent of their position ids or the sizes passed beside them). The text length is that of
    ``encoder_hidden_states`` (0 without). Packed latents that hold more tokens than their grid (reference images
    of editing models) raise :class:`ShapeError`.
    """
    family, cfg = family_of(model), model.config
    text = inputs.get("encoder_hidden_states")
    text_tokens = 0 if text is None else int(text.shape[1])
    latent = inputs["sample"] if "sample" in inputs else inputs["hidden_states"]
    if family.grid == "latent":
        patch = _patch_sizes(cfg, family.rank)
        return tuple(s // p for s, p in zip(latent.shape[-family.rank:], patch)), text_tokens
    if family.grid == "frames_first":  # [B, F, C, H, W]
        pt, p, _ = _patch_sizes(cfg, 3)
        return (latent.shape[1] // pt, latent.shape[-2] // p, latent.shape[-1] // p), text_tokens
    if family.grid == "sizes":
        patch = _patch_sizes(cfg, 3)
        grid = tuple(int(inputs[k]) // p for k, p in zip(("num_frames", "height", "width"), patch))
    elif family.grid == "img_shapes":
        shapes = inputs["img_shapes"][0]
        shapes = [shapes] if isinstance(shapes[0], int) else list(shapes)
        frames, h, w = shapes[0]
        grid = (int(h), int(w)) if frames == 1 and len(shapes) == 1 else (-1,)
    else:
        grid = _packed_grid(inputs["img_ids"])
    if math.prod(grid) != latent.shape[1] or min(grid) < 1:
        raise ShapeError(f"visattn: the {latent.shape[1]} packed latent tokens of this {type(model).__name__} call "
                         f"are not one image grid (reference or condition images packed beside it are not "
                         f"supported)")
    return grid, text_tokens


def layer_kind(model: nn.Module, layer: int) -> str:
    """What attention layer ``layer`` attends over: ``"self"`` (its own sequence: the grid, with the text and other
    tokens where the family joins them), ``"cross"`` (grid queries, text keys), ``"text"`` (the text alone) or
    ``"linear"`` (linear attention, no softmax: Sana's self-attention). :func:`layer_kinds` gives every layer's."""
    return _kind(family_of(model), *attention_layers(model)[layer])


def layer_kinds(model: nn.Module) -> list[str]:
    """:func:`layer_kind` of every attention layer, in :func:`attention_layers` order (one walk of the model)."""
    family = family_of(model)
    return [_kind(family, name, module) for name, module in attention_layers(model)]


def _kind(family: Family, name: str, module: nn.Module) -> str:
    if name.startswith(family.text_only):
        return "text"
    if getattr(module, "is_cross_attention", False) or name.rsplit(".", 1)[-1] in family.cross:
        return "cross"
    if isinstance(module.processor, LINEAR_PROCESSORS):
        return "linear"
    return "self"


def linear_attention(model: nn.Module) -> dict[int, str]:
    """The attention layers of ``model`` that run linear attention (no softmax map to observe or make sparse), each
    with the reason, for :func:`visattn.frameworks.base.select_layers`."""
    if type(model).__name__ not in FAMILIES:
        return {}
    layers = attention_layers(model)
    return {i: f"it runs linear attention ({type(layers[i][1].processor).__name__}), which has no softmax attention "
               f"map" for i, kind in enumerate(layer_kinds(model)) if kind == "linear"}


def _unet_level(model: nn.Module, name: str) -> int:
    """How many times the UNet has downsampled the latent where attention layer ``name`` runs."""
    part, _, rest = name.partition(".")
    total = sum(b.downsamplers is not None for b in model.down_blocks)
    if part == "down_blocks":
        return sum(b.downsamplers is not None for b in model.down_blocks[:int(rest.split(".")[0])])
    if part == "up_blocks":
        return total - sum(b.upsamplers is not None for b in model.up_blocks[:int(rest.split(".")[0])])
    return total  # mid_block


@dataclass(frozen=True)
class LayerGrid:
    """Where attention layer ``layer``'s tokens sit relative to a call's grid: what :func:`layer_grid` and
    :func:`token_layout` read of the model (its kind, how often a UNet halved the grid above it, the family's text
    side), read in one walk by :func:`layer_grids`. Methods keep these from ``apply``, so that a forward traced by
    ``torch.compile`` walks no module tree (dynamo would trace every walk, at every layer of every call site)."""

    layer: int
    model_name: str
    kind: str  # layer_kind
    halvings: int  # downsamplers above the layer (UNets); 0 elsewhere
    text: str  # Family.text: the side of the self-attention sequence the family's other tokens are on

    def grid(self, grid: tuple[int, ...]) -> tuple[int, ...] | None:
        """The grid of the layer's queries in a call with input grid ``grid``; ``None`` for the text alone."""
        if self.kind == "text":
            return None
        grid = tuple(int(g) for g in grid)
        for _ in range(self.halvings):
            grid = tuple(-(-g // 2) for g in grid)
        return grid

    def layout(self, grid: tuple[int, ...], num_tokens: int) -> TokenLayout:
        """:func:`token_layout` of the layer."""
        layer_g = self.grid(grid)
        if layer_g is None:
            return TokenLayout(num_tokens=num_tokens, text=((0, num_tokens),))
        n = math.prod(layer_g)
        if num_tokens == n or self.kind == "cross":
            return TokenLayout(num_tokens=n, grid=layer_g)
        if num_tokens < n or not self.text:
            raise ShapeError(f"visattn: attention layer {self.layer} of this {self.model_name} got {num_tokens} "
                             f"tokens for a {'x'.join(map(str, layer_g))} grid")
        if self.text == "before":
            return TokenLayout(num_tokens=num_tokens, grid=layer_g, grid_start=num_tokens - n,
                               text=((0, num_tokens - n),))
        return TokenLayout(num_tokens=num_tokens, grid=layer_g, text=((n, num_tokens),))


def layer_grids(model: nn.Module) -> list[LayerGrid]:
    """The :class:`LayerGrid` of every attention layer, in :func:`attention_layers` order (one walk of the model)."""
    family, unet = family_of(model), type(model).__name__ == "UNet2DConditionModel"
    return [LayerGrid(i, type(model).__name__, _kind(family, name, module), _unet_level(model, name) if unet else 0,
                      family.text) for i, (name, module) in enumerate(attention_layers(model))]


def layer_grid(model: nn.Module, layer: int, grid: tuple[int, ...]) -> tuple[int, ...] | None:
    """The grid of attention layer ``layer``'s queries in a call with input grid ``grid`` (:func:`call_grid`);
    ``None`` for layers over the text alone. A UNet's layers see it at the resolution of their block (``h`` and
    ``w`` halved, rounding up, per downsampler above them)."""
    return layer_grids(model)[layer].grid(grid)


def token_layout(model: nn.Module, layer: int, grid: tuple[int, ...], num_tokens: int) -> TokenLayout:
    """The layout of the query sequence of attention layer ``layer``, ``num_tokens`` long, in a call with input
    grid ``grid`` (:func:`call_grid`).

    Cross-attention queries are the grid. Self-attention holds the grid and, where it is longer, the family's
    other tokens (text, registers, image embeddings) on the side :attr:`Family.text` names (Flux, Chroma, Flux2,
    Qwen-Image, CogView4, Lumina2, AuraFlow and CogVideoX put them first; SD3, HunyuanVideo (1.5) and Mochi last),
    so the text length is read from the sequence itself (it is per sample in Mochi, and includes AuraFlow's
    registers and HunyuanVideo 1.5's image and glyph tokens). Layers over the text alone have no grid. A sequence
    that cannot hold the layer's grid raises :class:`ShapeError`.
    """
    return layer_grids(model)[layer].layout(grid, num_tokens)


def register_attention_backend(name: str, fn: Callable[..., torch.Tensor], *, context_parallel: bool) -> Any:
    """Register ``fn`` as diffusers attention backend ``name``; return its ``AttentionBackendName`` member.

    ``fn`` takes the keywords of ``dispatch_attention_fn`` it names (``query``, ``key``, ``value``
    ``[B, S, H, D]``, ``attn_mask``, ``dropout_p``, ``is_causal``, ``scale``, ``enable_gqa``,
    ``_parallel_config``); ``context_parallel`` declares that it handles ``_parallel_config`` itself.
    Registering a name again keeps the first registration (same function expected).
    """
    enum, registry = attention_dispatch.AttentionBackendName, attention_dispatch._AttentionBackendRegistry
    if name in enum._value2member_map_:
        member = enum(name)
        if member in registry._backends and registry._backends[member] is not fn:
            raise UnsupportedModelError(f"the diffusers attention backend {name!r} is already registered with "
                                        f"another function")
    else:
        member = str.__new__(enum, name)  # an enum member as EnumType makes them (no public API adds one)
        member._name_, member._value_, member._sort_order_ = name.upper(), name, len(enum._member_names_)
        member.__objclass__ = enum
        enum._member_map_[member._name_] = member
        enum._value2member_map_[name] = member
        enum._member_names_.append(member._name_)
        if enum(name) is not member or name not in {m.value for m in enum.__members__.values()}:
            raise UnsupportedModelError(f"could not add {name!r} to diffusers' AttentionBackendName on this Python")
    registry.register(member, supports_context_parallel=context_parallel)(fn)
    return member


def select_attention_backend(model: nn.Module, patcher: Patcher, backend: Any) -> None:
    """Point every attention processor of ``model`` that has an ``_attention_backend`` at ``backend``.

    What ``model.set_attention_backend`` does to the processors, undone exactly by ``patcher`` (a
    processor that had only the class default gets it back); diffusers' process-wide active backend is
    left alone.
    """
    for _, module in attention_layers(model):
        if hasattr(module.processor, "_attention_backend"):
            patcher.set_attr(module.processor, "_attention_backend", backend)


def dense_backends(model: nn.Module, exclude: Any) -> dict[int, Any]:
    """The attention backend each layer of ``model`` dispatches to now, by layer index.

    A processor without its own choice uses diffusers' active backend; where that is ``exclude`` (the
    backend about to delegate to these), the native one (SDPA) is used instead.
    """
    active, _ = attention_dispatch._AttentionBackendRegistry.get_active_backend()
    backends = {}
    for index, (_, module) in enumerate(attention_layers(model)):
        chosen = getattr(module.processor, "_attention_backend", None)
        chosen = attention_dispatch.AttentionBackendName(chosen) if chosen is not None else active
        backends[index] = NATIVE_BACKEND if chosen == exclude else chosen
    return backends


def dispatch_attention(backend: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       parallel_config: Any = None, **kwargs: Any) -> torch.Tensor:
    """diffusers' ``dispatch_attention_fn`` on ``[B, S, H, D]`` tensors with backend ``backend``."""
    return attention_dispatch.dispatch_attention_fn(query, key, value, backend=backend,
                                                    parallel_config=parallel_config, **kwargs)


def require_ulysses(cp: Any) -> None:
    """Raise :class:`UnsupportedModelError` unless the ``ContextParallelConfig`` ``cp`` is Ulysses alone (see
    :func:`ulysses_attention`)."""
    if cp.ring_degree > 1:
        raise UnsupportedModelError(
            f"this attention needs every key of the sequence, so it runs under Ulysses context parallelism only "
            f"(ContextParallelConfig(ulysses_degree=N), ring_degree=1); got ring_degree={cp.ring_degree}, "
            f"ulysses_degree={cp.ulysses_degree}")


def require_equal_shards(cp: Any) -> None:
    """Raise :class:`UnsupportedModelError` if the ``ContextParallelConfig`` ``cp`` allows unequal shards
    (``ring_anything``, ``ulysses_anything``), which :func:`ring_attention` cannot gather."""
    if getattr(cp, "ring_anything", False) or getattr(cp, "ulysses_anything", False):
        raise UnsupportedModelError(f"this attention runs under ring context parallelism with equal shards; got "
                                    f"ring_anything={getattr(cp, 'ring_anything', False)}, "
                                    f"ulysses_anything={getattr(cp, 'ulysses_anything', False)}")


def shard_order(layout: TokenLayout, degree: int, device: torch.device) -> torch.Tensor:
    """Where each token of the joint sequence ``layout`` sits in the sequence diffusers' context parallelism gathers.

    With the text and the grid each split into ``degree`` equal shards (as diffusers' context-parallel plans of Flux
    and Flux.2 split ``encoder_hidden_states`` and ``hidden_states``), rank ``r`` holds its text shard and its grid
    shard in the family's order (text before or after the grid), and a gather (Ulysses' all-to-all, or
    :func:`ring_attention`'s all-gather) joins the ranks' sequences rank after rank: ``[text_0, grid_0, text_1,
    grid_1, ...]``. Returns int64 ``order`` ``[num_tokens]`` with ``gathered[:, order]`` the joint sequence (text,
    then grid, for text before). Unequal shards (``ulysses_anything``) raise :class:`ShapeError`.
    """
    grid = math.prod(layout.grid)
    text = layout.num_tokens - grid
    if text % degree or grid % degree:
        raise ShapeError(f"visattn: under context parallelism of degree {degree} the {text} text and {grid} grid "
                         f"tokens of this joint attention must each split into equal shards")
    ts, gs = text // degree, grid // degree
    start = torch.arange(degree, device=device)[:, None] * (ts + gs)
    before = layout.grid_start > 0
    text_pos = (start + (0 if before else gs) + torch.arange(ts, device=device)).flatten()
    grid_pos = (start + (ts if before else 0) + torch.arange(gs, device=device)).flatten()
    return torch.cat([text_pos, grid_pos] if before else [grid_pos, text_pos])


def ring_attention(attend: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attn_mask: torch.Tensor | None, parallel_config: Any) -> torch.Tensor:
    """``attend(q, k, v, mask, rows)`` over the whole sequence under diffusers' ring (or Ulysses x ring) context
    parallelism, for this rank's rows.

    ``query``, ``key``, ``value`` are this rank's shard ``[B, S / degree, H, D]`` (every head) of the
    context-parallel group (``degree = ring_degree * ulysses_degree``; diffusers shards the sequence over the
    flattened mesh). They are gathered from every rank of the group, in the order of the shards (as diffusers'
    ``rotate_method="allgather"`` gathers the keys and values, the queries too), so ``attend`` gets the whole
    sequence, every rank the same tensors, the key mask of this rank's keys ``[..., S / degree]`` gathered alike
    (as diffusers' Ulysses gathers it), and ``rows`` (bool ``[S]``: this rank's positions); it must compute at
    least those rows, and this rank's rows of its output come back. A function that decides from every query
    and key (routing) decides alike on every rank, and computes only its own rows' share; Ulysses' head split is
    not used. Equal shards (``ring_anything`` and ``ulysses_anything`` are refused), inference only.
    """
    cp = parallel_config.context_parallel_config
    require_equal_shards(cp)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise UnsupportedModelError("the visattn attention backends run inference only under context parallelism "
                                    "(no backward pass)")
    mesh = cp._flattened_mesh
    degree, rank, shard = mesh.size(), mesh.get_local_rank(), query.shape[1]
    q, k, v = (_all_gather(t, degree, mesh.get_group(), dim=1) for t in (query, key, value))
    if attn_mask is not None:
        attn_mask = _all_gather(attn_mask, degree, mesh.get_group(), dim=-1)
    rows = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
    rows[rank * shard:(rank + 1) * shard] = True
    return attend(q, k, v, attn_mask, rows)[:, rank * shard:(rank + 1) * shard]


def ulysses_attention(attend: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attn_mask: torch.Tensor | None, scale: float | None,
                      parallel_config: Any) -> torch.Tensor:
    """``attend(q, k, v, attn_mask, scale)`` over the whole sequence under diffusers' Ulysses context parallelism.

    ``query``, ``key``, ``value`` are this rank's sequence shard ``[B, S / degree, H, D]``; diffusers'
    all-to-all gives ``attend`` the whole sequence for ``H / degree`` heads (the same tensors, per head,
    as without parallelism) and sends its output back as a shard. Ring attention cannot serve such a
    function — each rank would see one shard of the keys at a time — so a ``ring_degree`` above 1 raises
    :class:`UnsupportedModelError` before any communication. Inference only: the backward pass raises.
    """
    require_ulysses(parallel_config.context_parallel_config)

    def forward_op(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float | None,
                   enable_gqa: bool, return_lse: bool, _save_ctx: bool = True, _parallel_config: Any = None
                   ) -> torch.Tensor:
        return attend(query, key, value, attn_mask, scale)

    def backward_op(ctx: Any, grad_out: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        raise UnsupportedModelError("the visattn attention backends run inference only under context parallelism "
                                    "(no backward pass)")

    return attention_dispatch._templated_context_parallel_attention(
        query, key, value, attn_mask, 0.0, False, scale, False, False, forward_op=forward_op,
        backward_op=backward_op, _parallel_config=parallel_config)
