"""Triton kernels, each with the core reference as its oracle and fallback."""

from .block_sparse import block_sparse_attention, kernel_unavailable_reason

__all__ = ["block_sparse_attention", "kernel_unavailable_reason"]
