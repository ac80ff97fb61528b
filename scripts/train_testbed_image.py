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

from visattn.testbed.diffusion import add_recipe_arguments, recipe_arguments
from visattn.testbed.image import TINY_CONFIG, train_image_unet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(p, name="image_unet", unit="images", steps=20000, max_minutes=3.5, batch_size=128,
                         train_size=40000, tiny="TINY_CONFIG: a tiny model on 16x16 images (a recipe check)")
    a = p.parse_args()
    train_image_unet(a.out, **recipe_arguments(a, TINY_CONFIG))


if __name__ == "__main__":
    main()
