"""The ``visattn`` command: ``info``, ``methods`` and ``inspect``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # not installed, or broken: say so rather than fail
        return "not installed"


def info() -> dict[str, object]:
    """Versions, GPU, whether the Triton kernels can run here, and the registered methods."""
    import torch

    import visattn

    cuda = torch.cuda.is_available()
    triton = _version("triton")
    return {
        "visattn": visattn.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton,
        "timm": _version("timm"),
        "open_clip": _version("open_clip"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "kernels": "triton on cuda" if cuda and triton != "not installed" else "pytorch reference (no CUDA GPU)",
        "methods": sorted(visattn.methods()),
    }


def _synthetic_image(size: int):
    """A deterministic test picture: a bright disc and a square on a striped background."""
    import torch

    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = 0.25 + 0.1 * torch.sin(xx * 40).expand(3, size, size).clone()
    disc = ((xx - 0.3) ** 2 + (yy - 0.35) ** 2) < 0.03
    square = ((xx - 0.7).abs() < 0.12) & ((yy - 0.7).abs() < 0.12)
    img[0][disc], img[1][square] = 1.0, 1.0
    return img


def run_inspect(model_name: str, image: str | None, layer: int, out: Path, checkpoint: str | None,
                img_size: int) -> dict[str, object]:
    """Build a timm ViT (random weights, or a local checkpoint), record one layer's attention, write a PNG."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    import visattn
    from visattn.frameworks.timm import attention_layers
    from visattn.render import attention_heatmap, render_map

    model = timm.create_model(model_name, pretrained=False, img_size=img_size,
                              checkpoint_path=checkpoint or "").eval()
    if image:
        pil = Image.open(image).convert("RGB").resize((img_size, img_size))
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    else:
        x = _synthetic_image(img_size)
    layers = len(attention_layers(model))
    layer = layer % layers
    handle = visattn.apply(model, "inspect", layers=[layer])
    with torch.no_grad():
        model(x.unsqueeze(0))
    visattn.remove(model)
    prefix = model.num_prefix_tokens
    heat = attention_heatmap(handle.last(layer), query=0 if prefix else "mean",
                             key_span=(prefix, handle.last(layer).shape[-1]))
    render_map(heat, out, image=x)
    return {"model": model_name, "weights": checkpoint or "random (no download)", "layer": layer,
            "query": "class token" if prefix else "mean over tokens", "map": list(handle.last(layer).shape),
            "png": str(out)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn", description="Attention processors for vision models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, kernels, methods")
    sub.add_parser("methods", help="every method with its frameworks, paper and options (JSON)")
    p = sub.add_parser("inspect", help="draw one layer's attention of a timm ViT over an image, as a PNG")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (built without download)")
    p.add_argument("--checkpoint", default=None, help="local checkpoint file to load (optional)")
    p.add_argument("--image", default=None, help="image file (default: a built-in synthetic picture)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--layer", type=int, default=-1, help="attention layer index (negative counts from the end)")
    p.add_argument("--out", type=Path, default=Path("attention.png"))
    args = parser.parse_args(argv)

    if args.command == "info":
        for key, value in info().items():
            print(f"{key:>13}: {', '.join(value) if isinstance(value, list) else value}")
    elif args.command == "methods":
        import visattn

        print(json.dumps(visattn.methods(), indent=2, default=str))
    elif args.command == "inspect":
        result = run_inspect(args.model, args.image, args.layer, args.out, args.checkpoint, args.img_size)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
