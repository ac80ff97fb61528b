"""The testbed image UNet: its training recipe, sampler, ``tome`` on it and ``visattn eval image``.

A tiny model (:data:`~visattn.testbed.image.TINY_CONFIG`: 16x16 images, attention on 8x8 and 4x4 grids)
is trained for a few steps by the shipped recipe; the harness's claims do not depend on how well it
generates.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import visattn
from visattn.cli import main
from visattn.errors import OptionError, UnsupportedModelError
from visattn.testbed.eval import eval_image
from visattn.testbed.image import TINY_CONFIG, build_image_unet, load_image_unet, sample, train_image_unet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(checkpoint path, metrics)`` of a tiny image UNet trained for 10 steps on the CPU."""
    out = tmp_path_factory.mktemp("image_unet")
    metrics = train_image_unet(out, steps=10, batch_size=8, train_size=64, config=TINY_CONFIG, lr=3e-3, warmup=2,
                               eval_n=8, eval_steps=1, guidances=(1.0, 3.0), log_every=5, device="cpu")
    return out / "image_unet.safetensors", metrics


def test_training_lowers_the_loss_and_records_seed_steps_and_accuracy(tiny):
    path, metrics = tiny
    history = metrics["loss_history"]
    assert len(history) == 2 and history[1] < history[0]
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["partial"] is False and record["seed"] == 0 and record["steps_done"] == 10
    assert 0.0 <= record["class_accuracy"] <= 1.0 and set(record["class_accuracy_by_guidance"]) == {"1.0", "3.0"}
    assert record["vit_accuracy_on_real_images"] >= 0.0 and record["config"]["size"] == 16
    assert {v.dtype for v in load_file(str(path)).values()} == {torch.float16}
    model = load_image_unet(path)
    assert model.sample_shape == (3, 16, 16) and model.default_guidance == record["sampling"]["guidance"]
    assert model.default_steps == 1


def test_sampling_is_a_function_of_seed_and_image_index(tiny):
    model = load_image_unet(tiny[0])
    images = sample(model, [0, 5, 8], seed=3, steps=2, guidance=2.0)
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, sample(model, [0, 5, 8], seed=3, steps=2, guidance=2.0))
    assert not torch.allclose(images, sample(model, [0, 5, 8], seed=4, steps=2, guidance=2.0))
    one_by_one = sample(model, [0, 5, 8], seed=3, steps=2, guidance=2.0, batch_size=1)
    torch.testing.assert_close(one_by_one, images, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scope", ["attention", "block"])
def test_tome_merges_at_the_finest_attention_level_of_the_unet(tiny, scope):
    model = load_image_unet(tiny[0])
    x, t, y = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5), torch.tensor([1, 2])
    handle = visattn.apply(model.unet, "tome", ratio=0.5, scope=scope)
    with torch.no_grad():
        model(x, t, y)
    counts = handle.token_counts
    visattn.remove(model.unet)
    assert counts and all(n == 64 and kept == 32 for _, n, kept in counts)  # the 8x8 grid, half merged away
    assert {name.split(".")[0] for name, _, _ in counts} == {"down_blocks", "up_blocks"}
    handle = visattn.apply(model.unet, "tome", ratio=0.5, scope=scope, max_downsample=4)
    with torch.no_grad():
        model(x, t, y)
    assert {n for _, n, _ in handle.token_counts} == {64, 16}  # and the 4x4 grid (mid block included)
    visattn.remove(model.unet)


def test_eval_image_tome_identity_is_exact_and_merging_costs_fidelity(tiny, tmp_path):
    result = eval_image("tome", {"scope": "block"}, ("ratio", [0, 0.75]), n=2, steps=2, checkpoint=tiny[0],
                        device="cpu", out_dir=tmp_path, progress=False)
    identity, merged = result["rows"]
    assert identity["psnr"] == math.inf and identity["ssim"] == 1.0
    assert identity["accuracy"] == result["stock_accuracy"] and "stock_accuracy_middle_frame" not in result
    assert math.isfinite(merged["psnr"]) and merged["ssim"] < 1.0
    stored = json.loads((tmp_path / "eval_image_image_unet_tome.json").read_text())
    assert stored["rows"][0]["psnr"] == math.inf and stored["testbed"] == "image" and stored["unit"] == "images"
    assert (tmp_path / "eval_image_image_unet_tome.png").stat().st_size > 0


def test_eval_image_command_prints_the_table(tiny, tmp_path, capsys):
    main(["eval", "image", "--method", "tome", "--option", "scope=block", "--sweep", "ratio=0,0.5", "--n", "1",
          "--steps", "2", "--checkpoint", str(tiny[0]), "--device", "cpu", "--out-dir", str(tmp_path),
          "--no-progress"])
    out = capsys.readouterr().out
    assert "| tome scope=block, ratio=0 | inf | 1.0000 |" in out
    assert "| tome scope=block, ratio=0.5 |" in out and "ratio=0.5 | inf |" not in out


def test_image_bad_inputs_are_named(tiny, tmp_path):
    model = load_image_unet(tiny[0])
    with pytest.raises(ValueError, match="labels must be class indices 0..7"):
        sample(model, [-1])
    with pytest.raises(ValueError, match="unknown image UNet config keys width; accepted: size"):
        build_image_unet({"width": 3})
    with pytest.raises(ValueError, match="size \\(18\\) must be a multiple"):
        build_image_unet({"size": 18})
    with pytest.raises(ValueError, match="block_out_channels must be 2 or more"):
        build_image_unet({"block_out_channels": (32,)})
    with pytest.raises(FileNotFoundError, match="no testbed image UNet .* scripts/train_testbed_image.py"):
        load_image_unet(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="class_dropout must be in"):
        train_image_unet(tmp_path, class_dropout=1.0)
    with pytest.raises(UnsupportedModelError, match="does not support diffusers models"):
        eval_image("bra", checkpoint=tiny[0], out_dir=None)
    with pytest.raises(OptionError, match="ratio"):
        eval_image("tome", {"ratio": 1.5}, checkpoint=tiny[0], out_dir=None)
    with pytest.raises(OptionError, match="max_downsample=1 selects no layer"):
        eval_image("tome", {"max_downsample": 1}, checkpoint=tiny[0], out_dir=None)
    with pytest.raises(ValueError, match="n must be >= 1"):
        eval_image("tome", n=0, checkpoint=tiny[0], out_dir=None)


def test_shipped_image_unet_loads_and_records_its_recipe_and_accuracy():
    from visattn.testbed.image import SHIPPED_IMAGE_UNET

    meta = json.loads(SHIPPED_IMAGE_UNET.with_suffix(".json").read_text())
    assert {"seed", "steps_done", "command", "class_accuracy", "sampling"} <= set(meta) and not meta["partial"]
    assert meta["class_accuracy"] >= 0.5  # a sampler that follows its class (chance is 0.125)
    model = load_image_unet()
    images = sample(model, [0, 1], seed=0, steps=2, device="cpu")
    assert images.shape[0] == 2 and torch.isfinite(images).all() and float(images.std()) > 0.01
