"""Quality against speed of the ``sparse_video`` strategies: the testbed video DiT's fidelity to stock at each point
of :func:`benchmarks.video.sweep_points`, beside Wan 2.1 1.3B's attention speedup at the same point.

For each strategy line (tile_topk and its routing rules, rectified, sliding_tile and its blocked form, grat) on the
model's token grid with ``--tile``, :func:`visattn.testbed.eval.eval_video` samples ``--n`` clips stock and patched
from the same noise, one call per line sweeping the option that varies along it (one call per point where several
do): PSNR and SSIM against stock, class accuracy (patched and stock), attention recall, and the kept block fraction
on the testbed grid. ``--speed`` (the JSON of ``benchmarks.video --sweep``) is joined by line and level (grat: by
pattern): Wan's attention speedup and kept fraction. ``--plot`` draws PSNR and class accuracy against that speedup,
one line per strategy (PSNR ``inf``, identical to stock, is drawn at the top of the axis); it needs matplotlib.

    PYTHONPATH=. python3 -m benchmarks.video --sweep --out benchmarks/results/video_sweep.json
    PYTHONPATH=. python3 -m benchmarks.video_quality --speed benchmarks/results/video_sweep.json \\
        --out benchmarks/results/video_quality.json --plot benchmarks/results/video_quality.png
    PYTHONPATH=. python3 -m benchmarks.video_quality --smoke --tile 2 4 4 --out /tmp/vq.json  # CPU, 2 clips, 2 steps
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.video import grid_kept_fraction, sweep_points, write
from visattn.processors.sparse_video.config import OPTIONS
from visattn.testbed.eval import eval_video
from visattn.testbed.video import load_video_dit

Point = tuple[float | None, dict[str, Any]]
DEFAULTS = {option.name: option.default for option in OPTIONS}


def model_grid(checkpoint: Path | None) -> tuple[int, int, int]:
    """The token grid (frames, height, width) of the testbed video DiT at ``checkpoint`` (None: the shipped one)."""
    c = load_video_dit(checkpoint).config
    return c["frames"] // c["patch_size"][0], c["size"] // c["patch_size"][1], c["size"] // c["patch_size"][2]


def line_evals(points: list[Point]) -> list[tuple[dict[str, Any], tuple[str, list[Any]] | None, list[Point]]]:
    """The ``eval_video`` calls of one line: (options, sweep, points); one sweep over the option that varies
    along the line (an option left out counts at its default), or one call per point where several vary."""
    names = {name for _, options in points for name in options}
    varying = [name for name in sorted(names)
               if len({repr(options.get(name, DEFAULTS[name])) for _, options in points}) > 1]
    if len(varying) != 1:
        return [(options, None, [(level, options)]) for level, options in points]
    name = varying[0]
    common = {k: v for k, v in points[0][1].items() if k != name}
    return [(common, (name, [options.get(name, DEFAULTS[name]) for _, options in points]), points)]


def quality(checkpoint: Path | None, tile: tuple[int, int, int], n: int, batch_size: int, steps: int | None,
            device: str) -> dict[str, Any]:
    """Every point of :func:`sweep_points` on the model's grid, evaluated against stock (see the module doc)."""
    grid = model_grid(checkpoint)
    rows, result = [], {}
    for line, points in sweep_points(grid, tile).items():
        for options, sweep, evaluated in line_evals(points):
            result = eval_video("sparse_video", options=options, sweep=sweep, n=n, batch_size=batch_size, steps=steps,
                                checkpoint=checkpoint, device=device, out_dir=None, progress=True)
            for (level, given), row in zip(evaluated, result["rows"]):
                rows.append(dict(line=line, level=level, options=given, psnr=row["psnr"], ssim=row["ssim"],
                                 accuracy=row["accuracy"], attention_recall=row.get("attention_recall"),
                                 kept_fraction=grid_kept_fraction(grid, given),
                                 stock_accuracy=result["stock_accuracy"]))
                print(f"{line:28s} level {level}  PSNR {row['psnr']:.2f} dB  SSIM {row['ssim']:.4f}  accuracy "
                      f"{row['accuracy']:.3f} (stock {result['stock_accuracy']:.3f})  recall "
                      f"{row.get('attention_recall', math.nan):.4f}  kept {rows[-1]['kept_fraction']:.3f}", flush=True)
    return dict(model=result["model"], grid=list(grid), tile=list(tile), n=n, steps=result["steps"],
                guidance=result["guidance"], device=result["device"], rows=rows)


def _key(row: dict[str, Any]) -> tuple[str, float | None, str | None]:
    return row["line"], row["level"], row["options"].get("grat_pattern")


def join(rows: list[dict[str, Any]], speed: dict[str, Any]) -> list[dict[str, Any]]:
    """``rows`` with the speedup and kept fraction of the same point (line and level, grat pattern) in ``speed``."""
    by_key = {_key(row): row for row in speed["rows"]}
    return [dict(row, speedup=by_key[_key(row)]["speedup"], wan_kept_fraction=by_key[_key(row)]["kept_fraction"])
            if _key(row) in by_key else row for row in rows]


def plot(result: dict[str, Any], speed: dict[str, Any], path: Path) -> None:
    """PSNR and class accuracy against the attention speedup of ``speed``: one line per strategy, each point labelled
    with its level, stock's accuracy drawn as a dashed line."""
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["rows"] if "speedup" in row]
    top = max((row["psnr"] for row in rows if math.isfinite(row["psnr"])), default=40.0) + 3.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6))
    for line in dict.fromkeys(row["line"] for row in rows):
        points = [row for row in rows if row["line"] == line]  # in level order
        xs = [row["speedup"] for row in points]
        labels = [row["options"].get("grat_pattern", "surrounding") if row["level"] is None else f"{row['level']:g}"
                  for row in points]
        for ax, ys in ((left, [min(row["psnr"], top) for row in points]), (right, [row["accuracy"] for row in points])):
            ax.plot(xs, ys, marker="o", label=line)
            for x, y, label in zip(xs, ys, labels):
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if any(not math.isfinite(row["psnr"]) for row in rows):
        left.axhline(top, color="gray", ls=":", lw=1)
        left.annotate("identical to stock (PSNR inf)", (0.01, top), xycoords=("axes fraction", "data"),
                      xytext=(0, -10), textcoords="offset points", fontsize=7, color="gray")
    stock = rows[0]["stock_accuracy"] if rows else math.nan
    right.legend(handles=[right.axhline(stock, color="black", ls="--", lw=1, label=f"stock ({stock:.3f})")], fontsize=7,
                 loc="lower right")  # the strategies' colours are the left panel's legend
    xlabel = f"attention speedup over stock SDPA: {speed['shape']}, eager, {speed['device']}"
    left.set_ylabel(f"PSNR against stock (dB), {result['n']} clips, {result['steps']} steps")
    right.set_ylabel(f"class accuracy (testbed ViT, every frame), {result['n']} clips")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    tile = "x".join(map(str, result["tile"]))
    fig.suptitle(f"sparse_video: quality on the {result['model']}, tile {tile}, against the speed of {speed['shape']}, "
                 f"eager, {speed['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a video_dit.safetensors with its json beside it (default: the shipped one)")
    parser.add_argument("--tile", type=int, nargs=3, default=(2, 2, 2), metavar=("T", "H", "W"),
                        help="sparse_video tile in tokens (default 2 2 2)")
    parser.add_argument("--n", type=int, default=64, help="clips per eval")
    parser.add_argument("--batch-size", type=int, default=64, help="clips per model call")
    parser.add_argument("--speed", type=Path, default=None, help="the JSON of benchmarks.video --sweep")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="draw PSNR and accuracy against speedup here (PNG; needs --speed)")
    parser.add_argument("--plot-only", action="store_true", help="read --out and --speed and only draw --plot")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 clips, batch 2, 2 steps")
    args = parser.parse_args()
    if args.plot and not args.speed:
        parser.error("--plot needs --speed")
    if args.plot_only and not (args.out and args.plot):
        parser.error("--plot-only needs --out, --speed and --plot")
    speed = json.loads(args.speed.read_text()) if args.speed else None
    if args.plot_only:
        result = json.loads(args.out.read_text())
    else:
        n, batch_size, steps, device = (2, 2, 2, "cpu") if args.smoke else (args.n, args.batch_size, None, args.device)
        result = quality(args.checkpoint, tuple(args.tile), n, batch_size, steps, device)
    if speed is not None:
        result["rows"] = join(result["rows"], speed)
    if not args.plot_only:
        write(result, args.out)
    if args.plot:
        plot(result, speed, args.plot)


if __name__ == "__main__":
    main()
