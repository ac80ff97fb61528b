"""The testbed video DiT: a small class-conditional diffusers ``WanTransformer3DModel`` in pixel space.

It generates the one-shape clips of :func:`~.data.video_batch` (8 frames of 32x32 RGB by default)
given the shape class. The model (:class:`VideoDiT`) is the Wan transformer plus a
:class:`ClassEmbedding` beside it: a learned table of ``class_tokens`` text-embedding vectors for each
of the 8 classes of :data:`~.data.SHAPES` and for a null class (:data:`NULL_CLASS`, classifier-free
guidance), fed to Wan as ``encoder_hidden_states``, so Wan's cross-attention is the conditioning path.
There is no VAE: Wan patchifies the pixels directly (``patch_size`` (1, 4, 4) gives a 8x8x8 grid,
512 tokens per clip: 64 tiles of 2x2x2 for ``sparse_video`` with ``tile=(2, 2, 2)``, 8 of the default
4x4x4). Attention heads are 64 wide, a size the block-sparse Triton kernel takes.

Config (:data:`VIDEO_CONFIG`): width 384 (6 heads of 64), 4 layers, FFN 1536, about 10.8 M parameters (21.6 MB
at fp16).

Training (:func:`train_video_dit`) is the rectified-flow recipe of :mod:`.diffusion` (shared with the
image UNet of :mod:`.image`): ``x_t = (1 - t) x_0 + t e`` with pixels ``x_0`` in [-1, 1], noise ``e``,
``t`` logit-normal moved toward the noise by a time shift (2 by default), and the model regresses the
velocity ``e - x_0`` (Wan sees the timestep ``1000 t``); the class is dropped to the null class with
probability ``class_dropout``. The model starts from adaLN-Zero (:func:`zero_gates`). AdamW, warm-up
then cosine, bf16 autocast on CUDA, random flips, quarter turns and time reversal of the clips (every
one keeps the class), an EMA of the weights (the shipped weights). :func:`sample` integrates the flow
from noise (``t = 1``) to data (``t = 0``) with Euler steps and classifier-free guidance
``v = v_null + g (v_class - v_null)``; each clip's noise is a function of ``(seed, index)`` alone.

Quality is measured as the issue asks: the shipped testbed ViT (:func:`~.vit.load_vit`) classifies
every frame of generated clips (:func:`class_accuracy`, also the middle frame alone); the fraction
classified as the conditioned class must reach 0.8 (:data:`QUALITY_BAR`). ``train_video_dit`` picks the
guidance scale on one set of noise seeds and reports the accuracy on another, and writes
``video_dit.safetensors`` (fp16) and ``video_dit.json`` (config, sampling defaults, seed, steps, metrics,
command). ``scripts/train_testbed_video.py`` runs it; :func:`load_video_dit` loads the shipped weights,
which reach the bar: 0.814 of the frames of 1024 clips (BENCHMARKS.md).

Methods apply to the Wan transformer inside: ``visattn.apply(model.transformer, "sparse_video", keep=0.25)``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import SHAPE_SCALE, SHAPES, check_shape_scale, video_batch
from .diffusion import (
    DEFAULT_STEPS,
    ClassEmbedding,
    FlowModel,
    check_recipe,
    load_testbed,
    merged_config,
    train_testbed,
)
from .diffusion import NULL_CLASS as NULL_CLASS  # re-exported, with the next four: the module's public names
from .diffusion import class_accuracy as class_accuracy
from .diffusion import classify_frames as classify_frames
from .diffusion import initial_noise as initial_noise
from .diffusion import sample as sample
from .vit import WEIGHTS_DIR, quarter_turns

VIDEO_CONFIG: dict[str, Any] = {
    "frames": 8, "size": 32, "patch_size": (1, 4, 4), "num_layers": 4, "num_attention_heads": 6,
    "attention_head_dim": 64, "ffn_dim": 1536, "freq_dim": 128, "text_dim": 128, "class_tokens": 4,
    "shape_scale": SHAPE_SCALE,
}
#: a tiny model on 4 frames of 16x16 (a 4x8x8 token grid, 4 tiles of 4x4x4) for checking the recipe and
#: the harness on a CPU in seconds; not a useful generator.
TINY_CONFIG: dict[str, Any] = {
    "frames": 4, "size": 16, "patch_size": (1, 2, 2), "num_layers": 2, "num_attention_heads": 2,
    "attention_head_dim": 16, "ffn_dim": 64, "freq_dim": 16, "text_dim": 16, "class_tokens": 2,
    "shape_scale": SHAPE_SCALE,
}
SHIPPED_VIDEO_DIT = WEIGHTS_DIR / "video_dit.safetensors"
#: guidance scales :func:`train_video_dit` chooses from by default (the video DiT wants strong guidance).
VIDEO_GUIDANCES: tuple[float, ...] = (4.5, 6.0, 8.0, 10.0, 12.0)
#: The share of generated frames the testbed ViT must classify as the conditioned class (chance: 1 / 8).
QUALITY_BAR = 0.8


def _config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`VIDEO_CONFIG` with ``overrides``, checked for consistency."""
    cfg = merged_config(VIDEO_CONFIG, overrides, "video DiT", "patch_size")
    cfg["shape_scale"] = tuple(float(v) for v in cfg["shape_scale"])
    check_shape_scale(cfg["shape_scale"])
    ints = [k for k in VIDEO_CONFIG if k not in ("patch_size", "shape_scale")]
    if len(cfg["patch_size"]) != 3 or min(cfg["patch_size"]) < 1 or any(int(cfg[k]) < 1 for k in ints):
        raise ValueError(f"video DiT config: patch_size must be 3 ints >= 1 and {', '.join(ints)} ints >= 1 "
                         f"(got {cfg})")
    p_t, p_h, _ = cfg["patch_size"]
    if cfg["frames"] % p_t or cfg["size"] % p_h or cfg["patch_size"][1] != cfg["patch_size"][2]:
        raise ValueError(f"video DiT config: frames ({cfg['frames']}) must be a multiple of patch_size[0] and size "
                         f"({cfg['size']}) of patch_size[1] == patch_size[2] (got patch_size {cfg['patch_size']})")
    return cfg


class VideoDiT(FlowModel):
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
        self.sample_shape = (c["frames"], 3, c["size"], c["size"])

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """Velocity ``[B, F, 3, H, W]`` at noisy clips ``x`` (same shape), times ``t`` ``[B]`` in [0, 1], ``labels``."""
        out = self.transformer(x.transpose(1, 2), t * 1000, self.classes(labels), return_dict=False)[0]
        return out.transpose(1, 2)


def build_video_dit(config: Mapping[str, Any] | None = None) -> VideoDiT:
    """The testbed video DiT with fresh (random) weights; ``config`` overrides keys of :data:`VIDEO_CONFIG`."""
    return VideoDiT(_config(config))


def zero_gates(model: VideoDiT) -> VideoDiT:
    """``model`` with adaLN-Zero's start (Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers", Sec. 3.2):
    every residual gate of Wan's blocks (the self-attention and feed-forward gates: their rows of the shared time
    projection and of each block's table) and the output projection set to zero, so that each block starts with
    its self-attention and feed-forward switched off (Wan's cross-attention has no gate) and the model's first
    velocity is zero. Training starts here (:func:`train_video_dit`)."""
    tr = model.transformer
    proj = tr.condition_embedder.time_proj
    width = proj.weight.shape[0] // 6  # six chunks: shift, scale, gate (attention), shift, scale, gate (FFN)
    with torch.no_grad():
        for chunk in (2, 5):
            proj.weight[chunk * width:(chunk + 1) * width].zero_()
            proj.bias[chunk * width:(chunk + 1) * width].zero_()
            for block in tr.blocks:
                block.scale_shift_table[:, chunk].zero_()
        tr.proj_out.weight.zero_()
        tr.proj_out.bias.zero_()
    return model


def load_video_dit(path: str | Path | None = None, device: str | torch.device = "cpu") -> VideoDiT:
    """The video DiT from ``path`` (default: the shipped weights) and the json beside it, float32, in eval mode."""
    return load_testbed(VideoDiT, path, SHIPPED_VIDEO_DIT, device, "video DiT", "scripts/train_testbed_video.py")


def _to_model(clips: Tensor) -> Tensor:
    """uint8 ``[B, F, H, W, 3]`` -> float ``[B, F, 3, H, W]`` in [-1, 1]."""
    return clips.permute(0, 1, 4, 2, 3).float().div_(127.5).sub_(1.0)


def _augment(x: Tensor) -> Tensor:
    """Per clip: random horizontal flip, quarter turn and time reversal (each keeps the class and the motion valid)."""
    pick = torch.rand(3, x.shape[0], device=x.device)
    x = torch.where((pick[0] < 0.5)[:, None, None, None, None], x.flip(-1), x)
    x = torch.where((pick[1] < 0.5)[:, None, None, None, None], x.flip(1), x)
    return quarter_turns(x, (pick[2] * 4).long().clamp(max=3))


def train_video_dit(out_dir: str | Path, *, steps: int = 100000, batch_size: int = 384, train_size: int = 48000,
                    lr: float = 2e-3, weight_decay: float = 0.01, warmup: int = 300, ema_decay: float = 0.999,
                    class_dropout: float = 0.1, time_shift: float = 2.0, config: Mapping[str, Any] | None = None,
                    eval_n: int = 1024, eval_steps: int = DEFAULT_STEPS,
                    guidances: Sequence[float] = VIDEO_GUIDANCES,
                    max_minutes: float | None = 8.2, seed: int = 0, workers: int = 1, device: str | None = None,
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
    shipped testbed ViT. ``time_shift`` (:func:`~.diffusion.shift_times`) moves the training
    times and the sampling steps toward the noise; the json records it as the sampling default.
    Returns the metrics written to ``video_dit.json``.
    """
    check_recipe({"steps": steps, "batch_size": batch_size, "train_size": train_size, "eval_n": eval_n,
                  "eval_steps": eval_steps, "log_every": log_every}, guidances, max_minutes, class_dropout,
                 time_shift)
    cfg = _config(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()  # data first: the worker processes fork before CUDA is initialised
    data = dict(seed=seed, frames=cfg["frames"], size=cfg["size"], shape_scale=cfg["shape_scale"], workers=workers)
    x_train, y_train = video_batch("train", train_size, **data)
    x_real, y_real = video_batch("test", eval_n, **data)
    data_s = time.time() - t0
    print(f"data: {train_size} training clips of {cfg['frames']}x{cfg['size']}x{cfg['size']} in {data_s:.1f} s",
          flush=True)

    tokens = cfg["frames"] // cfg["patch_size"][0] * (cfg["size"] // cfg["patch_size"][1]) ** 2
    header = {"model": "diffusers WanTransformer3DModel + ClassEmbedding (pixel space, rectified flow)",
              "config": {**cfg, "patch_size": list(cfg["patch_size"]), "shape_scale": list(cfg["shape_scale"])}}
    return train_testbed(
        lambda: zero_gates(build_video_dit(cfg)), x_train, y_train, x_real, y_real, to_model=_to_model,
        augment=_augment,
        weights=out_dir / "video_dit.safetensors", header=header, note=f", {tokens} tokens per clip",
        data_seconds=data_s, device=device, seed=seed, steps=steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup=warmup, ema_decay=ema_decay, class_dropout=class_dropout,
        time_shift=time_shift, max_minutes=max_minutes, compile=compile, eval_steps=eval_steps, guidances=guidances,
        log_every=log_every)
