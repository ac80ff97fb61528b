"""Train the testbed image UNet (see visattn/testbed/image.py) and write image_unet.safetensors + image_unet.json.

Made for one H100 in about 5 minutes: about 15 s of data (40000 images, 16 worker processes), a
training loop that stops at ``--steps`` or after ``--max-minutes`` (3.5 by default; the learning-rate
schedule anneals by whichever comes first), and under a minute of evaluation (sampling with the
guidance candidates, each image classified by the shipped testbed ViT). The EMA weights and the
metrics so far are written every ``--log-every`` steps, so a run stopped from outside still leaves a
checkpoint. The shipped weights are made with the defaults:

    python scripts/train_testbed_image.py --out visattn/testbed/weights --device cuda

A quick CPU check of the recipe (a tiny model): ``python scripts/train_testbed_image.py --out /tmp/image
--device cpu --steps 20 --train-size 64 --batch-size 8 --eval-n 8 --eval-steps 2 --tiny``.
"""

from __future__ import annotations

import argparse
import os

from visattn.testbed.diffusion import GUIDANCE_CANDIDATES
from visattn.testbed.image import TINY_CONFIG, train_image_unet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for image_unet.safetensors and image_unet.json")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--max-minutes", type=float, default=3.5, help="wall-time budget of the training loop")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=40000, help="training images generated")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-n", type=int, default=256, help="images sampled for the final class accuracy")
    p.add_argument("--eval-steps", type=int, default=25, help="Euler steps of the evaluation samples")
    p.add_argument("--guidances", default=",".join(str(g) for g in GUIDANCE_CANDIDATES),
                   help="classifier-free guidance scales to choose the default from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating the images")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--tiny", action="store_true", help="TINY_CONFIG: a tiny model on 16x16 images (a recipe check)")
    a = p.parse_args()
    train_image_unet(a.out, steps=a.steps, max_minutes=a.max_minutes, batch_size=a.batch_size,
                     train_size=a.train_size, lr=a.lr, eval_n=a.eval_n, eval_steps=a.eval_steps,
                     guidances=[float(g) for g in a.guidances.split(",")], config=TINY_CONFIG if a.tiny else None,
                     seed=a.seed, workers=a.workers, device=a.device, compile=a.compile,
                     log_every=max(1, min(a.log_every, a.steps // 4)))


if __name__ == "__main__":
    main()
