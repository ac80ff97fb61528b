"""Visual token pruning (``prune``, issue 8) on the LLaVA-1.5-7B architecture: prefill, KV cache, decode.

All in one run, bf16, sdpa, random weights (speed does not depend on them): ``LlavaForConditionalGeneration``
built from a config on the meta device, moved with ``to_empty`` and initialised on the GPU by transformers'
``initialize_weights`` (CLIP ViT-L/14-336 vision tower, 2-layer MLP projector, Llama-2-7B text model: 32
layers, hidden 4096, ffn 11008, 32 heads; 576 image tokens per 336px image, ``image_token_id`` set):

- prefill (one forward as ``generate()`` runs it: the vision tower, the projector, the language model
  and the last position's logits) of the stock model, of ``prune`` with each of ``--strategies``
  (``fastv``, ``transprune`` and ``plphp`` at K=2, ``star`` and ``vflowopt`` at their default L/2, ``cls``,
  ``zo``), and of the
  bound: the same model fed only ``kept`` visual tokens per image (vision tower and projector on the
  whole image, then the language model on the short sequence). Times are medians over interleaved
  repetitions (stock, methods and bound in turn), CUDA events around each call. A strategy that keeps
  every token in its first layers cannot reach that all-layer bound; its own bound is estimated from
  the measured times (``own_bound_ms``): layers before K at the stock cost, the rest at the bound's
  (``bound + K/L (stock - bound)``; ``star`` and ``vflowopt``: the input stage at the bound of ``sqrt(keep)``
  tokens, measured as ``bound_star_input``, for their first L/2 layers; ``plphp`` prunes the cache after an
  unpruned prefill, so its bound is the stock prefill).
- settings (``--settings BATCHxIMAGESxKEPT``): batch 16 with one image each, keeping 64/576 and
  128/576; batch 1 with five images (2880 visual tokens, LLaVA-NeXT-sized), keeping 320/2880. Every
  prompt has ``--text`` text tokens around the image(s).
- the KV cache after prefill at batch 16 keeping 64/576 (bytes of keys and values over all layers);
- ``generate()`` of ``--new-tokens`` tokens at batch 16 (greedy, no EOS): decode tokens per second,
  ``batch * new_tokens / (generate time - prefill time)``, stock and pruned, each timed (median of 2)
  after one untimed ``generate()`` of the same length, so that no timed step pays for the first call
  at a new cache length (cuDNN's attention builds a plan per shape); ``--new-tokens 0`` skips it.

    PYTHONPATH=. python3 -m benchmarks.lvlm --out benchmarks/results/lvlm.json
    PYTHONPATH=. python3 -m benchmarks.lvlm --tiny --out /tmp/lvlm.json   # CPU smoke run, tiny model
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import visattn
from benchmarks.timing import median_ms
from visattn.frameworks.transformers import output_cache

IMAGE_TOKEN = 32000
STRATEGIES = ("cls", "fastv", "star", "transprune", "plphp", "zo", "vflowopt")
#: strategies whose input stage keeps sqrt(keep) and whose stage at L // 2 the rest
HALVES = ("star", "vflowopt")
#: the decoder layer K of the strategies that drop tokens inside the language model (star: L // 2)
LAYER = {"fastv": 2, "transprune": 2, "plphp": 2}


def build(tiny: bool, device: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                  image_size=56, patch_size=14)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           vocab_size=32064, max_position_embeddings=8192)
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, pad_token_id=0,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.to_empty(device=device)
    # initialise everything on the device, the non-persistent buffers (rotary inv_freq, CLIP position ids)
    # included: clear the "already initialised" marks that construction left, then run transformers' init
    for item in [*model.modules(), *model.parameters(), *model.buffers()]:
        item.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def inputs(model: LlavaForConditionalGeneration, batch: int, images: int, text: int, device: str,
           visual_per_image: int | None = None) -> dict[str, torch.Tensor]:
    """``batch`` prompts: text/2 tokens, ``images`` images, text/2 tokens (no padding)."""
    vision = model.config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2 if visual_per_image is None else visual_per_image
    head = torch.randint(1, 31000, (batch, text // 2), device=device)
    tail = torch.randint(1, 31000, (batch, text - text // 2), device=device)
    ids = torch.cat([head, torch.full((batch, images * per_image), IMAGE_TOKEN, device=device), tail], dim=1)
    pixels = torch.randn(batch * images, 3, vision.image_size, vision.image_size, device=device,
                         dtype=model.dtype)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def prefill(model: LlavaForConditionalGeneration, x: dict[str, torch.Tensor]) -> Callable[[], Any]:
    return lambda: model(**x, logits_to_keep=1, use_cache=True)


def bound(model: LlavaForConditionalGeneration, x: dict[str, torch.Tensor], kept: int, text: int,
          images: int) -> Callable[[], Any]:
    """The stock model fed only ``kept`` visual tokens per image: vision tower and projector on every
    image, then the language model (and the last logits) on the short sequence."""
    short = inputs(model, x["input_ids"].shape[0], images, text, x["input_ids"].device.type, visual_per_image=kept)
    language, head = model.model.language_model, model.lm_head

    def run() -> Any:
        features = model.model.get_image_features(x["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default")
        features = getattr(features, "pooler_output", features)
        features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        features = features[:, :kept].reshape(-1, features.shape[-1])
        embeds = model.get_input_embeddings()(short["input_ids"])
        embeds = embeds.masked_scatter((short["input_ids"] == IMAGE_TOKEN)[..., None], features.to(embeds.dtype))
        hidden = language(inputs_embeds=embeds, attention_mask=short["attention_mask"], use_cache=True)
        return head(hidden.last_hidden_state[:, -1:])

    return run


def compare(model: LlavaForConditionalGeneration, variants: dict[str, tuple[dict[str, Any] | None, Callable]],
            iters: int, device: str) -> dict[str, float]:
    """Median ms of each variant, interleaved: every repetition runs each variant once, in turn.
    A variant is (prune options or None for stock, the call)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(iters + 2):  # two warm-up rounds
        for name, (options, fn) in variants.items():
            if options is not None:
                visattn.apply(model, "prune", **options)
            try:
                with torch.no_grad():
                    ms = median_ms(fn)
            finally:
                if options is not None:
                    visattn.remove(model)
            if rep >= 2:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def cache_bytes(cache: Any) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def strategy_options(strategy: str, keep: float) -> dict[str, Any]:
    return {"strategy": strategy, "keep": keep, **({"layer": LAYER[strategy]} if strategy in LAYER else {})}


def own_bound(strategy: str, ms: dict[str, float], layers: int) -> float:
    """The strategy's own bound (see the module docstring), from the measured stock and bound times."""
    if strategy == "plphp":
        return ms["stock"]
    if strategy in HALVES:
        return (ms["bound_star_input"] + ms["bound"]) / 2
    k = LAYER.get(strategy, 0)
    return ms["bound"] + k / layers * (ms["stock"] - ms["bound"])


def setting(text: str) -> tuple[int, int, int]:
    try:
        batch, images, kept = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is BATCHxIMAGESxKEPT, e.g. 16x1x64; got {text!r}") from None
    return batch, images, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (smoke run)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--text", type=int, default=70, help="text tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=256, help="decode tokens to time (0: no decode run)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--settings", nargs="+", type=setting, default=None,
                        help="BATCHxIMAGESxKEPT per image (default 16x1x64 16x1x128 1x5x64; tiny: 2x1x2 1x5x2)")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch.manual_seed(0)
    model = build(args.tiny, device, dtype)
    per_image = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    layers = model.config.text_config.num_hidden_layers
    settings = args.settings or ([(2, 1, 2), (1, 5, 2)] if args.tiny else [(16, 1, 64), (16, 1, 128), (1, 5, 64)])
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "torch": torch.__version__, "transformers": transformers.__version__,
                               "dtype": str(dtype), "text_tokens": args.text, "visual_per_image": per_image,
                               "prefill": [], "kv_cache": {}, "decode": {}}
    for batch, images, kept in settings:
        x = inputs(model, batch, images, args.text, device)
        with torch.no_grad():
            if not torch.isfinite(prefill(model, x)().logits).all():
                raise RuntimeError("the randomly initialised model gives non-finite logits")
        keep = kept / per_image
        variants: dict[str, tuple[dict[str, Any] | None, Callable]] = {"stock": (None, prefill(model, x))}
        for strategy in args.strategies:
            variants[strategy] = (strategy_options(strategy, keep), prefill(model, x))
        variants["bound"] = (None, bound(model, x, kept, args.text, images))
        if set(HALVES) & set(args.strategies):
            variants["bound_star_input"] = (None, bound(model, x, math.ceil(math.sqrt(keep) * per_image), args.text,
                                                        images))
        ms = compare(model, variants, args.iters, device)
        row = {"batch": batch, "visual_tokens": images * per_image, "kept": images * kept,
               "ms": ms, "speedup": {k: ms["stock"] / v for k, v in ms.items() if k != "stock"}}
        row["of_bound"] = {k: ms["bound"] / ms[k] for k in args.strategies}
        row["own_bound_ms"] = {k: own_bound(k, ms, layers) for k in args.strategies}
        row["of_own_bound"] = {k: row["own_bound_ms"][k] / ms[k] for k in args.strategies}
        results["prefill"].append(row)
        print(f"prefill B={batch} {images * per_image}->{images * kept}: "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
              + " | " + ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items())
              + " | of bound " + ", ".join(f"{k} {v:.0%}" for k, v in row["of_bound"].items())
              + " | of own bound " + ", ".join(f"{k} {v:.0%}" for k, v in row["of_own_bound"].items()), flush=True)
    cache_and_decode(model, args, settings[0], per_image, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


def cache_and_decode(model: LlavaForConditionalGeneration, args: argparse.Namespace, first: tuple[int, int, int],
                     per_image: int, results: dict[str, Any]) -> None:
    """In the first setting: the KV cache after prefill, stock and every strategy; with ``--new-tokens``,
    decode tokens per second of ``generate()``, stock, fastv and cls."""
    device = model.device.type
    batch, _, kept = first
    x = inputs(model, batch, 1, args.text, device)
    methods: dict[str, dict[str, Any] | None] = {"stock": None}
    methods.update({k: strategy_options(k, kept / per_image) for k in args.strategies})
    for name, options in methods.items():
        if options is not None:
            visattn.apply(model, "prune", **options)
        try:
            with torch.no_grad():
                cache = output_cache(prefill(model, x)())
                results["kv_cache"][name] = {"bytes": cache_bytes(cache),
                                             "tokens_per_layer": [layer.keys.shape[-2] for layer in cache.layers]}
                del cache
                if args.new_tokens and name in ("stock", "fastv", "cls"):
                    generate = lambda: model.generate(**x, max_new_tokens=args.new_tokens,  # noqa: E731
                                                      min_new_tokens=args.new_tokens, do_sample=False)
                    generate()  # warm-up over every cache length: cuDNN's SDPA builds a plan per new length
                    ms_generate = median_ms(generate, iters=2)
                    ms_prefill = statistics.median(median_ms(prefill(model, x)) for _ in range(3))
                    results["decode"][name] = {
                        "generate_ms": ms_generate, "prefill_ms": ms_prefill,
                        "decode_tokens_per_s": batch * args.new_tokens / (ms_generate - ms_prefill) * 1e3}
        finally:
            if options is not None:
                visattn.remove(model)
    stock_bytes = results["kv_cache"]["stock"]["bytes"]
    for name in args.strategies:
        results["kv_cache"][name]["smaller_than_stock"] = 1 - results["kv_cache"][name]["bytes"] / stock_bytes
        if name in results["decode"]:
            results["decode"][name]["speedup"] = (results["decode"][name]["decode_tokens_per_s"]
                                                  / results["decode"]["stock"]["decode_tokens_per_s"])
    print(f"kv cache after prefill, B={batch}, keep {kept}/{per_image}: "
          + ", ".join(f"{k} {v['bytes'] / 2**20:.0f} MiB" for k, v in results["kv_cache"].items()))
    if results["decode"]:
        print(f"decode, B={batch}, {args.new_tokens} new tokens: "
              + ", ".join(f"{k} {v['decode_tokens_per_s']:.0f} tok/s (generate {v['generate_ms']:.0f} ms)"
                          for k, v in results["decode"].items()))


if __name__ == "__main__":
    main()
