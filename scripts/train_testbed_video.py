"""Train the testbed video DiT (see visattn/testbed/video.py) and write video_dit.safetensors + video_dit.json.

Made for one H200 in under 10 minutes: about 15 seconds of data (14 worker processes), a training loop that
stops at ``--steps`` or after ``--max-minutes`` (7.5 by default; the learning-rate schedule anneals by
whichever comes first; the first minute of it is compilation), and under a minute of evaluation (sampling with
the guidance candidates, each clip's frames classified by the shipped testbed ViT). The EMA weights and the
metrics so far are written every ``--log-every`` steps, so a run stopped from outside still leaves a
checkpoint. The defaults are the recipe of the shipped weights:

    python scripts/train_testbed_video.py --out DIR --device cuda --compile

The shipped weights came from this recipe run through ``train_video_dit`` by a trial driver, alone on the
H200 (their json records its command), as ``--workers 14 --log-every 1000`` would run it: 6,955 steps in
the 7.5 minutes, 8.5 minutes in all. ``--steps 6955 --max-minutes 1000`` follows its number of steps.

A quick CPU check of the recipe (a tiny model, seconds): ``python scripts/train_testbed_video.py --out
/tmp/video --device cpu --steps 20 --train-size 64 --batch-size 8 --eval-n 8 --eval-steps 2 --tiny``.
"""

from __future__ import annotations

import argparse

from visattn.testbed.diffusion import add_recipe_arguments, recipe_arguments
from visattn.testbed.video import TINY_CONFIG, VIDEO_GUIDANCES, train_video_dit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(p, name="video_dit", unit="clips", steps=100000, max_minutes=7.5, batch_size=512,
                         train_size=48000, tiny="TINY_CONFIG: a tiny model, 4 frames of 16x16 (a recipe check)",
                         lr=2e-3, time_shift=2.0, guidances=VIDEO_GUIDANCES)
    a = p.parse_args()
    train_video_dit(a.out, **recipe_arguments(a, TINY_CONFIG))


if __name__ == "__main__":
    main()
