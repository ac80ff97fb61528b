"""The testbed ViT: a small timm ``VisionTransformer`` that classifies the shapes of :mod:`.data`.

Config (:data:`VIT_CONFIG`): 64x64 input, 8x8 patches (an 8x8 grid, 64 patch tokens), a class token
(so ToMe- and EViT-style methods apply), width 192, depth 6, 3 heads, 8 classes (:data:`~.data.SHAPES`).
Inputs are RGB in [0, 1] normalised with mean = std = 0.5 (:func:`to_input`).

:func:`train_vit` is the whole training recipe (AdamW, warm-up then cosine, label smoothing, bf16
autocast on CUDA, random flips and quarter turns, which keep every shape's class); it generates its
data with :func:`~.data.classification_batch`, measures top-1 on the test split and writes
``vit.safetensors`` (fp16) and ``vit.json`` (seed, steps, data sizes, metrics, time, command).
``scripts/train_testbed.py`` runs it; :func:`load_vit` loads the weights shipped in
``visattn/testbed/weights/``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import SHAPES, classification_batch

VIT_CONFIG: dict[str, Any] = {
    "img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0,
    "num_classes": len(SHAPES), "class_token": True, "global_pool": "token",
}
MEAN = STD = (0.5, 0.5, 0.5)
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_WEIGHTS = WEIGHTS_DIR / "vit.safetensors"


def build_vit() -> nn.Module:
    """The testbed ViT with fresh (random) weights, its data config set for :mod:`timm.data`."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**VIT_CONFIG)
    size = VIT_CONFIG["img_size"]
    model.pretrained_cfg = {"input_size": (3, size, size), "mean": MEAN, "std": STD, "interpolation": "bilinear",
                            "crop_pct": 1.0, "crop_mode": "center", "num_classes": len(SHAPES)}
    return model


def load_vit(path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The testbed ViT with weights from ``path`` (default: the shipped ones), float32, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else SHIPPED_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no testbed ViT weights at {path}; train them with scripts/train_testbed.py")
    model = build_vit()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.to(device).eval()


def to_input(images: np.ndarray | Tensor, device: str | torch.device = "cpu") -> Tensor:
    """uint8 images ``[N, H, W, 3]`` -> normalised float32 ``[N, 3, H, W]`` on ``device``."""
    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float().div_(255)
    return (x - 0.5) / 0.5


def quarter_turns(x: Tensor, turns: Tensor) -> Tensor:
    """Sample ``i`` of ``x`` (square in its last two dims) turned by ``turns[i]`` quarter turns (0..3), computed
    with ``torch.where`` rather than boolean indexing, so a training step does not wait on the GPU for it."""
    out = x
    for k in (1, 2, 3):
        out = torch.where((turns == k).view(-1, *[1] * (x.ndim - 1)), torch.rot90(x, k, dims=(-2, -1)), out)
    return out


def _augment(x: Tensor) -> Tensor:
    """Random horizontal flip and quarter turn per sample (every shape class is invariant to both)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return quarter_turns(x, torch.randint(0, 4, (x.shape[0],), device=x.device))


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: str | torch.device,
             batch_size: int = 1000) -> float:
    """Top-1 of ``model`` (in float32) on uint8 ``images`` with integer ``labels``."""
    model.eval()
    correct = 0
    for a in range(0, len(images), batch_size):
        logits = model(to_input(images[a:a + batch_size], device))
        correct += int((logits.argmax(-1).cpu() == torch.as_tensor(labels[a:a + batch_size])).sum())
    return correct / len(images)


def train_vit(out_dir: str | Path, *, steps: int = 8000, batch_size: int = 512, train_size: int = 160_000,
              val_size: int = 2000, test_size: int = 5000, lr: float = 1e-3, weight_decay: float = 0.05,
              warmup: int = 300, seed: int = 0, workers: int = 1, device: str | None = None,
              log_every: int = 500) -> dict[str, Any]:
    """Train the testbed ViT from scratch and write ``vit.safetensors`` and ``vit.json`` to ``out_dir``.

    Training, validation and test images are samples ``0 .. n-1`` of the ``train``, ``val`` and
    ``test`` splits of :func:`~.data.classification_batch` with ``seed``. Returns the metrics
    written to ``vit.json``.
    """
    from safetensors.torch import save_file

    if min(steps, batch_size, train_size, val_size, test_size) < 1:
        raise ValueError("steps, batch_size and the split sizes must all be >= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    x_train, y_train = classification_batch("train", train_size, seed=seed, workers=workers)
    x_val, y_val = classification_batch("val", val_size, seed=seed, workers=workers)
    x_test, y_test = classification_batch("test", test_size, seed=seed, workers=workers)
    data_s = time.time() - t0
    print(f"data: {train_size}/{val_size}/{test_size} images in {data_s:.1f} s", flush=True)

    torch.manual_seed(seed)
    model = build_vit().to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.from_numpy(x_train).to(device)
    labels = torch.from_numpy(y_train).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                                   max(1, steps - warmup))))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    t1 = time.time()
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, train_size, (batch_size,), generator=gen).to(device)
        x = _augment(to_input(images[idx], device))
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            val = accuracy(model, x_val, y_val, device)
            model.train()
            print(f"step {step}/{steps} loss {loss.item():.3f} val top-1 {val:.4f} ({time.time() - t1:.0f} s)",
                  flush=True)
    train_s = time.time() - t1
    weights = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in weights.items()})  # measure what is shipped
    metrics = {
        "model": "timm VisionTransformer", "config": VIT_CONFIG, "mean": MEAN, "std": STD, "classes": list(SHAPES),
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup": warmup, "train_size": train_size, "val_size": val_size, "test_size": test_size,
        "val_top1": accuracy(model, x_val, y_val, device), "test_top1": accuracy(model, x_test, y_test, device),
        "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "command": " ".join(["python3", *sys.argv]),
    }
    save_file(weights, str(out_dir / "vit.safetensors"))
    (out_dir / "vit.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"test top-1 {metrics['test_top1']:.4f}; wrote {out_dir / 'vit.safetensors'}", flush=True)
    return metrics
