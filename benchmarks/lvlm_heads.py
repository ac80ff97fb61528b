"""Per-token decode overhead of ``visual_sink`` (VAR) and ``head_modulation`` (PAI, VHR) vs stock (issue 8).

LLaVA-1.5-7B's architecture (CLIP ViT-L/14 at 336 px, 576 image tokens, Llama-2-7B), random weights,
bf16, ``attn_implementation="sdpa"``, built on the GPU from its config. One image and a short question
per prompt, batch 1 and 8, greedy ``generate()`` with the KV cache. Per-token decode time is
``(T(128 new tokens) - T(1 new token)) / 127``; every repetition runs stock and each method in turn
(starting one method later each time), and a method's overhead is the median over repetitions of its
ratio to stock in the same repetition (with the range over repetitions). Random weights have no
massive activations at VAR's ``tau=20``, so the benchmark runs VAR at ``tau=3``: every layer then has
visual sinks (their count is reported) and takes the redistribution path, which is what costs time.

    python -m benchmarks.lvlm_heads --out benchmarks/results/lvlm_heads.json   # on a CUDA GPU
    python -m benchmarks.lvlm_heads --tiny --out /tmp/lvlm_heads.json          # CPU smoke run

(as a module: run as a script, ``benchmarks/kernels.py`` would shadow the ``kernels`` package that
transformers imports).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import visattn
from benchmarks.timing import generate_seconds
from visattn.core.redistribute import attend_rows, redistribute
from visattn.kernels import reweighted_decode

IMAGE_TOKEN = 32000
#: name -> (method, options, decode steps on the fused Triton kernel or on the PyTorch path)
METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "stock": ("", {}, True),
    "visual_sink": ("visual_sink", dict(p=0.6, tau=3.0), True),
    "pai": ("head_modulation", dict(strategy="pai", alpha=0.2), True),
    "vhr": ("head_modulation", dict(strategy="vhr", alpha=0.2), True),
    "visual_sink_torch": ("visual_sink", dict(p=0.6, tau=3.0), False),
    "pai_torch": ("head_modulation", dict(strategy="pai", alpha=0.2), False),
}
KERNEL_REASON = reweighted_decode.unavailable_reason


def use_kernel(on: bool) -> None:
    """Let the decode kernel run where it can, or send every decode step to the PyTorch path."""
    reweighted_decode.unavailable_reason = KERNEL_REASON if on else (lambda q, mask: "switched off by the benchmark")


def check_kernel(config: LlavaConfig, device: str, dtype: torch.dtype) -> str | None:
    """The decode kernel against the PyTorch path at this model's head shape; the error, or None."""
    text = config.text_config
    h, d = text.num_attention_heads, text.hidden_size // text.num_attention_heads
    q, k, v = (torch.randn(2, h, n, d, device=device, dtype=dtype) for n in (1, 700, 700))
    image = torch.zeros(2, 700, dtype=torch.bool, device=device)
    image[:, 35:611] = True
    sink = (torch.rand(2, 700, device=device) < 0.03) & image
    hooks = dict(probs_fn=lambda pr: redistribute(pr, sink[:, None, None], image[:, None, None], p=0.6, rho=0.5,
                                                  summ=0.2))
    try:
        reason = reweighted_decode.unavailable_reason(q, None)
        if reason is not None:
            return f"the kernel does not run here: {reason}"
        classes = image.to(torch.int8) * 2 - sink.to(torch.int8)
        got = reweighted_decode.decode_row(q, k, v, None, classes, scale=d ** -0.5, mode="var", p=0.6, rho=0.5,
                                           summ=0.2).transpose(1, 2).float()
        ref = attend_rows(q.float(), k.float(), v.float(), None, scale=d ** -0.5, **hooks)
        err = float((got - ref).norm() / ref.norm())
        return None if err < 1e-2 else f"relative error {err:.2e}"
    except Exception as exc:  # recorded; the run goes on with the PyTorch path
        return f"{type(exc).__name__}: {exc}"


def llava_config(tiny: bool) -> LlavaConfig:
    if tiny:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=56, patch_size=14)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           vocab_size=32064, max_position_embeddings=1024)
    else:  # llava-hf/llava-1.5-7b-hf
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, pad_token_id=0,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def build(tiny: bool, device: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava_config(tiny), attn_implementation="sdpa", dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def prompt(config: LlavaConfig, batch: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LLaVA-1.5's layout: ~35 system tokens, the image, a ~20-token question."""
    side = config.vision_config.image_size
    n_image = (side // config.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    head, tail = torch.randint(1, 32000, (batch, 35), generator=g), torch.randint(1, 32000, (batch, 20), generator=g)
    ids = torch.cat([head, torch.full((batch, n_image), IMAGE_TOKEN), tail], 1)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                pixel_values=torch.randn(batch, 3, side, side, generator=g).to(device, dtype))


def measure(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, reps: int) -> dict[str, Any]:
    """Per-method prefill and per-token decode times; overheads are medians of per-repetition ratios to stock.

    Every repetition runs stock and each method once (``T(1)`` then ``T(new_tokens)``), starting one
    method later each time, so that drift of the host's speed (which these launch-bound steps follow)
    falls on stock and the methods alike; the ratio to stock is taken within each repetition.
    """
    names = list(METHODS)
    prefill: dict[str, list[float]] = {m: [] for m in names}
    per_token: dict[str, list[float]] = {m: [] for m in names}
    sinks = None
    for rep in range(reps + 1):  # repetition 0 warms up every cache length (cuDNN plans one per shape)
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            method, options, kernel = METHODS[name]
            use_kernel(kernel)
            handle = visattn.apply(model, method, **options) if method else None
            try:
                if rep:
                    first = generate_seconds(model, inputs, 1)
                    prefill[name].append(first)
                    per_token[name].append((generate_seconds(model, inputs, new_tokens) - first) / (new_tokens - 1))
                else:
                    generate_seconds(model, inputs, new_tokens)
                if name == "visual_sink":
                    sinks = [int(t.sum()) for t in handle.sink_tokens.values()]
            finally:
                use_kernel(True)
                if handle is not None:
                    visattn.remove(model)
    rows = {}
    for name in names:
        decode = [a / b - 1 for a, b in zip(per_token[name], per_token["stock"])]
        first = [a / b - 1 for a, b in zip(prefill[name], prefill["stock"])]
        rows[name] = dict(prefill_ms=1e3 * statistics.median(prefill[name]),
                          decode_ms_per_token=1e3 * statistics.median(per_token[name]),
                          decode_overhead=statistics.median(decode), decode_overhead_range=[min(decode), max(decode)],
                          prefill_overhead=statistics.median(first),
                          prefill_s=prefill[name], decode_s_per_token=per_token[name])
    batch = inputs["input_ids"].shape[0]
    rows["visual_sink"]["sinks_per_layer_mean"] = sum(sinks) / len(sinks) / batch
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lvlm_heads.json"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (smoke run)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build(args.tiny, device, dtype)
    build_s = time.perf_counter() - start
    kernel_error = check_kernel(model.config, device, dtype)
    print(f"build {build_s:.1f} s; decode kernel check: {kernel_error or 'ok'}", flush=True)
    if kernel_error:
        global KERNEL_RUNS
        KERNEL_RUNS = lambda q, mask: False  # noqa: E731
    results = []
    for batch in args.batches:
        inputs = prompt(model.config, batch, device, dtype)
        rows = measure(model, inputs, args.new_tokens, args.reps)
        results.append(dict(batch=batch, prompt_tokens=inputs["input_ids"].shape[1], new_tokens=args.new_tokens,
                            methods=rows))
        for name, row in rows.items():
            print(f"batch {batch:2d}  {name:12s} prefill {row['prefill_ms']:8.1f} ms ({row['prefill_overhead']:+6.1%})"
                  f"  decode {row['decode_ms_per_token']:7.2f} ms/token ({row['decode_overhead']:+6.1%}, "
                  f"{row['decode_overhead_range'][0]:+.1%}..{row['decode_overhead_range'][1]:+.1%})", flush=True)
    report = dict(model="LLaVA-1.5-7B architecture (random weights)" if not args.tiny else "tiny LLaVA",
                  dtype=str(dtype), device=torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
                  torch=torch.__version__, transformers=transformers.__version__, build_s=build_s,
                  kernel_error=kernel_error, results=results,
                  methods={k: dict(method=m, options=o, decode_kernel=c) for k, (m, o, c) in METHODS.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
