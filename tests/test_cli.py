"""The visattn command and the PNG renderer."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from visattn.cli import main
from visattn.errors import ShapeError
from visattn.render import attention_heatmap, render_map
from visattn.testbed.vit import SHIPPED_WEIGHTS


def test_info_and_methods(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "kernels:" in out and "inspect" in out
    assert main(["methods"]) == 0
    assert "inspect" in json.loads(capsys.readouterr().out)


def test_inspect_draws_the_testbed_vit_by_default_and_timm_models_on_request(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["inspect", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "testbed" and "shipped testbed ViT" in report["weights"]
    assert report["map"] == [1, 65, 65] and report["layer"] == 5 and "test picture" in report["image"]
    figure = np.asarray(Image.open(out).convert("RGB"))
    assert figure.shape[1] > 2 * figure.shape[0]  # the image, the map over it and a colour bar, side by side
    timm_args = ["inspect", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--out", str(out)]
    assert main([*timm_args, "--layer", "-1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["map"] == [1, 17, 17] and report["layer"] == 11 and report["weights"].startswith("random")
    src = tmp_path / "in.png"
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(src)
    assert main([*timm_args, "--image", str(src), "--layer", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["image"] == str(src)
    saved = tmp_path / "tiny.pth"
    import timm

    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).state_dict(), saved)
    assert main([*timm_args, "--checkpoint", str(saved)]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == str(saved)


@pytest.mark.parametrize("args,message", [
    (["--layer", "40"], "--layer 40 is out of range: this model has 6 attention layers (0..5, or -6..-1"),
    (["--model", "no_such_vit"], "--model no_such_vit: Unknown model"),
    (["--image", "missing.png"], "--image missing.png: "),
    (["--img-size", "32"], "--img-size applies to timm models"),
    (["--model", "vit_tiny_patch16_224", "--checkpoint", str(SHIPPED_WEIGHTS)],
     "does not fit the timm model vit_tiny_patch16_224 (72 missing, 0 unexpected and 4 differently shaped weights"),
])
def test_inspect_errors_are_one_line_naming_what_is_accepted(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--out", str(tmp_path / "x.png"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("visattn inspect: error: ") and message in err


@pytest.mark.skipif(shutil.which("visattn") is None, reason="console script not installed (pip install -e .)")
def test_console_script():
    res = subprocess.run(["visattn", "info"], capture_output=True, text=True, check=True)
    assert "visattn:" in res.stdout


def test_heatmap_reduction_and_errors(tmp_path):
    attn = torch.zeros(1, 5, 5)
    attn[0, 0, 1:] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # class-token row over a 2x2 grid
    heat = attention_heatmap(attn, query=0, key_span=(1, 5))
    assert np.allclose(heat, [[0.1, 0.2], [0.3, 0.4]])
    assert attention_heatmap(attn, query=0).shape == (2, 2)  # the largest square at the end
    with pytest.raises(ShapeError, match="needs 9 key tokens"):
        attention_heatmap(attn, grid=(3, 3), key_span=(1, 5))
    path = render_map(heat, tmp_path / "h.png", size=64)
    img = np.asarray(Image.open(path))
    assert img.shape == (64, 64, 3) and not np.array_equal(img[0, 0], img[-1, -1])


HELP = "from visattn.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"


@pytest.mark.parametrize("code", ["import visattn", HELP], ids=["import", "help"])
def test_import_and_help_load_no_framework_and_take_under_a_second(code):
    """``import visattn`` and ``visattn --help`` import neither torch nor a framework (torch alone takes over a
    second on the CI machine); the quickest of three runs, interpreter start included, is under a second."""
    import sys
    import time

    heavy = "{'torch', 'timm', 'diffusers', 'transformers', 'open_clip', 'numpy'}"
    loaded = "{m.split('.')[0] for m in sys.modules}"
    check = f"{code}\nimport sys\nheavy = sorted({loaded} & {heavy})\nassert not heavy, heavy"
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", check], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    assert min(times) < 1.0, times


@pytest.mark.parametrize("args,message", [
    (["bogus"], "visattn: error: argument command: invalid choice: 'bogus'"),
    (["eval", "dit", "--method", "tome"], "visattn eval: error: argument {vit,vlm,video,image}: invalid choice"),
    (["eval", "vit"], "visattn eval vit: error: the following arguments are required: --method"),
    (["inspect", "--layer", "x"], "visattn inspect: error: argument --layer: invalid int value: 'x'"),
])
def test_argument_errors_are_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(message) and "--help lists" in err
