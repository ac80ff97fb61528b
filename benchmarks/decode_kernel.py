"""The fused decode kernel (:mod:`visattn.kernels.reweighted_decode`) against SDPA at decode shapes.

One query row per sample and head over a KV cache, bf16, head dim 128: the LLaVA-1.5-7B decode step at batch 16
and 1 (32 heads; 1158 keys, a static cache of a 646-token prompt and 512 new tokens, 900 of them filled) and a
longer cache (4096 keys). Rows: SDPA with the boolean mask (what the stock model runs), VAR (``visual_sink``) and
PAI (``head_modulation``), PAI with a per-head gain (``imbalance``) at the split count the kernel chooses and at
fixed ones, and imbalance's former PyTorch path (:func:`visattn.core.redistribute.attend_rows`). Each call is
captured in a CUDA graph (the host's launch cost drops out) and timed as the best of three medians of 50
replays, in microseconds.

    PYTHONPATH=. python3 -m benchmarks.decode_kernel --out benchmarks/results/decode_kernel.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.timing import graphed, median_ms
from visattn.core.redistribute import amplify_logits, attend_rows
from visattn.kernels import reweighted_decode

#: (batch, heads, keys, filled keys)
SHAPES = [(16, 32, 1158, 900), (1, 32, 1158, 900), (16, 32, 4096, 3000)]
SPLITS = (1, 2, 4, 8, 16)
PROMPT, IMAGE = 646, slice(35, 611)  # LLaVA-1.5: 576 image tokens after the system prompt


def microseconds(fn: Any) -> float:
    replay = graphed(fn)
    return 1e3 * min(median_ms(replay, iters=50, warmup=5) for _ in range(3))


def shape_rows(b: int, h: int, n: int, filled: int, d: int = 128) -> dict[str, Any]:
    q, k, v = (torch.randn(b, h, m, d, device="cuda", dtype=torch.bfloat16) for m in (1, n, n))
    mask = torch.zeros(b, 1, 1, n, dtype=torch.bool, device="cuda")
    mask[..., :filled] = True
    image = torch.zeros(b, PROMPT, dtype=torch.bool, device="cuda")
    image[:, IMAGE] = True
    sink = (torch.rand(b, PROMPT, device="cuda") < 0.02) & image
    classes = {"var": image.to(torch.int8) * 2 - sink.to(torch.int8), "pai": image.to(torch.int8) * 2}
    gain = torch.rand(b, h, device="cuda")
    scale = d ** -0.5

    def kernel(mode: str, splits: int | None, with_gain: bool = False) -> Any:
        return lambda: reweighted_decode.decode_row(q, k, v, mask, classes[mode], scale=scale, mode=mode, alpha=0.2,
                                                    gain=gain if with_gain else None, p=0.6, rho=0.5, summ=0.2,
                                                    splits=splits, strict=True)

    weight = 0.2 * gain[:, :, None, None] * image[:, None, None, :].float()

    def imbalance_torch() -> torch.Tensor:
        def logits_fn(logits: torch.Tensor) -> torch.Tensor:
            logits[..., :PROMPT] = amplify_logits(logits[..., :PROMPT], weight)
            return logits

        return attend_rows(q, k, v, None, scale=scale, mask=mask, logits_fn=logits_fn)

    row: dict[str, Any] = {"splits_chosen": reweighted_decode.split_count(b * k.shape[1], n, q.device)}
    with torch.inference_mode():
        row["sdpa_us"] = microseconds(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        for mode in ("var", "pai"):
            row[f"{mode}_us"] = microseconds(kernel(mode, None))
            row[f"{mode}_us_by_splits"] = {s: microseconds(kernel(mode, s)) for s in SPLITS}
        row["imbalance_us"] = microseconds(kernel("pai", None, with_gain=True))
        row["imbalance_torch_us"] = microseconds(imbalance_torch)
    for name in ("var", "pai", "imbalance", "imbalance_torch"):
        row[f"{name}_vs_sdpa"] = row[f"{name}_us"] / row["sdpa_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for b, h, n, filled in SHAPES:
        row = shape_rows(b, h, n, filled)
        results["shapes"][f"B{b} H{h} keys {n} ({filled} filled)"] = row
        print(f"B{b} H{h} N{n}: sdpa {row['sdpa_us']:.1f} us, var {row['var_us']:.1f}, pai {row['pai_us']:.1f}, "
              f"imbalance {row['imbalance_us']:.1f} (PyTorch path {row['imbalance_torch_us']:.1f}); "
              f"splits {row['splits_chosen']}; by splits var {row['var_us_by_splits']}, pai {row['pai_us_by_splits']}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
