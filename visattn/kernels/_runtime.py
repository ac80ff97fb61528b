"""What every kernel module asks before it launches: can Triton run here, on these tensors; how a launch
reaches ``torch.compile``; and how an eager launch costs the host as little as Triton allows.

Each kernel is registered as a torch op (``visattn::...``, with a fake implementation and, where it is
differentiable, its autograd), which dynamo captures as one node and CUDA graphs record. :func:`op`
registers a ``torch.library.triton_op`` where Triton compiles for a GPU, so that Inductor sees the Triton
kernels inside it and launches them from its own generated code, and a plain custom op under Triton's
interpreter (whose kernels Inductor cannot take). :func:`launch` calls the op when the call is traced or
needs gradients, and the launcher directly in eager inference, where the op's dispatch would add its host
cost to every launch. :class:`Kernel` is that direct launch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from collections.abc import Callable
from functools import cached_property
from typing import Any, TypeVar

import torch
from torch import Tensor

R = TypeVar("R")
TRITON = importlib.util.find_spec("triton") is not None  # asked once: dynamo may not trace find_spec


def interpreting() -> bool:
    """``TRITON_INTERPRET`` is on: Triton runs kernels in its interpreter, on any device (the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def runtime_unavailable(*tensors: Tensor) -> str | None:
    """Why no Triton kernel can run on ``tensors`` here (Triton missing, or not CUDA outside the
    interpreter), or ``None``. Each kernel module adds its own limits (dtypes, sizes) after this."""
    if not TRITON:
        return "Triton is not installed"
    if not interpreting() and not all(t.is_cuda for t in tensors):
        return f"tensors are on {tensors[0].device.type}, Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    return None


def needs_op(*args: Any) -> bool:
    """Whether a kernel call must go through its op: under ``torch.compile``, or when a tensor argument
    needs a gradient (eager inference calls the launcher directly)."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
        isinstance(a, Tensor) and a.requires_grad for a in args))


def launch(op: Callable[..., R], launcher: Callable[..., R], *args: Any) -> R:
    """``op(*args)`` (the registered op) where :func:`needs_op`, else ``launcher(*args)``, the function the op
    runs."""
    return op(*args) if needs_op(*args) else launcher(*args)


def op(name: str, fn: Callable[..., Any], fake: Callable[..., Any], *, opaque: bool = False) -> Any:
    """Register ``fn`` as the torch op ``name`` (``"visattn::..."``) with the fake implementation ``fake``.

    A ``triton_op`` where Triton compiles (``fn`` launches through :meth:`Kernel.__call__` with
    ``traced=True``, so Inductor sees each Triton kernel); a ``custom_op`` where Triton is missing or
    interprets (chosen once, at import, as Triton reads ``TRITON_INTERPRET`` once), or where ``opaque``
    (``fn`` launches directly, and Inductor calls the op as it calls an ATen kernel it does not generate). An
    opaque op costs a compiled call the op's dispatch and the direct launch; a ``triton_op`` costs the
    compilation a Triton front-end pass per kernel and call site (Inductor reads each kernel's IR to learn what it
    writes): ToMe-SD's ops, six kernels in each of an SDXL UNet's 70 merging blocks, are opaque."""
    if TRITON and not interpreting() and not opaque:
        return torch.library.triton_op(name, fn, mutates_args=())
    registered = torch.library.custom_op(name, fn, mutates_args=())
    registered.register_fake(fake)
    return registered


class Kernel:
    """One Triton kernel of a kernel module, autotuned or not, and its launches.

    ``kernel(grid, *args, traced=False, **meta)`` launches it: ``args`` the kernel's runtime arguments in
    order, ``meta`` its ``tl.constexpr`` ones, ``grid(meta) -> (x, y[, z])``. With ``traced=True`` (inside a
    :func:`op` body) it goes through ``torch.library.wrap_triton``, so that Inductor launches the kernel
    itself. Otherwise the first launch of each signature goes through Triton (and its autotuner), and
    later ones call the compiled kernel directly: Triton's argument binding, specialisation and cache
    lookup cost some 50 us of a slow host's time per launch, more than a small kernel runs.

    The signature is what Triton may specialise a compilation on, or more: the device, every ``meta``
    value, every int and float argument's value, and every tensor argument's dtype, address modulo 16 and shape
    (the launch grid is bound with the compiled kernel, and it follows the shapes: a batch size that is no
    argument of the kernel changes it).
    Kernels whose int arguments change from call to call (sequence lengths that grow) fill the table; it
    keeps the last :attr:`CACHED` signatures.
    """

    CACHED = 256

    def __init__(self, module: str, name: str, tuned: str | None = None) -> None:
        self._module, self._name, self._tuned_name = module, name, tuned
        self._compiled: dict[tuple, tuple[Callable[..., None], tuple]] = {}
        self._lock = threading.Lock()

    @cached_property
    def jit(self) -> Any:
        """The ``triton.jit`` function (imported on first use, so ``TRITON_INTERPRET`` is read then)."""
        return getattr(importlib.import_module(self._module), self._name)

    @cached_property
    def tuned(self) -> Any:
        """Its ``triton.autotune`` wrapper, or ``None`` (no autotuning, or the interpreter)."""
        if self._tuned_name is None:
            return None
        return getattr(importlib.import_module(self._module), self._tuned_name)

    @staticmethod
    def _signature(args: tuple, meta: dict[str, Any]) -> tuple:
        return (torch.cuda.current_device(), *meta.values(),
                *[(a.dtype, a.data_ptr() & 15, a.shape) if isinstance(a, Tensor) else a for a in args])

    def __call__(self, grid: Callable[[dict], tuple[int, ...]], *args: Any, traced: bool = False,
                 **meta: Any) -> None:
        if not traced and self._compiled:  # the hot path first (the table stays empty under the interpreter)
            hit = self._compiled.get(self._signature(args, meta))
            if hit is not None:
                runner, constants = hit
                runner(*args, *constants)
                return
        kernel = self.tuned or self.jit
        if interpreting():
            kernel[grid](*args, **meta)
            return
        if traced:  # eager (an op called with gradients) it runs the autotuner: under the lock, as below
            with self._lock:
                torch.library.wrap_triton(kernel)[grid](*args, **meta)
            return
        key = self._signature(args, meta)
        with self._lock:  # the autotuner's best_config is read right after its launch
            compiled = kernel[grid](*args, **meta)
            config = {**meta, **(self.tuned.best_config.kwargs if self.tuned is not None else {})}
            size = tuple(grid(config))
            names = self.jit.arg_names[len(args):]  # the constexpr parameters, declared last
            if len(self._compiled) >= self.CACHED:
                del self._compiled[next(iter(self._compiled))]
            self._compiled[key] = (compiled[size + (1,) * (3 - len(size))], tuple(config[n] for n in names))
