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


def test_info_and_methods(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "kernels:" in out and "inspect" in out
    assert main(["methods"]) == 0
    assert "inspect" in json.loads(capsys.readouterr().out)


def test_inspect_writes_png_over_synthetic_and_given_image(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["inspect", "--img-size", "64", "--layer", "-1", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["map"] == [1, 17, 17] and report["layer"] == 11
    assert Image.open(out).size == (64, 64)
    src = tmp_path / "in.png"
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(src)
    assert main(["inspect", "--img-size", "32", "--image", str(src), "--layer", "0", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)


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
