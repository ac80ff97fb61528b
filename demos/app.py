"""The visattn demo: one Gradio tab per framework, on the testbed models (offline) or local checkpoints.

Run it with ``visattn demo --host 127.0.0.1 --port 7860`` (or ``python demos/app.py``). Everything it
computes is in :mod:`visattn.demo`; this file only lays out the inputs and outputs and turns the
computations' errors into messages.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no calls home

import gradio as gr  # noqa: E402

from visattn import demo  # noqa: E402
from visattn.testbed.data import SHAPES  # noqa: E402
from visattn.testbed.eval import resolve_device  # noqa: E402
from visattn.testbed.video import VIDEO_GUIDANCES  # noqa: E402

_OUT = Path(tempfile.mkdtemp(prefix="visattn-demo-"))  # GIFs and example images


def _messages(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with bad input and missing files shown as an error message in the page."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError, KeyError) as exc:  # VisattnError is a ValueError or TypeError
            raise gr.Error(str(exc).strip("'\"")) from exc

    return wrapped


def _progress(progress: gr.Progress) -> demo.Progress:
    return lambda fraction, text: progress(fraction, desc=text)


def _examples(kind: str, images: list[Any]) -> list[str]:
    """The example images as PNG files (what ``gr.Examples`` shows)."""
    from PIL import Image

    paths = []
    for i, image in enumerate(images):
        path = _OUT / f"{kind}_{i}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# ViT


def _top(probabilities: dict[str, float]) -> str:
    return max(probabilities, key=probabilities.get)


def _routes_text(routes: demo.Routes, layer: int) -> str:
    return (f"Region **{routes.region}** (red) attends in layer {layer} to regions **{routes.routed}** (yellow). "
            f"BRA's top class: **{_top(routes.probabilities)}**. Click the picture to pick another region.")


@_messages
def vit_analyse(device: str, image: Any, checkpoint: str, r: int, n_win: int, topk: int, layer: int, region: int,
                query: str,
                progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's idiom)
) -> tuple:
    model = demo.vit_model(checkpoint.strip() or None, device)
    progress(0.0, desc="classifying")
    probabilities = demo.classify(model, image)
    progress(0.25, desc="ToMe")
    merged = demo.tome_groups(model, image, int(r))
    progress(0.5, desc="BRA")
    routes = demo.bra_routes(model, image, n_win=int(n_win), topk=int(topk), layer=int(layer), region=int(region))
    progress(0.75, desc="inspect")
    maps = demo.attention_maps(model, image, layer=int(layer), query=query)
    tome_text = (f"**{merged.groups} tokens** left of {merged.token_counts[0] - 1} patches after r={r} per block; "
                 f"tokens entering each block: {merged.token_counts}. ToMe's top class: "
                 f"**{_top(merged.probabilities)}**.")
    return probabilities, merged.drawing, tome_text, routes.drawing, _routes_text(routes, layer), maps


@_messages
def vit_route(device: str, image: Any, checkpoint: str, n_win: int, topk: int, layer: int, evt: gr.SelectData) -> tuple:
    x, y = evt.index
    region = demo.region_at((x / demo.DISPLAY, y / demo.DISPLAY), int(n_win))
    model = demo.vit_model(checkpoint.strip() or None, device)
    routes = demo.bra_routes(model, image, n_win=int(n_win), topk=int(topk), layer=int(layer), region=region)
    return region, routes.drawing, _routes_text(routes, layer)


@_messages
def vit_speed(device: str, checkpoint: str, r: int, n_win: int, topk: int, batch: int,
              progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's idiom)
) -> list[list[Any]]:
    rows = demo.vit_throughput(demo.vit_model(checkpoint.strip() or None, device), r=int(r), n_win=int(n_win),
                               topk=int(topk), batch=int(batch), progress=_progress(progress))
    return [list(row.values()) for row in rows]


def vit_tab(device: gr.State) -> None:
    examples = demo.vit_examples()
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(type="numpy", label="image (64 x 64 after resizing)", value=examples[0][0],
                             elem_id="vit-image", height=256)
            gr.Examples(_examples("vit", [e[0] for e in examples]), inputs=image,
                        example_labels=[e[1] for e in examples], elem_id="vit-examples")
            checkpoint = gr.Textbox(label="local checkpoint (vit.safetensors; empty: the shipped testbed ViT)",
                                    elem_id="vit-checkpoint")
            label = gr.Label(num_top_classes=3, label="stock prediction", elem_id="vit-label")
        with gr.Column(scale=2):
            with gr.Row():
                r = gr.Slider(0, 32, value=8, step=1, label="ToMe r (tokens merged per block)")
                n_win = gr.Dropdown([1, 2, 4, 8], value=4, label="BRA n_win (regions per side)")
                topk = gr.Slider(1, 64, value=4, step=1, label="BRA topk (routed regions)")
            with gr.Row():
                layer = gr.Slider(0, 5, value=3, step=1, label="layer (BRA routes, attention maps)")
                query = gr.Radio(["class token", "mean"], value="class token", label="attention of")
                region = gr.Number(value=10, precision=0, label="BRA query region", elem_id="vit-region")
            analyse = gr.Button("Analyse", variant="primary", elem_id="vit-analyse")
            with gr.Row():
                with gr.Column():
                    tome_img = gr.Image(label="ToMe merge groups", elem_id="vit-tome", height=256)
                    tome_text = gr.Markdown(elem_id="vit-tome-text")
                with gr.Column():
                    bra_img = gr.Image(label="BRA routes (click a region)", elem_id="vit-bra", height=256)
                    bra_text = gr.Markdown(elem_id="vit-bra-text")
            maps = gr.Gallery(label="inspect: attention per head", columns=4, height=220, elem_id="vit-maps")
    with gr.Row():
        batch = gr.Slider(8, 256, value=64, step=8, label="throughput batch", elem_id="vit-batch")
        speed = gr.Button("Measure throughput", elem_id="vit-speed")
    table = gr.Dataframe(headers=["model", "images/s", "speed-up", "top-1 agreement"], elem_id="vit-table")
    analyse.click(vit_analyse, [device, image, checkpoint, r, n_win, topk, layer, region, query],
                  [label, tome_img, tome_text, bra_img, bra_text, maps])
    bra_img.select(vit_route, [device, image, checkpoint, n_win, topk, layer], [region, bra_img, bra_text])
    speed.click(vit_speed, [device, checkpoint, r, n_win, topk, batch], table)


# ---------------------------------------------------------------------------------------------------------------
# vision-language


VLM_COLUMNS = ("stock", "prune", "visual_sink", "head_modulation")


@_messages
def vlm_ask(device: str, image: Any, question: str, checkpoint: str, prune_strategy: str, keep: float, p: float,
            tau: float, hm_strategy: str, alpha: float,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's idiom)
) -> list[Any]:
    model, tokenizer = demo.vlm_model(checkpoint.strip() or None, device)
    methods = {"prune": {"strategy": prune_strategy, "keep": float(keep)},
               "visual_sink": {"p": float(p), "tau": float(tau)},
               "head_modulation": {"strategy": hm_strategy, "alpha": float(alpha)}}
    out: list[Any] = []
    for a in demo.vlm_answers(model, tokenizer, image, question, methods, _progress(progress)):
        options = ", ".join(f"{k}={v}" for k, v in a.options.items()) or "no method"
        out += [a.drawing, f"### {a.answer}\n`{a.method}` ({options}), {a.seconds * 1e3:.0f} ms  \n{a.note}"]
    return out


def vlm_status(checkpoint: str) -> dict[str, Any]:
    why = demo.vlm_missing(checkpoint.strip() or None)
    return gr.update(value=f"⚠ {why}" if why else "", visible=why is not None)


def vlm_tab(device: gr.State) -> None:
    examples = demo.vlm_examples()
    why = demo.vlm_missing()
    status = gr.Markdown(f"⚠ {why}" if why else "", visible=why is not None, elem_id="vlm-status")
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(type="numpy", label="image", value=examples[0][0], elem_id="vlm-image", height=256)
            question = gr.Textbox(label="question", value=examples[0][1], elem_id="vlm-question")
            gr.Examples([[path, q] for path, (_, q, _) in zip(_examples("vlm", [e[0] for e in examples]), examples)],
                        inputs=[image, question], example_labels=[f"{q} ({a})" for _, q, a in examples],
                        elem_id="vlm-examples")
            checkpoint = gr.Textbox(label="local checkpoint (vlm.safetensors, vlm_tokenizer.json beside it; "
                                          "empty: the shipped testbed VLM)", elem_id="vlm-checkpoint")
        with gr.Column(scale=2):
            with gr.Row():
                prune_strategy = gr.Dropdown(["fastv", "cls", "star", "plphp", "transprune", "zo"], value="fastv",
                                             label="prune strategy")
                keep = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="prune keep")
            with gr.Row():
                p = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="visual_sink p")
                tau = gr.Slider(0.5, 20.0, value=6.0, step=0.5, label="visual_sink tau (small model: small tau)")
            with gr.Row():
                hm_strategy = gr.Dropdown(["pai", "vhr", "imbalance", "avisc"], value="imbalance",
                                          label="head_modulation strategy")
                alpha = gr.Slider(0.0, 2.0, value=0.5, step=0.05, label="head_modulation alpha")
            ask = gr.Button("Ask", variant="primary", elem_id="vlm-ask")
    outputs: list[Any] = []
    with gr.Row():
        for name in VLM_COLUMNS:
            with gr.Column(min_width=160):
                outputs.append(gr.Image(label=name, height=200, elem_id=f"vlm-{name}-img"))
                outputs.append(gr.Markdown(elem_id=f"vlm-{name}"))
    checkpoint.change(vlm_status, checkpoint, status)
    ask.click(vlm_ask, [device, image, question, checkpoint, prune_strategy, keep, p, tau, hm_strategy, alpha], outputs)


# ---------------------------------------------------------------------------------------------------------------
# diffusion


@_messages
def video_run(device: str, checkpoint: str, shape: str, seed: int, steps: int, guidance: float, strategy: str,
              keep: float,
              progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's idiom)
) -> tuple:
    model = demo.video_model(checkpoint.strip() or None, device)
    result = demo.video_compare(model, SHAPES.index(shape), seed=int(seed), steps=int(steps),
                                guidance=float(guidance), strategy=strategy, keep=float(keep),
                                progress=_progress(progress))
    stem = f"{shape}_{seed}_{steps}_{strategy}_{keep}"
    dense = demo.write_gif(result.dense, _OUT / f"dense_{stem}.gif")
    sparse = demo.write_gif(result.sparse, _OUT / f"sparse_{stem}.gif")
    text = (f"dense **{result.dense_seconds:.2f} s**, sparse_video {strategy} keep={keep} "
            f"**{result.sparse_seconds:.2f} s** ({result.dense_seconds / result.sparse_seconds:.2f}x); "
            f"PSNR of sparse against dense **{result.psnr:.2f} dB**.")
    if device == "cpu":
        text += (" On the CPU sparse_video runs its PyTorch reference (the block-sparse Triton kernel needs a GPU), "
                 "so it is not faster here.")
    return str(dense), str(sparse), demo.frame_strip([result.dense, result.sparse]), text


def video_status(checkpoint: str) -> dict[str, Any]:
    why = demo.video_missing(checkpoint.strip() or None) or demo.video_quality(checkpoint.strip() or None)
    return gr.update(value=f"⚠ {why}" if why else "", visible=why is not None)


def video_tab(device: gr.State) -> None:
    why = demo.video_missing() or demo.video_quality()
    status = gr.Markdown(f"⚠ {why}" if why else "", visible=why is not None, elem_id="video-status")
    with gr.Row():
        shape = gr.Dropdown(list(SHAPES), value=SHAPES[0], label="class (shape)", elem_id="video-shape")
        seed = gr.Number(value=0, precision=0, label="seed")
        steps = gr.Slider(1, 50, value=4, step=1, label="sampling steps", elem_id="video-steps")
        # up to the largest scale the video DiT's training chooses from (the shipped weights chose 10)
        guidance = gr.Slider(1.0, max(VIDEO_GUIDANCES), value=3.0, step=0.5, label="guidance")
    with gr.Row():
        strategy = gr.Dropdown(["tile_topk", "rectified", "sliding_tile", "grat"], value="tile_topk",
                               label="sparse_video strategy")
        keep = gr.Slider(0.05, 1.0, value=0.25, step=0.05, label="keep (tile_topk, rectified)")
        checkpoint = gr.Textbox(label="local checkpoint (video_dit.safetensors; empty: the shipped testbed model)",
                                elem_id="video-checkpoint")
    gr.Examples([[SHAPES[i], i] for i in range(3)], inputs=[shape, seed], elem_id="video-examples")
    run = gr.Button("Sample dense and sparse", variant="primary", elem_id="video-run")
    with gr.Row():
        dense = gr.Image(type="filepath", label="dense", height=256, elem_id="video-dense")
        sparse = gr.Image(type="filepath", label="sparse_video", height=256, elem_id="video-sparse")
    strip = gr.Image(label="frames: dense (top), sparse (bottom)", elem_id="video-strip")
    text = gr.Markdown(elem_id="video-text")
    checkpoint.change(video_status, checkpoint, status)
    run.click(video_run, [device, checkpoint, shape, seed, steps, guidance, strategy, keep],
              [dense, sparse, strip, text])


# ---------------------------------------------------------------------------------------------------------------


def build(device: str = "auto") -> gr.Blocks:
    """The demo's page: the ViT, vision-language and diffusion tabs, their models on ``device``
    (``"auto"``: the GPU when there is one)."""
    device = str(resolve_device(device))
    with gr.Blocks(title="visattn demo", analytics_enabled=False) as app:
        gr.Markdown(f"# visattn\nAttention methods on the testbed models shipped with visattn (or your local "
                    f"checkpoints), stock against patched, on `{device}`.")
        state = gr.State(device)
        with gr.Tab("ViT (timm)", elem_id="tab-vit"):
            vit_tab(state)
        with gr.Tab("Vision-language (transformers)", elem_id="tab-vlm"):
            vlm_tab(state)
        with gr.Tab("Diffusion (diffusers)", elem_id="tab-video"):
            video_tab(state)
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, device: str = "auto") -> None:
    """Serve the demo at ``http://host:port`` until interrupted."""
    build(device).queue().launch(server_name=host, server_port=port, ssr_mode=False, show_error=True,
                           allowed_paths=[str(_OUT)])


if __name__ == "__main__":
    launch()  # host and port options: visattn demo --host HOST --port PORT
