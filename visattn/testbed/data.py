"""Deterministic synthetic data for the fidelity testbeds: shapes, scenes, questions, captions, videos.

Every sample is a pure function of ``(seed, split, index)``: its random generator is seeded with
that triple, so a sample never depends on how many workers made it or in which order, and the
splits (``train``, ``val``, ``test``) never share a generator stream.

- :func:`classification_scene` — one main shape (the label, one of :data:`SHAPES`) in a random
  colour, size, rotation and position on a textured background, with small distractor shapes of
  other classes (at most half the main shape's size) and occluding bars. :func:`classification_batch`
  makes many of them, optionally in worker processes: this is the ViT's data.
- :func:`multi_object_scene` — one to four shapes with a popularity and co-occurrence prior
  (:data:`POPULARITY`, :data:`PARTNERS`), for vision-language testbeds. Each :class:`Scene` carries
  its object list (shape, colour, box); :func:`object_statistics`, :func:`pope_questions` (POPE's
  random / popular / adversarial absent-object negatives), :func:`colour_questions`,
  :func:`count_questions` and :func:`captions` turn it into questions and reference captions.
- :func:`moving_shapes_video` — a short clip of shapes moving (and bouncing) over a static textured
  background, with per-frame boxes and a caption; :func:`video_batch` makes many one-shape clips,
  optionally in worker processes: this is the video DiT's data.

Images are ``uint8`` arrays ``[H, W, 3]``; shapes are drawn at twice the resolution and reduced,
so their edges are anti-aliased. Object colours are saturated named colours (:data:`COLOURS`);
backgrounds and occluders are desaturated, so an object's colour never appears in the background.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30), "green": (30, 200, 40), "blue": (40, 80, 235), "yellow": (240, 220, 30),
    "magenta": (220, 40, 220), "cyan": (30, 215, 225), "orange": (245, 135, 20), "white": (245, 245, 245),
}
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "checker", "noise", "gradient")
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: relative frequency of each shape in multi-object scenes (so "popular" negatives mean something).
POPULARITY: dict[str, float] = dict(zip(SHAPES, (0.22, 0.18, 0.15, 0.12, 0.10, 0.09, 0.08, 0.06)))
#: shapes that tend to appear together in multi-object scenes (so "adversarial" negatives mean something).
PARTNERS: dict[str, str] = {"circle": "ring", "ring": "circle", "square": "diamond", "diamond": "square",
                            "star": "cross", "cross": "star", "triangle": "hexagon", "hexagon": "triangle"}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
#: the default range of a moving shape's diameter, as fractions of the frame (:func:`moving_shapes_video`).
SHAPE_SCALE: tuple[float, float] = (0.3, 0.5)
_SUPERSAMPLE = 2
_COLOUR_JITTER = 15


@dataclass(frozen=True)
class SceneObject:
    """One shape in an image: its class, colour name and pixel box ``(x0, y0, x1, y1)``, ends exclusive."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    """An image with what is in it. ``objects[0]`` is the main object of a classification scene."""

    image: np.ndarray
    objects: list[SceneObject]
    background: str
    label: int = -1
    occluders: int = 0


@dataclass
class Video:
    """A clip ``frames`` ``[T, H, W, 3]`` uint8; ``boxes[t][i]`` is object ``i``'s box in frame ``t``."""

    frames: np.ndarray
    objects: list[SceneObject]
    boxes: list[list[tuple[int, int, int, int]]]
    background: str
    label: int
    caption: str


@dataclass
class ObjectStatistics:
    """Shape frequencies and pairwise co-occurrence counts over a set of scenes (POPE's negative pools)."""

    frequency: Counter = field(default_factory=Counter)
    cooccurrence: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SHAPES})


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``: a pure function of the three."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0 (got seed={seed}, index={index})")
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` centred at ``(cx, cy)`` with outer radius ``r``, rotated by ``angle``."""
    if shape in ("circle", "ring"):
        radii, n = [1.0], 48
    elif shape == "square":
        radii, n = [1.0], 4
    elif shape == "triangle":
        radii, n = [1.0], 3
    elif shape == "hexagon":
        radii, n = [1.0], 6
    elif shape == "diamond":
        radii, n = [1.0, 0.55], 4
    elif shape == "star":
        radii, n = [1.0, 0.42], 10
    elif shape == "cross":
        w = 0.32
        pts = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w),
               (-w, 1)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")
    out = []
    for i in range(n):
        a = angle + 2 * math.pi * i / n - math.pi / 2
        rad = r * radii[i % len(radii)]
        out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def shape_mask(shape: str, cx: float, cy: float, size: float, angle: float, canvas: int) -> np.ndarray:
    """Boolean mask ``[canvas, canvas]`` of ``shape`` whose bounding circle has diameter ``size``."""
    r = size / 2
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    draw.polygon(_outline(shape, cx, cy, r, angle), fill=255)
    if shape == "ring":
        draw.polygon(_outline("circle", cx, cy, 0.55 * r, 0.0), fill=0)
    return np.asarray(img) > 127


@lru_cache(maxsize=8)
def _grid(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _grey_tint(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(45, 165) + rng.uniform(-18, 18, size=3)


def background(rng: np.random.Generator, kind: str, canvas: int) -> np.ndarray:
    """A desaturated textured background ``[canvas, canvas, 3]`` float32 of the given kind."""
    yy, xx = _grid(canvas)
    if kind == "plain":
        t = np.zeros_like(xx)
    elif kind == "stripes":
        theta, freq = rng.uniform(0, math.pi), rng.uniform(3, 10)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    elif kind == "checker":
        freq = rng.integers(3, 9)
        t = ((np.floor(xx * freq) + np.floor(yy * freq)) % 2).astype(np.float32)
    elif kind == "noise":
        cells = int(rng.integers(3, 9))
        low = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        t = np.asarray(low.resize((canvas, canvas), Image.BILINEAR), dtype=np.float32) / 255
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(theta) + yy * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        raise ValueError(f"unknown background {kind!r}; accepted: {', '.join(BACKGROUNDS)}")
    c0, c1 = _grey_tint(rng), _grey_tint(rng)
    return (c0 + t[..., None] * (c1 - c0)).astype(np.float32)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    s = _SUPERSAMPLE
    return int(xs.min()) // s, int(ys.min()) // s, int(xs.max()) // s + 1, int(ys.max()) // s + 1


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


class _Canvas:
    """A supersampled image being drawn on; :meth:`finish` reduces it to ``size`` pixels, uint8."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng, self.size, self.canvas = rng, size, size * _SUPERSAMPLE
        self.kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        self.pixels = background(rng, self.kind, self.canvas)

    def place(self, shape: str, colour: str, size: float, avoid: Sequence[tuple[int, int, int, int]] = (),
              max_overlap: float = 0.0, tries: int = 30) -> SceneObject | None:
        """Draw ``shape`` at a random position and rotation, fully inside the image and overlapping
        each box in ``avoid`` by at most ``max_overlap``; ``None`` if no such position was found."""
        s = _SUPERSAMPLE
        for _ in range(tries):
            half = size / 2 + 1
            cx, cy = self.rng.uniform(half, self.size - half, size=2)
            angle = self.rng.uniform(0, 2 * math.pi)
            box = (int(cx - half), int(cy - half), int(math.ceil(cx + half)), int(math.ceil(cy + half)))
            if all(_overlap(box, b) <= max_overlap for b in avoid):
                mask = shape_mask(shape, cx * s, cy * s, size * s, angle, self.canvas)
                rgb = np.clip(np.array(COLOURS[colour]) + self.rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3),
                              0, 255)
                self.pixels[mask] = rgb
                return SceneObject(shape, colour, _box(mask))
        return None

    def occlude(self, box: tuple[int, int, int, int]) -> None:
        """A desaturated bar from one side of ``box`` to the other, 2-4 pixels wide."""
        s = _SUPERSAMPLE
        x0, y0, x1, y1 = (v * s for v in box)
        if self.rng.random() < 0.5:
            ends = [(x0, self.rng.uniform(y0, y1)), (x1, self.rng.uniform(y0, y1))]
        else:
            ends = [(self.rng.uniform(x0, x1), y0), (self.rng.uniform(x0, x1), y1)]
        img = Image.new("L", (self.canvas, self.canvas), 0)
        ImageDraw.Draw(img).line(ends, fill=255, width=int(self.rng.integers(2, 5)) * s)
        self.pixels[np.asarray(img) > 127] = _grey_tint(self.rng)

    def finish(self) -> np.ndarray:
        p = self.pixels  # 2x2 box filter (_SUPERSAMPLE == 2)
        small = (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]) / 4
        small += self.rng.normal(0, 3, small.shape).astype(np.float32)
        return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator) -> str:
    return list(COLOURS)[int(rng.integers(len(COLOURS)))]


def classification_scene(seed: int, split: str, index: int, size: int = 64) -> Scene:
    """A main shape (the label) 35-70% of the image wide, 0-2 smaller distractors, 0-2 occluding bars."""
    rng = rng_for(seed, split, index)
    canvas = _Canvas(rng, size)
    label = int(rng.integers(len(SHAPES)))
    main_size = rng.uniform(0.35, 0.7) * size
    others = [s for s in SHAPES if s != SHAPES[label]]
    n_distractors = int(rng.choice(3, p=[0.4, 0.35, 0.25]))
    objects: list[SceneObject] = []
    for _ in range(n_distractors):  # drawn first so that the main shape is never hidden by one
        d = canvas.place(others[int(rng.integers(len(others)))], _colour(rng),
                         rng.uniform(0.2, 0.5) * main_size, avoid=[o.box for o in objects])
        if d is not None:
            objects.append(d)
    main = canvas.place(SHAPES[label], _colour(rng), main_size, avoid=[o.box for o in objects], max_overlap=0.25,
                        tries=100)
    if main is None:  # no room left beside the distractors: draw it anywhere
        main = canvas.place(SHAPES[label], _colour(rng), main_size, avoid=[o.box for o in objects], max_overlap=1.0)
    n_occluders = int(rng.choice(3, p=[0.4, 0.35, 0.25]))
    for _ in range(n_occluders):
        canvas.occlude(main.box)
    return Scene(canvas.finish(), [main, *objects], canvas.kind, label, n_occluders)


def _classification_chunk(args: tuple[int, str, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, split, start, stop, size = args
    scenes = [classification_scene(seed, split, i, size) for i in range(start, stop)]
    return np.stack([s.image for s in scenes]), np.array([s.label for s in scenes], dtype=np.int64)


def _video_chunk(args: tuple[int, str, int, int, int, int, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    seed, split, start, stop, size, frames, shape_scale = args
    videos = [moving_shapes_video(seed, split, i, frames, size, shape_scale=shape_scale) for i in range(start, stop)]
    return np.stack([v.frames for v in videos]), np.array([v.label for v in videos], dtype=np.int64)


def _in_chunks(make: Callable[[tuple], tuple[np.ndarray, np.ndarray]], split: str, n: int, seed: int, start: int,
               workers: int, *args: Any) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start .. start+n-1`` of ``split`` drawn by ``make`` in chunks, in ``workers`` processes if > 1."""
    rng_for(seed, split, start)  # validates split, seed and start early
    if n <= 0:
        raise ValueError(f"n must be >= 1 (got {n})")
    chunk = max(1, min(2000, -(-n // max(workers, 1))))
    jobs = [(seed, split, a, min(a + chunk, start + n), *args) for a in range(start, start + n, chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(make, jobs))
    else:
        parts = [make(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def classification_batch(split: str, n: int, *, seed: int = 0, start: int = 0, size: int = 64,
                         workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, size, size, 3]`` uint8 and labels ``[n]`` of samples ``start .. start+n-1`` of ``split``.

    The result is the same for any ``workers``; with ``workers > 1`` chunks are drawn in processes.
    """
    return _in_chunks(_classification_chunk, split, n, seed, start, workers, size)


def video_batch(split: str, n: int, *, seed: int = 0, start: int = 0, frames: int = 8, size: int = 64,
                shape_scale: tuple[float, float] = SHAPE_SCALE, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One-shape clips ``[n, frames, size, size, 3]`` uint8 of :func:`moving_shapes_video` and their labels ``[n]``.

    Samples ``start .. start+n-1`` of ``split``; the same for any ``workers``, as :func:`classification_batch`.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1 (got {frames})")
    check_shape_scale(shape_scale)
    return _in_chunks(_video_chunk, split, n, seed, start, workers, size, frames, tuple(shape_scale))


def multi_object_scene(seed: int, split: str, index: int, size: int = 64, max_objects: int = 4) -> Scene:
    """One to ``max_objects`` shapes, barely overlapping, drawn by :data:`POPULARITY`; each later shape is
    the partner (:data:`PARTNERS`) of an earlier one with probability 0.4. Shapes may repeat."""
    rng = rng_for(seed, split, index)
    canvas = _Canvas(rng, size)
    weights = np.array([POPULARITY[s] for s in SHAPES])
    n = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    for _ in range(n):
        if objects and rng.random() < 0.4:
            shape = PARTNERS[objects[int(rng.integers(len(objects)))].shape]
        else:
            shape = SHAPES[int(rng.choice(len(SHAPES), p=weights / weights.sum()))]
        obj = canvas.place(shape, _colour(rng), rng.uniform(0.2, 0.38) * size, avoid=[o.box for o in objects],
                           max_overlap=0.1)
        if obj is not None:
            objects.append(obj)
    n_occluders = int(rng.choice(2, p=[0.7, 0.3]))
    for _ in range(n_occluders):
        canvas.occlude(objects[int(rng.integers(len(objects)))].box)
    return Scene(canvas.finish(), objects, canvas.kind, -1, n_occluders)


def object_statistics(scenes: Sequence[Scene]) -> ObjectStatistics:
    """How often each shape appears (once per image) and how often each pair appears in one image."""
    stats = ObjectStatistics()
    for scene in scenes:
        present = sorted({o.shape for o in scene.objects})
        stats.frequency.update(present)
        for a in present:
            stats.cooccurrence[a].update(b for b in present if b != a)
    return stats


POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")


def pope_questions(scene: Scene, stats: ObjectStatistics, split: str, rng: np.random.Generator,
                   k: int = 3) -> list[tuple[str, str]]:
    """POPE presence questions: up to ``k`` present shapes (answer ``yes``) and as many absent ones (``no``).

    Absent shapes are drawn as POPE does: ``random`` uniformly, ``popular`` the most frequent in
    ``stats``, ``adversarial`` those co-occurring most often in ``stats`` with the shapes present.
    """
    present = sorted({o.shape for o in scene.objects})
    absent = [s for s in SHAPES if s not in present]
    positives = [present[i] for i in rng.permutation(len(present))[:k]]
    m = min(len(positives), len(absent))
    if split == "random":
        negatives = [absent[i] for i in rng.permutation(len(absent))[:m]]
    elif split == "popular":
        negatives = sorted(absent, key=lambda s: (-stats.frequency[s], s))[:m]
    elif split == "adversarial":
        negatives = sorted(absent, key=lambda s: (-sum(stats.cooccurrence[p][s] for p in present), s))[:m]
    else:
        raise ValueError(f"unknown POPE split {split!r}; accepted: {', '.join(POPE_SPLITS)}")
    qa = [(f"Is there a {s} in the image?", "yes") for s in positives]
    qa += [(f"Is there a {s} in the image?", "no") for s in negatives]
    return [qa[i] for i in rng.permutation(len(qa))]


def colour_questions(scene: Scene) -> list[tuple[str, str]]:
    """``What colour is the <shape>?`` for each shape that appears exactly once."""
    counts = Counter(o.shape for o in scene.objects)
    return [(f"What colour is the {o.shape}?", o.colour) for o in scene.objects if counts[o.shape] == 1]


def count_questions(scene: Scene) -> list[tuple[str, str]]:
    """``How many shapes ...?`` overall, and ``How many <shape>s ...?`` for each shape present."""
    counts = Counter(o.shape for o in scene.objects)
    qa = [("How many shapes are there?", NUMBER_WORDS[len(scene.objects)])]
    qa += [(f"How many {plural(s)} are there?", NUMBER_WORDS[c]) for s, c in sorted(counts.items())]
    return qa


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _phrase(group: list[SceneObject]) -> str:
    """``a red circle``; ``two circles: a red one and a blue one``; ``two blue circles``."""
    shape, n = group[0].shape, len(group)
    colours = sorted(o.colour for o in group)
    if n == 1:
        return f"{_article(colours[0])} {colours[0]} {shape}"
    if len(set(colours)) == 1:
        return f"{NUMBER_WORDS[n]} {colours[0]} {plural(shape)}"
    return f"{NUMBER_WORDS[n]} {plural(shape)} ({', '.join(colours)})"


def captions(scene: Scene) -> list[str]:
    """Reference captions naming every object (by shape, colour and count) and the background."""
    groups: dict[str, list[SceneObject]] = {}
    for o in scene.objects:
        groups.setdefault(o.shape, []).append(o)
    phrases = [_phrase(g) for _, g in sorted(groups.items())]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    n = len(scene.objects)
    return [f"{listed} on a {scene.background} background.",
            f"an image with {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {listed}.",
            f"{listed}."]


@dataclass
class _Mover:
    """A shape in a video: where it is, how it moves and spins."""

    shape: str
    colour: str
    size: float
    pos: np.ndarray
    vel: np.ndarray
    angle: float
    spin: float
    heading: str = ""

    def step(self, frame_size: int) -> None:
        """Advance one frame, bouncing off the image edges."""
        self.pos += self.vel
        low, high = self.size / 2 + 1, frame_size - self.size / 2 - 1
        for axis in range(2):
            if not low <= self.pos[axis] <= high:
                self.vel[axis] = -self.vel[axis]
                self.pos[axis] = np.clip(self.pos[axis], low, high)
        self.angle += self.spin


def check_shape_scale(shape_scale: Sequence[float]) -> None:
    """A ValueError unless ``shape_scale`` is ``(low, high)`` with ``0 < low <= high < 1``."""
    if len(shape_scale) != 2 or not 0 < shape_scale[0] <= shape_scale[1] < 1:
        raise ValueError(f"shape_scale must be (low, high) with 0 < low <= high < 1, shape diameters as fractions "
                         f"of the frame (got {tuple(shape_scale)})")


def moving_shapes_video(seed: int, split: str, index: int, frames: int = 8, size: int = 64,
                        n_objects: int = 1, shape_scale: tuple[float, float] = SHAPE_SCALE) -> Video:
    """Shapes moving in straight lines (bouncing off the edges) over a static textured background.

    Each shape's diameter is drawn uniformly in ``shape_scale`` (fractions of ``size``). ``label`` is
    the first object's shape index; the caption names the objects and their initial heading.
    """
    if frames < 1 or n_objects < 1:
        raise ValueError(f"frames and n_objects must be >= 1 (got frames={frames}, n_objects={n_objects})")
    check_shape_scale(shape_scale)
    rng = rng_for(seed, split, index)
    canvas = _Canvas(rng, size)
    base = canvas.pixels
    movers = []
    for _ in range(n_objects):
        shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], _colour(rng)
        d = rng.uniform(*shape_scale) * size
        pos = rng.uniform(d / 2 + 1, size - d / 2 - 1, size=2)
        speed, heading = rng.uniform(1.5, 4.0), rng.uniform(0, 2 * math.pi)
        vel = speed * np.array([math.cos(heading), math.sin(heading)])
        movers.append(_Mover(shape, colour, d, pos, vel, rng.uniform(0, 2 * math.pi), rng.uniform(-0.2, 0.2),
                             _direction(vel)))
    clip, boxes = [], []
    s = _SUPERSAMPLE
    for _ in range(frames):
        canvas.pixels = base.copy()
        frame_boxes = []
        for m in movers:
            mask = shape_mask(m.shape, m.pos[0] * s, m.pos[1] * s, m.size * s, m.angle, canvas.canvas)
            canvas.pixels[mask] = COLOURS[m.colour]
            frame_boxes.append(_box(mask))
            m.step(size)
        clip.append(canvas.finish())
        boxes.append(frame_boxes)
    objects = [SceneObject(m.shape, m.colour, boxes[0][i]) for i, m in enumerate(movers)]
    caption = (" and ".join(f"{_article(m.colour)} {m.colour} {m.shape} moving {m.heading}" for m in movers)
               + f" on a {canvas.kind} background.")
    return Video(np.stack(clip), objects, boxes, canvas.kind, SHAPES.index(movers[0].shape), caption)


def _direction(vel: np.ndarray) -> str:
    """The initial heading in words (image y grows downwards)."""
    names = ("right", "down and right", "down", "down and left", "left", "up and left", "up", "up and right")
    return names[int(round(math.atan2(vel[1], vel[0]) / (math.pi / 4))) % 8]
