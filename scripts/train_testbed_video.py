"""Train the testbed video DiT (see visattn/testbed/video.py) and write video_dit.safetensors + video_dit.json.

Made for one GPU in under 10 minutes: about 10 seconds of data (14 worker processes), a training loop that
stops at ``--steps`` or after ``--max-minutes`` (8.2 by default; the learning-rate schedule anneals by
whichever comes first; the first minute of it is compilation), and half a minute of evaluation (1024 clips
sampled with the guidance candidates, each clip's frames classified by the shipped testbed ViT). The EMA
weights and the metrics so far are written every ``--log-every`` steps, so a run stopped from outside still
leaves a checkpoint. The defaults are the recipe of the shipped weights:

    python scripts/train_testbed_video.py --out DIR --device cuda --compile --workers 14 --log-every 1000

It made the shipped weights on one H100 (their json records the command, which spelt out the width-384
config, batch and evaluation size that are the defaults now): 7,233 steps in the 8.2 minutes, 9.2 minutes in
all, class accuracy 0.814 on 1024 clips. ``--steps 7233 --max-minutes 1000`` follows its number of steps.

A quick CPU check of the recipe (a tiny model, seconds): ``python scripts/train_testbed_video.py --out
/tmp/video --device cpu --steps 20 --train-size 64 --batch-size 8 --eval-n 8 --eval-steps 2 --tiny``.
"""

from __future__ import annotations

import argparse

from visattn.testbed.diffusion import add_recipe_arguments, recipe_arguments
from visattn.testbed.video import TINY_CONFIG, VIDEO_GUIDANCES, train_video_dit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(p, name="video_dit", unit="clips", steps=100000, max_minutes=8.2, batch_size=384,
                         train_size=48000, tiny="TINY_CONFIG: a tiny model, 4 frames of 16x16 (a recipe check)",
                         lr=2e-3, time_shift=2.0, guidances=VIDEO_GUIDANCES, eval_n=1024)
    a = p.parse_args()
    train_video_dit(a.out, **recipe_arguments(a, TINY_CONFIG))


if __name__ == "__main__":
    main()
