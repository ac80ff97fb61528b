"""Subject regions on a token grid: the framework-free part of IR-Diffusion's isolation and reposition
attention (Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation and
Reposition Attention).

A :class:`Region` is a subject's place in an image of ``H x W`` pixels: a box ``(x0, y0, x1, y1)``
(pixels, ``x0 < x1 <= W``, ``y0 < y1 <= H``) or a mask (``[H, W]`` bool; its bounding box is its box).
On a ``h x w`` token grid a region covers the tokens whose cell (``H / h x W / w`` pixels) it covers
at least half of, boxes and masks alike (:func:`token_mask`; never empty: the most covered token
at least).

Reposition (:func:`reposition`): a target token at pixel centre ``p`` inside target box ``T`` takes
the reference token at ``R_0 + (p - T_0) * |R| / |T|`` (nearest token; kept if the reference region
covers it): the reference subject scaled and moved onto the target box, token by token.

Isolation (:func:`isolation_mask`): in a sequence of text tokens and image tokens, image tokens of
different subjects may not attend to each other; each subject's tokens also attend to the extra keys
of its own reference subject, and nothing else does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """A subject's region: ``box`` in pixels and, for a mask, ``mask`` (``[H, W]`` bool)."""

    box: Box
    mask: Tensor | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        """``(H, W)`` of a mask region, ``None`` for a box."""
        return None if self.mask is None else (int(self.mask.shape[0]), int(self.mask.shape[1]))


def is_box(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def as_region(value: Any) -> Region:
    """A box ``(x0, y0, x1, y1)`` or a mask: a PIL image (nonzero pixels of its L mode), a 2-D array
    or tensor (nonzero entries). Raises ``ValueError`` for anything else or an empty mask."""
    if is_box(value):
        x0, y0, x1, y1 = (float(v) for v in value)
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"box {tuple(value)} must have x0 < x1 and y0 < y1")
        return Region((x0, y0, x1, y1))
    if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
        import numpy as np

        value = np.array(value.convert("L"))
    mask = torch.as_tensor(value)
    if mask.dim() != 2:
        raise ValueError(f"a mask must be 2-D [H, W]; got shape {list(mask.shape)}")
    mask = mask != 0
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    if rows.numel() == 0:
        raise ValueError("a subject mask is empty")
    box = (float(cols[0]), float(rows[0]), float(cols[-1]) + 1, float(rows[-1]) + 1)
    return Region(box, mask)


def check_in_image(region: Region, image_size: tuple[int, int], what: str) -> None:
    """``ValueError`` if a mask is not ``image_size`` or a box leaves the image."""
    height, width = image_size
    if region.mask is not None:
        if region.size != (height, width):
            raise ValueError(f"{what} is a {region.size[0]}x{region.size[1]} mask (HxW) but the image is "
                             f"{height}x{width}")
        return
    x0, y0, x1, y1 = region.box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(f"{what} {region.box} lies outside the {width}x{height} image (x in [0, {width}], "
                         f"y in [0, {height}])")


def token_mask(region: Region, image_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """``[h * w]`` bool: the tokens of a ``h x w`` grid that ``region`` covers (see module docstring)."""
    (height, width), (h, w) = image_size, grid
    if region.mask is not None:
        cover = F.interpolate(region.mask[None, None].float(), size=(h, w), mode="area")[0, 0]
        inside = cover >= 0.5
        if not inside.any():
            inside = cover == cover.max()
    else:  # the covered share of each cell, per axis
        x0, y0, x1, y1 = region.box
        top, left = torch.arange(h) * height / h, torch.arange(w) * width / w
        cover_y = ((torch.minimum(top + height / h, torch.tensor(y1)) - torch.clamp(top, min=y0)) * h / height).clamp(0)
        cover_x = ((torch.minimum(left + width / w, torch.tensor(x1)) - torch.clamp(left, min=x0)) * w / width).clamp(0)
        cover = cover_y[:, None] * cover_x[None, :]
        inside = cover >= 0.5
        if not inside.any():
            inside = cover == cover.max()
    return inside.flatten()


def reposition(reference: Region, target: Region, image_size: tuple[int, int], grid: tuple[int, int],
               enabled: bool = True) -> tuple[Tensor, Tensor]:
    """The reference subject's tokens, placed for the target: ``(source, place)``, both ``[M]`` raster
    indices on ``grid``: reference token ``source[m]`` stands at position ``place[m]``.

    With ``enabled`` the reference subject is scaled and moved onto the target box (module docstring);
    without, its tokens keep their own positions (``source == place``)."""
    ref_tokens = token_mask(reference, image_size, grid)
    if not enabled:
        idx = ref_tokens.nonzero()[:, 0]
        return idx, idx
    (height, width), (h, w) = image_size, grid
    place = token_mask(target, image_size, grid).nonzero()[:, 0]
    py = (torch.div(place, w, rounding_mode="floor") + 0.5) * height / h
    px = (place % w + 0.5) * width / w
    tx0, ty0, tx1, ty1 = target.box
    rx0, ry0, rx1, ry1 = reference.box
    ry = ry0 + (py - ty0) * (ry1 - ry0) / (ty1 - ty0)
    rx = rx0 + (px - tx0) * (rx1 - rx0) / (tx1 - tx0)
    row = (ry * h / height).floor().long().clamp(0, h - 1)
    col = (rx * w / width).floor().long().clamp(0, w - 1)
    source = row * w + col
    keep = ref_tokens[source]
    return source[keep], place[keep]


def subject_map(targets: list[Region], image_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """``[h * w]`` long: the subject each target token belongs to (``-1``: none; the first region wins)."""
    subject = torch.full((math.prod(grid),), -1, dtype=torch.long)
    for i, region in enumerate(targets):
        subject[token_mask(region, image_size, grid) & (subject < 0)] = i
    return subject


def isolation_mask(subject: Tensor, extra_owner: Tensor, text_tokens: int = 0) -> Tensor:
    """Boolean attention mask (True = attend) of the target: ``[S, S + M]``.

    The sequence is ``text_tokens`` text tokens then the image tokens (``subject`` ``[N]``, ``-1`` for
    tokens of no subject), ``S = text_tokens + N``; the ``M`` extra keys are reference tokens,
    ``extra_owner[m]`` the subject they belong to. Isolation: an image token of subject ``i`` attends
    to no token of a subject ``j != i``; text and background tokens attend to, and are attended by,
    every token of the sequence. Reference keys are attended by their own subject's tokens only.
    """
    seq = torch.cat([subject.new_full((text_tokens,), -1), subject])
    q, k = seq[:, None], seq[None, :]
    within = (q < 0) | (k < 0) | (q == k)
    extra = (q >= 0) & (q == extra_owner[None, :])
    return torch.cat([within, extra], dim=1)
