"""What the testbed's class-conditional generators share: rectified flow, classifier-free guidance, class accuracy.

The video DiT (:mod:`.video`) and the image UNet (:mod:`.image`) are both a diffusers denoiser plus a
:class:`ClassEmbedding`: a learned table of ``class_tokens`` vectors for each of the 8 classes of
:data:`~.data.SHAPES` and for a null class (:data:`NULL_CLASS`), fed to the denoiser as
``encoder_hidden_states``, so its cross-attention is the conditioning path. Both subclass
:class:`FlowModel`, which says what a sample's shape is and how guidance combines the two branches.

Training (:func:`train_flow`) is rectified flow (Liu et al., 2023, "Flow Straight and Fast"):
``x_t = (1 - t) x_0 + t e`` with data ``x_0`` in [-1, 1], noise ``e``, ``t`` logit-normal, and the model
regresses the velocity ``e - x_0`` (the denoisers see the timestep ``1000 t``); with a time shift
``s`` (:func:`shift_times`, SD3's Eq. 23) training draws ``t`` and sampling spaces its steps toward the
noise end, where a clip's global layout (which shape, where) is decided. The class is dropped to
the null class with probability ``class_dropout``. AdamW, warm-up then cosine, bf16 autocast on CUDA,
an EMA of the weights (the shipped weights). :func:`sample` integrates the flow from noise (``t = 1``)
to data (``t = 0``) with Euler steps and classifier-free guidance (Ho & Salimans, 2022)
``v = v_null + g (v_class - v_null)``; each sample's noise is a function of ``(seed, index)`` alone
(:func:`initial_noise`), so a method's sample and the stock sample start from the same noise.

Quality is the fraction of samples that the shipped testbed ViT classifies as the conditioned class
(:func:`sample_accuracy`; every frame of a clip); :func:`choose_guidance` picks the guidance scale on one
set of noise seeds and reports the accuracy at it on another.

:func:`train_testbed` is the training run both testbeds share once their data is generated (training,
checkpoints, evaluation, the json), :func:`load_testbed` their loader, and :func:`add_recipe_arguments`
their training scripts' command line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import SHAPES
from .vit import MEAN, STD, VIT_CONFIG, load_vit

#: the class index meaning "no class" (classifier-free guidance's unconditional branch).
NULL_CLASS = len(SHAPES)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.0
#: guidance scales :func:`choose_guidance` chooses from by default.
GUIDANCE_CANDIDATES: tuple[float, ...] = (1.0, 2.0, 3.0, 4.5, 6.0)


class ClassEmbedding(nn.Module):
    """``class_tokens`` learned vectors of width ``text_dim`` per class, plus the null class: the denoiser's text."""

    def __init__(self, num_classes: int, class_tokens: int, text_dim: int) -> None:
        super().__init__()
        self.class_tokens, self.text_dim = class_tokens, text_dim
        self.table = nn.Embedding(num_classes + 1, class_tokens * text_dim)
        nn.init.normal_(self.table.weight, std=0.5)

    def forward(self, labels: Tensor) -> Tensor:
        """Labels ``[B]`` (``num_classes`` = null) -> ``encoder_hidden_states`` ``[B, class_tokens, text_dim]``."""
        return self.table(labels).unflatten(-1, (self.class_tokens, self.text_dim))


class FlowModel(nn.Module):
    """A class-conditional velocity model ``forward(x, t, labels)``; subclasses set ``sample_shape``.

    ``sample_shape`` is one sample's shape (without the batch); ``default_steps``,
    ``default_guidance`` and ``default_shift`` are what :func:`sample` uses when not told otherwise
    (loaders set them from the weights' json).
    """

    sample_shape: tuple[int, ...]

    def __init__(self) -> None:
        super().__init__()
        self.default_steps, self.default_guidance, self.default_shift = DEFAULT_STEPS, DEFAULT_GUIDANCE, 1.0

    def guided(self, x: Tensor, t: Tensor, labels: Tensor, guidance: float) -> Tensor:
        """Classifier-free guided velocity; the class and null branches run as one batch (one call per step)."""
        if guidance == 1.0:
            return self(x, t, labels)
        null = torch.full_like(labels, NULL_CLASS)
        v_class, v_null = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        return v_null + guidance * (v_class - v_null)


def merged_config(defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None, what: str,
                  tuple_key: str) -> dict[str, Any]:
    """``defaults`` updated with ``overrides`` (an unknown key is an error naming the accepted ones), with
    the value of ``tuple_key`` made a tuple of ints; a testbed's own checks follow."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} config keys {', '.join(unknown)}; accepted: {', '.join(defaults)}")
    cfg = {**defaults, **overrides}
    cfg[tuple_key] = tuple(int(v) for v in cfg[tuple_key])
    return cfg


def shift_times(t: Tensor, shift: float) -> Tensor:
    """Times ``t`` in [0, 1] moved toward the noise end: ``s t / (1 + (s - 1) t)`` (Esser et al., 2024,
    "Scaling Rectified Flow Transformers", Eq. 23); ``shift`` 1 leaves them unchanged."""
    return shift * t / (1 + (shift - 1) * t)


def check_shift(shift: float) -> None:
    """A ValueError unless ``shift`` (of :func:`shift_times`) is > 0."""
    if not shift > 0:
        raise ValueError(f"time shift must be > 0 (1 = no shift, > 1 = more time near the noise; got {shift})")


def initial_noise(seed: int, count: int, shape: Sequence[int]) -> Tensor:
    """Noise ``[count, *shape]`` float32 on the CPU; item ``i`` depends on ``(seed, i)`` alone."""
    out = torch.empty(count, *shape)
    for i in range(count):
        state = np.random.SeedSequence([seed, i]).generate_state(2, np.uint64)[0]
        out[i] = torch.randn(*shape, generator=torch.Generator().manual_seed(int(state) >> 1))
    return out


def check_labels(labels: Sequence[int] | Tensor) -> Tensor:
    """``labels`` as a long tensor ``[B]``; a clear error unless they are classes or the null class."""
    lab = torch.as_tensor(labels, dtype=torch.long).flatten()
    if lab.numel() == 0 or int(lab.min()) < 0 or int(lab.max()) > NULL_CLASS:
        raise ValueError(f"labels must be class indices 0..{NULL_CLASS - 1} ({', '.join(SHAPES)}) or {NULL_CLASS} "
                         f"(no class), at least one (got {lab.tolist()})")
    return lab


@torch.no_grad()
def sample(model: FlowModel, labels: Sequence[int] | Tensor, *, seed: int = 0, steps: int | None = None,
           guidance: float | None = None, shift: float | None = None, device: str | torch.device | None = None,
           batch_size: int | None = None, progress: Callable[[int], Any] | None = None) -> Tensor:
    """Samples ``[B, *model.sample_shape]`` in [0, 1] (float32, on the CPU) of the classes ``labels``, one per label.

    Euler steps of the flow from ``t = 1`` to ``t = 0`` with classifier-free guidance (module doc), at
    times ``shift_times(linspace(1, 0, steps + 1), shift)``.
    Sample ``i`` starts from :func:`initial_noise` item ``i`` of ``seed``, whatever ``batch_size``
    (samples per model call; all at once if None). ``steps``, ``guidance`` and ``shift`` default to the
    model's ``default_steps`` / ``default_guidance`` / ``default_shift``. ``device`` (default: the
    model's) is where it runs; the model is moved there. On CUDA the model runs under bf16 autocast.
    ``progress(1)`` is called after every Euler step of every batch.
    """
    lab = check_labels(labels)
    steps = model.default_steps if steps is None else steps
    guidance = model.default_guidance if guidance is None else guidance
    shift = model.default_shift if shift is None else shift
    check_shift(shift)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (got {steps!r})")
    if not guidance >= 1.0:
        raise ValueError(f"guidance must be >= 1 (1 = no classifier-free guidance; got {guidance})")
    batch_size = len(lab) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    noise = initial_noise(seed, len(lab), model.sample_shape)
    times = shift_times(torch.linspace(1.0, 0.0, steps + 1), shift)  # shift 1: the plain grid, exactly
    out = []
    for a in range(0, len(lab), batch_size):
        x, y = noise[a:a + batch_size].to(dev), lab[a:a + batch_size].to(dev)
        for i in range(steps):
            t = torch.full((len(y),), float(times[i]), device=dev)
            with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
                v = model.guided(x, t, y, guidance)
            x = x + float(times[i + 1] - times[i]) * v.float()
            if progress is not None:
                progress(1)
        out.append(((x + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def classify_frames(vit: nn.Module, clips: Tensor, batch_size: int = 512) -> Tensor:
    """The testbed ViT's class ``[B, F]`` of each frame of clips ``[B, F, 3, H, W]`` in [0, 1] (resized for it)."""
    if clips.ndim != 5 or clips.shape[2] != 3:
        raise ValueError(f"clips must be [B, F, 3, H, W] (got {list(clips.shape)})")
    dev = next(vit.parameters()).device
    frames = clips.flatten(0, 1)
    side = VIT_CONFIG["img_size"]
    mean, std = torch.tensor(MEAN, device=dev)[:, None, None], torch.tensor(STD, device=dev)[:, None, None]
    preds = []
    for a in range(0, len(frames), batch_size):
        x = frames[a:a + batch_size].to(dev).float()
        if x.shape[-1] != side or x.shape[-2] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        preds.append(vit((x - mean) / std).argmax(-1).cpu())
    return torch.cat(preds).view(clips.shape[:2])


def class_accuracy(predicted: Tensor, labels: Sequence[int] | Tensor) -> dict[str, float]:
    """From per-frame classes ``[B, F]``: the fraction of all frames, and of middle frames, showing ``labels``."""
    lab = torch.as_tensor(labels, dtype=torch.long).view(-1, 1)
    hits = predicted == lab
    return {"frames": round(float(hits.double().mean()), 6),
            "middle": round(float(hits[:, predicted.shape[1] // 2].double().mean()), 6)}


def sample_accuracy(vit: nn.Module, samples: Tensor, labels: Sequence[int] | Tensor) -> dict[str, float]:
    """:func:`class_accuracy` of images ``[B, 3, H, W]`` (one frame each) or clips ``[B, F, 3, H, W]``."""
    return class_accuracy(classify_frames(vit, samples[:, None] if samples.ndim == 4 else samples), labels)


def eval_labels(n: int) -> list[int]:
    """The classes of ``n`` evaluation samples: 0, 1, ..., 7, 0, 1, ... (balanced)."""
    return [i % len(SHAPES) for i in range(n)]


def check_recipe(counts: dict[str, int], guidances: Sequence[float], max_minutes: float | None,
                 class_dropout: float, time_shift: float) -> None:
    """The checks of a training call's arguments, before any work: ``counts`` (name -> value) must be >= 1."""
    if min(counts.values()) < 1:
        raise ValueError(f"{', '.join(counts)} must all be >= 1 (got {counts})")
    if not guidances or min(guidances) < 1.0:
        raise ValueError(f"guidances must be a non-empty list of scales >= 1 (got {list(guidances)})")
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"max_minutes must be > 0 or None (got {max_minutes})")
    if not 0.0 <= class_dropout < 1.0:
        raise ValueError(f"class_dropout must be in [0, 1) (got {class_dropout})")
    check_shift(time_shift)


def train_flow(model: FlowModel, draw: Callable[[], tuple[Tensor, Tensor]], *, steps: int, lr: float,
               weight_decay: float, warmup: int, ema_decay: float, class_dropout: float, time_shift: float,
               max_minutes: float | None, device: torch.device, compile: bool, log_every: int,
               on_log: Callable[[int, FlowModel, list[float], float], Any],
               ) -> tuple[FlowModel, list[float], int, float]:
    """The rectified-flow training loop (module doc); returns ``(ema, loss_history, steps_done, seconds)``.

    ``draw()`` gives a training batch on ``device``: data ``x_0`` in [-1, 1] (augmented) and its labels.
    ``max_minutes`` bounds the loop's wall time: the learning-rate schedule follows whichever of
    ``step / steps`` and ``elapsed / max_minutes`` is further, so a run cut short by time still anneals.
    Weight decay applies to matrices other than the class table. Every ``log_every`` steps the mean loss
    since the last report joins ``loss_history`` and ``on_log(step, ema, loss_history, elapsed_seconds)`` runs.
    """
    cuda = device.type == "cuda"
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "table" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "table" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99), fused=cuda)
    forward = torch.compile(model) if compile else model
    params, ema_params = list(model.parameters()), list(ema.parameters())
    budget = None if max_minutes is None else max_minutes * 60
    t0, losses, history, step, done = time.time(), [], [], 0, 0.0
    model.train()
    while step < steps and done < 1.0:
        step += 1
        ramp = min(1.0, step / warmup) if warmup > 0 else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * ramp * 0.5 * (1 + math.cos(math.pi * done))
        x0, labels = draw()
        batch = len(labels)
        y = torch.where(torch.rand(batch, device=device) < class_dropout, NULL_CLASS, labels)
        t = shift_times(torch.sigmoid(torch.randn(batch, device=device)), time_shift)
        noise = torch.randn_like(x0)
        xt = x0 + t.view(-1, *[1] * (x0.ndim - 1)) * (noise - x0)
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss = F.mse_loss(forward(xt, t, y).float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.detach())
        elapsed = time.time() - t0
        done = max(step / steps, elapsed / budget if budget else 0.0)
        if step % log_every == 0:
            history.append(round(float(torch.stack(losses).mean()), 5))
            losses.clear()
            on_log(step, ema, history, elapsed)
    if losses:
        history.append(round(float(torch.stack(losses).mean()), 5))
    return ema, history, step, time.time() - t0


def shipped_copy(model: FlowModel) -> FlowModel:
    """A float32 copy of ``model`` in eval mode holding exactly the fp16 weights that :func:`save` writes."""
    copy_ = copy.deepcopy(model).float()
    copy_.load_state_dict({k: v.to(torch.float16).float() for k, v in model.state_dict().items()})
    return copy_.eval()


def save(model: nn.Module, path: Path, metrics: dict[str, Any]) -> None:
    """Write the model's weights (fp16) to ``path`` (``.safetensors``) and ``metrics`` to the ``.json`` beside it."""
    from safetensors.torch import save_file

    weights = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path))
    path.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")


def choose_guidance(model: FlowModel, vit: nn.Module, guidances: Sequence[float], *, n: int, seed: int, steps: int,
                    device: torch.device, batch_size: int = 128) -> tuple[float, dict[str, float], dict[str, float]]:
    """The guidance scale whose ``max(8, n // 2)`` samples (noise seed ``seed + 1``) the ViT classifies best (ties:
    the smaller scale), the accuracy per scale, and :func:`sample_accuracy` at it on ``n`` samples of ``seed``."""
    half = eval_labels(max(len(SHAPES), n // 2))
    by_guidance = {}
    for g in guidances:
        found = sample(model, half, seed=seed + 1, steps=steps, guidance=g, device=device, batch_size=batch_size)
        by_guidance[str(g)] = sample_accuracy(vit, found, half)["frames"]
        print(f"guidance {g}: class accuracy {by_guidance[str(g)]:.3f} ({len(half)} samples)", flush=True)
    best = max(guidances, key=lambda g: (by_guidance[str(g)], -g))
    labels = eval_labels(n)
    final = sample_accuracy(vit, sample(model, labels, seed=seed, steps=steps, guidance=best, device=device,
                                        batch_size=batch_size), labels)
    return best, by_guidance, final


M = TypeVar("M", bound=FlowModel)


def load_testbed(model_class: Callable[[Mapping[str, Any]], M], path: str | Path | None, shipped: Path,
                 device: str | torch.device, what: str, script: str) -> M:
    """``model_class(config)`` with the weights at ``path`` (default: ``shipped``), float32, in eval mode on ``device``.

    The json beside the weights gives the config and the sampling defaults (``default_steps``,
    ``default_guidance``). Without either file, a FileNotFoundError names the testbed (``what``) and the
    training script (``script``).
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else shipped
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        raise FileNotFoundError(f"no testbed {what} at {path} (the weights and {meta.name} beside them); train "
                                f"one with {script}")
    info = json.loads(meta.read_text())
    model = model_class(info["config"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    model.default_steps = int(info["sampling"]["steps"])
    model.default_guidance = float(info["sampling"]["guidance"])
    model.default_shift = float(info["sampling"].get("shift", 1.0))  # weights trained before the shift: 1
    return model.to(device).eval()


def train_testbed(build: Callable[[], FlowModel], x_train: np.ndarray, y_train: np.ndarray, x_real: np.ndarray,
                  y_real: np.ndarray, *, to_model: Callable[[Tensor], Tensor], augment: Callable[[Tensor], Tensor],
                  weights: Path, header: Mapping[str, Any], note: str, data_seconds: float, device: torch.device,
                  seed: int, steps: int, batch_size: int, lr: float, weight_decay: float, warmup: int,
                  ema_decay: float, class_dropout: float, time_shift: float, max_minutes: float | None, compile: bool,
                  eval_steps: int, guidances: Sequence[float], log_every: int) -> dict[str, Any]:
    """A testbed generator's training run once its data is generated; returns the metrics written to ``weights``' json.

    ``build()`` makes the fresh model (after ``torch.manual_seed(seed)``). The training samples
    ``x_train`` (uint8) and classes ``y_train`` are drawn ``batch_size`` at a time, put through
    ``to_model`` (to [-1, 1]) and ``augment``, and fed to :func:`train_flow` with the recipe arguments.
    Every ``log_every`` steps a quick class accuracy (up to 64 samples) is printed and the EMA weights
    are written to ``weights`` with ``"partial": true``. At the end the EMA weights, as shipped (fp16),
    choose the guidance (:func:`choose_guidance`, ``len(y_real)`` samples) and the final weights and
    metrics are written. ``x_real`` / ``y_real`` are real test samples: the shipped testbed ViT's
    accuracy on them is recorded as ``vit_accuracy_on_real_images`` (or ``_clips``); for clips the
    middle frame's class accuracy is recorded too. The json starts with ``header`` (``model`` and
    ``config``); ``note`` is added to the printed model summary.
    """
    import diffusers

    cuda = device.type == "cuda"
    train_size, eval_n = len(y_train), len(y_real)
    vit = load_vit(device=device)
    torch.manual_seed(seed)
    model = build().to(device)
    model.default_shift = time_shift  # the EMA and the shipped copy inherit it: every sample below uses it
    clips = len(model.sample_shape) == 4  # [F, 3, H, W]: a video model
    unit = "clips" if clips else "images"
    data, labels = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    meta: dict[str, Any] = {
        **header, "classes": list(SHAPES), "null_class": NULL_CLASS, "seed": seed, "steps": steps,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup, "ema_decay": ema_decay,
        "class_dropout": class_dropout, "time_shift": time_shift, "train_size": train_size,
        "max_minutes": max_minutes, "compile": compile,
        "data_seconds": round(data_seconds, 1), "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "command": " ".join(["python3", *sys.argv]),
    }
    print(f"model: {meta['parameters'] / 1e6:.2f} M parameters{note}; training for {steps} steps"
          + (f" or {max_minutes} minutes" if max_minutes else ""), flush=True)
    quick_labels = eval_labels(min(64, eval_n))

    def draw() -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, train_size, (batch_size,), generator=gen).to(device)
        return augment(to_model(data[idx])), labels[idx]

    def on_log(step: int, ema: FlowModel, history: list[float], elapsed: float) -> None:
        quick = sample_accuracy(vit, sample(ema, quick_labels, seed=seed + 2, steps=eval_steps,
                                            guidance=DEFAULT_GUIDANCE, device=device), quick_labels)
        print(f"step {step}/{steps} loss {history[-1]:.4f} class accuracy ({len(quick_labels)} {unit}) "
              f"{quick['frames']:.3f} ({step / elapsed:.1f} steps/s, {elapsed:.0f} s)", flush=True)
        save(ema, weights, {**meta, "partial": True, "steps_done": step, "loss_history": history,
                            "quick_class_accuracy": quick["frames"],
                            "sampling": {"steps": eval_steps, "guidance": DEFAULT_GUIDANCE, "shift": time_shift}})

    ema, history, step, train_s = train_flow(
        model, draw, steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup, ema_decay=ema_decay,
        class_dropout=class_dropout, time_shift=time_shift, max_minutes=max_minutes, device=device, compile=compile,
        log_every=log_every, on_log=on_log)
    print(f"trained {step} steps in {train_s:.0f} s; final loss {history[-1]:.4f}; evaluating", flush=True)

    t0 = time.time()
    best, by_guidance, final = choose_guidance(shipped_copy(ema), vit, guidances, n=eval_n, seed=seed,
                                               steps=eval_steps, device=device)
    real = sample_accuracy(vit, to_model(torch.from_numpy(x_real)).add(1).div(2), y_real)
    middle = {"class_accuracy_middle_frame": final["middle"]} if clips else {}
    metrics = {
        **meta, "partial": False, "steps_done": step, "loss_history": history,
        "sampling": {"steps": eval_steps, "guidance": best, "shift": time_shift,
                     "sampler": "Euler, classifier-free guidance"},
        "eval_n": eval_n, "class_accuracy": final["frames"], **middle, "class_accuracy_by_guidance": by_guidance,
        f"vit_accuracy_on_real_{unit}": real["frames"], "train_seconds": round(train_s, 1),
        **({"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1)} if cuda else {}),
        "eval_seconds": round(time.time() - t0, 1),
    }
    save(ema, weights, metrics)
    frames = f" (every frame; middle frame {final['middle']:.3f})" if clips else ""
    print(f"class accuracy {final['frames']:.3f}{frames} at guidance {best}, {eval_n} {unit}; wrote {weights}",
          flush=True)
    return metrics


def add_recipe_arguments(parser: argparse.ArgumentParser, *, name: str, unit: str, steps: int, max_minutes: float,
                         batch_size: int, train_size: int, tiny: str, lr: float = 5e-4, time_shift: float = 1.0,
                         guidances: Sequence[float] = GUIDANCE_CANDIDATES, eval_n: int = 256) -> None:
    """Add a testbed training script's arguments to ``parser``, with the testbed's defaults.

    ``name`` is the weights' stem (``--out`` gets ``name.safetensors`` and ``name.json``), ``unit`` what
    a sample is called in the help ("images", "clips"), ``tiny`` the help of ``--tiny`` (the testbed's
    TINY_CONFIG).
    """
    parser.add_argument("--out", required=True, help=f"folder for {name}.safetensors and {name}.json")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--max-minutes", type=float, default=max_minutes, help="wall-time budget of the training loop")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--train-size", type=int, default=train_size, help=f"training {unit} generated")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--time-shift", type=float, default=time_shift,
                        help="SD3 time shift of training times and sampling steps (1 = none, > 1 = toward the noise)")
    parser.add_argument("--eval-n", type=int, default=eval_n, help=f"{unit} sampled for the final class accuracy")
    parser.add_argument("--eval-steps", type=int, default=25, help="Euler steps of the evaluation samples")
    parser.add_argument("--guidances", default=",".join(str(g) for g in guidances),
                        help="classifier-free guidance scales to choose the default from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help=f"processes generating the {unit}")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--tiny", action="store_true", help=tiny)
    parser.add_argument("--config", type=_json_object, default=None, metavar="JSON",
                        help='overrides of the model config, e.g. \'{"num_layers": 6}\' (on top of --tiny\'s if given)')


def _json_object(text: str) -> dict[str, Any]:
    """``--config``'s value: a JSON object (its keys are checked against the testbed's config by the trainer)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}); e.g. '{{\"num_layers\": 6}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of config keys (got {text})")
    return value


def recipe_arguments(args: argparse.Namespace, tiny_config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a testbed's training function from :func:`add_recipe_arguments`' ``args``."""
    return dict(steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size,
                train_size=args.train_size, lr=args.lr, time_shift=args.time_shift, eval_n=args.eval_n,
                eval_steps=args.eval_steps,
                guidances=[float(g) for g in args.guidances.split(",")],
                config={**(tiny_config if args.tiny else {}), **(args.config or {})} or None,
                seed=args.seed, workers=args.workers, device=args.device, compile=args.compile,
                log_every=max(1, min(args.log_every, args.steps // 4)))
