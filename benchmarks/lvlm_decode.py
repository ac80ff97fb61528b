"""Decode speed of ``generate()`` on the LLaVA-1.5-7B architecture, eager and compiled (issue 20, item 2).

The model of :mod:`benchmarks.lvlm` (CLIP ViT-L/14-336 + Llama-2-7B, random weights, bf16, sdpa), batch
``--batch`` prompts of one 576-token image and ``--text`` text tokens, greedy decoding of ``--new-tokens``
tokens (no EOS) in two modes, each method against the stock model in the same mode:

- ``eager``: transformers' default ``generate()`` (dynamic KV cache, no compilation): every decode step is a
  Python forward, launch-bound on a slow host;
- ``static``: ``generate(cache_implementation="static")``, which transformers compiles on a GPU by itself
  (``torch.compile``, inductor, ``mode="reduce-overhead"``: CUDA graphs) for the decode steps; the prefill stays
  eager.

Decode tokens per second are ``batch * (new - 1) / (T(new) - T(1))`` with ``T(n)`` the time of a ``generate()``
of ``n`` tokens (host clock, the GPU synchronised before and after), after one untimed ``generate()`` of ``new``
tokens per method and mode (which compiles, and warms every cache length); ``--reps`` timed pairs, median. A method
runs all its repetitions in one go (applying it again would install new hooks, which compiled code guards on, and
compile again); stock runs first and again last, so that drift shows. ``visual_sink`` runs at ``tau=3``, as in
:mod:`benchmarks.lvlm_heads`: random weights have no massive activations at its default 20.

Pruning's bound (row ``bound``) is the stock model decoding after a prompt of only the tokens that remain
(``--kept`` + ``--text`` text tokens, no image: the decode steps cost the same whatever the tokens are); a strategy
that keeps every token in its first K layers has its own bound, ``bound + K/L (stock - bound)`` per step
(:func:`benchmarks.lvlm.own_bound`). With a static cache each layer then holds the kept tokens plus the
slots of the tokens to come, and attends over all of them in every step.

    PYTHONPATH=. python3 -m benchmarks.lvlm_decode --out benchmarks/results/lvlm_decode.json
    PYTHONPATH=. python3 -m benchmarks.lvlm_decode --tiny --new-tokens 8 --out /tmp/decode.json   # CPU smoke run

Each method's result is written to ``--out`` as soon as it is measured; a method that fails records its error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import visattn
from benchmarks.lvlm import HALVES, build, inputs, own_bound, strategy_options
from benchmarks.timing import generate_seconds

#: name -> (method, options); ``stock`` applies nothing. Prune's options come from
#: :func:`benchmarks.lvlm.strategy_options` (its layer K, and ``keep`` from ``--kept``).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "stock": ("", {}),
    "bound": ("", {}),
    "visual_sink": ("visual_sink", dict(p=0.6, tau=3.0)),
    "pai": ("head_modulation", dict(strategy="pai")),
    "vhr": ("head_modulation", dict(strategy="vhr")),
    "imbalance": ("head_modulation", dict(strategy="imbalance")),
    "avisc": ("head_modulation", dict(strategy="avisc")),
    **{strategy: ("prune", dict(strategy=strategy)) for strategy in ("cls", "fastv", "transprune", "star", "plphp",
                                                                      "zo", "vflowopt")},
}


def generate_ms(model: torch.nn.Module, x: dict[str, torch.Tensor], new: int, mode: str) -> float:
    return 1e3 * generate_seconds(model, x, new, **({"cache_implementation": "static"} if mode == "static" else {}))


def measure(model: torch.nn.Module, x: dict[str, torch.Tensor], name: str, mode: str, new: int, reps: int,
            keep: float) -> dict[str, Any]:
    method, options = METHODS[name]
    if method == "prune":
        options = strategy_options(options["strategy"], keep)
    handle = visattn.apply(model, method, **options) if method else None
    try:
        begin = time.perf_counter()
        generate_ms(model, x, new, mode)  # compiles (static), warms every cache length
        warmup_s = time.perf_counter() - begin
        pairs = [(generate_ms(model, x, 1, mode), generate_ms(model, x, new, mode)) for _ in range(reps)]
    finally:
        if handle is not None:
            visattn.remove(model)
    batch = x["input_ids"].shape[0]
    per_token = [(long - short) / (new - 1) for short, long in pairs]
    return {"method": method, "options": options, "warmup_s": warmup_s,
            "prefill_ms": statistics.median(short for short, _ in pairs),
            "decode_ms_per_step": statistics.median(per_token),
            "decode_tokens_per_s": batch * 1e3 / statistics.median(per_token), "pairs_ms": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (smoke run)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--modes", nargs="+", choices=("eager", "static"), default=["static", "eager"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text", type=int, default=70, help="text tokens per prompt")
    parser.add_argument("--kept", type=int, default=64, help="visual tokens prune keeps of 576")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--eager-new-tokens", type=int, default=None,
                        help="new tokens in eager mode (default: --new-tokens)")
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64  # every method compiles the model's forward anew
    model = build(args.tiny, device, torch.float32 if args.tiny else torch.bfloat16)
    vision = model.config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2
    x = inputs(model, args.batch, 1, args.text, device)
    short = torch.randint(1, 31000, (args.batch, args.kept + args.text), device=device)
    prompts = {"bound": dict(input_ids=short, attention_mask=torch.ones_like(short))}
    pruned = [m for m in args.methods if METHODS[m][0] == "prune"]
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "torch": torch.__version__, "transformers": transformers.__version__,
                               "batch": args.batch, "prompt_tokens": x["input_ids"].shape[1],
                               "kept": args.kept, "visual_per_image": per_image, "modes": {}}
    names = ["stock", *(["bound"] if pruned else []), *[m for m in args.methods if m not in ("stock", "bound")],
             "stock_again"]
    for mode in args.modes:
        new = args.new_tokens if mode == "static" or args.eager_new_tokens is None else args.eager_new_tokens
        rows: dict[str, Any] = results["modes"].setdefault(mode, {"new_tokens": new, "methods": {}})["methods"]
        for name in names:
            if name == "bound":  # generate() sizes a static cache for the longest generation the model ran so far
                model.__dict__.pop("_previous_max_cache_length", None)
            try:
                row = measure(model, prompts.get(name, x), name.removesuffix("_again"), mode, new, args.reps,
                              args.kept / per_image)
            except Exception as exc:  # recorded, and the run goes on with the next method
                row = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                torch._dynamo.reset()  # a failed compiled call can leave CUDA-graph state that fails the next ones
            if name == "bound":
                torch._dynamo.reset()  # its shorter cache must not make later compilations dynamic in its length
            rows[name] = row
            stock = rows["stock"].get("decode_tokens_per_s")
            if stock and "decode_tokens_per_s" in row:
                row["speedup"] = row["decode_tokens_per_s"] / stock
                row["overhead"] = stock / row["decode_tokens_per_s"] - 1
            # (star's and vflowopt's own bound needs the bound of their input stage's tokens, not measured here)
            if (name in pruned and name not in HALVES and "decode_ms_per_step" in row
                    and "decode_ms_per_step" in rows.get("bound", {})):
                steps = {"stock": rows["stock"]["decode_ms_per_step"], "bound": rows["bound"]["decode_ms_per_step"]}
                row["own_bound_ms_per_step"] = own_bound(name, steps, model.config.text_config.num_hidden_layers)
                row["of_own_bound"] = row["own_bound_ms_per_step"] / row["decode_ms_per_step"]
            print(f"{mode:6s} {name:12s} " + (row["error"][:300] if "error" in row else
                  f"{row['decode_tokens_per_s']:8.0f} tok/s ({row['decode_ms_per_step']:.2f} ms/step, "
                  f"{row.get('speedup', 1):.2f}x), prefill {row['prefill_ms']:.0f} ms, "
                  f"warm-up {row['warmup_s']:.0f} s"), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
