"""The fidelity testbed: generated data, the shipped ViT, and ``visattn eval vit``."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import visattn
from visattn.cli import main
from visattn.errors import OptionError, UnknownMethodError, UnsupportedModelError
from visattn.testbed import data as D
from visattn.testbed.eval import eval_vit, parse_option, parse_sweep
from visattn.testbed.vit import SHIPPED_WEIGHTS, accuracy, load_vit

pytest.importorskip("timm")


def _near(image: np.ndarray, colour: str, tol: int = 30) -> np.ndarray:
    """Pixels within ``tol`` (per channel) of a named colour."""
    return (np.abs(image.astype(int) - np.array(D.COLOURS[colour])) <= tol).all(axis=-1)


def _inside(mask: np.ndarray, boxes: list) -> bool:
    allowed = np.zeros_like(mask)
    for x0, y0, x1, y1 in boxes:
        allowed[y0:y1, x0:x1] = True
    return not (mask & ~allowed).any()


def test_samples_are_pure_functions_of_seed_split_index():
    x1, y1 = D.classification_batch("train", 6, seed=3)
    x2, y2 = D.classification_batch("train", 6, seed=3, workers=2)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    x3, _ = D.classification_batch("train", 3, seed=3, start=3)  # a sample does not depend on its batch
    assert np.array_equal(x1[3:], x3)
    assert not np.array_equal(x1, D.classification_batch("train", 6, seed=4)[0])
    a, b = D.multi_object_scene(1, "val", 5), D.multi_object_scene(1, "val", 5)
    assert np.array_equal(a.image, b.image) and a.objects == b.objects
    v, w = D.moving_shapes_video(1, "test", 2), D.moving_shapes_video(1, "test", 2)
    assert np.array_equal(v.frames, w.frames) and v.caption == w.caption


def test_splits_share_no_image():
    hashes = {s: {hashlib.sha1(im.tobytes()).hexdigest() for im in D.classification_batch(s, 150)[0]}
              for s in D.SPLITS}
    assert all(len(h) == 150 for h in hashes.values())
    assert not (hashes["train"] & hashes["val"]) and not (hashes["train"] & hashes["test"])
    assert not (hashes["val"] & hashes["test"])


def test_bad_generator_input_is_named():
    with pytest.raises(ValueError, match="unknown split 'dev'; accepted: train, val, test"):
        D.classification_batch("dev", 4)
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        D.shape_mask("blob", 8, 8, 8, 0, 16)


def test_shapes_are_drawn_as_named():
    ring, circle = (D.shape_mask(s, 32, 32, 40, 0.0, 64) for s in ("ring", "circle"))
    assert circle[32, 32] and not ring[32, 32] and ring[32, 13]
    square, triangle = (D.shape_mask(s, 64, 64, 100, 0.0, 128).sum() for s in ("square", "triangle"))
    assert abs(square / (2 * 50**2) - 1) < 0.05 and abs(triangle / (3 * 3**0.5 / 4 * 50**2) - 1) < 0.05


def test_classification_objects_match_pixels():
    for i in range(40):
        scene = D.classification_scene(0, "test", i)
        main_obj = scene.objects[0]
        assert scene.label == D.SHAPES.index(main_obj.shape)
        assert all(o.shape != main_obj.shape for o in scene.objects[1:])  # distractors are other classes
        x0, y0, x1, y1 = main_obj.box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and max(x1 - x0, y1 - y0) >= 20
        same = [o.box for o in scene.objects if o.colour == main_obj.colour]
        near = _near(scene.image, main_obj.colour)
        assert _inside(near, same)  # the colour appears only where objects of that colour are
        assert near[y0:y1, x0:x1].mean() > 0.15  # and the main shape is visible in its box


def test_multi_object_scenes_questions_and_captions():
    scenes = [D.multi_object_scene(0, "train", i) for i in range(200)]
    stats = D.object_statistics(scenes)
    assert stats.frequency["circle"] > stats.frequency["hexagon"]  # the popularity prior shows
    assert stats.cooccurrence["circle"]["ring"] > stats.cooccurrence["circle"]["hexagon"]  # and the partners
    rng = np.random.default_rng(0)
    for scene in scenes[:60]:
        present = {o.shape for o in scene.objects}
        for colour in {o.colour for o in scene.objects}:
            assert _inside(_near(scene.image, colour), [o.box for o in scene.objects if o.colour == colour])
        for split in D.POPE_SPLITS:
            qa = D.pope_questions(scene, stats, split, rng)
            yes = [q.split()[3] for q, a in qa if a == "yes"]
            no = [q.split()[3] for q, a in qa if a == "no"]
            assert set(yes) <= present and not set(no) & present and len(yes) == len(no) >= 1
        counts = dict(D.count_questions(scene))
        assert counts["How many shapes are there?"] == D.NUMBER_WORDS[len(scene.objects)]
        for q, a in D.colour_questions(scene):
            assert any(o.colour == a and o.shape in q for o in scene.objects)
        for caption in D.captions(scene):
            words = caption.replace(",", " ").replace(".", " ").split()
            mentioned = {s for s in D.SHAPES if s in words or D.plural(s) in words}
            assert mentioned == present
    with_circle = next(s for s in scenes if {o.shape for o in s.objects} == {"circle"})
    adversarial = [q for q, a in D.pope_questions(with_circle, stats, "adversarial", rng) if a == "no"]
    assert adversarial == ["Is there a ring in the image?"]  # the circle's usual partner
    with pytest.raises(ValueError, match="accepted: random, popular, adversarial"):
        D.pope_questions(with_circle, stats, "hard", rng)


def test_videos_move_shapes_and_box_them():
    video = D.moving_shapes_video(0, "train", 7, frames=6, n_objects=2)
    assert video.frames.shape == (6, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.boxes[0] != video.boxes[-1]
    assert video.label == D.SHAPES.index(video.objects[0].shape) and video.objects[0].shape in video.caption
    for frame, boxes in zip(video.frames, video.boxes):
        for obj, (x0, y0, x1, y1) in zip(video.objects, boxes):
            near = _near(frame, obj.colour)
            assert _inside(near, [b for o, b in zip(video.objects, boxes) if o.colour == obj.colour])
            assert near[y0:y1, x0:x1].any()


def test_shipped_vit_reaches_90_percent():
    meta = json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    assert meta["test_top1"] >= 0.9 and {"seed", "steps", "train_size", "train_seconds", "command"} <= set(meta)
    assert SHIPPED_WEIGHTS.stat().st_size < 8 * 2**20
    x, y = D.classification_batch("test", 200, seed=meta["seed"], start=4000)
    assert accuracy(load_vit(), x, y, "cpu", batch_size=100) >= 0.9


def test_eval_inspect_agrees_fully_and_writes_json_and_png(tmp_path, capsys):
    assert main(["eval", "vit", "--method", "inspect", "--n", "48", "--out-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| inspect defaults |" in out and "| 1.000 |" in out
    assert "agreement with stock: the share of images on which the patched model predicts the class" in out
    result = json.loads((tmp_path / "eval_vit_inspect.json").read_text())
    assert result["n"] == 48 and result["rows"][0]["agreement"] == 1.0
    assert result["rows"][0]["speed"] is None  # CPU timings of small batches are noise: not recorded
    assert result["rows"][0]["top1"] == result["stock_top1"]
    assert Image.open(tmp_path / "eval_vit_inspect.png").size == (640, 400)


@pytest.mark.parametrize("method,options,sweep", [("tome", {}, ("r", [0, 8])),
                                                  ("prune", {"strategy": "cls"}, ("keep", [1.0, 0.5]))])
def test_eval_sweep_identity_point_agrees_fully(method, options, sweep):
    if method not in visattn.methods():
        pytest.skip(f"{method} is not registered")
    result = eval_vit(method, options, sweep, n=32, out_dir=None, progress=False)
    identity, strong = result["rows"]
    assert identity["agreement"] == 1.0 and identity["options"] == {**options, sweep[0]: sweep[1][0]}
    assert 0.0 <= strong["agreement"] <= 1.0


def test_eval_takes_a_local_checkpoint_and_image_folder(tmp_path):
    import timm

    x, y = D.classification_batch("test", 8)
    folders = [tmp_path / "images" / f"{i}_{s}" for i, s in enumerate(D.SHAPES)]  # sorted = class order
    for folder in folders:
        folder.mkdir(parents=True)
    for i, (img, label) in enumerate(zip(x, y)):
        Image.fromarray(img).save(folders[label] / f"{i}.png")
    result = eval_vit("inspect", images=tmp_path / "images", n=None, out_dir=None, progress=False)
    generated = eval_vit("inspect", n=8, out_dir=None, progress=False)
    assert result["n"] == 8 and result["stock_top1"] == generated["stock_top1"]

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    result = eval_vit("tome", {}, ("r", [0]), model_name="vit_tiny_patch16_224", checkpoint=tmp_path / "tiny.pth",
                      num_classes=3, img_size=32, images=tmp_path / "images", n=None, out_dir=tmp_path,
                      progress=False)
    assert result["rows"][0]["agreement"] == 1.0
    assert (tmp_path / "eval_vit_vit_tiny_patch16_224_tome.json").is_file()


def test_eval_options_are_read_as_typed_values():
    assert parse_option("r=8") == ("r", 8) and parse_option("keep=0.25") == ("keep", 0.25)
    assert parse_option("cls=true") == ("cls", True) and parse_option("tile=none") == ("tile", None)
    assert parse_option("tile=2x4x4") == ("tile", (2, 4, 4)) and parse_option("window=8X8") == ("window", (8, 8))
    assert parse_option("strategy=sliding_tile") == ("strategy", "sliding_tile")
    assert parse_option("strategy=x") == ("strategy", "x") and parse_option("name=2x") == ("name", "2x")
    assert parse_sweep("window=2x4x4,1x2x3") == ("window", [(2, 4, 4), (1, 2, 3)])


def test_eval_bad_inputs_are_named(tmp_path, capsys):
    with pytest.raises(UnknownMethodError, match="known methods: .*inspect"):
        eval_vit("nope", out_dir=None)
    for bad in ("r", "r=", "r=1,,2", "=1,2"):
        with pytest.raises(OptionError, match="NAME=V1,V2"):
            parse_sweep(bad)
    with pytest.raises(OptionError, match=r"r must be an int >= 0.*\(got -1\)"):
        eval_vit("tome", sweep=("r", [0, -1]), out_dir=None)
    no_timm = [n for n, d in visattn.methods().items() if "timm" not in d["frameworks"]]
    if no_timm:
        with pytest.raises(UnsupportedModelError, match="methods that do: .*inspect"):
            eval_vit(no_timm[0], out_dir=None)
    with pytest.raises(OptionError, match="unknown option"):
        eval_vit("inspect", {"r": 1}, out_dir=None)
    with pytest.raises(OptionError, match="both swept and given"):
        eval_vit("inspect", {"per_head": True}, ("per_head", [False]), out_dir=None)
    with pytest.raises(ValueError, match="both a timm model name and a checkpoint"):
        eval_vit("inspect", model_name="vit_tiny_patch16_224", out_dir=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eval_vit("inspect", images=tmp_path / "missing", out_dir=None)
    with pytest.raises(ValueError, match="accepted: auto, cpu, cuda"):
        eval_vit("inspect", device="tpu", out_dir=None)
    with pytest.raises(SystemExit):
        main(["eval", "vit", "--method", "inspect", "--sweep", "per_head"])
    assert "NAME=V1,V2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "dit", "--method", "inspect"])
    assert "invalid choice: 'dit'" in capsys.readouterr().err


def test_result_files_are_named_by_testbed_model_method_and_strategy():
    from visattn.testbed.eval import _stem

    assert _stem("vlm", None, "head_modulation", {"strategy": "avisc"}) == "eval_vlm_head_modulation_avisc"
    assert _stem("vit", "vit_tiny_patch16_224", "tome", {}) == "eval_vit_vit_tiny_patch16_224_tome"
    assert _stem("video", None, "sparse_video", None) == "eval_video_sparse_video"
