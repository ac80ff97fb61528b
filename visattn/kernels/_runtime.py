"""What every kernel module asks before it launches: can Triton run here, on these tensors; and how a
launch reaches ``torch.compile``.

Each kernel is registered as a torch custom op (``visattn::...``, with a fake implementation and, where it
is differentiable, its autograd), which dynamo and Inductor capture as one node and CUDA graphs record.
:func:`launch` calls the op when the call is traced or needs gradients, and the launcher directly in eager
inference, where the op's dispatch would add its host cost (some microseconds) to every launch.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
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


def launch(op: Callable[..., R], launcher: Callable[..., R], *args: Any) -> R:
    """``op(*args)`` (the registered custom op) under ``torch.compile`` or when a tensor argument needs a
    gradient, else ``launcher(*args)``, the function the op runs."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in args)):
        return op(*args)
    return launcher(*args)
