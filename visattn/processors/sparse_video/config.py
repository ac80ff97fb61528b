"""The options of ``sparse_video`` and their validated form, :class:`SparseVideoConfig`.

``OPTIONS`` and ``INSTALL`` declare the options (their checks, defaults, identity values and the strategies
that read them); the constants name the strategies, the GRAT patterns, the supported diffusers families
and the default tile and window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import OptionError, ShapeError
from ...options import Option, bool_option, check_scope, choice_option, int_option, validate_options

STRATEGIES = ("tile_topk", "rectified", "sliding_tile", "grat")
GRAT_PATTERNS = ("surrounding", "criss_cross")
SCORES = ("mean", "antidiagonal")
PERMUTATIONS = ("none", "importance", "cluster")
FAMILIES = ("WanTransformer3DModel", "WanVACETransformer3DModel", "SkyReelsV2Transformer3DModel",
            "LTXVideoTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel",
            "HunyuanVideo15Transformer3DModel", "MochiTransformer3DModel", "FluxTransformer2DModel",
            "ChromaTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel",
            "SD3Transformer2DModel", "AuraFlowTransformer2DModel", "CogView4Transformer2DModel",
            "Lumina2Transformer2DModel", "PixArtTransformer2DModel", "DiTTransformer2DModel")
# not SanaTransformer2DModel: its self-attention is linear attention (no softmax to make sparse)
DEFAULT_TILE = {3: (4, 4, 4), 2: (8, 8)}
DEFAULT_KEEP = {"tile_topk": 0.25, "rectified": 0.5}  # keep=None; why these: the package doc, "Defaults"
DEFAULT_WINDOW = 3
DEFAULT_STRIDE = 8  # XAttention's antidiagonal stride (tokens)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_tuple(v: Any) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise TypeError
    t = tuple(v)
    if len(t) not in (2, 3) or not all(_is_int(i) and i >= 1 for i in t):
        raise ValueError
    return t


def _check_tile(v: Any) -> tuple[int, ...] | None:
    return None if v is None else _int_tuple(v)


def _check_window(v: Any) -> tuple[int, ...] | tuple[tuple[int, ...], ...] | None:
    if v is None:
        return None
    if isinstance(v, Sequence) and v and all(isinstance(w, Sequence) for w in v):
        per_head = tuple(_int_tuple(w) for w in v)
        if len({len(w) for w in per_head}) != 1:
            raise ValueError
        return per_head
    return _int_tuple(v)


def _check_axes(v: Any) -> int | tuple[int, ...] | None:
    if v is None or (_is_int(v) and v >= 1):
        return v
    if _is_int(v):
        raise ValueError
    return _int_tuple(v)


def _check_fraction(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise ValueError
    return float(v)


_ROUTED = ("tile_topk", "rectified")  # the strategies that score block pairs and keep the best
OPTIONS: tuple[Option, ...] = (
    choice_option("strategy", "tile_topk", STRATEGIES, doc="routing rule (see the module doc)"),
    Option("keep", None, "None (0.25 for tile_topk, 0.5 for rectified) or a number in (0, 1]", _check_fraction,
           identity=1.0, strategies=_ROUTED,
           doc="tile_topk/rectified: fraction of kv blocks each query block visits (None: the strategy's default)"),
    Option("top_p", None, "None or a number in (0, 1]", _check_fraction, identity=1.0, strategies=_ROUTED,
           doc="tile_topk/rectified: keep the fewest blocks whose coarse softmax mass reaches top_p (replaces keep)"),
    choice_option("score", "mean", SCORES,
                  doc="tile_topk/rectified: block importance from mean-pooled q and k ('mean', VSA) or from strided "
                      "antidiagonal sums of q.k inside each block ('antidiagonal', XAttention)"
                  ).scoped(strategies=_ROUTED),
    int_option("stride", None, low=1, allow_none=True,
               doc="score='antidiagonal': antidiagonal stride in tokens (None: 8); must divide the block"
               ).scoped(strategies=_ROUTED),
    choice_option("permute", "none", PERMUTATIONS,
                  doc="tile_topk/rectified: reorder each head's grid tokens before routing, undone on the output: "
                      "'importance' sorts keys by the attention mass pooled queries give them (PBS-Attn), "
                      "'cluster' sorts queries and keys by k-means cluster (semantic clustering)"
                  ).scoped(strategies=_ROUTED),
    Option("tile", None, "None (4x4x4 for video, 8x8 for images) or a tuple of 2 or 3 ints >= 1", _check_tile,
           doc="tile shape in tokens (t, h, w) or (h, w); a block is one tile's worth of tokens"),
    Option("window", None, "None (3 tiles per axis), a tuple of 2 or 3 ints >= 1, or one such tuple per head",
           _check_window, strategies=("sliding_tile",),
           doc="sliding_tile: window in tiles per axis (identity: the tile grid's size)"),
    Option("window_stride", None, "None (1), an int >= 1 or a tuple of 2 or 3 ints >= 1", _check_axes,
           strategies=("sliding_tile",),
           doc="sliding_tile: tiles per axis that share one window (GNA's stride; = window: blocked attention)"),
    Option("window_dilation", None, "None (1), an int >= 1 or a tuple of 2 or 3 ints >= 1", _check_axes,
           strategies=("sliding_tile",),
           doc="sliding_tile: spacing in tiles of a window's tiles (GNA's dilation)"),
    choice_option("grat_pattern", "surrounding", GRAT_PATTERNS,
                  doc="grat: shared kv set of a tile group").scoped(strategies=("grat",)),
    int_option("grat_radius", 1, low=0,
               doc="grat surrounding: radius in tiles (identity: the tile grid's side)").scoped(strategies=("grat",)),
    int_option("dense_steps", 0, low=0, doc="first denoising steps (distinct timesteps) run dense"),
    int_option("dense_layers", 0, low=0, doc="first sparse-eligible attention layers run dense"),
    bool_option("strict", False, doc="raise instead of falling back to the PyTorch reference"),
)
INSTALLS = ("processor", "attention_backend")
INSTALL = choice_option("install", "processor", INSTALLS,
                        doc="'processor': attention processors around the stock ones; 'attention_backend': the "
                            "diffusers attention backend 'visattn_sparse', which context parallelism (Ulysses) "
                            "wraps (visattn.processors.sparse_video.backend)")


def axes(value: int | tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    """A per-axis option (``window_stride``, ``window_dilation``) as ``ndim`` values; None means 1 on every axis."""
    if value is None:
        return (1,) * ndim
    return (value,) * ndim if isinstance(value, int) else value


@dataclass(frozen=True)
class SparseVideoConfig:
    """The validated options of ``sparse_video`` (see the package doc)."""

    strategy: str = "tile_topk"
    keep: float | None = None  # resolved to DEFAULT_KEEP[strategy] for tile_topk and rectified
    top_p: float | None = None
    score: str = "mean"
    stride: int | None = None
    permute: str = "none"
    tile: tuple[int, ...] | None = None
    window: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    window_stride: int | tuple[int, ...] | None = None
    window_dilation: int | tuple[int, ...] | None = None
    grat_pattern: str = "surrounding"
    grat_radius: int = 1
    dense_steps: int = 0
    dense_layers: int = 0
    strict: bool = False

    def __post_init__(self) -> None:
        """The checks across options (each option alone was checked by :data:`OPTIONS`); ``keep=None`` becomes the
        strategy's default (:data:`DEFAULT_KEEP`)."""
        if self.keep is None and self.strategy in DEFAULT_KEEP:
            object.__setattr__(self, "keep", DEFAULT_KEEP[self.strategy])
        if self.stride is not None and self.score != "antidiagonal":
            raise OptionError(f"sparse_video: stride is read only with score='antidiagonal' (got score={self.score!r})")
        if self.score == "antidiagonal":
            stride = self.antidiagonal_stride()
            blocks = {math.prod(t) for t in ([self.tile] if self.tile else DEFAULT_TILE.values())}
            if any(b % stride for b in blocks):
                raise OptionError(f"sparse_video: the antidiagonal stride ({stride}) must divide the block "
                                  f"({' / '.join(map(str, sorted(blocks)))} tokens, a tile's); give another stride "
                                  f"or tile")
        if self.window_stride is not None:
            windows = self.window if self.window is not None else (DEFAULT_WINDOW,) * 3
            for window in windows if isinstance(windows[0], tuple) else (windows,):
                strides = axes(self.window_stride, len(window))
                if (self.window is not None and len(strides) != len(window)) or any(
                        s > w for s, w in zip(strides, window)):
                    raise OptionError(f"sparse_video: window_stride {self.window_stride} must have one value per axis "
                                      f"of the window {window}, each <= the window (a query tile must see itself)")

    @classmethod
    def from_options(cls, **options: Any) -> SparseVideoConfig:
        """The config of ``options`` as given; an option the chosen strategy does not read is an error."""
        values = validate_options("sparse_video", OPTIONS, options)
        check_scope("sparse_video", OPTIONS, options, "diffusers")
        return cls(**values)

    @classmethod
    def resolve(cls, config: SparseVideoConfig | None, options: dict[str, Any]) -> SparseVideoConfig:
        """``config`` (checked already, as ``visattn.apply`` does) or the config of ``options``, not both."""
        if config is None:
            return cls.from_options(**options)
        if options:
            raise OptionError(f"sparse_video: give a config or options, not both (got config and {sorted(options)})")
        return config

    def antidiagonal_stride(self) -> int:
        """The stride of ``score='antidiagonal'`` (``stride`` or :data:`DEFAULT_STRIDE`)."""
        return DEFAULT_STRIDE if self.stride is None else self.stride

    def tile_for(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        tile = self.tile or DEFAULT_TILE[len(grid)]
        if len(tile) != len(grid):
            raise ShapeError(f"sparse_video: tile {tile} cannot cover the {'x'.join(map(str, grid))} token grid; "
                             f"give a tile with {len(grid)} sides")
        return tile
