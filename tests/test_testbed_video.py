"""The testbed video DiT: its data, training recipe, sampler, metrics and ``visattn eval video``.

A tiny model (:data:`~visattn.testbed.video.TINY_CONFIG`: 4 frames of 16x16, a 4x8x8 token grid of four
4x4x4 tiles) is trained for a few steps by the shipped recipe; the harness's claims do not depend on
how well it generates.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from visattn.cli import main
from visattn.errors import OptionError, UnsupportedModelError
from visattn.testbed import video
from visattn.testbed.data import SHAPES, moving_shapes_video, video_batch
from visattn.testbed.diffusion import add_recipe_arguments, recipe_arguments, shift_times
from visattn.testbed.eval import eval_video, psnr, ssim
from visattn.testbed.video import TINY_CONFIG, load_video_dit, sample, train_video_dit
from visattn.testbed.vit import load_vit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(checkpoint path, metrics)`` of a tiny video DiT trained for 12 steps on the CPU."""
    out = tmp_path_factory.mktemp("video_dit")
    metrics = train_video_dit(out, steps=12, batch_size=8, train_size=64, config=TINY_CONFIG, lr=3e-3, warmup=2,
                              eval_n=8, eval_steps=2, guidances=(1.0, 3.0), log_every=6, time_shift=3.0, device="cpu")
    return out / "video_dit.safetensors", metrics


def test_quarter_turns_turn_each_sample_by_its_own_count():
    from visattn.testbed.vit import quarter_turns

    clips = torch.randn(5, 2, 3, 4, 4)
    turns = torch.tensor([0, 1, 2, 3, 1])
    expected = torch.stack([torch.rot90(c, int(k), dims=(-2, -1)) for c, k in zip(clips, turns)])
    assert torch.equal(quarter_turns(clips, turns), expected)
    turned = video._augment(clips)  # flips, turns and time reversal keep every clip's values
    values = [t.flatten(1).sort(1).values for t in (turned, clips)]
    assert turned.shape == clips.shape and torch.equal(*values)


def test_video_batch_is_the_generator_and_the_same_for_any_workers():
    clips, labels = video_batch("train", 3, seed=1, start=2, frames=3, size=16)
    assert clips.shape == (3, 3, 16, 16, 3) and clips.dtype == np.uint8
    one = moving_shapes_video(1, "train", 3, frames=3, size=16)
    assert np.array_equal(clips[1], one.frames) and labels[1] == one.label
    again, labels_again = video_batch("train", 3, seed=1, start=2, frames=3, size=16, workers=2)
    assert np.array_equal(clips, again) and np.array_equal(labels, labels_again)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        video_batch("train", 3, frames=0)


def test_shape_scale_sets_the_size_of_the_moving_shape():
    def width(clip_scale: tuple[float, float]) -> list[int]:
        videos = [moving_shapes_video(0, "train", i, frames=2, size=32, shape_scale=clip_scale) for i in range(8)]
        return [v.objects[0].box[2] - v.objects[0].box[0] for v in videos]

    small, large = width((0.2, 0.25)), width((0.7, 0.75))
    assert max(small) < min(large)
    default, _ = video_batch("train", 2, frames=2, size=32)
    same, _ = video_batch("train", 2, frames=2, size=32, shape_scale=(0.3, 0.5))
    assert np.array_equal(default, same)  # (0.3, 0.5) is the default
    for bad in ((0.5, 0.3), (0.0, 0.5), (0.3, 1.0), (0.3,)):
        with pytest.raises(ValueError, match="shape_scale must be"):
            video_batch("train", 1, shape_scale=bad)
    with pytest.raises(ValueError, match="shape_scale must be"):
        video.build_video_dit({"shape_scale": (0.6, 0.4)})


def test_training_starts_from_adaln_zero():
    model = video.zero_gates(video.build_video_dit(TINY_CONFIG))
    tr = model.transformer
    width = tr.config.num_attention_heads * tr.config.attention_head_dim
    gates = tr.condition_embedder.time_proj.weight.view(6, width, -1)[[2, 5]]
    assert not gates.any() and tr.condition_embedder.time_proj.weight.view(6, width, -1)[[0, 1, 3, 4]].any()
    assert not torch.stack([b.scale_shift_table[:, [2, 5]] for b in tr.blocks]).any()
    x = torch.randn(2, 4, 3, 16, 16)
    assert not model(x, torch.rand(2), torch.tensor([0, 8])).any()  # the output projection starts at zero
    fresh = video.build_video_dit(TINY_CONFIG)
    assert fresh(x, torch.rand(2), torch.tensor([0, 8])).abs().max() > 0  # only training starts there


def test_training_lowers_the_loss_and_records_seed_steps_and_accuracy(tiny):
    path, metrics = tiny
    history = metrics["loss_history"]
    assert len(history) == 2 and history[1] < history[0]
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["partial"] is False and record["seed"] == 0 and record["steps_done"] == 12
    assert 0.0 <= record["class_accuracy"] <= 1.0 and set(record["class_accuracy_by_guidance"]) == {"1.0", "3.0"}
    model = load_video_dit(path)
    assert model.config["frames"] == 4 and model.default_guidance == record["sampling"]["guidance"]
    assert model.default_steps == 2
    assert record["time_shift"] == record["sampling"]["shift"] == model.default_shift == 3.0


def test_sampling_is_a_function_of_seed_and_clip_index(tiny):
    model = load_video_dit(tiny[0])
    clips = sample(model, [0, 5, 8], seed=3, steps=2, guidance=2.0)
    assert clips.shape == (3, 4, 3, 16, 16) and clips.min() >= 0 and clips.max() <= 1
    assert torch.equal(clips, sample(model, [0, 5, 8], seed=3, steps=2, guidance=2.0))
    assert not torch.allclose(clips, sample(model, [0, 5, 8], seed=4, steps=2, guidance=2.0))
    assert torch.equal(video.initial_noise(3, 2, (4, 3, 16, 16))[1], video.initial_noise(3, 5, (4, 3, 16, 16))[1])
    one_by_one = sample(model, [0, 5, 8], seed=3, steps=2, guidance=2.0, batch_size=1)
    torch.testing.assert_close(one_by_one, clips, atol=1e-4, rtol=0)
    assert torch.equal(clips, sample(model, [0, 5, 8], seed=3, steps=2, guidance=2.0, shift=3.0))  # the default
    assert not torch.allclose(clips, sample(model, [0, 5, 8], seed=3, steps=2, guidance=2.0, shift=1.0))


def test_time_shift_moves_times_toward_the_noise_and_keeps_the_ends():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_times(t, 1.0), t)
    shifted = shift_times(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:-1] > t[1:-1]).all())
    assert bool((shifted.diff() > 0).all())
    assert float(shift_times(torch.tensor(0.5, dtype=torch.float64), 3.0)) == pytest.approx(0.75)


def test_class_accuracy_reads_generated_frames_with_the_vit():
    clips, labels = video_batch("test", 8, frames=3, size=64)
    frames = torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255
    predicted = video.classify_frames(load_vit(), frames)
    assert predicted.shape == (8, 3)
    acc = video.class_accuracy(predicted, labels)
    assert acc["frames"] >= 0.9 and acc["middle"] >= 0.85
    assert video.class_accuracy(predicted, (torch.as_tensor(labels) + 1) % len(SHAPES))["frames"] <= 0.1


def test_ssim_and_psnr():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 3, 24, 24)
    assert torch.equal(ssim(a, a), torch.ones(2, 3, dtype=torch.float64))
    noisy = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    s = ssim(noisy, a)
    assert s.shape == (2, 3) and bool((s < 0.99).all()) and bool((s > ssim((a + 0.3 * torch.randn_like(a)).clamp(0, 1),
                                                                           a)).all())
    # flat images: SSIM is its luminance term (2 x y + C1) / (x^2 + y^2 + C1), C1 = 0.01^2
    flat = ssim(torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.6))
    assert float(flat) == pytest.approx((2 * 0.2 * 0.6 + 1e-4) / (0.2 ** 2 + 0.6 ** 2 + 1e-4), rel=1e-6)
    assert psnr(a, a) == math.inf
    assert psnr(torch.zeros(4, 4), torch.full((4, 4), 0.1)) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, a[:1])


def test_eval_video_identity_is_exact_and_sparsity_costs_fidelity(tiny, tmp_path):
    result = eval_video("sparse_video", {}, ("keep", [1.0, 0.25]), n=2, steps=2, checkpoint=tiny[0], device="cpu",
                        out_dir=tmp_path, progress=False)
    identity, sparse = result["rows"]
    assert identity["psnr"] == math.inf and identity["ssim"] == 1.0
    assert identity["accuracy"] == result["stock_accuracy"]
    assert math.isfinite(sparse["psnr"])  # differs from stock (the tiny model, near its adaLN-Zero start, barely)
    assert identity["attention_recall"] == pytest.approx(1.0) and 0 < sparse["attention_recall"] < 1
    stored = json.loads((tmp_path / "eval_video_video_dit_sparse_video.json").read_text())
    assert stored["rows"][0]["psnr"] == math.inf and stored["testbed"] == "video"
    assert (tmp_path / "eval_video_video_dit_sparse_video.png").stat().st_size > 0


def test_eval_video_command_prints_the_table(tiny, tmp_path, capsys):
    main(["eval", "video", "--method", "sparse_video", "--option", "keep=0.25", "--sweep", "dense_steps=2,0",
          "--n", "1", "--steps", "2", "--checkpoint", str(tiny[0]), "--device", "cpu", "--out-dir", str(tmp_path),
          "--no-progress"])
    out = capsys.readouterr().out
    dense = next(line for line in out.splitlines() if line.startswith("| sparse_video keep=0.25, dense_steps=2 |"))
    assert dense.startswith("| sparse_video keep=0.25, dense_steps=2 | inf | 1.0000 |")  # every step dense: stock
    assert dense.endswith("| 1.0000 |")  # attention recall: all of it kept
    assert "| sparse_video keep=0.25, dense_steps=0 |" in out and "dense_steps=0 | inf |" not in out


def test_video_bad_inputs_are_named(tiny, tmp_path, capsys):
    model = load_video_dit(tiny[0])
    with pytest.raises(ValueError, match="labels must be class indices 0..7"):
        sample(model, [9])
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        sample(model, [0], steps=0)
    with pytest.raises(ValueError, match="guidance must be >= 1"):
        sample(model, [0], guidance=0.5)
    with pytest.raises(ValueError, match="time shift must be > 0"):
        sample(model, [0], shift=0.0)
    with pytest.raises(ValueError, match="time shift must be > 0"):
        train_video_dit(tmp_path, steps=1, time_shift=-1.0, config=TINY_CONFIG, device="cpu")
    with pytest.raises(ValueError, match="unknown video DiT config keys width; accepted: frames"):
        video.build_video_dit({"width": 3})
    with pytest.raises(ValueError, match="must be a multiple"):
        video.build_video_dit({"size": 18})
    with pytest.raises(FileNotFoundError, match="no testbed video DiT"):
        load_video_dit(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="max_minutes must be > 0"):
        train_video_dit(tmp_path, max_minutes=0)
    with pytest.raises(UnsupportedModelError, match="does not support diffusers models"):
        eval_video("bra", checkpoint=tiny[0], out_dir=None)
    with pytest.raises(UnsupportedModelError, match="WanTransformer3DModel"):
        eval_video("isolation", checkpoint=tiny[0], out_dir=None)
    with pytest.raises(OptionError, match="keep"):
        eval_video("sparse_video", {"keep": 2.0}, checkpoint=tiny[0], out_dir=None)
    with pytest.raises(ValueError, match="n must be >= 1"):
        eval_video("sparse_video", n=0, checkpoint=tiny[0], out_dir=None)
    with pytest.raises(SystemExit):
        main(["eval", "video", "--method", "sparse_video", "--tokenizer", "t.json"])
    assert "--tokenizer applies to the vlm testbed only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "vit", "--method", "tome", "--steps", "3", "--guidance", "2"])
    assert "--steps applies to the video and image testbeds only; --guidance applies" in capsys.readouterr().err


def test_shipped_video_dit_loads_and_records_its_recipe_and_accuracy():
    meta = json.loads(video.SHIPPED_VIDEO_DIT.with_suffix(".json").read_text())
    assert {"seed", "steps_done", "command", "class_accuracy", "sampling"} <= set(meta) and not meta["partial"]
    assert video.SHIPPED_VIDEO_DIT.stat().st_size < 24 * 2**20  # 10.8 M parameters at fp16: 21.6 MB
    assert meta["class_accuracy"] >= video.QUALITY_BAR and meta["eval_n"] >= 1024
    model = load_video_dit()
    assert model.default_guidance == meta["sampling"]["guidance"] and model.default_steps == meta["sampling"]["steps"]
    clip = sample(model, [0], seed=0, steps=2, device="cpu")
    assert clip.shape == (1, model.config["frames"], 3, model.config["size"], model.config["size"])
    assert torch.isfinite(clip).all() and float(clip.std()) > 0.01


def test_training_script_config_overrides_merge_over_tiny_and_bad_ones_are_named(capsys):
    """scripts/train_testbed_video.py's ``--config`` (a JSON object) lands in the trainer's ``config``, over
    ``--tiny``'s; a value that is not a JSON object is refused by the parser."""
    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser, name="video_dit", unit="clips", steps=10, max_minutes=1.0, batch_size=8,
                         train_size=64, tiny="tiny")
    args = parser.parse_args(["--out", "x", "--tiny", "--config", '{"num_layers": 3}'])
    assert recipe_arguments(args, TINY_CONFIG)["config"] == {**TINY_CONFIG, "num_layers": 3}
    assert recipe_arguments(parser.parse_args(["--out", "x"]), TINY_CONFIG)["config"] is None
    for bad, why in (("{num_layers: 3}", "not JSON"), ("[3]", "must be a JSON object")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--out", "x", "--config", bad])
        assert why in capsys.readouterr().err
