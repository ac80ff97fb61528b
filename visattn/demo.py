"""What the Gradio demo (``demos/app.py``, ``visattn demo``) computes, as plain functions without Gradio.

One part per tab, each on a testbed model shipped in (or trained for) :mod:`visattn.testbed`, or on a
local checkpoint in the same layout:

- ViT (timm): the testbed ViT's prediction; ToMe's merge groups drawn over the image (from
  ``trace_source``); the regions BRA routes one region to, in a chosen layer; ``inspect`` attention
  maps of a layer, per head; throughput and top-1 agreement, stock vs ``tome`` and ``bra``.
- Vision-language (transformers): the testbed VLM's answer to a question, from the stock model and
  under ``prune``, ``visual_sink`` and ``head_modulation``, with the image tokens each one kept,
  found or selected drawn over the image.
- Diffusion (diffusers): the testbed video DiT's sample, dense and under ``sparse_video``, from the
  same noise: frames, latency and PSNR of sparse against dense.

Models load once per checkpoint path (:func:`vit_model`, :func:`vlm_model`, :func:`video_model`);
methods are applied for one computation and removed (:func:`applied`), one computation at a time
(:func:`one_at_a_time`).
Images are RGB ``uint8`` arrays ``[H, W, 3]``; drawings come back as PIL images :data:`DISPLAY` pixels wide.
"""

from __future__ import annotations

import colorsys
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, wraps
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

import visattn

from .render import attention_heatmap, heatmap_image
from .testbed.data import SHAPES, classification_scene, colour_questions, count_questions, multi_object_scene
from .testbed.eval import psnr

#: side of every drawing, in pixels (the testbed images are 64 px; a patch becomes 32 px).
DISPLAY = 256
#: ``progress(fraction, description)``: how long computations report their progress (``gr.Progress`` fits).
Progress = Callable[[float, str], Any]

_LOCK = threading.Lock()


def one_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run under one lock: the cached models are shared by every request, and a method applied for
    one computation must not be seen by another."""

    @wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return fn(*args, **kwargs)

    return locked


def _report(progress: Progress | None, fraction: float, text: str) -> None:
    if progress is not None:
        progress(fraction, text)


@contextmanager
def applied(model: nn.Module, method: str, **options: Any) -> Iterator[Any]:
    """``visattn.apply(model, method, **options)`` for the ``with`` block, removed on the way out."""
    handle = visattn.apply(model, method, **options)
    try:
        yield handle
    finally:
        visattn.remove(model)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (and so where its inputs go)."""
    return next(model.parameters()).device


def _optional(path: str | Path | None) -> str | None:
    """A checkpoint field's value: ``None`` for empty (the shipped weights)."""
    text = str(path).strip() if path is not None else ""
    return text or None


# ---------------------------------------------------------------------------------------------------------------
# images and drawings


def as_rgb(image: Any, size: int) -> np.ndarray:
    """``image`` (PIL image, ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` array) as RGB ``uint8`` ``[size, size, 3]``."""
    if image is None:
        raise ValueError("no image given: upload one or pick an example")
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))
    pil = pil.convert("RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(pil)


def enlarge(image: np.ndarray, size: int = DISPLAY) -> Image.Image:
    """``image`` scaled to ``size`` pixels with sharp pixel edges (the testbed images are tiny)."""
    return Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST)


def palette(n: int) -> np.ndarray:
    """``n`` well-separated saturated colours ``[n, 3]`` ``uint8`` (golden-ratio hue steps)."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    rgb = np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues], dtype=np.float64).reshape(n, 3)
    return (rgb * 255).round().astype(np.uint8)


def paint_patches(image: np.ndarray, colours: np.ndarray, weight: np.ndarray, *, labels: np.ndarray | None = None,
                  size: int = DISPLAY) -> Image.Image:
    """``image`` enlarged, each patch of the ``(h, w)`` grid blended towards ``colours[i, j]`` by ``weight[i, j]``.

    ``colours`` ``[h, w, 3]``, ``weight`` ``[h, w]`` in ``[0, 1]``; with ``labels`` ``[h, w]``, a white line
    is drawn between neighbouring patches whose labels differ (group or region borders).
    """
    h, w = weight.shape
    if size % h or size % w:
        raise ValueError(f"a {h}x{w} patch grid does not divide {size} pixels")
    base = np.asarray(enlarge(image, size)).astype(np.float32)
    up = lambda a: a.repeat(size // h, 0).repeat(size // w, 1)  # noqa: E731
    alpha = up(weight.astype(np.float32))[..., None]
    out = Image.fromarray((base * (1 - alpha) + up(colours.astype(np.float32)) * alpha).astype(np.uint8))
    if labels is not None:
        draw = ImageDraw.Draw(out)
        ph, pw = size // h, size // w
        for i in range(h):
            for j in range(w):
                if j + 1 < w and labels[i, j] != labels[i, j + 1]:
                    draw.line([((j + 1) * pw, i * ph), ((j + 1) * pw, (i + 1) * ph)], fill=(255, 255, 255), width=2)
                if i + 1 < h and labels[i, j] != labels[i + 1, j]:
                    draw.line([(j * pw, (i + 1) * ph), ((j + 1) * pw, (i + 1) * ph)], fill=(255, 255, 255), width=2)
    return out


def mark_tokens(image: np.ndarray, marked: np.ndarray, grid: tuple[int, int], *, dim_unmarked: bool,
                colour: tuple[int, int, int] = (255, 40, 40)) -> Image.Image:
    """``image`` with the image tokens ``marked`` (``[h * w]`` bool, raster order) shown: either every
    unmarked patch darkened (``dim_unmarked``: the marked ones are what a method kept) or the marked
    patches tinted ``colour`` (tokens a method found or selected)."""
    marked = np.asarray(marked, dtype=bool).reshape(grid)
    if dim_unmarked:
        return paint_patches(image, np.zeros((*grid, 3)), np.where(marked, 0.0, 0.75))
    return paint_patches(image, np.broadcast_to(np.array(colour), (*grid, 3)), np.where(marked, 0.6, 0.0))


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float]:
    """``fn()``'s result and its median wall time in seconds over ``repeats`` runs after one warm-up."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - begin)
    return out, float(np.median(times))


# ---------------------------------------------------------------------------------------------------------------
# ViT tab


def vit_examples(n: int = 4, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """Test images of the testbed's shape classifier, the first of each of ``n`` different classes, with
    their labels."""
    if not 1 <= n <= len(SHAPES):
        raise ValueError(f"n must be in 1..{len(SHAPES)} (got {n})")
    out: dict[str, np.ndarray] = {}
    index = 0
    while len(out) < n:
        scene = classification_scene(seed, "test", index)
        out.setdefault(SHAPES[scene.label], scene.image)
        index += 1
    return [(image, label) for label, image in out.items()]


@lru_cache(maxsize=2)
def vit_model(checkpoint: str | None = None, device: str = "cpu") -> nn.Module:
    """The testbed ViT on ``device`` (shipped weights, or ``checkpoint``: a ``vit.safetensors`` in that layout)."""
    from .testbed.vit import load_vit

    return load_vit(_optional(checkpoint), device)


def _vit_input(model: nn.Module, image: Any) -> tuple[np.ndarray, torch.Tensor]:
    from .testbed.vit import to_input

    size = int(model.patch_embed.img_size[0])
    rgb = as_rgb(image, size)
    return rgb, to_input(rgb[None], device_of(model))


def _probabilities(logits: torch.Tensor) -> dict[str, float]:
    return {SHAPES[i]: round(float(p), 4) for i, p in enumerate(logits.softmax(-1)[0])}


@one_at_a_time
@torch.no_grad()
def classify(model: nn.Module, image: Any) -> dict[str, float]:
    """The stock model's class probabilities for ``image``."""
    _, x = _vit_input(model, image)
    return _probabilities(model(x))


@dataclass
class MergeGroups:
    """ToMe on one image: the drawing, the prediction under ToMe and the tokens entering each block."""

    drawing: Image.Image
    probabilities: dict[str, float]
    token_counts: list[int]
    groups: int


@one_at_a_time
@torch.no_grad()
def tome_groups(model: nn.Module, image: Any, r: int) -> MergeGroups:
    """ToMe with ``r`` merges per block; every group of patches that ended in one token gets a colour
    (patches left alone are not tinted) and white borders separate the groups."""
    from .frameworks.timm import vit_grid

    rgb, x = _vit_input(model, image)
    grid = vit_grid(model)
    with applied(model, "tome", r=int(r), trace_source=True) as handle:
        logits = model(x)
        source, counts = handle.source, handle.token_counts
    prefix = int(model.num_prefix_tokens)
    n_img = grid[0] * grid[1]
    if source is None:  # nothing merged: every patch its own token
        group = np.arange(n_img)
    else:
        group = source[0, :, prefix:].float().argmax(0).numpy()  # the final token holding each patch
    sizes = np.bincount(group, minlength=int(group.max()) + 1)
    colours = palette(len(sizes))[group].reshape(*grid, 3)
    weight = np.where(sizes[group] > 1, 0.6, 0.0).reshape(grid)
    drawing = paint_patches(rgb, colours, weight, labels=group.reshape(grid))
    return MergeGroups(drawing, _probabilities(logits), counts or [prefix + n_img] * len(model.blocks),
                       len(np.unique(group)))


def region_at(point: tuple[float, float], n_win: int) -> int:
    """The region (raster index in the ``n_win x n_win`` grid) under ``point`` = ``(x, y)`` as fractions
    of the image's width and height."""
    x, y = (min(max(float(v), 0.0), 1.0 - 1e-9) for v in point)
    return int(y * n_win) * n_win + int(x * n_win)


@dataclass
class Routes:
    """BRA in one layer for one region: the drawing, the routed regions and the prediction under BRA."""

    drawing: Image.Image
    region: int
    routed: list[int]
    probabilities: dict[str, float]


@one_at_a_time
@torch.no_grad()
def bra_routes(model: nn.Module, image: Any, *, n_win: int, topk: int, layer: int, region: int) -> Routes:
    """Bi-level routing attention with ``n_win`` regions per side and ``topk`` routes; which regions
    ``region`` attends to in ``layer`` (the query region red, its routed regions yellow)."""
    from .frameworks.timm import vit_grid

    rgb, x = _vit_input(model, image)
    grid = vit_grid(model)
    if not 0 <= region < n_win * n_win:
        raise ValueError(f"region must be in 0..{n_win * n_win - 1} for n_win={n_win} (got {region})")
    with applied(model, "bra", n_win=int(n_win), topk=int(topk)) as handle:
        logits = model(x)
    routes = handle.routes.get(layer)  # none at topk = n_win ** 2: every region attends to every region
    routed = routes[0, region].tolist() if routes is not None else list(range(n_win * n_win))
    side = grid[0] // n_win, grid[1] // n_win
    colours = np.zeros((n_win, n_win, 3))
    weight = np.zeros((n_win, n_win))
    for r in routed:
        colours[r // n_win, r % n_win] = (255, 220, 0)
        weight[r // n_win, r % n_win] = 0.5
    colours[region // n_win, region % n_win] = (255, 30, 30)
    weight[region // n_win, region % n_win] = 0.6  # red even where the region routes to itself
    regions = np.arange(n_win * n_win).reshape(n_win, n_win)
    up = lambda a: a.repeat(side[0], 0).repeat(side[1], 1)  # noqa: E731  region grid -> patch grid
    drawing = paint_patches(rgb, up(colours), up(weight), labels=up(regions))
    return Routes(drawing, region, routed, _probabilities(logits))


@one_at_a_time
@torch.no_grad()
def attention_maps(model: nn.Module, image: Any, *, layer: int, query: str = "class token"
                   ) -> list[tuple[Image.Image, str]]:
    """``inspect``'s map of ``layer`` for each head and for their mean, drawn over the image. ``query``:
    ``"class token"`` (where the class token looks) or ``"mean"`` (the attention every patch receives,
    averaged over queries)."""
    if query not in ("class token", "mean"):
        raise ValueError(f"query must be 'class token' or 'mean' (got {query!r})")
    rgb, x = _vit_input(model, image)
    with applied(model, "inspect", layers=[int(layer)], per_head=True) as handle:
        model(x)
        maps = handle.last(int(layer))  # [1, H, N, N]
    prefix = int(model.num_prefix_tokens)
    q = 0 if query == "class token" and prefix else "mean"
    base = enlarge(rgb)
    span = (prefix, maps.shape[-1])
    out = [(heatmap_image(attention_heatmap(maps[:, [h]], query=q, key_span=span), image=base),
            f"layer {layer}, head {h}") for h in range(maps.shape[1])]
    out.append((heatmap_image(attention_heatmap(maps, query=q, key_span=span), image=base),
                f"layer {layer}, mean of {maps.shape[1]} heads"))
    return out


@one_at_a_time
@torch.no_grad()
def vit_throughput(model: nn.Module, *, r: int, n_win: int, topk: int, batch: int = 64, repeats: int = 3,
                   progress: Progress | None = None) -> list[dict[str, Any]]:
    """Images per second of the stock model, ``tome`` (``r``) and ``bra`` (``n_win``, ``topk``) on a batch
    of testbed test images, each with its speed-up and its top-1 agreement with stock."""
    from .testbed.data import classification_batch
    from .testbed.vit import to_input

    device = device_of(model)
    images, _ = classification_batch("test", batch)
    x = to_input(images, device)
    runs: list[tuple[str, str | None, dict[str, Any]]] = [
        ("stock", None, {}), (f"tome r={r}", "tome", {"r": int(r)}),
        (f"bra n_win={n_win} topk={topk}", "bra", {"n_win": int(n_win), "topk": int(topk)})]
    rows: list[dict[str, Any]] = []
    for i, (name, method, options) in enumerate(runs):
        _report(progress, i / len(runs), f"timing {name}")
        if method is None:
            logits, seconds = _timed(lambda: model(x), device, repeats)
            stock_pred, stock_seconds = logits.argmax(-1), seconds
        else:
            with applied(model, method, **options):
                logits, seconds = _timed(lambda: model(x), device, repeats)
        rows.append({"model": name, "images/s": round(batch / seconds, 1),
                     "speed-up": round(stock_seconds / seconds, 2),
                     "top-1 agreement": round(float((logits.argmax(-1) == stock_pred).float().mean()), 3)})
    _report(progress, 1.0, "done")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# vision-language tab


def vlm_examples(n: int = 3, seed: int = 0) -> list[tuple[np.ndarray, str, str]]:
    """Test scenes of the VLM testbed with one colour or count question each, and the true answer."""
    out = []
    for i in range(n):
        scene = multi_object_scene(seed, "test", i)
        qa = (colour_questions(scene) if i % 2 == 0 else count_questions(scene)) or count_questions(scene)
        out.append((scene.image, *qa[0]))
    return out


def vlm_missing(checkpoint: str | None = None) -> str | None:
    """Why the VLM tab cannot run with ``checkpoint`` (default: the shipped weights), or ``None`` if it can."""
    from .testbed.vlm import SHIPPED_VLM

    path = Path(_optional(checkpoint) or SHIPPED_VLM)
    if path.is_file() and path.with_name("vlm_tokenizer.json").is_file():
        return None
    return (f"No testbed VLM weights at `{path}` (with `vlm_tokenizer.json` beside them). Train some with "
            f"`python scripts/train_testbed_vlm.py --out DIR` and give `DIR/vlm.safetensors` as the checkpoint.")


@lru_cache(maxsize=2)
def vlm_model(checkpoint: str | None = None, device: str = "cpu") -> tuple[nn.Module, Any]:
    """The testbed VLM on ``device`` and its tokenizer (shipped weights, or ``checkpoint``: a ``vlm.safetensors``
    with ``vlm_tokenizer.json`` beside it); a clear ``FileNotFoundError`` when there are none."""
    from .testbed.vlm import load_vlm

    why = vlm_missing(checkpoint)
    if why is not None:
        raise FileNotFoundError(why.replace("`", ""))
    return load_vlm(_optional(checkpoint), device=device)


@dataclass
class VlmAnswer:
    """One model's answer: which method with which options, the answer, its time and the tokens drawn."""

    method: str
    options: dict[str, Any]
    answer: str
    seconds: float
    drawing: Image.Image
    note: str


def _vlm_tokens(method: str, handle: Any, n_image: int) -> tuple[np.ndarray | None, bool, str]:
    """The image tokens to draw for ``method``'s handle: ``(marked [n_image] bool or None, dim_unmarked, note)``."""
    if method == "prune":
        kept = handle.kept
        if not kept:
            return None, True, "kept every image token"
        stage = max(kept)  # the last stage: what the deepest layers see
        positions = kept[stage][0]
        where = "the language model's input" if stage == 0 else f"decoder layer {stage}"
        if positions.ndim == 2:  # PLPHP: one set per kv head
            positions, where = positions[0], f"kv head 0 of {where}'s cache"
        marked = np.zeros(n_image, dtype=bool)
        marked[positions[positions < n_image].numpy()] = True
        return marked, True, f"kept {int(marked.sum())} of {n_image} image tokens in {where} (others darkened)"
    if method == "visual_sink":
        sinks = [handle.sink_tokens[layer][0, :n_image] for layer in sorted(handle.sink_tokens)]
        marked = torch.stack(sinks).any(0).numpy() if sinks else np.zeros(n_image, dtype=bool)
        if not marked.any():
            return None, False, "no visual sink tokens found (a lower tau finds more)"
        per_layer = ", ".join(str(int(t.sum())) for t in sinks)
        return marked, False, (f"{int(marked.sum())} image tokens are visual sinks in some layer (red); per layer "
                               f"with sinks: {per_layer}")
    if method == "head_modulation" and handle.selected is not None:
        marked = handle.selected[0, :n_image].numpy()
        return marked, False, f"{int(marked.sum())} image tokens selected (red)"
    if method == "head_modulation" and handle.blind is not None:
        marked = handle.blind[0, :n_image].numpy()
        return marked, False, f"{int(marked.sum())} blind image tokens (red): all the blind model sees of the image"
    return None, False, "modulates attention to every image token"


@one_at_a_time
@torch.no_grad()
def vlm_answers(model: nn.Module, tokenizer: Any, image: Any, question: str,
                methods: dict[str, dict[str, Any]], progress: Progress | None = None) -> list[VlmAnswer]:
    """The answer to ``question`` about ``image`` from the stock model, then under each of ``methods``
    (name -> options, e.g. ``{"prune": {"strategy": "fastv", "keep": 0.5}}``), with drawings of the image
    tokens each one kept (``prune``), found (``visual_sink``), selected (``head_modulation`` imbalance) or found blind
    (``head_modulation`` avisc)."""
    from .testbed.vlm import IMAGE_TOKENS, answer, encode

    question = question.strip()
    if not question:
        raise ValueError("ask a question, e.g. 'what colour is the circle?'")
    encode(tokenizer, question)  # a word outside the testbed's vocabulary: a clear ValueError now
    size = int(model.config.vision_config.image_size)
    rgb = as_rgb(image, size)
    side = math.isqrt(IMAGE_TOKENS)
    runs = [("stock", {}), *methods.items()]
    out = []
    for i, (method, options) in enumerate(runs):
        _report(progress, i / len(runs), f"answering with {method}")
        begin = time.perf_counter()
        if method == "stock":
            words = answer(model, tokenizer, rgb[None], [question], device_of(model))
            marked, dim, note = None, False, "every image token"
        else:
            with applied(model, method, **options) as handle:
                words = answer(model, tokenizer, rgb[None], [question], device_of(model))
                marked, dim, note = _vlm_tokens(method, handle, IMAGE_TOKENS)
        seconds = time.perf_counter() - begin
        drawing = enlarge(rgb) if marked is None else mark_tokens(rgb, marked, (side, side), dim_unmarked=dim)
        out.append(VlmAnswer(method, dict(options), words[0], round(seconds, 3), drawing, note))
    _report(progress, 1.0, "done")
    return out


# ---------------------------------------------------------------------------------------------------------------
# diffusion tab


def video_quality(checkpoint: str | None = None) -> str | None:
    """A warning when the video DiT's recorded class accuracy (``video_dit.json``) is below the testbed's bar,
    ``None`` when it reaches it or the weights record none."""
    import json

    from .testbed.video import QUALITY_BAR, SHIPPED_VIDEO_DIT

    meta = Path(_optional(checkpoint) or SHIPPED_VIDEO_DIT).with_suffix(".json")
    accuracy = json.loads(meta.read_text()).get("class_accuracy") if meta.is_file() else None
    if accuracy is None or accuracy >= QUALITY_BAR:
        return None
    return (f"This video DiT is below its quality bar: the testbed ViT sees the conditioned shape in "
            f"{accuracy:.0%} of its frames (bar {QUALITY_BAR:.0%}, chance 12.5%); the others draw the wrong shape "
            f"or none. Dense and sparse still start from the same noise, so how far sparse_video moves the sample "
            f"shows; what it keeps of a good model does not.")


def video_missing(checkpoint: str | None = None) -> str | None:
    """Why the diffusion tab cannot run with ``checkpoint`` (default: the shipped weights), or ``None`` if it can."""
    from .testbed.video import SHIPPED_VIDEO_DIT

    path = Path(_optional(checkpoint) or SHIPPED_VIDEO_DIT)
    if path.is_file() and path.with_suffix(".json").is_file():
        return None
    return (f"No testbed video DiT at `{path}` (with `{path.with_suffix('.json').name}` beside it). Train one with "
            f"`python scripts/train_testbed_video.py --out DIR` and give `DIR/video_dit.safetensors` as the "
            f"checkpoint.")


@lru_cache(maxsize=2)
def video_model(checkpoint: str | None = None, device: str = "cpu") -> nn.Module:
    """The testbed video DiT on ``device`` (shipped weights, or ``checkpoint``: a ``video_dit.safetensors`` with
    its ``video_dit.json`` beside it); a clear ``FileNotFoundError`` when there are none."""
    from .testbed.video import load_video_dit

    why = video_missing(checkpoint)
    if why is not None:
        raise FileNotFoundError(why.replace("`", ""))
    return load_video_dit(_optional(checkpoint), device)


def to_frames(video: torch.Tensor) -> np.ndarray:
    """One sample ``[F, 3, H, W]`` in ``[0, 1]`` as ``uint8`` frames ``[F, H, W, 3]``."""
    return (video.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def frame_strip(rows: list[np.ndarray], height: int = 96, gap: int = 4) -> Image.Image:
    """Clips ``[F, H, W, 3]`` as one picture, one clip per row, frames left to right, scaled to ``height``."""
    frames = max(len(r) for r in rows)
    width = round(height * rows[0].shape[2] / rows[0].shape[1])
    out = Image.new("RGB", (frames * (width + gap) - gap, len(rows) * (height + gap) - gap), (255, 255, 255))
    for i, clip in enumerate(rows):
        for t, frame in enumerate(clip):
            tile = Image.fromarray(frame).resize((width, height), Image.Resampling.NEAREST)
            out.paste(tile, (t * (width + gap), i * (height + gap)))
    return out


def write_gif(frames: np.ndarray, path: str | Path, size: int = DISPLAY, fps: float = 6.0) -> Path:
    """``frames`` ``[F, H, W, 3]`` as a looping animated GIF, scaled to ``size`` pixels wide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height = round(size * frames.shape[1] / frames.shape[2])
    pics = [Image.fromarray(f).resize((size, height), Image.Resampling.NEAREST) for f in frames]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=round(1000 / fps), loop=0)
    return path


@dataclass
class VideoComparison:
    """Dense and sparse samples ``[F, H, W, 3]`` ``uint8`` from the same noise, their latencies and PSNR."""

    dense: np.ndarray
    sparse: np.ndarray
    dense_seconds: float
    sparse_seconds: float
    psnr: float


@one_at_a_time
@torch.no_grad()
def video_compare(model: nn.Module, label: int, *, seed: int, steps: int, guidance: float, strategy: str,
                  keep: float, progress: Progress | None = None) -> VideoComparison:
    """The testbed video DiT's sample for class ``label`` (an index into :data:`~.testbed.data.SHAPES`),
    dense and with ``sparse_video`` (``strategy``, ``keep``) on its Wan transformer, from the same noise:
    both clips, each run's wall time and the PSNR of the sparse clip against the dense one."""
    from .testbed.video import sample

    done = [0]

    def step(count: int) -> None:
        done[0] += count
        _report(progress, done[0] / (2 * steps), f"step {done[0] % steps or steps}/{steps} "
                                                 f"({'dense' if done[0] <= steps else 'sparse'})")

    def run() -> tuple[torch.Tensor, float]:
        begin = time.perf_counter()
        clip = sample(model, [int(label)], seed=int(seed), steps=int(steps), guidance=float(guidance), progress=step)
        return clip[0], time.perf_counter() - begin

    dense, dense_s = run()
    with applied(model.transformer, "sparse_video", strategy=strategy, keep=float(keep)):
        sparse, sparse_s = run()
    _report(progress, 1.0, "done")
    return VideoComparison(to_frames(dense), to_frames(sparse), round(dense_s, 3), round(sparse_s, 3),
                           round(psnr(sparse, dense), 2))
