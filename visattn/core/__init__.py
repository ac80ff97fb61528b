"""Framework-free math: reference attention, token layouts, and the building blocks methods share."""

from .attention import (
    attention,
    attention_logits,
    attention_probs,
    block_mask,
    block_sparse_attention_reference,
    check_block_lists,
)
from .layout import TokenLayout

__all__ = [
    "TokenLayout",
    "attention",
    "attention_logits",
    "attention_probs",
    "block_mask",
    "block_sparse_attention_reference",
    "check_block_lists",
]
