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


class CommandError(ValueError):
    """A bad command-line value: printed as one line, with what is accepted."""


def _inspect_model(model_name: str, checkpoint: str | None, img_size: int | None) -> tuple[object, str]:
    """The model ``visattn inspect`` draws, and a description of its weights."""
    import timm

    from .testbed.vit import SHIPPED_WEIGHTS, load_vit

    if model_name == "testbed":
        if img_size is not None:
            raise CommandError("--img-size applies to timm models (--model NAME); the testbed ViT takes 64 px")
        try:
            return load_vit(checkpoint), checkpoint or f"the shipped testbed ViT ({SHIPPED_WEIGHTS.name})"
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            raise CommandError(f"--checkpoint {checkpoint} is not a testbed ViT checkpoint ({_first_line(exc)}); "
                               f"give --model NAME for a timm checkpoint") from None
    try:
        model = timm.create_model(model_name, pretrained=False, img_size=img_size or 224)
    except RuntimeError as exc:
        raise CommandError(f"--model {model_name}: {_first_line(exc)}; give 'testbed' or a timm model name "
                           f"(timm.list_models('*vit*') lists them)") from None
    except TypeError:
        raise CommandError(f"--model {model_name} is not a ViT that takes img_size; give 'testbed' or a timm "
                           f"ViT name (timm.list_models('*vit*') lists them)") from None
    if checkpoint is None:
        return model, "random (no download)"
    try:
        state = timm.models.load_state_dict(checkpoint)
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        raise CommandError(f"--checkpoint {checkpoint}: {_first_line(exc)}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or resized:
        example = (missing or unexpected or resized)[0]
        raise CommandError(f"--checkpoint {checkpoint} does not fit the timm model {model_name} ({len(missing)} "
                           f"missing, {len(unexpected)} unexpected and {len(resized)} differently shaped weights, "
                           f"e.g. {example}); give --model the architecture it was saved from (--model testbed for "
                           f"visattn's testbed weights)")
    model.load_state_dict(state)
    return model, checkpoint


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def run_inspect(model_name: str, image: str | None, layer: int, out: Path, checkpoint: str | None,
                img_size: int | None = None) -> dict[str, object]:
    """Record one attention layer of a ViT on an image; write the image, the map over it and a colour bar.

    ``model_name`` ``"testbed"``: the testbed ViT shipped in the package (trained here on generated shapes; or
    ``checkpoint`` in its layout) on one of its test pictures unless ``image`` is given; otherwise a timm model
    name built without download, random weights unless ``checkpoint``. Bad values raise :class:`CommandError`.
    """
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    import visattn
    from visattn.frameworks.timm import attention_layers
    from visattn.render import attention_figure, attention_heatmap

    from .testbed.data import SHAPES, classification_scene

    model, weights = _inspect_model(model_name, checkpoint, img_size)
    size = int(model.patch_embed.img_size[0])
    layers = len(attention_layers(model))
    if not -layers <= layer < layers:
        raise CommandError(f"--layer {layer} is out of range: this model has {layers} attention layers "
                           f"(0..{layers - 1}, or -{layers}..-1 counting from the end)")
    layer %= layers
    picture = "a testbed test picture"
    if image:
        try:
            rgb = np.array(Image.open(image).convert("RGB").resize((size, size)))
        except (OSError, UnidentifiedImageError) as exc:
            raise CommandError(f"--image {image}: {_first_line(exc)}; give a PNG, JPEG or other image file") from None
        picture = image
    else:
        scene = classification_scene(0, "test", 0, size=size)
        rgb, picture = scene.image, f"a testbed test picture (a {SHAPES[scene.label]})"
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    handle = visattn.apply(model, "inspect", layers=[layer])
    try:
        with torch.no_grad():
            model(x.unsqueeze(0))
    finally:
        visattn.remove(model)
    attn = handle.last(layer)
    prefix = model.num_prefix_tokens
    query = "class token" if prefix else "mean over queries"
    heat = attention_heatmap(attn, query=0 if prefix else "mean", key_span=(prefix, attn.shape[-1]))
    attention_figure(heat, rgb, out, title=f"{model_name}, layer {layer}: attention of the {query} to each patch")
    return {"model": model_name, "weights": weights, "image": picture, "layer": layer, "query": query,
            "map": list(attn.shape), "png": str(out)}


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


#: Where the commands write unless told otherwise (``visattn.testbed.eval.RESULTS_DIR``, named here too so that
#: ``visattn --help`` does not import the harness).
RESULTS_DIR = Path("visattn_results")
#: ``visattn eval vlm``'s scenes without --questions.
VLM_SCENES = 200
EVAL_TESTBEDS = {
    "vit": "the shipped testbed ViT classifier (or a local timm checkpoint with --model/--checkpoint) on held-out "
           "generated shapes (or --images): top-1 of stock and patched, and agreement (the share of images on which "
           "the patched model predicts what the stock model predicts)",
    "vlm": "the shipped testbed LLaVA-style VLM (or --checkpoint/--tokenizer, or a Hugging Face checkpoint directory "
           "with --questions/--images): POPE and QA accuracy of stock and patched, and agreement of their answers",
    "video": "the shipped testbed video DiT (or --checkpoint): clips sampled stock and patched from the same noise; "
             "PSNR/SSIM of patched against stock, and class accuracy of both",
    "image": "the shipped testbed image UNet (or --checkpoint): images sampled stock and patched from the same "
             "noise; PSNR/SSIM of patched against stock, and class accuracy of both",
}
EVAL_DEFAULTS: dict[str, dict[str, object]] = {
    "vit": dict(supports="timm", n=1000, items="test images", batch=250, seed="seed of the generated test split",
                checkpoint="local timm checkpoint file (with --model); default: the shipped testbed ViT"),
    "vlm": dict(supports="transformers", n=f"{VLM_SCENES} scenes; with --questions, every question",
                items="test scenes (with --questions: the first N questions of each file)", batch=250,
                seed="seed of the generated test split",
                checkpoint="a vlm.safetensors in the testbed layout, or a Hugging Face checkpoint directory"),
    "video": dict(supports="diffusers' Wan", n=8, items="clips", batch=8, seed="seed of the noise",
                  checkpoint="a video_dit.safetensors with its video_dit.json beside it"),
    "image": dict(supports="diffusers' UNet", n=32, items="generated images", batch=32, seed="seed of the noise",
                  checkpoint="an image_unet.safetensors with its image_unet.json beside it"),
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser with errors on one line (``visattn eval: error: ...``), without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _fail(self, f"{message} ({self.prog} --help lists the options)")


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    """Exit with status 2 and one line: the command, then what was wrong and what is accepted."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="visattn", description="Attention processors for vision models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, kernels, methods")
    sub.add_parser("methods", help="every method with its frameworks, paper and options (JSON)")
    p = sub.add_parser("inspect", help="draw one layer's attention of a ViT over an image, as a PNG",
                       description="Draw where one attention layer of a ViT looks: the image, the map over it and "
                                   "a colour bar, in one PNG. By default the testbed ViT shipped in the package "
                                   "(trained on generated shapes) on one of its test pictures.")
    p.add_argument("--model", default="testbed",
                   help="'testbed' (default: the shipped testbed ViT) or a timm model name (built without "
                        "download; random weights unless --checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="local weights: a testbed vit.safetensors (--model testbed) or a timm checkpoint of --model")
    p.add_argument("--image", default=None, help="image file (default: a testbed test picture)")
    p.add_argument("--img-size", type=int, default=None, help="input size of a timm model (default 224)")
    p.add_argument("--layer", type=int, default=-1, help="attention layer index (negative counts from the end)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "attention.png", help="the PNG to write")
    e = sub.add_parser("eval", help="stock vs patched model on a held-out set: top-1 or POPE/QA and agreement, "
                                    "or video / image PSNR/SSIM (JSON + PNG)",
                       description="Stock vs patched model on a testbed; each testbed documents its options: "
                                   "visattn eval vit --help (or vlm, video, image).")
    testbeds = e.add_subparsers(dest="testbed", required=True, metavar="{vit,vlm,video,image}")
    evals = {name: testbeds.add_parser(name, help=text, description=text) for name, text in EVAL_TESTBEDS.items()}
    for name, t in evals.items():
        defaults = EVAL_DEFAULTS[name]
        t.add_argument("--method", required=True, help=f"a registered method that supports {defaults['supports']}; "
                                                       f"see visattn methods")
        t.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                       help="a fixed option of the method, e.g. strategy=cls (repeatable)")
        t.add_argument("--sweep", default=None, metavar="NAME=V1,V2,...",
                       help="an option swept over values, e.g. r=0,4,8")
        t.add_argument("--n", type=int, default=None if name == "vlm" else defaults["n"],
                       help=f"{defaults['items']} (default {defaults['n']})")
        t.add_argument("--seed", type=int, default=0, help=defaults["seed"])
        t.add_argument("--batch-size", type=int, default=defaults["batch"], help=f"default {defaults['batch']}")
        t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        t.add_argument("--checkpoint", default=None, help=defaults["checkpoint"])
        t.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                       help=f"where the JSON and PNG go (default: {RESULTS_DIR}/ in the working directory)")
        t.add_argument("--no-progress", action="store_true", help="no progress bar")
    evals["vit"].add_argument("--model", default=None, help="timm model name of a local checkpoint (with --checkpoint)")
    evals["vit"].add_argument("--num-classes", type=int, default=None,
                              help="classes of the checkpoint's head (passed to timm)")
    evals["vit"].add_argument("--img-size", type=int, default=None,
                              help="input size of the checkpoint (passed to timm)")
    evals["vit"].add_argument("--images", default=None,
                              help="local image folder, one subfolder per class (ImageFolder layout)")
    evals["vlm"].add_argument("--images", default=None, help="the folder holding the images of --questions")
    evals["vlm"].add_argument("--tokenizer", default=None, help="tokenizer file (default: vlm_tokenizer.json beside "
                                                                "the checkpoint)")
    evals["vlm"].add_argument("--questions", nargs="+", default=None, metavar="FILE",
                              help="POPE-format question files (JSON lines: image, text, label), with --images and a "
                                   "Hugging Face --checkpoint DIR; --n then takes the first N questions of each")
    for name in ("video", "image"):
        evals[name].add_argument("--steps", type=int, default=None,
                                 help="Euler sampling steps (default: the weights' own)")
        evals[name].add_argument("--guidance", type=float, default=None,
                                 help="classifier-free guidance scale (default: the weights' own)")
    d = sub.add_parser("demo", help="the Gradio demo (demos/app.py): ViT, vision-language and diffusion tabs on the "
                                    "testbed models")
    d.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N: where the models run")
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [a.split("=")[0] for a in extra if a.startswith("--")]
        owners = {f: [n for n, t in evals.items() if f in t._option_string_actions] for f in flags}
        if args.command != "eval" or not flags or not all(owners.values()):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        _fail(evals[args.testbed], "; ".join(
            f"{f} applies to the {' and '.join(owners[f])} testbed{'s' if len(owners[f]) > 1 else ''} only"
            for f in flags) + f" (visattn eval {args.testbed} --help lists its options)")

    if args.command == "info":
        for key, value in info().items():
            print(f"{key:>13}: {', '.join(value) if isinstance(value, list) else value}")
    elif args.command == "methods":
        import visattn

        print(json.dumps(visattn.methods(), indent=2, default=str))
    elif args.command == "inspect":
        try:
            result = run_inspect(args.model, args.image, args.layer, args.out, args.checkpoint, args.img_size)
        except CommandError as exc:
            _fail(p, str(exc))
        print(json.dumps(result, indent=2))
    elif args.command == "eval":
        from visattn.errors import VisattnError
        from visattn.testbed.eval import eval_image, eval_video, eval_vit, eval_vlm, parse_option, parse_sweep, table

        testbed = evals[args.testbed]
        try:
            options = dict(parse_option(o) for o in args.option)
            sweep = parse_sweep(args.sweep) if args.sweep else None
            common = dict(n=args.n, seed=args.seed, batch_size=args.batch_size, device=args.device,
                          checkpoint=args.checkpoint, out_dir=args.out_dir, progress=not args.no_progress)
            if args.testbed in ("video", "image"):
                evaluate = eval_video if args.testbed == "video" else eval_image
                result = evaluate(args.method, options, sweep, steps=args.steps, guidance=args.guidance, **common)
            elif args.testbed == "vlm":
                if args.n is None and not args.questions:
                    common["n"] = VLM_SCENES
                result = eval_vlm(args.method, options, sweep, tokenizer=args.tokenizer, questions=args.questions,
                                  images=args.images, **common)
            else:
                result = eval_vit(args.method, options, sweep, model_name=args.model, num_classes=args.num_classes,
                                  img_size=args.img_size, images=args.images, **common)
        except (VisattnError, ValueError, OSError) as exc:
            _fail(testbed, str(exc))
        print(f"{result['model']} on {result['data']}, {result['device']}")
        print(table(result))
        print("wrote " + ", ".join(result["files"]))
    elif args.command == "demo":
        try:
            app = load_demo_app()
        except RuntimeError as exc:
            _fail(d, str(exc))
        app.launch(args.host, args.port, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
