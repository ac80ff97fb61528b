"""The testbed image UNet: a small class-conditional diffusers ``UNet2DConditionModel`` in pixel space.

It generates the shape images of :func:`~.data.classification_batch` (64x64 RGB, the images the
testbed ViT classifies) given the shape class, so that ``tome`` (ToMe for Stable Diffusion) can be
measured on a model family it supports. The model (:class:`ImageUNet`) is an SD-style UNet, laid out
like SDXL's: no attention at full resolution, transformer blocks (self-attention, cross-attention,
MLP) at 1/2 and 1/4 of it (32x32 = 1024 and 16x16 = 256 tokens) and in the mid block; ``tome``'s
default ``max_downsample`` (the finest level with attention) merges at the 32x32 level. The class
reaches the UNet through ``encoder_hidden_states``: ``class_tokens`` learned vectors per class and
for a null class (:class:`~.diffusion.ClassEmbedding`). There is no VAE: the UNet works on the pixels.

Config (:data:`IMAGE_CONFIG`): ``block_out_channels`` (64, 96, 128), one ResNet (and transformer) layer
per block, attention heads 32 wide, class tokens of width 128; about 5.6 M parameters.

Training (:func:`train_image_unet`) is the rectified-flow recipe of :mod:`.diffusion`, shared with the
video DiT: the UNet regresses the velocity ``e - x_0`` at ``x_t = (1 - t) x_0 + t e`` (timestep
``1000 t``), the class dropped to the null class with probability ``class_dropout``; AdamW, warm-up
then cosine, bf16 autocast on CUDA, random flips and quarter turns (which keep every shape's class),
an EMA of the weights (the shipped weights). :func:`~.diffusion.sample` draws images with Euler steps
and classifier-free guidance, each image's noise a function of ``(seed, index)`` alone. The shipped
testbed ViT classifies the samples; the fraction classified as the conditioned class must reach
0.8. ``train_image_unet`` writes ``image_unet.safetensors`` (fp16) and ``image_unet.json`` (config,
sampling defaults, seed, steps, metrics, command); ``scripts/train_testbed_image.py`` runs it and
:func:`load_image_unet` loads the shipped weights.

Methods apply to the UNet inside: ``visattn.apply(model.unet, "tome", ratio=0.5, scope="block")``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data import SHAPES, classification_batch
from .diffusion import (
    DEFAULT_STEPS,
    GUIDANCE_CANDIDATES,
    ClassEmbedding,
    FlowModel,
    check_recipe,
    load_testbed,
    merged_config,
    train_testbed,
)
from .diffusion import sample as sample  # re-exported: image.sample is public
from .vit import WEIGHTS_DIR, _augment

IMAGE_CONFIG: dict[str, Any] = {
    "size": 64, "block_out_channels": (64, 96, 128), "layers_per_block": 1, "head_width": 32, "norm_groups": 32,
    "text_dim": 128, "class_tokens": 4,
}
#: a tiny model on 16x16 images (attention on 8x8 and 4x4 grids) for checking the recipe and the harness
#: on a CPU in seconds; not a useful generator.
TINY_CONFIG: dict[str, Any] = {
    "size": 16, "block_out_channels": (16, 32, 32), "layers_per_block": 1, "head_width": 16, "norm_groups": 8,
    "text_dim": 16, "class_tokens": 2,
}
SHIPPED_IMAGE_UNET = WEIGHTS_DIR / "image_unet.safetensors"


def _config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """:data:`IMAGE_CONFIG` with ``overrides``, checked for consistency."""
    cfg = merged_config(IMAGE_CONFIG, overrides, "image UNet", "block_out_channels")
    channels, ints = cfg["block_out_channels"], [k for k in IMAGE_CONFIG if k != "block_out_channels"]
    if len(channels) < 2 or min(channels) < 1 or any(int(cfg[k]) < 1 for k in ints):
        raise ValueError(f"image UNet config: block_out_channels must be 2 or more ints >= 1 (the first level has no "
                         f"attention) and {', '.join(ints)} ints >= 1 (got {cfg})")
    if cfg["size"] % 2 ** (len(channels) - 1) or any(c % cfg["norm_groups"] or c % cfg["head_width"]
                                                      for c in channels[1:]) or channels[0] % cfg["norm_groups"]:
        raise ValueError(f"image UNet config: size ({cfg['size']}) must be a multiple of 2 ** (levels - 1) and every "
                         f"block_out_channels {channels} a multiple of norm_groups ({cfg['norm_groups']}); those with "
                         f"attention (all but the first) of head_width ({cfg['head_width']})")
    return cfg


class ImageUNet(FlowModel):
    """The UNet (``.unet``) and its class embedding (``.classes``); see the module doc.

    ``config`` is the full :data:`IMAGE_CONFIG`; ``default_steps`` and ``default_guidance`` are what
    :func:`~.diffusion.sample` uses when not told otherwise (set from the weights' json by
    :func:`load_image_unet`).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__()
        self.config = _config(config)
        c = self.config
        channels = c["block_out_channels"]
        attention_levels = len(channels) - 1
        self.unet = UNet2DConditionModel(
            sample_size=c["size"], in_channels=3, out_channels=3, layers_per_block=c["layers_per_block"],
            block_out_channels=channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * attention_levels,
            up_block_types=("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",),
            cross_attention_dim=c["text_dim"], norm_num_groups=c["norm_groups"], use_linear_projection=True,
            attention_head_dim=tuple(ch // c["head_width"] for ch in channels))  # diffusers: heads per block
        self.classes = ClassEmbedding(len(SHAPES), c["class_tokens"], c["text_dim"])
        self.sample_shape = (3, c["size"], c["size"])

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """Velocity ``[B, 3, H, W]`` at noisy images ``x`` (same shape), times ``t`` ``[B]`` in [0, 1], ``labels``."""
        return self.unet(x, t * 1000, encoder_hidden_states=self.classes(labels), return_dict=False)[0]


def build_image_unet(config: Mapping[str, Any] | None = None) -> ImageUNet:
    """The testbed image UNet with fresh (random) weights; ``config`` overrides keys of :data:`IMAGE_CONFIG`."""
    return ImageUNet(_config(config))


def load_image_unet(path: str | Path | None = None, device: str | torch.device = "cpu") -> ImageUNet:
    """The image UNet from ``path`` (default: the shipped weights) and the json beside it, float32, in eval mode."""
    return load_testbed(ImageUNet, path, SHIPPED_IMAGE_UNET, device, "image UNet", "scripts/train_testbed_image.py")


def _to_model(images: Tensor) -> Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def train_image_unet(out_dir: str | Path, *, steps: int = 20000, batch_size: int = 128, train_size: int = 40000,
                     lr: float = 5e-4, weight_decay: float = 0.01, warmup: int = 200, ema_decay: float = 0.999,
                     class_dropout: float = 0.1, time_shift: float = 1.0, config: Mapping[str, Any] | None = None,
                     eval_n: int = 256, eval_steps: int = DEFAULT_STEPS,
                     guidances: Sequence[float] = GUIDANCE_CANDIDATES,
                     max_minutes: float | None = None, seed: int = 0, workers: int = 1, device: str | None = None,
                     compile: bool = False, log_every: int = 500) -> dict[str, Any]:
    """Train the testbed image UNet from scratch; write ``image_unet.safetensors`` and ``.json`` to ``out_dir``.

    The images are samples ``0 .. train_size-1`` of the ``train`` split of
    :func:`~.data.classification_batch` with ``seed`` (at the config's ``size``). ``max_minutes`` bounds
    the training loop's wall time (:func:`~.diffusion.train_flow`: the schedule anneals by whichever of
    steps and time runs out first); ``steps_done`` records where it stopped. Every ``log_every`` steps the
    mean loss since the last report (kept in ``loss_history``), the speed and a quick class accuracy (up
    to 64 images) are printed and the EMA weights are written with ``"partial": true``. At the end the
    EMA weights, as shipped (fp16), sample ``eval_n // 2`` images per guidance scale in ``guidances``
    (noise seed ``seed + 1``); the best scale becomes the default and the reported ``class_accuracy`` is
    measured at it on ``eval_n`` other images (noise seed ``seed``), classified by the shipped testbed
    ViT. ``time_shift`` (:func:`~.diffusion.shift_times`) moves the training
    times and the sampling steps toward the noise; the json records it as the sampling default.
    Returns the metrics written to ``image_unet.json``.
    """
    check_recipe({"steps": steps, "batch_size": batch_size, "train_size": train_size, "eval_n": eval_n,
                  "eval_steps": eval_steps, "log_every": log_every}, guidances, max_minutes, class_dropout,
                 time_shift)
    cfg = _config(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()  # data first: the worker processes fork before CUDA is initialised
    x_train, y_train = classification_batch("train", train_size, seed=seed, size=cfg["size"], workers=workers)
    x_real, y_real = classification_batch("test", eval_n, seed=seed, size=cfg["size"], workers=workers)
    data_s = time.time() - t0
    print(f"data: {train_size} training images of {cfg['size']}x{cfg['size']} in {data_s:.1f} s", flush=True)

    header = {"model": "diffusers UNet2DConditionModel + ClassEmbedding (pixel space, rectified flow)",
              "config": {**cfg, "block_out_channels": list(cfg["block_out_channels"])}}
    return train_testbed(
        lambda: build_image_unet(cfg), x_train, y_train, x_real, y_real, to_model=_to_model, augment=_augment,
        weights=out_dir / "image_unet.safetensors", header=header, note="", data_seconds=data_s, device=device,
        seed=seed, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
        ema_decay=ema_decay, class_dropout=class_dropout, time_shift=time_shift, max_minutes=max_minutes,
        compile=compile, eval_steps=eval_steps, guidances=guidances, log_every=log_every)
