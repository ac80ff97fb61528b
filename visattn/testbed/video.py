"""The testbed video DiT: a small class-conditional diffusers ``WanTransformer3DModel`` in pixel space.

It generates the one-shape clips of :func:`~.data.video_batch` (8 frames of 64x64 RGB by default)
given the shape class. The model (:class:`VideoDiT`) is the Wan transformer plus a
:class:`ClassEmbedding` beside it: a learned table of ``class_tokens`` text-embedding vectors for each
of the 8 classes of :data:`~.data.SHAPES` and for a null class (:data:`NULL_CLASS`, classifier-free
guidance), fed to Wan as ``encoder_hidden_states``, so Wan's cross-attention is the conditioning path.
There is no VAE: Wan patchifies the pixels directly (``patch_size`` (1, 4, 4) gives a 8x16x16 grid,
2048 tokens per clip, 32 tiles of 4x4x4 for ``sparse_video``). Attention heads are 64 wide, a size the
block-sparse Triton kernel takes.

Config (:data:`VIDEO_CONFIG`): width 192 (3 heads of 64), 6 layers, FFN 768, about 3.8 M parameters.

Training (:func:`train_video_dit`) is rectified flow: ``x_t = (1 - t) x_0 + t e`` with pixels ``x_0`` in
[-1, 1], noise ``e``, ``t`` logit-normal, and the model regresses the velocity ``e - x_0`` (Wan sees the
timestep ``1000 t``); the class is dropped to the null class with probability ``class_dropout``. AdamW,
warm-up then cosine, bf16 autocast on CUDA, random flips, quarter turns and time reversal of the clips
(every one keeps the class), an EMA of the weights (the shipped weights). :func:`sample` integrates the
flow from noise (``t = 1``) to data (``t = 0``) with Euler steps and classifier-free guidance
``v = v_null + g (v_class - v_null)``; each clip's noise is a function of ``(seed, index)`` alone.

Quality is measured as the issue asks: the shipped testbed ViT (:func:`~.vit.load_vit`) classifies
every frame of generated clips (:func:`class_accuracy`, also the middle frame alone); the fraction
classified as the conditioned class must reach 0.8. ``train_video_dit`` picks the guidance scale on
one set of noise seeds and reports the accuracy on another, and writes ``video_dit.safetensors``
(fp16) and ``video_dit.json`` (config, sampling defaults, seed, steps, metrics, command).
``scripts/train_testbed_video.py`` runs it; :func:`load_video_dit` loads the shipped weights.

Methods apply to the Wan transformer inside: ``visattn.apply(model.transformer, "sparse_video", keep=0.25)``.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import SHAPES, video_batch
from .vit import MEAN, STD, VIT_CONFIG, WEIGHTS_DIR, load_vit

VIDEO_CONFIG: dict[str, Any] = {
    "frames": 8, "size": 64, "patch_size": (1, 4, 4), "num_layers": 6, "num_attention_heads": 3,
    "attention_head_dim": 64, "ffn_dim": 768, "freq_dim": 128, "text_dim": 128, "class_tokens": 4,
}
#: a tiny model on 4 frames of 16x16 (a 4x8x8 token grid, 4 tiles of 4x4x4) for checking the recipe and
#: the harness on a CPU in seconds; not a useful generator.
TINY_CONFIG: dict[str, Any] = {
    "frames": 4, "size": 16, "patch_size": (1, 2, 2), "num_layers": 2, "num_attention_heads": 2,
    "attention_head_dim": 16, "ffn_dim": 64, "freq_dim": 16, "text_dim": 16, "class_tokens": 2,
}
#: the class index meaning "no class" (classifier-free guidance's unconditional branch).
NULL_CLASS = len(SHAPES)
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.0
#: guidance scales :func:`train_video_dit` chooses from.
GUIDANCE_CANDIDATES: tuple[float, ...] = (1.0, 2.0, 3.0, 4.5, 6.0)
SHIPPED_VIDEO_DIT = WEIGHTS_DIR / "video_dit.safetensors"


def _config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`VIDEO_CONFIG` with ``overrides``, checked for consistency."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(VIDEO_CONFIG))
    if unknown:
        raise ValueError(f"unknown video DiT config keys {', '.join(unknown)}; accepted: {', '.join(VIDEO_CONFIG)}")
    cfg = {**VIDEO_CONFIG, **overrides}
    cfg["patch_size"] = tuple(int(p) for p in cfg["patch_size"])
    ints = [k for k in VIDEO_CONFIG if k != "patch_size"]
    if len(cfg["patch_size"]) != 3 or min(cfg["patch_size"]) < 1 or any(int(cfg[k]) < 1 for k in ints):
        raise ValueError(f"video DiT config: patch_size must be 3 ints >= 1 and {', '.join(ints)} ints >= 1 "
                         f"(got {cfg})")
    p_t, p_h, _ = cfg["patch_size"]
    if cfg["frames"] % p_t or cfg["size"] % p_h or cfg["patch_size"][1] != cfg["patch_size"][2]:
        raise ValueError(f"video DiT config: frames ({cfg['frames']}) must be a multiple of patch_size[0] and size "
                         f"({cfg['size']}) of patch_size[1] == patch_size[2] (got patch_size {cfg['patch_size']})")
    return cfg


class ClassEmbedding(nn.Module):
    """``class_tokens`` learned vectors of width ``text_dim`` per class, plus the null class: Wan's text input."""

    def __init__(self, num_classes: int, class_tokens: int, text_dim: int) -> None:
        super().__init__()
        self.class_tokens, self.text_dim = class_tokens, text_dim
        self.table = nn.Embedding(num_classes + 1, class_tokens * text_dim)
        nn.init.normal_(self.table.weight, std=0.5)

    def forward(self, labels: Tensor) -> Tensor:
        """Labels ``[B]`` (``num_classes`` = null) -> ``encoder_hidden_states`` ``[B, class_tokens, text_dim]``."""
        return self.table(labels).unflatten(-1, (self.class_tokens, self.text_dim))


class VideoDiT(nn.Module):
    """The Wan transformer (``.transformer``) and its class embedding (``.classes``); see the module doc.

    ``config`` is the full :data:`VIDEO_CONFIG`; ``default_steps`` and ``default_guidance`` are what
    :func:`sample` uses when not told otherwise (set from the weights' json by :func:`load_video_dit`).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        from diffusers import WanTransformer3DModel

        super().__init__()
        self.config = _config(config)
        c = self.config
        self.transformer = WanTransformer3DModel(
            patch_size=c["patch_size"], num_attention_heads=c["num_attention_heads"],
            attention_head_dim=c["attention_head_dim"], in_channels=3, out_channels=3, text_dim=c["text_dim"],
            freq_dim=c["freq_dim"], ffn_dim=c["ffn_dim"], num_layers=c["num_layers"],
            rope_max_seq_len=max(64, c["frames"], c["size"]))
        self.classes = ClassEmbedding(len(SHAPES), c["class_tokens"], c["text_dim"])
        self.default_steps, self.default_guidance = DEFAULT_STEPS, DEFAULT_GUIDANCE

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """Velocity ``[B, F, 3, H, W]`` at noisy clips ``x`` (same shape), times ``t`` ``[B]`` in [0, 1], ``labels``."""
        out = self.transformer(x.transpose(1, 2), t * 1000, self.classes(labels), return_dict=False)[0]
        return out.transpose(1, 2)

    def guided(self, x: Tensor, t: Tensor, labels: Tensor, guidance: float) -> Tensor:
        """Classifier-free guided velocity; the class and null branches run as one batch (one call per step)."""
        if guidance == 1.0:
            return self(x, t, labels)
        null = torch.full_like(labels, NULL_CLASS)
        v_class, v_null = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
        return v_null + guidance * (v_class - v_null)


def build_video_dit(config: Mapping[str, Any] | None = None) -> VideoDiT:
    """The testbed video DiT with fresh (random) weights; ``config`` overrides keys of :data:`VIDEO_CONFIG`."""
    return VideoDiT(_config(config))


def load_video_dit(path: str | Path | None = None, device: str | torch.device = "cpu") -> VideoDiT:
    """The video DiT from ``path`` (default: the shipped weights) and the json beside it, float32, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else SHIPPED_VIDEO_DIT
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        raise FileNotFoundError(f"no testbed video DiT at {path} (the weights and {meta.name} beside them); train "
                                f"one with scripts/train_testbed_video.py")
    info = json.loads(meta.read_text())
    model = VideoDiT(info["config"])
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    model.default_steps = int(info["sampling"]["steps"])
    model.default_guidance = float(info["sampling"]["guidance"])
    return model.to(device).eval()


def initial_noise(seed: int, count: int, shape: Sequence[int]) -> Tensor:
    """Noise ``[count, *shape]`` float32 on the CPU; item ``i`` depends on ``(seed, i)`` alone."""
    out = torch.empty(count, *shape)
    for i in range(count):
        state = np.random.SeedSequence([seed, i]).generate_state(2, np.uint64)[0]
        out[i] = torch.randn(*shape, generator=torch.Generator().manual_seed(int(state) >> 1))
    return out


def _labels(labels: Sequence[int] | Tensor) -> Tensor:
    lab = torch.as_tensor(labels, dtype=torch.long).flatten()
    if lab.numel() == 0 or int(lab.min()) < 0 or int(lab.max()) > NULL_CLASS:
        raise ValueError(f"labels must be class indices 0..{NULL_CLASS - 1} ({', '.join(SHAPES)}) or {NULL_CLASS} "
                         f"(no class), at least one (got {lab.tolist()})")
    return lab


@torch.no_grad()
def sample(model: VideoDiT, labels: Sequence[int] | Tensor, *, seed: int = 0, steps: int | None = None,
           guidance: float | None = None, device: str | torch.device | None = None, batch_size: int | None = None,
           progress: Callable[[int], Any] | None = None) -> Tensor:
    """Clips ``[B, F, 3, H, W]`` in [0, 1] (float32, on the CPU) of the classes ``labels``, one per label.

    Euler steps of the flow from ``t = 1`` to ``t = 0`` with classifier-free guidance (module doc).
    Clip ``i`` starts from :func:`initial_noise` item ``i`` of ``seed``, whatever ``batch_size`` (clips
    per model call; all at once if None). ``steps`` and ``guidance`` default to the model's
    ``default_steps`` / ``default_guidance``. ``device`` (default: the model's) is where it runs; the
    model is moved there. On CUDA the model runs under bf16 autocast. ``progress(1)`` is called after
    every Euler step of every batch.
    """
    lab = _labels(labels)
    steps = model.default_steps if steps is None else steps
    guidance = model.default_guidance if guidance is None else guidance
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (got {steps!r})")
    if not guidance >= 1.0:
        raise ValueError(f"guidance must be >= 1 (1 = no classifier-free guidance; got {guidance})")
    batch_size = len(lab) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    c = model.config
    noise = initial_noise(seed, len(lab), (c["frames"], 3, c["size"], c["size"]))
    times = torch.linspace(1.0, 0.0, steps + 1)
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


def eval_labels(n: int) -> list[int]:
    """The classes of ``n`` evaluation clips: 0, 1, ..., 7, 0, 1, ... (balanced)."""
    return [i % len(SHAPES) for i in range(n)]


def _to_model(clips: Tensor) -> Tensor:
    """uint8 ``[B, F, H, W, 3]`` -> float ``[B, F, 3, H, W]`` in [-1, 1]."""
    return clips.permute(0, 1, 4, 2, 3).float().div_(127.5).sub_(1.0)


def _augment(x: Tensor) -> Tensor:
    """Per clip: random horizontal flip, quarter turn and time reversal (each keeps the class and the motion valid)."""
    pick = torch.rand(3, x.shape[0], device=x.device)
    x = torch.where((pick[0] < 0.5)[:, None, None, None, None], x.flip(-1), x)
    x = torch.where((pick[1] < 0.5)[:, None, None, None, None], x.flip(1), x)
    turns = (pick[2] * 4).long().clamp(max=3)
    out = x.clone()
    for k in (1, 2, 3):
        sel = turns == k
        out[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
    return out


def _save(model: VideoDiT, out_dir: Path, metrics: dict[str, Any]) -> None:
    """Write the model's weights (fp16) and ``metrics`` as ``video_dit.safetensors`` / ``video_dit.json``."""
    from safetensors.torch import save_file

    weights = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out_dir / "video_dit.safetensors"))
    (out_dir / "video_dit.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _shipped_copy(model: VideoDiT) -> VideoDiT:
    """A float32 copy of ``model`` holding exactly the fp16 weights that get written."""
    copy_ = copy.deepcopy(model).float()
    copy_.load_state_dict({k: v.to(torch.float16).float() for k, v in model.state_dict().items()})
    return copy_.eval()


def train_video_dit(out_dir: str | Path, *, steps: int = 12000, batch_size: int = 64, train_size: int = 32000,
                    lr: float = 5e-4, weight_decay: float = 0.01, warmup: int = 300, ema_decay: float = 0.999,
                    class_dropout: float = 0.1, config: Mapping[str, Any] | None = None, eval_n: int = 256,
                    eval_steps: int = DEFAULT_STEPS, guidances: Sequence[float] = GUIDANCE_CANDIDATES,
                    max_minutes: float | None = None, seed: int = 0, workers: int = 1, device: str | None = None,
                    compile: bool = False, log_every: int = 500) -> dict[str, Any]:
    """Train the testbed video DiT from scratch; write ``video_dit.safetensors`` and ``video_dit.json`` to ``out_dir``.

    The clips are samples ``0 .. train_size-1`` of the ``train`` split of :func:`~.data.video_batch`
    with ``seed``. ``max_minutes`` bounds the training loop's wall time: the learning-rate schedule
    follows whichever of ``step / steps`` and ``elapsed / max_minutes`` is further, so a run cut
    short by time still anneals; ``steps_done`` records where it stopped. Every ``log_every`` steps the
    mean loss since the last report (kept in ``loss_history``), the speed and a quick class accuracy (up
    to 64 clips) are printed and the EMA weights are written with ``"partial": true``. At the end the
    EMA weights, as shipped (fp16), sample ``eval_n // 2`` clips per guidance scale in ``guidances``
    (noise seed ``seed + 1``); the best scale becomes the default and the reported ``class_accuracy``
    is measured at it on ``eval_n`` other clips (noise seed ``seed``), every frame classified by the
    shipped testbed ViT. Returns the metrics written to ``video_dit.json``.
    """
    if min(steps, batch_size, train_size, eval_n, eval_steps, log_every) < 1:
        raise ValueError("steps, batch_size, train_size, eval_n, eval_steps and log_every must all be >= 1")
    if not guidances or min(guidances) < 1.0:
        raise ValueError(f"guidances must be a non-empty list of scales >= 1 (got {list(guidances)})")
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"max_minutes must be > 0 or None (got {max_minutes})")
    if not 0.0 <= class_dropout < 1.0:
        raise ValueError(f"class_dropout must be in [0, 1) (got {class_dropout})")
    import diffusers

    cfg = _config(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()  # data first: the worker processes fork before CUDA is initialised
    x_train, y_train = video_batch("train", train_size, seed=seed, frames=cfg["frames"], size=cfg["size"],
                                   workers=workers)
    x_real, y_real = video_batch("test", eval_n, seed=seed, frames=cfg["frames"], size=cfg["size"], workers=workers)
    data_s = time.time() - t0
    print(f"data: {train_size} training clips of {cfg['frames']}x{cfg['size']}x{cfg['size']} in {data_s:.1f} s",
          flush=True)

    vit = load_vit(device=device)
    torch.manual_seed(seed)
    model = build_video_dit(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    clips, labels = torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "table" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "table" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99), fused=cuda)
    forward = torch.compile(model) if compile else model
    meta: dict[str, Any] = {
        "model": "diffusers WanTransformer3DModel + ClassEmbedding (pixel space, rectified flow)",
        "config": {**cfg, "patch_size": list(cfg["patch_size"])}, "classes": list(SHAPES), "null_class": NULL_CLASS,
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup": warmup, "ema_decay": ema_decay, "class_dropout": class_dropout, "train_size": train_size,
        "max_minutes": max_minutes, "compile": compile, "data_seconds": round(data_s, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "command": " ".join(["python3", *sys.argv]),
    }
    params, ema_params = list(model.parameters()), list(ema.parameters())
    budget = None if max_minutes is None else max_minutes * 60
    tokens = cfg["frames"] // cfg["patch_size"][0] * (cfg["size"] // cfg["patch_size"][1]) ** 2
    print(f"model: {meta['parameters'] / 1e6:.2f} M parameters, {tokens} tokens per clip; training for {steps} steps"
          + (f" or {max_minutes} minutes" if budget else ""), flush=True)
    quick_labels = eval_labels(min(64, eval_n))
    t1, losses, history, step, done = time.time(), [], [], 0, 0.0
    model.train()
    while step < steps and done < 1.0:
        step += 1
        ramp = min(1.0, step / warmup) if warmup > 0 else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * ramp * 0.5 * (1 + math.cos(math.pi * done))
        idx = torch.randint(0, train_size, (batch_size,), generator=gen).to(device)
        x0 = _augment(_to_model(clips[idx]))
        y = torch.where(torch.rand(batch_size, device=device) < class_dropout, NULL_CLASS, labels[idx])
        t = torch.sigmoid(torch.randn(batch_size, device=device))
        noise = torch.randn_like(x0)
        xt = x0 + t[:, None, None, None, None] * (noise - x0)
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss = F.mse_loss(forward(xt, t, y).float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.detach())
        elapsed = time.time() - t1
        done = max(step / steps, elapsed / budget if budget else 0.0)
        if step % log_every == 0:
            history.append(round(float(torch.stack(losses).mean()), 5))
            losses.clear()
            quick = class_accuracy(classify_frames(vit, sample(ema, quick_labels, seed=seed + 2, steps=eval_steps,
                                                               guidance=DEFAULT_GUIDANCE, device=device)),
                                   quick_labels)
            print(f"step {step}/{steps} loss {history[-1]:.4f} class accuracy ({len(quick_labels)} clips) "
                  f"{quick['frames']:.3f} ({step / elapsed:.1f} steps/s, {elapsed:.0f} s)", flush=True)
            _save(ema, out_dir, {**meta, "partial": True, "steps_done": step, "loss_history": history,
                                 "quick_class_accuracy": quick["frames"],
                                 "sampling": {"steps": eval_steps, "guidance": DEFAULT_GUIDANCE}})
    train_s = time.time() - t1
    if losses:
        history.append(round(float(torch.stack(losses).mean()), 5))
    print(f"trained {step} steps in {train_s:.0f} s; final loss {history[-1]:.4f}; evaluating", flush=True)

    t2 = time.time()
    shipped = _shipped_copy(ema)
    half = eval_labels(max(len(SHAPES), eval_n // 2))
    by_guidance = {}
    for g in guidances:
        preds = classify_frames(vit, sample(shipped, half, seed=seed + 1, steps=eval_steps, guidance=g,
                                            device=device, batch_size=128))
        by_guidance[str(g)] = class_accuracy(preds, half)["frames"]
        print(f"guidance {g}: class accuracy {by_guidance[str(g)]:.3f} ({len(half)} clips)", flush=True)
    best = max(guidances, key=lambda g: (by_guidance[str(g)], -g))
    final = class_accuracy(classify_frames(vit, sample(shipped, eval_labels(eval_n), seed=seed, steps=eval_steps,
                                                       guidance=best, device=device, batch_size=128)),
                           eval_labels(eval_n))
    real = class_accuracy(classify_frames(vit, _to_model(torch.from_numpy(x_real)).add(1).div(2)), y_real)
    metrics = {
        **meta, "partial": False, "steps_done": step, "loss_history": history,
        "sampling": {"steps": eval_steps, "guidance": best, "sampler": "Euler, classifier-free guidance"},
        "eval_n": eval_n, "class_accuracy": final["frames"], "class_accuracy_middle_frame": final["middle"],
        "class_accuracy_by_guidance": by_guidance, "vit_accuracy_on_real_clips": real["frames"],
        "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t2, 1),
    }
    _save(ema, out_dir, metrics)
    print(f"class accuracy {final['frames']:.3f} (every frame; middle frame {final['middle']:.3f}) at guidance "
          f"{best}, {eval_n} clips; wrote {out_dir / 'video_dit.safetensors'}", flush=True)
    return metrics
