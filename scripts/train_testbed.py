"""Train the testbed ViT (see visattn/testbed/vit.py) and write vit.safetensors + vit.json.

The shipped weights were made on one H100 with the defaults:

    python scripts/train_testbed.py --out visattn/testbed/weights --workers 16

A quick CPU check of the recipe: ``python scripts/train_testbed.py --out /tmp/vit --steps 20
--train-size 2000 --val-size 200 --test-size 200 --batch-size 64``.
"""

from __future__ import annotations

import argparse
import os

from visattn.testbed.vit import train_vit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for vit.safetensors and vit.json")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--train-size", type=int, default=160_000)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=5000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating the data")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    a = p.parse_args()
    train_vit(a.out, steps=a.steps, batch_size=a.batch_size, train_size=a.train_size, val_size=a.val_size,
              test_size=a.test_size, lr=a.lr, seed=a.seed, workers=a.workers, device=a.device,
              log_every=max(1, min(500, a.steps // 4)))


if __name__ == "__main__":
    main()
