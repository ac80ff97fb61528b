"""``visattn eval vit``, ``visattn eval vlm`` and ``visattn eval video``: how far a method moves a model's answers.

The harness runs the stock model once over a held-out set, then for each value of a sweep applies
the method (``visattn.apply(model, method, **options)``), runs the same images, and removes it
again. Per value it reports the patched top-1, the stock top-1 and the *agreement*: the fraction
of images whose predicted class is the stock model's. At a method's identity setting the
agreement is 1.0.

By default the model is the testbed ViT shipped in ``visattn/testbed/weights`` and the images are
the first ``n`` samples of the ``test`` split of :func:`~.data.classification_batch` (never seen in
training). A user with real models and data passes a timm model name with a local checkpoint
(``model_name`` + ``checkpoint``) and/or a local image folder in ImageFolder layout (one subfolder
per class; labels are the sorted subfolder indices, so top-1 is meaningful when the model was
trained with that class order; agreement always is). Images are prepared with the model's timm
data config (resize, centre crop, normalise).

Results go to ``<out_dir>/eval_vit_<method>.json`` (with a model's name when one is given, and the method's
``strategy`` when the options name one: ``eval_vlm_prune_fastv.json``) and a
PNG plot of top-1 and agreement across the sweep beside it.

``visattn eval vlm`` (:func:`eval_vlm`) does the same for the testbed VLM (:mod:`.vlm`, a
transformers ``LlavaForConditionalGeneration`` run with sdpa attention) on the questions of held-out
generated scenes: POPE accuracy and F1 per split (random, popular, adversarial), colour and count
accuracy, and agreement (the fraction of questions answered as the stock model answers them), for
every method that supports transformers, and CHAIR object hallucination (CHAIR_i, CHAIR_s) and object
recall of the captions it generates. A user's own Hugging Face checkpoint directory and POPE question
files (:mod:`.hf_vlm`) go through the same harness. Results: ``<out_dir>/eval_vlm_<method>.json`` and a
PNG of POPE accuracy, CHAIR_i and agreement across the sweep.

``visattn eval video`` (:func:`eval_video`) samples clips with the testbed video DiT (:mod:`.video`, a
diffusers ``WanTransformer3DModel``) stock and patched from the same noise, for every method that
supports Wan (``sparse_video``): PSNR and SSIM of the patched clips against the stock ones, and the

class accuracy of both (the fraction of frames the testbed ViT classifies as the conditioned class).
Results: ``<out_dir>/eval_video_<method>.json`` and a PNG of SSIM and class accuracy across the sweep.
``visattn eval image`` (:func:`eval_image`) does the same with the testbed image UNet (:mod:`.image`, a
diffusers ``UNet2DConditionModel``) for every method that supports UNets (``tome``):
``<out_dir>/eval_image_<method>.json`` and its PNG.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

import visattn

from .. import processors  # noqa: F401  (registers the methods)
from ..errors import OptionError, UnsupportedModelError
from ..options import validate_options
from ..registry import all_methods, get_method
from .data import SHAPES, classification_batch
from .vit import SHIPPED_WEIGHTS, load_vit

#: Where results go unless told otherwise: a folder in the working directory (git-ignored in a visattn clone), never
#: the committed ``benchmarks/results``.
RESULTS_DIR = Path("visattn_results")

TESTBEDS: tuple[str, ...] = ("vit", "vlm", "video", "image")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: how many of each pass's captions the VLM result keeps, as examples.
CAPTION_EXAMPLES = 8


def parse_value(text: str) -> Any:
    """``"4"`` -> 4, ``"0.5"`` -> 0.5, ``"true"``/``"false"``/``"none"`` -> True/False/None, ``"2x4x4"`` ->
    ``(2, 4, 4)`` (a tile or window, written as the options' errors write it), else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    parts = lowered.split("x")
    if len(parts) > 1 and all(p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_option(text: str) -> tuple[str, Any]:
    """``"strategy=cls"`` -> ``("strategy", "cls")``."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise OptionError(f"an option must be written NAME=VALUE, e.g. r=8 (got {text!r})")
    return name.strip(), parse_value(value)


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``"r=0,4,8"`` -> ``("r", [0, 4, 8])``."""
    name, sep, values = text.partition("=")
    items = [v for v in values.split(",")] if sep else []
    if not name.strip() or not items or any(not v.strip() for v in items):
        raise OptionError(f"a sweep must be written NAME=V1,V2,..., e.g. r=0,4,8 (got {text!r})")
    return name.strip(), [parse_value(v) for v in items]


@dataclass(frozen=True)
class _Data:
    """What the model is run on: either generated images or files, and their labels."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: tuple[Path, ...] = ()
    classes: tuple[str, ...] = SHAPES
    description: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, start: int, stop: int, transform: Any) -> torch.Tensor:
        if self.images is not None:
            pics = [Image.fromarray(a) for a in self.images[start:stop]]
        else:
            pics = [Image.open(p).convert("RGB") for p in self.paths[start:stop]]
        return torch.stack([transform(p) for p in pics])


def image_folder(root: str | Path, n: int | None) -> _Data:
    """The first ``n`` images (sorted by class, then file name) of an ImageFolder-layout folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(f)
                labels.append(i)
    if not paths:
        raise ValueError(f"no images in {root}: expected one subfolder per class holding image files "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    if n is not None:
        paths, labels = paths[:n], labels[:n]
    return _Data(np.array(labels, dtype=np.int64), paths=tuple(paths), classes=tuple(classes),
                 description=f"image folder {root} ({len(paths)} images, {len(classes)} classes)")


def resolve_device(device: str) -> torch.device:
    """``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N`` as a device; anything else, or a
    GPU asked for where there is none, is an error naming the accepted values."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N")
    return dev


def _check_method(method: str, options: Mapping[str, Any], sweep: tuple[str, Sequence[Any]] | None,
                  framework: str = "timm", testbed: str = "ViT") -> list[dict[str, Any]]:
    """Validate everything about the method before a model is built; the options of each sweep point."""
    cls = get_method(method)
    if framework not in cls.frameworks:
        supported = [n for n, c in all_methods().items() if framework in c.frameworks]
        raise UnsupportedModelError(f"{method} does not support {framework} models, so it cannot run on the {testbed} "
                                    f"testbed; methods that do: {', '.join(supported)}")
    if sweep is None:
        points = [dict(options)]
    else:
        name, values = sweep
        if name in options:
            raise OptionError(f"{method}: {name} is both swept and given as an option; give it once")
        if not values:
            raise OptionError(f"{method}: the sweep of {name} has no values")
        points = [{**options, name: v} for v in values]
    for given in points:
        validate_options(method, cls.options, given)
    return points


def _load_model(model_name: str | None, checkpoint: str | Path | None, num_classes: int | None,
                img_size: int | None, device: torch.device) -> tuple[nn.Module, str]:
    if model_name is None and checkpoint is None:
        return load_vit(device=device), f"testbed ViT ({SHIPPED_WEIGHTS.name})"
    if model_name is None or checkpoint is None:
        raise ValueError("a local model needs both a timm model name and a checkpoint file "
                         f"(got model={model_name!r}, checkpoint={checkpoint!r})")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    import timm

    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(model_name, pretrained=False, checkpoint_path=str(checkpoint), **kwargs)
    return model.to(device).eval(), f"{model_name} ({checkpoint})"


def _transform(model: nn.Module, img_size: int | None) -> Any:
    """The model's timm eval transform; ``img_size`` (when the model was built with one) overrides its config."""
    from timm.data import create_transform, resolve_model_data_config

    args = {"input_size": (3, img_size, img_size)} if img_size is not None else None
    return create_transform(**resolve_model_data_config(model, args=args))


@torch.no_grad()
def _predict(model: nn.Module, data: _Data, transform: Any, batch_size: int, device: torch.device,
             bar: Any, after_batch: Any = None) -> tuple[torch.Tensor, float]:
    """Predicted classes of every image, and the seconds the forward passes took."""
    preds, seconds = [], 0.0
    for a in range(0, len(data), batch_size):
        x = data.batch(a, min(a + batch_size, len(data)), transform).to(device)
        t0 = time.perf_counter()
        logits = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        preds.append(logits.argmax(-1).cpu())
        if after_batch is not None:
            after_batch()
        bar.update(1)
    return torch.cat(preds), seconds


def _fraction(hits: torch.Tensor) -> float:
    return round(float(hits.double().mean()), 6)


def eval_vit(method: str, options: Mapping[str, Any] | None = None, sweep: tuple[str, Sequence[Any]] | None = None,
             *, n: int = 1000, seed: int = 0, batch_size: int = 250, device: str = "auto",
             model_name: str | None = None, checkpoint: str | Path | None = None, num_classes: int | None = None,
             img_size: int | None = None, images: str | Path | None = None,
             out_dir: str | Path | None = RESULTS_DIR, progress: bool = True) -> dict[str, Any]:
    """Stock vs ``method`` on a ViT classifier; returns (and writes, unless ``out_dir`` is None) the results.

    Args:
        method: a registered method that supports timm (``visattn.methods()``).
        options: fixed options of the method, e.g. ``{"strategy": "cls"}``.
        sweep: ``(option name, values)``, e.g. ``("r", [0, 4, 8])``; None runs the options once.
        n: number of images (the first ``n`` of the test split, or of ``images``; all of them if None).
        seed: data seed of the generated test split.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
        model_name, checkpoint: a timm model name and a local checkpoint (default: the testbed ViT);
            ``num_classes`` and ``img_size`` are passed to ``timm.create_model`` when given.
        images: a local ImageFolder-layout folder (default: the generated test split).
    """
    from tqdm.auto import tqdm

    options = dict(options or {})
    points = _check_method(method, options, sweep)
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 or None (got {n})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    dev = resolve_device(device)
    if images is not None:
        data = image_folder(images, n)
    else:
        if n is None:
            raise ValueError("n must be given for the generated test split")
        x, y = classification_batch("test", n, seed=seed)
        data = _Data(y, images=x, description=f"generated test split, seed {seed}, images 0..{n - 1}")
    model, model_desc = _load_model(model_name, checkpoint, num_classes, img_size, dev)
    for given in points:  # the method's own checks against this model (e.g. grid sizes), before any pass
        visattn.apply(model, method, **given)
        visattn.remove(model)
    transform = _transform(model, img_size)
    labels = torch.from_numpy(data.labels)
    batches = math.ceil(len(data) / batch_size)

    with torch.no_grad():  # warm-up, so that the stock pass's time does not include one-off costs
        model(data.batch(0, min(batch_size, len(data)), transform).to(dev))
    bar = tqdm(total=batches * (1 + len(points)), desc=f"eval vit {method}", unit="batch", disable=not progress)
    stock, stock_s = _predict(model, data, transform, batch_size, dev, bar)
    rows = []
    for given in points:
        label = ", ".join(f"{k}={v}" for k, v in given.items()) or "defaults"
        bar.set_postfix_str(label)
        handle = visattn.apply(model, method, **given)
        try:  # methods that record (inspect) expose clear(); keep memory flat
            preds, seconds = _predict(model, data, transform, batch_size, dev, bar,
                                      getattr(handle, "clear", None))
        finally:
            visattn.remove(model)
        rows.append({"options": given, "value": given.get(sweep[0]) if sweep else None,
                     "top1": _fraction(preds == labels), "agreement": _fraction(preds == stock),
                     "speed": _speed(dev, stock_s, seconds)})
    bar.close()

    result = {
        "testbed": "vit", "method": method, "options": options, "sweep": sweep[0] if sweep else None,
        "model": model_desc, "data": data.description, "n": len(data), "classes": list(data.classes),
        "stock_top1": _fraction(stock == labels), "rows": rows,
        **_run_record(dev, batch_size),
    }
    return _write(result, out_dir, _stem("vit", model_name, method, options))


def _run_record(dev: torch.device, batch_size: int) -> dict[str, Any]:
    """Where and how a result was made: device, torch version, batch size, time, command."""
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "batch_size": batch_size,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["visattn", *sys.argv[1:]]) if Path(sys.argv[0]).name == "visattn" else None,
    }


def _stem(testbed: str, model: str | None, method: str, options: Mapping[str, Any] | None) -> str:
    """``eval_<testbed>[_<model>]_<method>[_<strategy>]``: the results' file name, without suffix."""
    strategy = (options or {}).get("strategy")
    return "_".join(["eval", testbed, *([model] if model else []), method, *([str(strategy)] if strategy else [])])


def _write(result: dict[str, Any], out_dir: str | Path | None, stem: str) -> dict[str, Any]:
    """Write ``result`` as ``<stem>.json`` with its plot ``<stem>.png`` under ``out_dir`` (if given)."""
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        plot(result, out / f"{stem}.png")
        result["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.png")]
    return result


def eval_vlm(method: str, options: Mapping[str, Any] | None = None, sweep: tuple[str, Sequence[Any]] | None = None,
             *, n: int | None = 200, seed: int = 0, batch_size: int = 200, device: str = "auto",
             checkpoint: str | Path | None = None, tokenizer: str | Path | None = None,
             questions: str | Path | Sequence[str | Path] | None = None, images: str | Path | None = None,
             out_dir: str | Path | None = RESULTS_DIR, progress: bool = True) -> dict[str, Any]:
    """Stock vs ``method`` on a VLM; returns (and writes, unless ``out_dir`` is None) the results.

    By default the questions are those of scenes ``0 .. n-1`` of the generated ``test`` split
    (:mod:`.vlm`): POPE presence questions per split (random, popular, adversarial; accuracy, F1 with
    ``yes`` as positive, yes-ratio), colour and count questions (accuracy); and each scene is
    captioned (greedy ``generate()``, at most 24 new tokens, to the first full stop) and the
    captions scored for object hallucination against the shapes in the scene: ``chair_i`` (named
    shapes that are absent / all named shapes), ``chair_s`` (captions naming an absent shape / all
    captions), ``recall`` (present shapes named / all present shapes). Per sweep point: the patched
    metrics; the *agreement*, the fraction of questions answered as the stock model answers them
    (overall and per kind); and ``caption_agreement``, the fraction of captions equal to stock's.

    Args:
        method: a registered method that supports transformers (``visattn.methods()``).
        options, sweep: as for :func:`eval_vit`.
        n: number of test scenes (each gives about 20 questions); with ``questions``, the number of
            questions taken from the top of each file (None: all).
        checkpoint: a ``vlm.safetensors`` in the testbed VLM's layout (default: the shipped one), or a
            Hugging Face checkpoint directory with its processor (:class:`~.hf_vlm.HFVLM`: prompts
            through the processor's chat template, answers read as POPE reads them).
        tokenizer: the testbed tokenizer file (default: ``vlm_tokenizer.json`` beside the checkpoint).
        questions, images: POPE-format question files (JSON lines with ``image``, ``text``, ``label``;
            each file a split named by its stem) and the folder holding their images, instead of the
            generated scenes (:func:`~.hf_vlm.read_pope`); they need a Hugging Face checkpoint, and
            there is no CHAIR (the files list no objects).
    """
    from tqdm.auto import tqdm

    from .vlm import CAPTION_TOKENS, SHIPPED_VLM, TestbedVLM, evaluate, load_vlm, question_set

    options = dict(options or {})
    points = _check_method(method, options, sweep, framework="transformers", testbed="VLM")
    if (questions is None) != (images is None):
        raise ValueError("POPE question files and their image folder go together: give both --questions and "
                         f"--images (got questions={questions!r}, images={images!r})")
    hf = checkpoint is not None and Path(checkpoint).is_dir()
    if questions is not None and not hf:
        raise ValueError("question files need a Hugging Face checkpoint directory (--checkpoint DIR): the testbed "
                         "VLM knows only the words of its generated scenes")
    if hf and tokenizer is not None:
        raise ValueError("--tokenizer is for a testbed vlm.safetensors; a Hugging Face checkpoint brings its processor")
    if (n is None and questions is None) or (n is not None and n < 1):
        raise ValueError(f"n must be >= 1 (got {n}); None (all questions) only with question files")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    dev = resolve_device(device)
    if questions is not None:
        from .hf_vlm import read_pope

        files = [questions] if isinstance(questions, (str, Path)) else list(questions)
        pics, kinds = read_pope(files, images, n)
        present = None
        data_desc = f"POPE question files {', '.join(map(str, files))}, images in {images}"
    else:
        pics, kinds, present = question_set("test", n, seed)
        data_desc = f"generated test scenes, seed {seed}, scenes 0..{n - 1}"
    if hf:
        from .hf_vlm import HFVLM

        vlm = HFVLM(checkpoint, dev)
        model_desc = vlm.description
    else:
        vlm = TestbedVLM(*load_vlm(checkpoint, tokenizer, dev, attn_implementation="sdpa"), dev)
        model_desc = f"testbed VLM ({Path(checkpoint).name if checkpoint is not None else SHIPPED_VLM.name})"
    model = vlm.model
    for given in points:  # the method's own checks against this model, before any pass
        visattn.apply(model, method, **given)
        visattn.remove(model)
    total = sum(len(v) for v in kinds.values()) + (len(present) if present is not None else 0)

    with torch.no_grad():  # warm-up, so that the stock pass's time does not include one-off costs
        first = next(iter(kinds))
        evaluate(vlm, pics, {first: kinds[first][:batch_size]}, batch_size)
    bar = tqdm(total=total * (1 + len(points)), desc=f"eval vlm {method}", unit="q", disable=not progress)
    t0 = time.perf_counter()
    stock, stock_answers = evaluate(vlm, pics, kinds, batch_size, bar.update, present)
    stock_s = time.perf_counter() - t0
    rows = []
    for given in points:
        label = ", ".join(f"{k}={v}" for k, v in given.items()) or "defaults"
        bar.set_postfix_str(label)
        handle = visattn.apply(model, method, **given)
        clear = getattr(handle, "clear", None)  # methods that record (inspect): keep memory flat

        def on_batch(k: int, clear: Any = clear) -> None:
            if clear is not None:
                clear()
            bar.update(k)

        try:
            t0 = time.perf_counter()
            metrics, answers = evaluate(vlm, pics, kinds, batch_size, on_batch, present)
            seconds = time.perf_counter() - t0
        finally:
            visattn.remove(model)
        same = {k: [a == b for a, b in zip(answers[k], stock_answers[k])] for k in answers}
        captions = same.pop("caption", None)
        rows.append({"options": given, "value": given.get(sweep[0]) if sweep else None, "metrics": metrics,
                     "agreement": round(sum(sum(v) for v in same.values()) / sum(map(len, same.values())), 6),
                     "agreement_per_kind": {k: round(sum(v) / max(len(v), 1), 6) for k, v in same.items()},
                     "caption_agreement": round(sum(captions) / len(captions), 6) if captions else None,
                     "captions": answers.get("caption", [])[:CAPTION_EXAMPLES],
                     "speed": _speed(dev, stock_s, seconds)})
    bar.close()

    result = {
        "testbed": "vlm", "method": method, "options": options, "sweep": sweep[0] if sweep else None,
        "model": model_desc, "data": data_desc, "n": n, "images": len(pics),
        "questions": {k: len(v) for k, v in kinds.items()}, "stock": stock,
        "stock_captions": stock_answers.get("caption", [])[:CAPTION_EXAMPLES], "caption_tokens": CAPTION_TOKENS,
        "rows": rows,
        "attn_implementation": "sdpa", **_run_record(dev, batch_size),
    }
    name = None if checkpoint is None else Path(checkpoint).name if hf else Path(checkpoint).stem
    return _write(result, out_dir, _stem("vlm", name, method, options))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM (Wang et al., 2004) of images ``[..., C, H, W]`` in [0, 1]: one value per image ``[...]``.

    Local statistics under a Gaussian window (``window`` pixels, at most the image's smaller side,
    standard deviation ``sigma``) over the positions where the window fits, per channel, in float64;
    the SSIM map is averaged over positions and channels. Identical images give exactly 1.
    """
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f"ssim needs two images of one shape [..., C, H, W] (got {list(a.shape)} and {list(b.shape)})")
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma).to(a.device)
    channels = a.shape[-3]
    x, y = (t.reshape(-1, channels, *t.shape[-2:]).double() for t in (a, b))

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(channels, 1, 1, size), groups=channels)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(channels, 1, size, 1), groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    ssim_map = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim_map.mean(dim=(-3, -2, -1)).reshape(a.shape[:-3])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of ``a`` against ``b`` (values in [0, 1]) from their mean squared error; ``inf`` if identical."""
    mse = float((a.double() - b.double()).square().mean())
    return math.inf if mse == 0 else round(10 * math.log10(1 / mse), 4)


def eval_video(method: str, options: Mapping[str, Any] | None = None, sweep: tuple[str, Sequence[Any]] | None = None,
               *, n: int = 8, seed: int = 0, steps: int | None = None, guidance: float | None = None,
               batch_size: int = 8, device: str = "auto", checkpoint: str | Path | None = None,
               out_dir: str | Path | None = RESULTS_DIR, progress: bool = True) -> dict[str, Any]:
    """Stock vs ``method`` on the testbed video DiT; returns (and writes, unless ``out_dir`` is None) the results.

    The stock model samples ``n`` clips (classes 0, 1, ..., 7, 0, ... in turn; the noise of clip ``i``
    a function of ``seed`` and ``i``, :func:`~.diffusion.sample`), then for each sweep point the method
    is applied to the Wan transformer and the same clips are sampled from the same noise. Per point: PSNR
    (dB, from the mean squared error over all clips; ``inf`` when identical) and SSIM (:func:`ssim`, per
    frame, averaged) of the patched clips against the stock ones, and the class accuracy of both: the
    fraction of frames (and of middle frames) that the shipped testbed ViT classifies as the
    conditioned class. At a method's identity setting PSNR is ``inf`` and SSIM 1. For ``sparse_video``
    also the attention recall of each point: the share of the stock run's own self-attention mass that
    the point's routing keeps, averaged over every layer, step and head of the first clip of each batch
    (:class:`~visattn.processors.sparse_video.recall.RecallMeter`; 1 at an identity setting).

    Args:
        method: a registered method that supports diffusers and Wan (``visattn.methods()``), e.g. sparse_video.
        options, sweep: as for :func:`eval_vit`.
        n: number of clips; ``batch_size``: clips per model call.
        steps, guidance: Euler steps and classifier-free guidance scale (default: the weights' own).
        checkpoint: a ``video_dit.safetensors`` with its ``video_dit.json`` beside it (default: the shipped one).
    """
    from .video import SHIPPED_VIDEO_DIT, load_video_dit

    return _eval_generator("video", method, options, sweep, n=n, seed=seed, steps=steps, guidance=guidance,
                           batch_size=batch_size, device=device, checkpoint=checkpoint, out_dir=out_dir,
                           progress=progress, load=load_video_dit, shipped=SHIPPED_VIDEO_DIT, denoiser="transformer")


def eval_image(method: str, options: Mapping[str, Any] | None = None, sweep: tuple[str, Sequence[Any]] | None = None,
               *, n: int = 32, seed: int = 0, steps: int | None = None, guidance: float | None = None,
               batch_size: int = 32, device: str = "auto", checkpoint: str | Path | None = None,
               out_dir: str | Path | None = RESULTS_DIR, progress: bool = True) -> dict[str, Any]:
    """Stock vs ``method`` on the testbed image UNet; returns (and writes, unless ``out_dir`` is None) the results.

    As :func:`eval_video`, on images: the stock UNet (:mod:`.image`, a diffusers ``UNet2DConditionModel``)
    samples ``n`` images (classes 0, 1, ..., 7, 0, ... in turn, the noise of image ``i`` a function of
    ``seed`` and ``i``), then for each sweep point the method is applied to the UNet and the same images
    are sampled from the same noise. Per point: PSNR and SSIM of the patched images against the stock
    ones, and the class accuracy of both (the fraction of images the shipped testbed ViT classifies as
    the conditioned class). ``tome`` at ``ratio=0`` gives PSNR ``inf`` and SSIM 1; with
    ``--option scope=block`` it measures the block scope's fidelity cost.

    Args:
        method: a registered method that supports diffusers UNets (``visattn.methods()``), e.g. tome.
        options, sweep: as for :func:`eval_vit`.
        n: number of images; ``batch_size``: images per model call.
        steps, guidance: Euler steps and classifier-free guidance scale (default: the weights' own).
        checkpoint: an ``image_unet.safetensors`` with its ``image_unet.json`` beside it (default: the shipped one).
    """
    from .image import SHIPPED_IMAGE_UNET, load_image_unet

    return _eval_generator("image", method, options, sweep, n=n, seed=seed, steps=steps, guidance=guidance,
                           batch_size=batch_size, device=device, checkpoint=checkpoint, out_dir=out_dir,
                           progress=progress, load=load_image_unet, shipped=SHIPPED_IMAGE_UNET, denoiser="unet")


def _eval_generator(testbed: str, method: str, options: Mapping[str, Any] | None,
                    sweep: tuple[str, Sequence[Any]] | None, *, n: int, seed: int, steps: int | None,
                    guidance: float | None, batch_size: int, device: str, checkpoint: str | Path | None,
                    out_dir: str | Path | None, progress: bool, load: Callable[..., Any], shipped: Path,
                    denoiser: str) -> dict[str, Any]:
    """:func:`eval_video` and :func:`eval_image`: ``load(checkpoint, device)`` gives a
    :class:`~.diffusion.FlowModel` whose attribute ``denoiser`` is the diffusers model the method patches."""
    from tqdm.auto import tqdm

    from .diffusion import eval_labels, sample, sample_accuracy

    unit = {"video": "clips", "image": "images"}[testbed]
    name = {"video": "video DiT", "image": "image UNet"}[testbed]
    options = dict(options or {})
    points = _check_method(method, options, sweep, framework="diffusers", testbed=name)
    if n is None or n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1 or None (got {steps!r})")
    if guidance is not None and not guidance >= 1.0:
        raise ValueError(f"guidance must be >= 1 or None (got {guidance})")
    dev = resolve_device(device)
    model = load(checkpoint, dev)
    target = getattr(model, denoiser)
    for given in points:  # the method's own checks against this model, before any pass
        visattn.apply(target, method, **given)
        visattn.remove(target)
    steps = model.default_steps if steps is None else steps
    guidance = model.default_guidance if guidance is None else guidance
    vit = load_vit(device=dev)
    labels = eval_labels(n)

    def run(update: Any) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        found = sample(model, labels, seed=seed, steps=steps, guidance=guidance, device=dev, batch_size=batch_size,
                       progress=update)
        return found, time.perf_counter() - t0

    def accuracy(samples: torch.Tensor) -> dict[str, float]:
        acc = sample_accuracy(vit, samples, labels)
        return {"accuracy": acc["frames"], **({"accuracy_middle_frame": acc["middle"]} if testbed == "video" else {})}

    sample(model, labels[:1], seed=seed, steps=1, guidance=guidance, device=dev)  # warm-up (one-off costs)
    bar = tqdm(total=steps * math.ceil(n / batch_size) * (1 + len(points)), desc=f"eval {testbed} {method}",
               unit="step", disable=not progress)
    recall = None
    if method == "sparse_video":  # what each point's routing keeps of the stock run's own attention
        from ..processors.sparse_video import SparseVideoConfig
        from ..processors.sparse_video.recall import RecallMeter

        configs = {str(i): SparseVideoConfig.from_options(**{k: v for k, v in given.items() if k != "install"})
                   for i, given in enumerate(points)}
        with RecallMeter(target, configs) as meter:
            stock, stock_s = run(bar.update)
        recall = meter.means()
    else:
        stock, stock_s = run(bar.update)
    rows = []
    for i, given in enumerate(points):
        bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in given.items()) or "defaults")
        handle = visattn.apply(target, method, **given)
        clear = getattr(handle, "clear", None)  # methods that record (inspect): keep memory flat

        def update(k: int, clear: Any = clear) -> None:
            if clear is not None:
                clear()
            bar.update(k)

        try:
            found, seconds = run(update)
        finally:
            visattn.remove(target)
        rows.append({"options": given, "value": given.get(sweep[0]) if sweep else None,
                     "psnr": psnr(found, stock), "ssim": round(float(ssim(found, stock).mean()), 6),
                     **accuracy(found), "speed": _speed(dev, stock_s, seconds),
                     **({"attention_recall": round(recall[str(i)], 6)} if recall is not None else {})})
    bar.close()

    result = {
        "testbed": testbed, "method": method, "options": options, "sweep": sweep[0] if sweep else None,
        "model": f"testbed {name} ({Path(checkpoint).name if checkpoint is not None else shipped.name})",
        "data": f"{n} generated {unit} of classes 0..7 in turn, noise seed {seed}", "n": n, "unit": unit,
        "steps": steps, "guidance": guidance, **{f"stock_{k}": v for k, v in accuracy(stock).items()},
        "rows": rows, **_run_record(dev, batch_size),
    }
    return _write(result, out_dir, _stem(testbed, None if checkpoint is None else Path(checkpoint).stem, method,
                                         options))


def _speed(dev: torch.device, stock_s: float, seconds: float) -> dict[str, Any] | None:
    """The patched passes' wall-clock time against stock's, recorded on a GPU only (``None`` on a CPU, where
    such ratios of a small model's batches are noise: r=0 has shown 0.74x-1.46x)."""
    if dev.type != "cuda":
        return None
    return {"what": "wall time of this eval's forward passes on the GPU, data transfer included; BENCHMARKS.md "
                    "has benchmark-grade speed", "stock_seconds": round(stock_s, 3), "seconds": round(seconds, 3),
            "speedup": round(stock_s / max(seconds, 1e-9), 3)}


#: What the columns of :func:`table` mean, printed under it.
LEGENDS = {
    "vit": "top-1: accuracy on the test images; agreement with stock: the share of images on which the patched "
           "model predicts the class the stock model predicts (1.000: the same answers).",
    "vlm": "POPE: yes/no object questions (accuracy and F1 per split); colour / count: short answers; CHAIR: "
           "hallucinated objects in captions (lower is better), recall: objects mentioned; agreement with stock: "
           "the share of questions the patched model answers as the stock model does.",
    "generator": "PSNR and SSIM of each patched sample against the stock sample from the same noise (higher: closer "
                 "to stock); class accuracy: the share of frames or images the testbed ViT classifies as the "
                 "conditioned class.",
}


def table(result: Mapping[str, Any]) -> str:
    """The result as a Markdown table, one row per sweep point, with what its columns mean under it (speed, on a
    GPU only, is in the JSON)."""
    if result.get("testbed") == "vlm":
        return _vlm_table(result) + "\n\n" + LEGENDS["vlm"]
    if result.get("testbed") in ("video", "image"):
        return _generator_table(result) + "\n\n" + LEGENDS["generator"]
    lines = ["| setting | top-1 stock | top-1 patched | agreement with stock |", "|---|---|---|---|"]
    for row in result["rows"]:
        setting = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
        lines.append(f"| {result['method']} {setting} | {result['stock_top1']:.3f} | {row['top1']:.3f} | "
                     f"{row['agreement']:.3f} |")
    return "\n".join(lines) + "\n\n" + LEGENDS["vit"]


def _vlm_table(result: Mapping[str, Any]) -> str:
    stock = result["stock"]
    pope = [k for k in stock if "f1" in stock[k]]
    words = [k for k in ("colour", "count") if k in stock]
    head = [f"POPE acc {' / '.join(pope)}", f"POPE F1 {' / '.join(pope)}", *(f"{k} acc" for k in words)]
    if "caption" in stock:
        head.append("CHAIR_i / CHAIR_s / recall")
    lines = [f"| setting | {' | '.join(head)} | agreement with stock |", "|---" * (len(head) + 2) + "|"]

    def cells(m: Mapping[str, Any]) -> str:
        out = [" / ".join(f"{m[s]['accuracy']:.3f}" for s in pope), " / ".join(f"{m[s]['f1']:.3f}" for s in pope),
               *(f"{m[k]['accuracy']:.3f}" for k in words)]
        if "caption" in m:
            out.append(" / ".join(f"{m['caption'][k]:.3f}" for k in ("chair_i", "chair_s", "recall")))
        return " | ".join(out)

    lines.append(f"| stock | {cells(stock)} | 1.000 |")
    for row in result["rows"]:
        setting = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
        lines.append(f"| {result['method']} {setting} | {cells(row['metrics'])} | {row['agreement']:.3f} |")
    return "\n".join(lines)


def _generator_table(result: Mapping[str, Any]) -> str:
    recall = all("attention_recall" in row for row in result["rows"])
    lines = ["| setting | PSNR (dB) | SSIM | class accuracy stock | class accuracy patched |"
             + (" attention recall |" if recall else ""), "|---|---|---|---|---|" + ("---|" if recall else "")]
    for row in result["rows"]:
        setting = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
        lines.append(f"| {result['method']} {setting} | {row['psnr']:.2f} | {row['ssim']:.4f} | "
                     f"{result['stock_accuracy']:.3f} | {row['accuracy']:.3f} |"
                     + (f" {row['attention_recall']:.4f} |" if recall else ""))
    return "\n".join(lines)


def plot(result: Mapping[str, Any], path: str | Path, width: int = 640, height: int = 400) -> Path:
    """Top-1 (stock and patched; for the VLM, POPE accuracy and CHAIR_i) and agreement across the sweep, as a PNG;
    for the video DiT and the image UNet, SSIM and the class accuracy of the stock and patched samples."""
    rows = result["rows"]
    names = [str(r["value"]) if result["sweep"] else "defaults" for r in rows]
    if result.get("testbed") == "vlm":
        pope = next(k for k, m in result["stock"].items() if "f1" in m)  # random, or the first question file
        series = [("agreement", [r["agreement"] for r in rows], (230, 120, 20)),
                  (f"POPE {pope} patched", [r["metrics"][pope]["accuracy"] for r in rows], (40, 90, 200)),
                  (f"POPE {pope} stock", [result["stock"][pope]["accuracy"]] * len(rows), (140, 140, 140))]
        if "caption" in result["stock"]:
            series += [("CHAIR_i patched", [r["metrics"]["caption"]["chair_i"] for r in rows], (200, 40, 40)),
                       ("CHAIR_i stock", [result["stock"]["caption"]["chair_i"]] * len(rows), (230, 160, 160))]
        what = f"{result['images']} images, {sum(result['questions'].values())} questions"
    elif result.get("testbed") in ("video", "image"):
        series = [("SSIM", [r["ssim"] for r in rows], (230, 120, 20)),
                  ("class acc. patched", [r["accuracy"] for r in rows], (40, 90, 200)),
                  ("class acc. stock", [result["stock_accuracy"]] * len(rows), (140, 140, 140))]
        what = f"{result['n']} {result['unit']}, {result['steps']} steps"
    else:
        series = [("agreement", [r["agreement"] for r in rows], (230, 120, 20)),
                  ("top-1 patched", [r["top1"] for r in rows], (40, 90, 200)),
                  ("top-1 stock", [result["stock_top1"]] * len(rows), (140, 140, 140))]
        what = f"{result['n']} images"
    low = min(min(v) for _, v, _ in series)
    y0 = max(0.0, math.floor(low * 10) / 10 - 0.1)
    left, right, top, bottom = 60, width - 20, 40, height - 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i + 0.5) / len(rows)
        return x, bottom - (bottom - top) * (v - y0) / (1.0 - y0)

    for k in range(11):
        v = y0 + (1.0 - y0) * k / 10
        y = xy(0, v)[1]
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((8, y - 6), f"{v:.2f}", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    for i, name in enumerate(names):
        x = xy(i, y0)[0]
        draw.text((x - 3 * len(name), bottom + 8), name, fill="black")
    draw.text((left, bottom + 28), f"{result['sweep'] or 'setting'}", fill="black")
    title = f"{result['method']} on {result['model']}: {what}"
    draw.text((left, 10), title, fill="black")
    for j, (label, values, colour) in enumerate(series):
        pts = [xy(i, v) for i, v in enumerate(values)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=4 if j == 0 else 2)
        for x, y in pts:  # the first series (agreement, SSIM) as open squares, visible under an equal second
            if j == 0:
                draw.rectangle([x - 6, y - 6, x + 6, y + 6], outline=colour, width=2)
            else:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((right - 150, top + 8 + 14 * j), label, fill=colour)
    path = Path(path)
    img.save(path)
    return path
