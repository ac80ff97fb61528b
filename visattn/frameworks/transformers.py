"""transformers: attention layers of vision-language models, observed and routed through ``AttentionInterface``.

Every attention module of a current transformers model (``CLIPAttention``, ``SiglipAttention``,
``LlamaAttention``, ``Qwen2VLAttention``, Qwen2-VL's ``VisionAttention``...) computes its q, k, v,
applies norms and rotary embeddings (M-RoPE included) and then calls
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)``.
visattn registers two functions there, ``"visattn_sdpa"`` and ``"visattn_eager"``, each with the
mask format of the implementation it wraps in ``AttentionMaskInterface`` (without that entry
transformers would build no mask at all). Each one runs the routes visattn installed on the
module it serves (an observer, or a method's own attention), newest first, each handing on to the
next and the oldest to the stock implementation: ``ALL_ATTENTION_FUNCTIONS["sdpa"]`` or the
modeling file's own ``eager_attention_forward``, both looked up in the namespace of the module's
``forward``. A module without routes calls the stock implementation straight away.

Switching a model over sets ``_attn_implementation_internal`` — the value behind
``config._attn_implementation`` — of the configs of the routed modules only (for LLaVA the vision
config, the text config or both) from ``"sdpa"``/``"eager"`` to ``"visattn_sdpa"``/``"visattn_eager"``,
through the :class:`~visattn.patching.Patcher`, so ``remove()`` puts back every config exactly.
That is what ``model.set_attn_implementation`` changes too, minus its recursion into configs whose
modules visattn leaves alone. Users can also call ``model.set_attn_implementation("visattn_sdpa")``
themselves: without routes the functions call straight through.

The layer index a route serves is bound when it is installed, so vision-tower modules (which
have no ``layer_idx``) need nothing from transformers. Layer indices follow
:func:`attention_layers`: the vision tower's layers first, then the language model's, as they run.

Also here, for methods that act on the language model (pruning, visual sinks, head modulation):
:func:`decoder_layers`, :func:`language_layers`, :func:`image_token_spans` (image positions from
``config.image_token_id``, per sample, so left padding and batches work) and :func:`track_inputs`
(the ``input_ids`` and ``attention_mask`` of the current forward, in a
:class:`~visattn.frameworks.base.CallContext`).

Checked against transformers 5.17 and 5.23 (``sdpa_attention_forward``, ``AttentionInterface``,
``AttentionMaskInterface``, ``get_decoder``) with LlavaForConditionalGeneration,
LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration. Models loaded with ``attn_implementation="sdpa"`` or
``"eager"`` are supported; flash and flex attention take masks in other forms (sequence lengths,
block masks) and are refused with an error.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface

from ..core.layout import TokenLayout
from ..errors import ShapeError, UnsupportedModelError
from ..patching import Patcher
from .base import CallContext, Observer

#: The stock implementations visattn can wrap, and the prefix of the names it registers for them.
IMPLEMENTATIONS = ("sdpa", "eager")
PREFIX = "visattn_"
#: Module attribute holding the routes installed on an attention module (a tuple, oldest first).
ROUTES_ATTR = "_visattn_routes"
SUPPORTED = ("LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration, "
             "Qwen2_5_VLForConditionalGeneration, and other models whose attention modules dispatch through "
             "transformers' AttentionInterface")

#: ``route(call, module, query, key, value, attention_mask, **kwargs) -> (output, weights)``: runs in place
#: of the attention function; ``call`` (same signature, minus ``call``) is the next route or the stock one.
Route = Callable[..., tuple[Tensor, "Tensor | None"]]
#: ``make_route(layer_index, module, implementation) -> Route``, where ``implementation`` is the wrapped
#: stock implementation (``"sdpa"`` or ``"eager"``).
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
    """The stock implementation behind ``module``'s config (``"sdpa"`` or ``"eager"``); raises otherwise."""
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
    additive float as given, or, for SDPA called without a mask on a causal module, the top-left
    aligned causal mask that ``is_causal`` stands for (``sdpa_attention_forward``'s rule); ``None``
    when every key is attended."""
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


def track_inputs(model: nn.Module, patcher: Patcher) -> CallContext:
    """A :class:`CallContext` updated at the start of every forward of ``model`` (``generate()`` included):
    ``step`` counts the calls (0 = the first), ``extra`` holds that call's ``input_ids`` and
    ``attention_mask`` (``None`` where not given). The hook is removed by ``patcher``."""
    context = CallContext(extra={})
    signature = inspect.signature(model.forward)

    def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        given = signature.bind_partial(*args, **kwargs).arguments
        context.step += 1
        context.extra = {"input_ids": given.get("input_ids"), "attention_mask": given.get("attention_mask")}

    patcher.add_hook(model.register_forward_pre_hook(pre, with_kwargs=True))
    return context
