"""transformers: attention layers of vision-language models, observed and routed through ``AttentionInterface``.

Every attention module of a current transformers model (``CLIPAttention``, ``SiglipAttention``,
``LlamaAttention``, ``Qwen2VLAttention``, Qwen2-VL's ``VisionAttention``...) computes its q, k, v,
applies norms and rotary embeddings (M-RoPE included) and then calls
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)``.
visattn registers three functions there, ``"visattn_sdpa"``, ``"visattn_eager"`` and
``"visattn_flex_attention"``, each with the mask format of the implementation it wraps in
``AttentionMaskInterface`` (without that entry transformers would build no mask at all). Each one runs the routes
visattn installed on the module it serves (an observer, or a method's own attention), newest first, each handing on
to the next and the oldest to the stock implementation: ``ALL_ATTENTION_FUNCTIONS["sdpa"]`` (or
``["flex_attention"]``) or the modeling file's own ``eager_attention_forward``, all looked up in the namespace of the
module's ``forward``. A module without routes calls the stock implementation straight away.

Switching a model over sets ``_attn_implementation_internal`` — the value behind
``config._attn_implementation`` — of the configs of the routed modules only (for LLaVA the vision
config, the text config or both) from ``"sdpa"``/``"eager"``/``"flex_attention"`` to ``"visattn_"`` + the same,
through the :class:`~visattn.patching.Patcher`, so ``remove()`` puts back every config exactly.
That is what ``model.set_attn_implementation`` changes too, minus its recursion into configs whose
modules visattn leaves alone. Users can also call ``model.set_attn_implementation("visattn_sdpa")``
themselves: without routes the functions call straight through.

The layer index a route serves is bound when it is installed, so vision-tower modules (which
have no ``layer_idx``) need nothing from transformers. Layer indices follow
:func:`attention_layers`: the vision tower's layers first, then the language model's, as they run.

Also here, for methods that act on the language model (pruning, visual sinks, head modulation):
:func:`decoder_layers`, :func:`language_layers`, :func:`image_token_spans` (image positions from
``config.image_token_id``, per sample, so left padding and batches work), and the one reader of a
call's inputs that every method uses, :func:`read_call` (through :func:`on_call`, a pre-hook of the
model or its language model, and :func:`output_cache`): input ids, attention mask, position ids, the KV
cache under either of its names (``cache`` from transformers 5.24 on, ``past_key_values`` before) and
whether image features come with the call (``pixel_values``, or the ``mm_encoder_outputs`` that
``generate()`` computes before the prefill from 5.23 on).

Tested on transformers 5.6 (the floor, ``.ci/floor-constraints.txt``) and 5.24 (``sdpa_attention_forward``,
``AttentionInterface``, ``AttentionMaskInterface``, ``get_decoder``, both cache argument names) with
LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
PaliGemmaForConditionalGeneration, Idefics3ForConditionalGeneration, InternVLForConditionalGeneration,
Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration and Qwen3VLForConditionalGeneration. Models
loaded with ``attn_implementation="sdpa"``, ``"eager"`` or ``"flex_attention"`` are supported (a method that
computes attention itself reads flex attention's ``BlockMask`` as a dense mask, :func:`stock_mask`); flash attention
takes its mask as sequence lengths and is refused with an error.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface

from ..core.layout import TokenLayout
from ..errors import ShapeError, UnsupportedModelError
from ..patching import Patcher
from .base import Observer

#: The stock implementations visattn can wrap, and the prefix of the names it registers for them.
IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
PREFIX = "visattn_"
#: Module attribute holding the routes installed on an attention module (a tuple, oldest first).
ROUTES_ATTR = "_visattn_routes"
SUPPORTED = ("LLaVA (1.5, NeXT, OneVision), PaliGemma, Idefics3 / SmolVLM, InternVL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, "
             "and other models whose attention modules dispatch through transformers' AttentionInterface")

#: ``route(call, module, query, key, value, attention_mask, **kwargs) -> (output, weights)``: runs in place
#: of the attention function; ``call`` (same signature, minus ``call``) is the next route or the stock one.
Route = Callable[..., tuple[Tensor, "Tensor | None"]]
#: ``make_route(layer_index, module, implementation) -> Route``, where ``implementation`` is the wrapped
#: stock implementation (one of :data:`IMPLEMENTATIONS`).
RouteFactory = Callable[[int, nn.Module, str], Route]


@functools.cache
def _forward_globals(cls: type) -> dict[str, Any] | None:
    """The globals of ``cls.forward`` if that forward dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    forward = inspect.unwrap(cls.forward)
    code = getattr(forward, "__code__", None)
    if code is None or "ALL_ATTENTION_FUNCTIONS" not in code.co_names:
        return None
    return forward.__globals__


def _stock_attention(module: nn.Module, implementation: str) -> Callable[..., Any]:
    """The function ``module`` runs for ``implementation`` when visattn is not in the way."""
    names = _forward_globals(type(module))
    if implementation == "eager":
        return names["eager_attention_forward"]
    return names["ALL_ATTENTION_FUNCTIONS"][implementation]


def _dispatcher(implementation: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        call = _stock_attention(module, implementation)
        for route in module.__dict__.get(ROUTES_ATTR, ()):
            call = functools.partial(route, call)
        return call(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = attention.__qualname__ = f"{PREFIX}{implementation}_attention_forward"
    return attention


for _impl in IMPLEMENTATIONS:
    AttentionInterface.register(PREFIX + _impl, _dispatcher(_impl))
    AttentionMaskInterface.register(PREFIX + _impl, AttentionMaskInterface()[_impl])


def refuse_implementation(method: str, needs: str) -> None:
    """Register ``"visattn_<method>"`` so that ``model.set_attn_implementation("visattn_<method>")`` is accepted by
    transformers and the model's first forward raises :class:`UnsupportedModelError` pointing to ``visattn.apply``:
    the method also needs ``needs`` (hooks outside the attention function, which that call cannot install)."""

    def refuse(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        raise UnsupportedModelError(
            f"{method} cannot run as an attention implementation alone: it also needs {needs}, which "
            f"set_attn_implementation cannot install; call model.set_attn_implementation(\"sdpa\") and "
            f"visattn.apply(model, {method!r}, ...) instead (visattn.remove(model) undoes it)")

    refuse.__name__ = refuse.__qualname__ = f"{PREFIX}{method}_attention_forward"
    AttentionInterface.register(PREFIX + method, refuse)
    AttentionMaskInterface.register(PREFIX + method, AttentionMaskInterface()["sdpa"])


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules that dispatch through ``AttentionInterface``, in execution order.

    For LLaVA-style models: the vision tower's layers, then the language model's self-attention.
    """
    layers = [(n, m) for n, m in model.named_modules() if _forward_globals(type(m)) is not None]
    if not layers:
        raise UnsupportedModelError(
            f"the transformers model {type(model).__name__} has no attention layers that dispatch through "
            f"AttentionInterface; supported: {SUPPORTED}")
    return layers


def _implementation(module: nn.Module) -> str:
    """The stock implementation behind ``module``'s config (one of :data:`IMPLEMENTATIONS`); raises otherwise."""
    name = str(module.config._attn_implementation)
    base = name.removeprefix(PREFIX)
    if base not in IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"visattn observes transformers attention implemented as {' or '.join(map(repr, IMPLEMENTATIONS))}; "
            f"this {type(module).__name__} uses {name!r}: load the model with attn_implementation=\"sdpa\" "
            f"(or call model.set_attn_implementation(\"sdpa\"))")
    if base == "eager" and "eager_attention_forward" not in inspect.unwrap(type(module).forward).__code__.co_names:
        raise UnsupportedModelError(f"{type(module).__name__} has no eager_attention_forward to wrap; "
                                    f"load the model with attn_implementation=\"sdpa\"")
    return base


def route_attention(model: nn.Module, patcher: Patcher, layers: Sequence[int], make_route: RouteFactory) -> None:
    """Run ``make_route(index, module, implementation)`` in place of the attention function of each
    selected layer, switching those layers' configs to the ``visattn_*`` implementations; all undone
    by ``patcher``. Every check runs before anything is changed."""
    modules = attention_layers(model)
    chosen = [(idx, modules[idx][1]) for idx in layers]
    implementations = [_implementation(module) for _, module in chosen]
    configs = {id(module.config): module.config for _, module in chosen}
    for config in configs.values():
        current = config._attn_implementation
        if not current.startswith(PREFIX):
            patcher.set_attr(config, "_attn_implementation_internal", PREFIX + current)
    for (idx, module), implementation in zip(chosen, implementations):
        routes = module.__dict__.get(ROUTES_ATTR, ())
        patcher.set_attr(module, ROUTES_ATTR, routes + (make_route(idx, module, implementation),))


def stock_mask(implementation: str, module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None,
               is_causal: bool | None = None) -> Tensor | None:
    """The mask the stock ``implementation`` applies to ``query``/``key``: boolean (True = attend) or
    additive float as given; flex attention's ``BlockMask`` as the boolean ``[B, 1, Nq, Nk]`` its ``mask_mod``
    gives (transformers builds it with the padding and the cache offsets inside); for SDPA called without a mask
    on a causal module, the top-left aligned causal mask that ``is_causal`` stands for
    (``sdpa_attention_forward``'s rule); ``None`` when every key is attended."""
    if implementation == "flex_attention" and attention_mask is not None:
        from torch.nn.attention.flex_attention import create_mask

        return create_mask(attention_mask.mask_mod, query.shape[0], None, query.shape[-2], key.shape[-2],
                           device=query.device)
    if attention_mask is not None or implementation != "sdpa":
        return attention_mask
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    nq, nk = query.shape[-2], key.shape[-2]
    if causal and nq > 1:
        return torch.ones(nq, nk, dtype=torch.bool, device=query.device).tril()
    return None


def observe_attention(model: nn.Module, patcher: Patcher, layers: Sequence[int], observer: Observer) -> None:
    """Call ``observer`` with the q, k, scaling and :func:`stock_mask` of every call of the selected layers,
    then the stock attention, untouched (see :mod:`visattn.frameworks.base`)."""

    def make_route(idx: int, module: nn.Module, implementation: str) -> Route:
        def route(call: Callable[..., Any], module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            scaling = kwargs.get("scaling")
            observer(idx, query, key, query.shape[-1] ** -0.5 if scaling is None else scaling,
                     stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal")))
            return call(module, query, key, value, attention_mask, **kwargs)

        return route

    route_attention(model, patcher, layers, make_route)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers (``model.get_decoder().layers``), for layer hooks."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"cannot find the decoder layers of {type(model).__name__} (model.get_decoder().layers); "
            f"supported: {SUPPORTED}")
    return layers


def projector(model: nn.Module) -> nn.Module | None:
    """The multimodal projector of a LLaVA-style model (``multi_modal_projector``), or ``None``."""
    return getattr(getattr(model, "model", model), "multi_modal_projector", None)


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision tower of a LLaVA-style model (``vision_tower``), or ``None``."""
    return getattr(getattr(model, "model", model), "vision_tower", None)


def language_layers(model: nn.Module) -> list[int]:
    """Indices (into :func:`attention_layers`) of the language model's self-attention layers, in order."""
    inside = {id(m) for m in decoder_layers(model).modules()}
    return [i for i, (_, m) in enumerate(attention_layers(model)) if id(m) in inside]


def image_token_spans(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> TokenLayout:
    """Where the image tokens are, per sample: maximal runs of ``config.image_token_id`` in ``input_ids``.

    ``input_ids`` is ``[B, N]`` (left or right padded); positions where ``attention_mask`` is 0 are
    never image tokens. Returns a :class:`TokenLayout` with ``num_tokens=N`` and ``image[b]`` the
    ``[start, end)`` spans of sample ``b`` (adjacent images with no token between them form one span).
    """
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        raise UnsupportedModelError(f"{type(model).__name__}'s config has no image_token_id; supported: {SUPPORTED}")
    if input_ids.ndim != 2:
        raise ShapeError(f"input_ids must be [batch, tokens]; got shape {tuple(input_ids.shape)}")
    is_image = input_ids == token
    if attention_mask is not None:
        is_image &= attention_mask.bool()
    edges = F.pad(is_image.to(torch.int8), (1, 1)).diff(dim=1)
    starts, ends = (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist()
    spans: list[list[tuple[int, int]]] = [[] for _ in range(input_ids.shape[0])]
    for (b, s), (_, e) in zip(starts, ends):
        spans[b].append((s, e))
    return TokenLayout(num_tokens=input_ids.shape[1], image=tuple(tuple(s) for s in spans))


#: The names under which a model's forward takes the KV cache: ``cache`` (transformers 5.24 on) and
#: ``past_key_values`` (earlier releases; deprecated in 5.24, still accepted there through ``**kwargs``).
CACHE_ARGUMENTS = ("cache", "past_key_values")


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    """The signature of ``cls.forward`` as called on an instance (``self`` left out)."""
    signature = inspect.signature(cls.forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


@functools.cache
def _parameters(cls: type) -> tuple[tuple[str, ...], frozenset[str], bool]:
    """What binding a call of ``cls.forward`` needs: the names taken positionally, in order; every name taken
    by keyword; whether it takes ``**kwargs``. (Forwards run for every layer of every decode step, so
    :func:`read_call` binds with these rather than with ``Signature.bind_partial``, which costs several
    times more.)"""
    params = _signature(cls).parameters.values()
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    keyword = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return positional, keyword, any(p.kind is p.VAR_KEYWORD for p in params)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@dataclass(frozen=True)
class ModelCall:
    """The inputs of one forward of a transformers model (the whole VLM or its language model), read the
    same way on every supported release by :func:`read_call`.

    Attributes:
        arguments: every argument of the call by name (``**kwargs`` merged in), as given.
        input_ids, inputs_embeds, attention_mask, position_ids: as given (``None`` where not).
        cache: the KV cache, under whichever of :data:`CACHE_ARGUMENTS` it came (``None``: no cache given).
        images: image features come with this call, as ``pixel_values`` computed inside the forward or as
            ``mm_encoder_outputs["image"]`` that ``generate()`` computed before it (transformers >= 5.23).
    """

    arguments: dict[str, Any]
    input_ids: Tensor | None
    inputs_embeds: Tensor | None
    attention_mask: Tensor | None
    position_ids: Tensor | None
    cache: Any
    images: bool

    def keywords(self, **changes: Any) -> dict[str, Any]:
        """The call's arguments as keywords, with ``changes`` applied; ``cache=...`` sets the cache under the
        name (or names) the call used, or ``cache`` where it gave none."""
        given = dict(self.arguments)
        if "cache" in changes:
            cache = changes.pop("cache")
            names = [name for name in CACHE_ARGUMENTS if name in given] or [CACHE_ARGUMENTS[0]]
            given.update(dict.fromkeys(names, cache))
        given.update(changes)
        return given


def read_call(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> ModelCall:
    """The :class:`ModelCall` of ``module(*args, **kwargs)``; raises an :class:`UnsupportedModelError` naming the
    transformers version when the call does not fit ``module``'s forward or its cache is not a ``Cache``. It reads
    nothing on the host (the tokens the cache holds: :func:`held_tokens`), so hooks of every decoder layer can call
    it in compiled decoding."""
    positional, keyword, any_keyword = _parameters(type(module))
    bound = dict(zip(positional, args))
    wrong = ([f"{len(args)} positional arguments for {len(positional)}"] if len(args) > len(positional) else []) + [
        f"{name!r} given twice" for name in kwargs if name in bound] + (
        [] if any_keyword else [f"unexpected {name!r}" for name in kwargs if name not in keyword])
    if wrong:
        raise UnsupportedModelError(
            f"cannot read the call of {type(module).__name__} under transformers {_transformers_version()}: "
            f"{', '.join(wrong)}; expected the arguments of its forward{_signature(type(module))}")
    bound.update(kwargs)
    cache = next((bound[name] for name in CACHE_ARGUMENTS if bound.get(name) is not None), None)
    if cache is not None and not callable(getattr(cache, "get_seq_length", None)):
        raise UnsupportedModelError(
            f"{type(module).__name__} was called under transformers {_transformers_version()} with a KV cache of type "
            f"{type(cache).__name__}; expected a transformers Cache (DynamicCache, StaticCache...) as "
            f"{' or '.join(CACHE_ARGUMENTS)}")
    encoded = bound.get("mm_encoder_outputs") or {}
    return ModelCall(arguments=bound, input_ids=bound.get("input_ids"), inputs_embeds=bound.get("inputs_embeds"),
                     attention_mask=bound.get("attention_mask"), position_ids=bound.get("position_ids"), cache=cache,
                     images=bound.get("pixel_values") is not None or encoded.get("image") is not None)


def output_cache(output: Any) -> Any:
    """The KV cache a model's output carries (``cache`` from transformers 5.24 on, ``past_key_values`` before)."""
    for name in CACHE_ARGUMENTS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def static_layers(cache: Any, method: str) -> list[Any] | None:
    """The layers of ``cache`` when it is a static KV cache (``generate(cache_implementation="static")``, the
    cache transformers compiles decoding for) whose lengths can still be set layer by layer; ``None`` for any
    other cache.

    A ``StaticLayer`` allocates ``max_cache_len`` slots at its first update (in the prefill) and writes each update
    at its own ``cumulative_length``; the masks ``generate()`` builds are sized by layer 0. So a method that keeps
    fewer prompt tokens in some layers gives those layers fewer slots before the prefill reaches them
    (:func:`reserve`) and hands them masks of their own. Raises :class:`UnsupportedModelError` for a static cache
    whose layers cannot take that: sliding-window (or other) layers, or layers allocated before the prefill
    (``early_initialization()``, or a cache reused after ``reset()``)."""
    if not getattr(cache, "is_compileable", False):
        return None
    from transformers.cache_utils import StaticLayer

    layers = list(getattr(cache, "layers", ()))
    other = sorted({type(layer).__name__ for layer in layers
                    if not isinstance(layer, StaticLayer) or getattr(layer, "is_sliding", False)})
    if other or not layers:
        raise UnsupportedModelError(
            f"{method} gives each layer of a static KV cache a length of its own, and this {type(cache).__name__} "
            f"has {', '.join(other) or 'no'} layers; it supports caches of full-attention StaticLayers "
            f"(generate(cache_implementation=\"static\")) and the default dynamic cache")
    if any(layer.is_initialized for layer in layers):
        raise UnsupportedModelError(
            f"{method} gives each layer of a static KV cache a length of its own before the prefill allocates it, "
            f"and this {type(cache).__name__} was allocated already (early_initialization(), or reused after "
            f"reset(), as generate() of transformers {_transformers_version()} may do from its second call on); "
            f"pass a fresh StaticCache, or let generate(cache_implementation=\"static\") make one (a release that "
            f"makes one per call, such as 5.25, or del model._cache before the call)")
    return layers


def static_slots(cache: Any) -> int | None:
    """The key slots that attention layers read from a static KV cache (layer 0's capacity, allocated or not), or
    ``None`` for any other cache: what a mask-less call's keys are with a static cache (without padding, transformers
    leaves a static prefill's mask to SDPA's ``is_causal``)."""
    if not getattr(cache, "is_compileable", False):
        return None
    return int(cache.layers[0].max_cache_len)


def held_tokens(cache: Any) -> int | Tensor:
    """The tokens ``cache`` holds (0 for no cache), read on the host; but in a compiled forward on a static cache
    that has been written, the cache's own count on the device (a 0-dim tensor): reading it on the host would sync
    with the GPU and break the graph in every decode step, and a host count that grows would recompile the step, or,
    as a symbolic int, record a new CUDA graph for every step. Index with it (``held + arange(q)``); a compiled
    forward is the first on its cache when this gives the int 0 (its layers are not allocated yet: transformers
    runs a static-cache generation's prefill eager, on a fresh cache; :func:`first_forward`)."""
    if cache is None:
        return 0
    held = cache.get_seq_length()
    return held if torch.compiler.is_compiling() and isinstance(held, Tensor) else int(held)


def first_forward(held: int | Tensor) -> bool:
    """Whether a forward whose cache held ``held`` tokens (:func:`held_tokens`) starts it, on the host in any mode."""
    return isinstance(held, int) and held == 0


def reserve(layers: Sequence[Any], tokens: int) -> None:
    """Give each of the static cache ``layers`` (:func:`static_layers`, not yet allocated) ``tokens`` fewer slots:
    prompt tokens that will never reach them."""
    for layer in layers:
        layer.max_cache_len -= tokens


def check_calling_convention(module: nn.Module) -> None:
    """Refuse, before anything is patched, a model whose forward takes no input ids, mask or KV cache."""
    params = _signature(type(module)).parameters
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [name for name in ("input_ids", "attention_mask") if name not in params]
    if not has_kwargs and not any(name in params for name in CACHE_ARGUMENTS):
        missing.append(" or ".join(CACHE_ARGUMENTS))
    if missing:
        raise UnsupportedModelError(
            f"{type(module).__name__}.forward under transformers {_transformers_version()} takes no "
            f"{', '.join(missing)}; visattn reads a vision-language call's input_ids, attention_mask and KV cache "
            f"({' or '.join(CACHE_ARGUMENTS)})")


def on_call(module: nn.Module, patcher: Patcher, fn: Callable[[ModelCall], dict[str, Any] | None]) -> None:
    """Run ``fn(read_call(...))`` before every forward of ``module`` (``generate()``'s steps included); when
    ``fn`` returns a dict, the forward is called with it as its keyword arguments instead. Undone by ``patcher``."""

    def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        changed = fn(read_call(module, args, kwargs))
        return None if changed is None else ((), changed)

    patcher.add_hook(module.register_forward_pre_hook(pre, with_kwargs=True))


def after_call(module: nn.Module, patcher: Patcher, fn: Callable[[ModelCall, Any], Any]) -> None:
    """Run ``fn(read_call(...), output)`` after every forward of ``module``; what ``fn`` returns, unless ``None``,
    is the forward's output instead. Undone by ``patcher``."""

    def post(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        return fn(read_call(module, args, kwargs), output)

    patcher.add_hook(module.register_forward_hook(post, with_kwargs=True))
