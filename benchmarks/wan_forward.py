"""One Wan 2.1 T2V 1.3B transformer forward (81x480x832, random weights, bf16), stock and with
``sparse_video`` tile_topk keep=0.1, in one process: a quick spot check of the full-forward speedup
(``benchmarks.video`` measures every strategy, the attention alone and the bounds).

    PYTHONPATH=. python3 -m benchmarks.wan_forward --label new
"""

from __future__ import annotations

import argparse

import torch

import visattn
from benchmarks.timing import median_ms
from benchmarks.video import WAN_1_3B, wan_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="", help="printed before the figures (which code ran)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--keep", type=float, default=0.1)
    args = parser.parse_args()
    model, inputs = wan_model(WAN_1_3B, (21, 60, 104), 512, torch.device("cuda"), torch.bfloat16)

    def run() -> torch.Tensor:
        return model(**inputs, return_dict=False)[0]

    with torch.no_grad():
        stock = median_ms(run, args.reps, warmup=2)
        visattn.apply(model, "sparse_video", keep=args.keep)
        sparse = median_ms(run, args.reps, warmup=2)
    print(f"{args.label} wan 1.3B forward: stock {stock:.1f} ms, tile_topk keep={args.keep} {sparse:.1f} ms, "
          f"{stock / sparse:.3f}x", flush=True)


if __name__ == "__main__":
    main()
