"""Train the testbed VLM (see visattn/testbed/vlm.py) and write vlm.safetensors, vlm_tokenizer.json and vlm.json.

The vision tower is the shipped testbed ViT (visattn/testbed/weights/vit.safetensors), frozen; the
projector and the Llama are trained. The weights, once they pass the issue's bar (POPE accuracy >= 85%
on the random split), are written into the package with:

    python scripts/train_testbed_vlm.py --out visattn/testbed/weights

on a GPU when one is present (``--device cuda``; larger ``--steps`` and ``--train-size`` fit there).
The CPU-only runs made so far (``--threads 1``, defaults, about 15 minutes) reach about 73%; none is
shipped (BENCHMARKS.md, "Fidelity (issue 9)"). ``--init`` continues from an earlier run's weights.

A quick check of the recipe: ``python scripts/train_testbed_vlm.py --out /tmp/vlm --steps 10
--train-size 200 --val-size 20 --test-size 20``.
"""

from __future__ import annotations

import argparse

from visattn.testbed.vlm import train_vlm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for vlm.safetensors, vlm_tokenizer.json and vlm.json")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--val-size", type=int, default=60)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--max-qa", type=int, default=16, help="question-answer pairs per training sequence")
    p.add_argument("--caption-share", type=float, default=0.25,
                   help="fraction of training sequences that teach captioning instead of questions")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes generating the scenes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--init", default=None, help="a vlm.safetensors to continue from (a second stage)")
    a = p.parse_args()
    train_vlm(a.out, steps=a.steps, batch_size=a.batch_size, train_size=a.train_size, val_size=a.val_size,
              test_size=a.test_size, max_qa=a.max_qa, caption_share=a.caption_share,
              lr=a.lr, seed=a.seed, workers=a.workers, threads=a.threads,
              device=a.device, init=a.init, log_every=max(1, min(300, a.steps // 4)))


if __name__ == "__main__":
    main()
