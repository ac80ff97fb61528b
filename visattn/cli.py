"""The ``visattn`` command: ``info``, ``methods``, ``inspect``, ``eval`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # not installed, or broken: say so rather than fail
        return "not installed"


def info() -> dict[str, object]:
    """Versions (torch and each framework against the range the suite passed on), GPU, whether the Triton
    kernels can run here, and the registered methods."""
    import torch

    import visattn

    from .versions import status

    cuda = torch.cuda.is_available()
    triton = _version("triton")
    return {
        "visattn": visattn.__version__,
        "python": sys.version.split()[0],
        "torch": status("torch"),
        "triton": triton,
        "timm": status("timm"),
        "open_clip": status("open_clip_torch"),
        "diffusers": status("diffusers"),
        "transformers": status("transformers"),
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


def load_demo_app() -> ModuleType:
    """The Gradio app ``demos/app.py`` of this source tree, as a module (``launch(host, port, device)``).

    Raises ``RuntimeError`` with what to do when Gradio or the file is missing."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise RuntimeError('the demo needs Gradio: pip install "visattn[demo]"')
    path = Path(__file__).resolve().parent.parent / "demos" / "app.py"
    if not path.is_file():
        raise RuntimeError(f"the demo app is demos/app.py of a visattn source tree (pip install -e .); "
                           f"not found at {path}")
    spec = importlib.util.spec_from_file_location("visattn_demo_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    e = sub.add_parser("eval", help="stock vs patched model on a held-out set: top-1 or POPE/QA and agreement, "
                                    "or video / image PSNR/SSIM (JSON + PNG)")
    e.add_argument("testbed", choices=["vit", "vlm", "video", "image"],
                   help="vit: the shipped testbed ViT classifier (or --model/--checkpoint); "
                        "vlm: the shipped testbed LLaVA-style VLM (or --checkpoint/--tokenizer, or a Hugging Face "
                        "checkpoint directory with --questions/--images); "
                        "video: the shipped testbed video DiT (or --checkpoint); "
                        "image: the shipped testbed image UNet (or --checkpoint)")
    e.add_argument("--method", required=True,
                   help="a registered method that supports timm (vit), transformers (vlm), diffusers' Wan "
                        "(video) or diffusers' UNet (image); see visattn methods")
    e.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a fixed option of the method, e.g. strategy=cls (repeatable)")
    e.add_argument("--sweep", default=None, metavar="NAME=V1,V2,...", help="an option swept over values, e.g. r=0,4,8")
    e.add_argument("--n", type=int, default=None,
                   help="number of images (vit, default 1000), of scenes (vlm, default 200), of clips (video, "
                        "default 8) or of generated images (image, default 32)")
    e.add_argument("--seed", type=int, default=0, help="seed of the generated test split (video, image: of the noise)")
    e.add_argument("--batch-size", type=int, default=None, help="default 250 (vit, vlm), 8 (video), 32 (image)")
    e.add_argument("--steps", type=int, default=None,
                   help="video, image: Euler sampling steps (default: the weights' own)")
    e.add_argument("--guidance", type=float, default=None,
                   help="video, image: classifier-free guidance scale (default: the weights' own)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--model", default=None, help="timm model name of a local checkpoint (with --checkpoint)")
    e.add_argument("--checkpoint", default=None,
                   help="vit: local timm checkpoint file (with --model); vlm: a vlm.safetensors in the testbed "
                        "layout; video: a video_dit.safetensors with its video_dit.json beside it; image: an "
                        "image_unet.safetensors with its image_unet.json beside it")
    e.add_argument("--tokenizer", default=None, help="vlm: tokenizer file (default: vlm_tokenizer.json beside it)")
    e.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint's head (passed to timm)")
    e.add_argument("--img-size", type=int, default=None, help="input size of the checkpoint (passed to timm)")
    e.add_argument("--images", default=None, help="vit: local image folder, one subfolder per class (ImageFolder "
                   "layout); vlm: the folder holding the images of --questions")
    e.add_argument("--questions", nargs="+", default=None, metavar="FILE",
                   help="vlm: POPE-format question files (JSON lines: image, text, label), with --images and a "
                        "Hugging Face --checkpoint DIR; --n then takes the first N questions of each")
    e.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"), help="where the JSON and PNG go")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = sub.add_parser("demo", help="the Gradio demo (demos/app.py): ViT, vision-language and diffusion tabs on the "
                                    "testbed models")
    d.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N: where the models run")
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
    elif args.command == "eval":
        from visattn.errors import VisattnError
        from visattn.testbed.eval import eval_image, eval_video, eval_vit, eval_vlm, parse_option, parse_sweep, table

        try:
            options = dict(parse_option(o) for o in args.option)
            sweep = parse_sweep(args.sweep) if args.sweep else None
            only = {"--model": ("vit",), "--num-classes": ("vit",), "--img-size": ("vit",), "--images": ("vit", "vlm"),
                    "--tokenizer": ("vlm",), "--questions": ("vlm",), "--steps": ("video", "image"),
                    "--guidance": ("video", "image")}
            given = [k for k, testbeds in only.items() if args.testbed not in testbeds
                     and getattr(args, k[2:].replace("-", "_")) is not None]
            if given:
                raise ValueError("; ".join(f"{k} applies to the {' and '.join(only[k])} testbed"
                                           f"{'s' if len(only[k]) > 1 else ''} only" for k in given))
            batch_size = args.batch_size if args.batch_size is not None else {"video": 8, "image": 32}.get(
                args.testbed, 250)
            if args.testbed in ("video", "image"):
                evaluate, default_n = (eval_video, 8) if args.testbed == "video" else (eval_image, 32)
                result = evaluate(args.method, options, sweep, n=default_n if args.n is None else args.n,
                                  seed=args.seed, steps=args.steps, guidance=args.guidance, batch_size=batch_size,
                                  device=args.device, checkpoint=args.checkpoint, out_dir=args.out_dir,
                                  progress=not args.no_progress)
            elif args.testbed == "vlm":
                n = args.n if args.n is not None else None if args.questions else 200
                result = eval_vlm(args.method, options, sweep, n=n, seed=args.seed, batch_size=batch_size,
                                  device=args.device, checkpoint=args.checkpoint, tokenizer=args.tokenizer,
                                  questions=args.questions, images=args.images, out_dir=args.out_dir,
                                  progress=not args.no_progress)
            else:
                result = eval_vit(args.method, options, sweep, n=1000 if args.n is None else args.n, seed=args.seed,
                                  batch_size=batch_size, device=args.device, model_name=args.model,
                                  checkpoint=args.checkpoint, num_classes=args.num_classes, img_size=args.img_size,
                                  images=args.images, out_dir=args.out_dir, progress=not args.no_progress)
        except (VisattnError, ValueError, OSError) as exc:
            e.error(str(exc))
        print(f"{result['model']} on {result['data']}, {result['device']}")
        print(table(result))
        print("wrote " + ", ".join(result["files"]))
    elif args.command == "demo":
        try:
            app = load_demo_app()
        except RuntimeError as exc:
            d.error(str(exc))
        app.launch(args.host, args.port, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
