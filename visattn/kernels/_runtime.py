"""What every kernel module asks before it launches: can Triton run here, on these tensors."""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor


def interpreting() -> bool:
    """``TRITON_INTERPRET`` is on: Triton runs kernels in its interpreter, on any device (the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def runtime_unavailable(*tensors: Tensor) -> str | None:
    """Why no Triton kernel can run on ``tensors`` here (Triton missing, or not CUDA outside the
    interpreter), or ``None``. Each kernel module adds its own limits (dtypes, sizes) after this."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not interpreting() and not all(t.is_cuda for t in tensors):
        return f"tensors are on {tensors[0].device.type}, Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    return None
