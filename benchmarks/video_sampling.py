"""Is the video testbed's class accuracy held back by its sampler? Class accuracy of one set of weights under other
sampling settings: time shift, guidance scale, Euler steps, Heun steps, and a guidance interval (Kynkaenniemi et al.,
2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion Models":
classifier-free guidance only at times inside the interval, the conditional velocity elsewhere).

Every setting samples ``--n`` clips (balanced classes) from noise seed 1 and the testbed ViT classifies every frame;
the three best are then measured again on noise seed 0, so the figure reported is not the one chosen on. The other
settings keep the weights' own defaults. GPU (about 6 s per setting at 1024 clips on an H100):

    PYTHONPATH=. python3 -m benchmarks.video_sampling --out benchmarks/results/video_sampling_h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from visattn.testbed.diffusion import FlowModel, eval_labels, initial_noise, sample_accuracy, shift_times
from visattn.testbed.video import load_video_dit
from visattn.testbed.vit import load_vit

#: the settings tried, each against the weights' defaults (steps, guidance, shift; interval: the whole flow)
SETTINGS: list[dict[str, Any]] = [
    {}, {"shift": 1.0}, {"shift": 1.5}, {"shift": 3.0}, {"shift": 4.0}, {"guidance": 14.0}, {"guidance": 6.0},
    {"steps": 50}, {"heun": True, "steps": 13}, {"interval": (0.0, 0.8)}, {"interval": (0.1, 1.0)},
    {"interval": (0.2, 1.0)}, {"interval": (0.0, 0.6)}, {"shift": 3.0, "guidance": 14.0},
    {"shift": 4.0, "guidance": 14.0}, {"shift": 3.0, "interval": (0.1, 1.0)},
    {"guidance": 14.0, "interval": (0.1, 1.0)}, {"guidance": 20.0, "interval": (0.1, 1.0)},
    {"guidance": 14.0, "interval": (0.2, 1.0)},
]


@torch.no_grad()
def generate(model: FlowModel, labels: list[int], seed: int, *, steps: int, guidance: float, shift: float,
             interval: tuple[float, float] = (0.0, 1.0), heun: bool = False, batch_size: int = 512) -> torch.Tensor:
    """Clips in [0, 1] on the CPU: :func:`visattn.testbed.diffusion.sample`'s Euler flow (the same noise and times),
    with guidance only at times in ``interval``, and Heun's second-order correction where ``heun``."""
    dev = next(model.parameters()).device
    noise = initial_noise(seed, len(labels), model.sample_shape)
    times = shift_times(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    out = []
    for a in range(0, len(labels), batch_size):
        x, y = noise[a:a + batch_size].to(dev), torch.tensor(labels[a:a + batch_size], device=dev)

        def velocity(x: torch.Tensor, t: float, y: torch.Tensor = y) -> torch.Tensor:
            scale = guidance if interval[0] <= t <= interval[1] else 1.0
            with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
                return model.guided(x, torch.full((len(y),), t, device=dev), y, scale).float()

        for t0, t1 in zip(times[:-1], times[1:]):
            v = velocity(x, t0)
            if heun and t1 > 0:
                v = 0.5 * (v + velocity(x + (t1 - t0) * v, t1))
            x = x + (t1 - t0) * v
        out.append(((x + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def sweep(checkpoint: Path | None, n: int, device: str) -> dict[str, Any]:
    """Every setting of :data:`SETTINGS` on seed 1, the best three again on seed 0 (see the module doc)."""
    model, vit = load_video_dit(checkpoint, device=device), load_vit(device=device)
    labels = eval_labels(n)
    defaults = {"steps": model.default_steps, "guidance": model.default_guidance, "shift": model.default_shift}

    def accuracy(setting: dict[str, Any], seed: int) -> float:
        return sample_accuracy(vit, generate(model, labels, seed, **{**defaults, **setting}), labels)["frames"]

    rows = []
    for setting in SETTINGS:
        rows.append({"setting": setting, "seed_1": accuracy(setting, 1)})
        print(f"{setting or 'defaults'}: {rows[-1]['seed_1']:.3f} (seed 1)", flush=True)
    for row in sorted(rows, key=lambda r: -r["seed_1"])[:3]:
        row["seed_0"] = accuracy(row["setting"], 0)
        print(f"{row['setting'] or 'defaults'}: {row['seed_0']:.3f} (seed 0)", flush=True)
    return {"model": str(checkpoint or "shipped video_dit.safetensors"), "defaults": defaults, "n": n,
            "device": torch.cuda.get_device_name() if device == "cuda" else device, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="video DiT weights (default: the shipped ones)")
    p.add_argument("--n", type=int, default=1024, help="clips per setting")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.write_text(json.dumps(sweep(a.checkpoint, a.n, a.device), indent=1) + "\n")


if __name__ == "__main__":
    main()
