"""Token layouts: where the prefix, grid, text and image tokens sit in a sequence.

A :class:`TokenLayout` tells a method which tokens form the spatial grid (and its shape), which
are prefix tokens (class, registers) that must never be merged or routed, and which spans hold
text or image tokens. Framework adapters build it from the model and the call; methods read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ShapeError

Span = tuple[int, int]


@dataclass(frozen=True)
class TokenLayout:
    """Positions of token kinds in a sequence of ``num_tokens`` tokens.

    Attributes:
        num_tokens: sequence length.
        num_prefix: leading tokens that are not on the grid (class and register tokens).
        grid: spatial shape of the grid tokens, ``(h, w)`` or ``(t, h, w)``, or ``None``.
        grid_start: index of the first grid token (defaults to ``num_prefix``).
        text: ``[start, end)`` spans of text tokens (e.g. Flux puts text first, SD3 last).
        image: per sample, the ``[start, end)`` spans of image tokens (vision-language models, where
            image positions differ between samples); empty when not applicable.
    """

    num_tokens: int
    num_prefix: int = 0
    grid: tuple[int, ...] | None = None
    grid_start: int | None = None
    text: tuple[Span, ...] = ()
    image: tuple[tuple[Span, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.grid_start is None:
            object.__setattr__(self, "grid_start", self.num_prefix)
        if self.grid is not None:
            if len(self.grid) not in (2, 3) or any(g <= 0 for g in self.grid):
                raise ShapeError(f"grid must be (h, w) or (t, h, w) of positive sizes; got {self.grid}")
            if self.grid_start + self.num_grid_tokens > self.num_tokens:
                raise ShapeError(f"grid {self.grid} at {self.grid_start} does not fit in {self.num_tokens} tokens")
        spans = list(self.text) + [s for sample in self.image for s in sample]
        for start, end in spans:
            if not 0 <= start <= end <= self.num_tokens:
                raise ShapeError(f"span ({start}, {end}) lies outside [0, {self.num_tokens}]")

    @property
    def num_grid_tokens(self) -> int:
        return math.prod(self.grid) if self.grid else 0

    @property
    def grid_span(self) -> Span:
        return (self.grid_start, self.grid_start + self.num_grid_tokens)

    @property
    def num_text_tokens(self) -> int:
        return sum(e - s for s, e in self.text)

    @classmethod
    def for_vit(cls, num_tokens: int, num_prefix: int, grid: tuple[int, int] | None = None) -> TokenLayout:
        """A ViT sequence: ``num_prefix`` prefix tokens, then a grid (square if not given)."""
        n = num_tokens - num_prefix
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ShapeError(f"{n} patch tokens do not form a square grid; pass grid=(h, w)")
            grid = (side, side)
        return cls(num_tokens=num_tokens, num_prefix=num_prefix, grid=tuple(grid))
