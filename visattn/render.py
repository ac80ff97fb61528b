"""Draw attention maps as PNG heatmaps, optionally blended over the input image."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .errors import ShapeError

# A perceptually ordered colour ramp (dark blue -> teal -> yellow), interpolated linearly.
_RAMP = np.array([[48, 18, 59], [40, 110, 190], [30, 170, 150], [120, 210, 80], [250, 230, 35]], dtype=np.float32)


def attention_heatmap(attn: Tensor, *, query: int | str = "mean", grid: tuple[int, int] | None = None,
                      key_span: tuple[int, int] | None = None, sample: int = 0) -> np.ndarray:
    """Reduce one recorded map to a 2D array over the image grid.

    Args:
        attn: ``[B, Nq, Nk]`` or ``[B, H, Nq, Nk]`` (heads are averaged).
        query: a query index (e.g. 0 for a class token), or ``"mean"`` to average over queries.
        grid: ``(h, w)`` of the key tokens in ``key_span``; square if omitted.
        key_span: ``[start, end)`` of the image tokens among the keys; defaults to the last ``h*w`` keys.
        sample: which batch element.
    """
    if attn.ndim == 4:
        attn = attn.mean(dim=1)
    if attn.ndim != 3:
        raise ShapeError(f"attention map must be [B, Nq, Nk] or [B, H, Nq, Nk]; got {tuple(attn.shape)}")
    a = attn[sample].float()
    row = a.mean(dim=0) if query == "mean" else a[int(query)]
    nk = row.shape[0]
    if grid is None:  # square; without a span, prefix tokens come first, so take the largest square at the end
        side = math.isqrt((key_span[1] - key_span[0]) if key_span else nk)
        grid = (side, side)
    n_img = grid[0] * grid[1]
    start, end = key_span if key_span else (nk - n_img, nk)
    if end - start != n_img or start < 0:
        raise ShapeError(f"grid {grid} needs {n_img} key tokens; span {start}..{end} of {nk} keys has {end - start}")
    return row[start:end].reshape(grid).cpu().numpy()


def _colorize(heat: np.ndarray) -> np.ndarray:
    lo, hi = float(heat.min()), float(heat.max())
    t = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    pos = t * (len(_RAMP) - 1)
    i = np.clip(pos.astype(int), 0, len(_RAMP) - 2)
    f = (pos - i)[..., None]
    return (_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def heatmap_image(heat: np.ndarray | Tensor, *, image: Any = None, size: int = 448, alpha: float = 0.55
                  ) -> Image.Image:
    """``heat`` (2D) as an RGB heatmap, blended over ``image`` (PIL image, array or ``[3, H, W]`` tensor) at
    the image's size if given, else scaled up by whole pixels towards ``size``."""
    if isinstance(heat, Tensor):
        heat = heat.detach().float().cpu().numpy()
    if heat.ndim != 2:
        raise ShapeError(f"heatmap must be 2D; got shape {heat.shape}")
    colour = Image.fromarray(_colorize(heat))
    if image is not None:
        if isinstance(image, Tensor):
            image = tensor_to_image(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        base = image.convert("RGB")
        colour = colour.resize(base.size, Image.Resampling.BILINEAR)
        out = Image.blend(base, colour, alpha)
    else:
        scale = max(1, size // max(heat.shape))
        out = colour.resize((heat.shape[1] * scale, heat.shape[0] * scale), Image.Resampling.NEAREST)
    return out


def render_map(heat: np.ndarray | Tensor, path: str | Path, *, image: Any = None, size: int = 448,
               alpha: float = 0.55) -> Path:
    """Write ``heat`` (2D) as a PNG heatmap (:func:`heatmap_image`), blended over ``image`` if given."""
    out = heatmap_image(heat, image=image, size=size, alpha=alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """A ``[3, H, W]`` or ``[1, 3, H, W]`` tensor of any range as an RGB PIL image."""
    x = x.detach().float().cpu()
    if x.ndim == 4:
        x = x[0]
    x = (x - x.min()) / (x.max() - x.min() + 1e-12)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def attention_figure(heat: np.ndarray | Tensor, image: Any, path: str | Path, *, title: str = "",
                     size: int = 320) -> Path:
    """Write a PNG of three panels: ``image``, ``heat`` blended over it, and a colour bar labelled with the map's
    smallest and largest values (the ramp is stretched between them), under ``title``."""
    if isinstance(heat, Tensor):
        heat = heat.detach().float().cpu().numpy()
    if isinstance(image, Tensor):
        image = tensor_to_image(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    base = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    overlay = heatmap_image(heat, image=base)
    bar_w, label_w, pad, top = 18, 96, 10, 28 if title else 10
    ramp = _colorize(np.linspace(1.0, 0.0, size, dtype=np.float32)[:, None].repeat(bar_w, axis=1))
    fig = Image.new("RGB", (3 * pad + 2 * size + pad + bar_w + label_w, top + size + pad), "white")
    fig.paste(base, (pad, top))
    fig.paste(overlay, (2 * pad + size, top))
    bar_x = 3 * pad + 2 * size
    fig.paste(Image.fromarray(ramp), (bar_x, top))
    draw = ImageDraw.Draw(fig)
    if title:
        draw.text((pad, 8), title, fill="black")
    draw.text((bar_x + bar_w + 4, top), f"{float(heat.max()):.3g}", fill="black")
    draw.text((bar_x + bar_w + 4, top + size - 12), f"{float(heat.min()):.3g}", fill="black")
    draw.text((bar_x + bar_w + 4, top + size // 2 - 6), "attention", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path)
    return path
