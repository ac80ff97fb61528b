"""What every framework adapter provides, and the per-call context they carry.

A framework module (``visattn.frameworks.timm``, ``.open_clip``, ``.diffusers``, ``.transformers``)
exposes two functions used by methods:

``attention_layers(model) -> list[tuple[str, nn.Module]]``
    The model's attention modules in execution order, with their qualified names. Layer indices
    in every method's ``layers=`` option index this list.

``observe_attention(model, patcher, layers, observer) -> None``
    Arrange, through ``patcher`` so it can be undone exactly, that each call of each selected
    attention layer calls ``observer(layer_index, q, k, scale, mask)`` with the exact query and key
    the stock attention uses (after norms and rotary embeddings, ``[B, H, N, D]``; k may have fewer
    heads), its softmax scale, and its mask (boolean, True = attend, or an additive float bias, or
    ``None``), while the layer's output stays bit-identical to stock.

Per-call state. What one forward (or one ``generate()``) carries from a hook to the next — token sizes
after a merge, the image positions of a prompt, the grid of a denoiser call — lives in a
:class:`PerThread`, never in an attribute of the model or a closure's dict: two threads running
forwards of one patched model each see their own, as with the stock model.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

Observer = Callable[[int, Tensor, Tensor, float, "Tensor | None"], None]
T = TypeVar("T")


class PerThread(Generic[T]):
    """A value of which each thread has its own: the state one forward (or one generation) of a patched model
    carries between its hooks.

    ``get()`` is this thread's value, made by ``factory`` on its first use in the thread; ``set(value)``
    replaces it (a method does so when a forward starts). ``latest()`` serves handles read after a forward:
    this thread's value, or in a thread that has none (the forward ran in a worker thread) the value set most
    recently in any thread. Built on ``threading.local``, which ``torch.compile`` traces without a graph break.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._local = threading.local()
        self._latest: T | None = None

    def get(self) -> T:
        value = getattr(self._local, "value", None)
        return self.set(self._factory()) if value is None else value

    def set(self, value: T) -> T:
        self._local.value = self._latest = value
        return value

    def latest(self) -> T:
        value = getattr(self._local, "value", None)
        if value is None:
            value = self._latest
        return self._factory() if value is None else value


_SINKS: dict[int, Callable[[int, Tensor], None]] = {}
_SINK_KEYS = itertools.count()


_SDPA = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class SDPAIntercept(TorchFunctionMode):
    """While active, hands each SDPA call's arguments, by name, to ``handler``.

    A result other than ``None`` replaces the call's output; ``None`` lets SDPA run as called.
    ``seen`` counts the SDPA calls, ``answered`` those the handler replaced. The mode is
    thread-local and patches nothing global.
    """

    def __init__(self, handler: Callable[[dict[str, Any]], Any]) -> None:
        super().__init__()
        self.handler = handler
        self.seen = self.answered = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            self.seen += 1
            out = self.handler(dict(zip(SDPA_ARGS, args), **kwargs))
            if out is not None:
                self.answered += 1
                return out
        return func(*args, **kwargs)


def sdpa_observer(layer: int, observer: Observer) -> SDPAIntercept:
    """An :class:`SDPAIntercept` that reports each call's q, k, scale and mask to ``observer`` as layer ``layer``."""

    def report(call: dict[str, Any]) -> None:
        q, k, mask = call["query"], call["key"], call.get("attn_mask")
        if call.get("is_causal"):
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scale = call.get("scale")
        observer(layer, q, k, q.shape[-1] ** -0.5 if scale is None else scale, mask)

    return SDPAIntercept(report)


def observe_sdpa(module: torch.nn.Module, patcher: Any, layer: int, observer: Observer,
                 unobservable: Callable[[], Exception]) -> None:
    """Report every SDPA call that ``module``'s forward makes to ``observer`` as layer ``layer`` (hooks undone by
    ``patcher``; :func:`intercept_sdpa` with a :func:`sdpa_observer`). The forward runs as stock."""
    intercept_sdpa(module, patcher, lambda: sdpa_observer(layer, observer), unobservable)


def intercept_sdpa(module: torch.nn.Module, patcher: Any, make: Callable[[], SDPAIntercept],
                   unreached: Callable[[], Exception]) -> None:
    """Run every forward of ``module`` inside a fresh ``make()`` (hooks undone by ``patcher``): a pre-hook enters
    it (thread-local), a hook leaves it and raises ``unreached()`` if the forward made no SDPA call."""
    active: PerThread[list[SDPAIntercept]] = PerThread(list)  # this thread's calls of the module, innermost last

    def enter(module: torch.nn.Module, args: tuple) -> None:
        tap = make()
        tap.__enter__()
        active.get().append(tap)

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        tap = active.get().pop()
        tap.__exit__(None, None, None)
        if output is not None and tap.seen == 0:  # output is None when the forward raised
            raise unreached()

    patcher.add_hook(module.register_forward_pre_hook(enter))
    patcher.add_hook(module.register_forward_hook(leave, always_call=True))


def deliver(key: int, index: int, value: Tensor) -> None:
    """Hand ``value`` (of layer ``index``) to the :class:`Sink` registered under ``key``, if it is still open."""
    sink = _SINKS.get(key)
    if sink is not None:
        sink(index, value)


@functools.cache
def _deliver_op() -> Callable[[int, int, Tensor], None]:
    """:func:`deliver` as the custom op ``visattn::deliver``, an ordered side effect of a compiled graph."""
    from .._logging import effect_op

    return effect_op("deliver", deliver)


class Sink:
    """Where a forward hands a tensor to Python for a handle to show (``inspect``'s maps): ``sink(index, value)``
    calls ``record(index, value)``, in eager and compiled forwards alike.

    Under ``torch.compile`` the call goes through the custom op ``visattn::deliver``, an ordered side effect of
    the graph: no graph break, and no Python state that dynamo guards is touched inside the graph. (A CUDA
    graph replays kernels only: replays record nothing.) ``close()`` drops ``record``.
    """

    def __init__(self, record: Callable[[int, Tensor], None]) -> None:
        self._op = _deliver_op()
        self.key = next(_SINK_KEYS)
        _SINKS[self.key] = record

    def __call__(self, index: int, value: Tensor) -> None:
        (self._op if torch.compiler.is_compiling() else deliver)(self.key, index, value)

    def close(self) -> None:
        _SINKS.pop(self.key, None)


F = TypeVar("F", bound=Callable[..., Any])
K = TypeVar("K")


_CONSTANTS: dict[tuple, Any] = {}
_CONSTANTS_KEPT = 256


def constant(fn: F) -> F:
    """``fn``, a pure function of hashable arguments that builds index tensors (a permutation, block lists),
    memoised: each result is built once by an eager call and kept (the last 256). A call traced by
    ``torch.compile`` takes a kept result as an input of the graph, so the compiled graph does not rebuild it;
    one not yet built is built inside the graph, in every call, and not kept (a dict filled while tracing would
    make the next call compile again). ``fn`` must not read tensors on the host. (Results marked as constants
    through ``torch.compiler.assume_constant_result`` would be graph constants, but dynamo then fails to read
    their shapes: tried on torch 2.11 and 2.14.)"""
    name = f"{fn.__module__}.{fn.__qualname__}"

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        key = (name, *args)
        value = _CONSTANTS.get(key)
        if value is None:
            value = fn(*args)
            if not torch.compiler.is_compiling():
                if len(_CONSTANTS) >= _CONSTANTS_KEPT:
                    del _CONSTANTS[next(iter(_CONSTANTS))]
                _CONSTANTS[key] = value
        return value

    return call  # type: ignore[return-value]


def memo(cache: dict[K, T], key: K, make: Callable[[], T]) -> T:
    """``cache[key]``, made by ``make()`` on first use; a call traced by ``torch.compile`` just returns ``make()``
    (dynamo guards on a dict it sees filled while tracing, and the next call would compile again)."""
    if torch.compiler.is_compiling():
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


@dataclass
class CallContext:
    """Per-call state a method may need inside an attention layer.

    Attributes:
        layer: index of the attention layer being run (its position in ``attention_layers``).
        timestep: the diffusion timestep of the current denoiser call, if the model takes one.
        step: how many denoiser calls have started (in this thread) since the method was applied (0-based).
        extra: anything else a framework adapter reads from the call (e.g. ``input_ids``).
    """

    layer: int | None = None
    timestep: Any = None
    step: int = -1
    extra: dict[str, Any] | None = None
    _counted: int = field(default=-1, repr=False)  # the call denoising_step last counted
    _denoising: int = field(default=-1, repr=False)
    _last_timestep: float | None = field(default=None, repr=False)

    def denoising_step(self) -> int:
        """The denoising step of the current call (0-based): a step is a distinct timestep, so repeated calls at
        one timestep (classifier-free guidance run as two calls) are one step, and a timestep larger than the
        last one starts a new generation at step 0. Reads the timestep on the host, once per call."""
        if self.step != self._counted:
            self._counted = self.step
            t = None if self.timestep is None else float(torch.as_tensor(self.timestep).flatten()[0])
            if t is None or self._last_timestep is None or t > self._last_timestep:
                self._denoising = 0
            elif t < self._last_timestep:
                self._denoising += 1
            self._last_timestep = t
        return self._denoising


def adapter(framework: str) -> ModuleType:
    """The adapter module of ``framework`` (``visattn.frameworks.<framework>``)."""
    return importlib.import_module(f"visattn.frameworks.{framework}")


class LazyAdapter:
    """A framework adapter module, imported on first attribute access, so that the methods using it
    import (and register) without that framework installed: ``tfa = LazyAdapter("transformers")``."""

    def __init__(self, framework: str) -> None:
        self._framework = framework
        self._module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if self._module is None:  # imported once: torch.compile cannot trace importlib (a graph break per use)
            self._module = adapter(self._framework)
        return getattr(self._module, name)


def select_layers(names: Sequence[str], layers: Sequence[int] | None, method: str,
                  without: Mapping[int, str] | None = None) -> list[int]:
    """Indices of the chosen layers, checked against the model's attention layers; ``without`` maps the layers the
    method cannot serve to the reason (left out of ``layers=None``, an error when chosen)."""
    from ..errors import OptionError

    without = without or {}
    if layers is None:
        return [i for i in range(len(names)) if i not in without]
    bad = [i for i in layers if i >= len(names)]
    if bad:
        raise OptionError(f"{method}: layers {bad} out of range; this model has {len(names)} attention layers "
                          f"(0..{len(names) - 1})")
    refused = [i for i in layers if i in without]
    if refused:
        raise OptionError(f"{method}: cannot serve attention layer {refused[0]} ({names[refused[0]]}): "
                          f"{without[refused[0]]}")
    return sorted(layers)


def vit_blocks(target: Any) -> list[Any]:
    """The transformer blocks of a timm ViT or an open_clip visual tower (a detected ``Target``), in order."""
    return [m for _, m in adapter(target.framework).vit_blocks(target.model)]


class StepCall(Protocol):
    """What one forward of a ViT carries from block to block for a :class:`BlockStep` (sizes, masks...).

    Attributes:
        token_counts: the adapter appends the tokens entering each block.
        origin: ``[B, N]`` for each current token, the index of the token of the first block's sequence it
            keeps the position of (-1: a token fused from many, which has none); ``None`` while the tokens
            are the caller's. Adapters of models with rotary or relative position embeddings follow it.
    """

    token_counts: list[int]
    origin: Tensor | None

    def stock(self, layer: int, num_tokens: int) -> bool:
        """Whether block ``layer``, entered by ``num_tokens`` tokens, runs its stock forward in this call."""

    def mask(self, dtype: Any) -> Tensor | None:
        """The attention mask or additive bias of the current tokens (the caller's until tokens change)."""

    def step(self, layer: int, x: Tensor, branch: Tensor, q: Tensor | None, k: Tensor | None, scale: float,
             bias: Tensor | None = None) -> Tensor:
        """The block's tokens after attention, ``x + branch`` (``[B, N, C]``: the residual stream and the
        attention branch, left for the step to sum so it can fuse the sum into its own pass); returns the tokens
        the MLP gets. ``q`` and ``k`` are the attention's, ``bias`` an additive bias it added to its logits
        (BEiT's relative position bias)."""


class BlockStep(Protocol):
    """What a method does between a ViT block's attention and its MLP (ToMe's merge, EViT's pruning).

    The timm and open_clip adapters own the block (:func:`step_blocks`): when a forward enters the first
    block they ask :meth:`start` for the call's :class:`StepCall` (kept per thread), run each block's
    attention with its mask, hand the output with the block's q and k to its ``step``, and feed the result
    to the MLP; blocks for which ``stock`` says so run their stock forward. Parameter names do not change.

    Attributes:
        method: the method's name, for errors.
        verb: what the step does to tokens ("merge", "prune"), for errors.
    """

    method: str
    verb: str

    def start(self, attn_mask: Tensor | None) -> StepCall:
        """A forward begins (its first block), with the caller's attention mask: its fresh state."""

    def captures(self, layer: int) -> bool:
        """Whether the step at block ``layer`` reads the attention's q and k (fixed when installed)."""


@functools.cache
def stepped_class(base: type, forward: Callable[..., Tensor]) -> type:
    """``base`` (a block class) with ``forward`` running a :class:`BlockStep`; ``_visattn_base`` is ``base``."""
    return type(f"Stepped{base.__name__}", (base,), {"forward": forward, "_visattn_base": base})


def step_blocks(target: Any, patcher: Any, step: BlockStep) -> PerThread[StepCall]:
    """Run ``step`` in every block of a timm ViT or open_clip visual tower (see :class:`BlockStep`),
    through ``patcher``, so ``remove()`` undoes it. Returns the per-thread :class:`StepCall` of the
    forward running (or last run), for the method's handle."""
    return adapter(target.framework).step_blocks(target.model, patcher, step)
