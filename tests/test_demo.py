"""The demo's computations (visattn.demo) without a browser, and `visattn demo`'s errors.

The browser test (test_demo_browser.py) drives the page; these check what each tab computes, on the
shipped testbed models and tiny stand-ins, and that every method is removed again afterwards.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import visattn
from visattn import demo
from visattn.cli import load_demo_app, main
from visattn.errors import ShapeError
from visattn.processors.bra import route_regions
from visattn.testbed.data import SHAPES


@pytest.fixture(scope="module")
def vit():
    return demo.vit_model()


@pytest.fixture(scope="module")
def image():
    return demo.vit_examples(1)[0][0]


def test_vit_examples_are_distinct_classes():
    examples = demo.vit_examples(4)
    assert len({label for _, label in examples}) == 4 and all(label in SHAPES for _, label in examples)
    assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img, _ in examples)


def test_as_rgb_takes_pil_grey_and_rgba_and_resizes():
    grey = np.full((40, 30), 128, np.uint8)
    rgba = np.zeros((64, 64, 4), np.uint8)
    for given in (grey, rgba, Image.fromarray(grey)):
        out = demo.as_rgb(given, 64)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.flags.writeable
    with pytest.raises(ValueError, match="no image"):
        demo.as_rgb(None, 64)


def test_paint_patches_blends_only_weighted_patches():
    img = np.full((8, 8, 3), 100, np.uint8)
    colours = np.zeros((2, 2, 3))
    colours[0, 0] = 255
    weight = np.array([[1.0, 0.0], [0.0, 0.0]])
    out = np.asarray(demo.paint_patches(img, colours, weight, size=16))
    assert out.shape == (16, 16, 3) and (out[:8, :8] == 255).all() and (out[8:, 8:] == 100).all()
    with pytest.raises(ValueError, match="does not divide"):
        demo.paint_patches(img, np.zeros((3, 3, 3)), np.zeros((3, 3)), size=16)


def test_mark_tokens_dims_or_tints():
    img = np.full((8, 8, 3), 200, np.uint8)
    marked = np.array([True, False, False, False])
    dimmed = np.asarray(demo.mark_tokens(img, marked, (2, 2), dim_unmarked=True))
    assert (dimmed[:128, :128] == 200).all() and (dimmed[128:, 128:] < 100).all()
    tinted = np.asarray(demo.mark_tokens(img, marked, (2, 2), dim_unmarked=False))
    assert (tinted[:128, :128] != 200).any() and (tinted[128:, 128:] == 200).all()


def test_tome_groups_r0_is_every_patch_and_r8_merges_and_leaves_the_model_stock(vit, image):
    before = demo.classify(vit, image)
    none = demo.tome_groups(vit, image, 0)
    assert none.groups == 64 and none.probabilities == before
    merged = demo.tome_groups(vit, image, 8)
    assert merged.token_counts == [65, 57, 49, 41, 33, 25] and merged.groups == 16
    assert merged.drawing.size == (demo.DISPLAY, demo.DISPLAY)
    assert not visattn.applied(vit) and demo.classify(vit, image) == before


def test_region_at_corners():
    assert demo.region_at((0.0, 0.0), 4) == 0
    assert demo.region_at((0.99, 0.0), 4) == 3
    assert demo.region_at((1.0, 1.0), 4) == 15
    assert demo.region_at((0.3, 0.6), 2) == 2


def test_route_regions_picks_the_region_holding_the_matching_keys():
    grid, n_win = (4, 4), 2  # 4 regions of 2x2 tokens, one class token first
    q = torch.zeros(1, 1, 17, 2)
    k = torch.zeros(1, 1, 17, 2)
    q[0, 0, 1:, 0] = 1.0  # every query looks along channel 0
    k[0, 0, 1 + 2 * 4 + 2, 0] = 10.0  # token (2, 2) of the grid: bottom-right region (3)
    routed = route_regions(q, k, num_prefix=1, grid=grid, n_win=n_win, topk=1)
    assert routed.shape == (1, 4, 1) and (routed == 3).all()
    every = route_regions(q, k, num_prefix=1, grid=grid, n_win=n_win, topk=4)
    assert (every == torch.arange(4)).all()  # ascending


def test_bra_routes(vit, image):
    routes = demo.bra_routes(vit, image, n_win=4, topk=4, layer=3, region=10)
    assert routes.region == 10 and len(routes.routed) == 4 and all(0 <= r < 16 for r in routes.routed)
    every = demo.bra_routes(vit, image, n_win=2, topk=4, layer=0, region=0)  # identity: topk = n_win ** 2
    assert every.routed == [0, 1, 2, 3] and every.probabilities == demo.classify(vit, image)
    with pytest.raises(ValueError, match="region must be in 0..15"):
        demo.bra_routes(vit, image, n_win=4, topk=4, layer=0, region=16)
    with pytest.raises(ShapeError, match="n_win values that fit"):
        demo.bra_routes(vit, image, n_win=3, topk=4, layer=0, region=0)
    assert not visattn.applied(vit)


def test_attention_maps_per_head_and_mean(vit, image):
    maps = demo.attention_maps(vit, image, layer=5)
    assert [caption for _, caption in maps] == ["layer 5, head 0", "layer 5, head 1", "layer 5, head 2",
                                                "layer 5, mean of 3 heads"]
    assert all(pic.size == (demo.DISPLAY, demo.DISPLAY) for pic, _ in maps)
    assert len(demo.attention_maps(vit, image, layer=0, query="mean")) == 4
    with pytest.raises(ValueError, match="query must be"):
        demo.attention_maps(vit, image, layer=0, query="patch")


def test_vit_throughput_rows(vit):
    seen = []
    rows = demo.vit_throughput(vit, r=0, n_win=2, topk=4, batch=8, repeats=1,
                               progress=lambda f, text: seen.append(f))
    assert [row["model"] for row in rows] == ["stock", "tome r=0", "bra n_win=2 topk=4"]
    assert rows[0]["speed-up"] == 1.0 and all(row["top-1 agreement"] == 1.0 for row in rows)  # identities
    assert all(row["images/s"] > 0 for row in rows) and seen[-1] == 1.0 and seen == sorted(seen)


# ---------------------------------------------------------------------------------------------------------------
# vision-language


@pytest.fixture(scope="module")
def vlm():
    if demo.vlm_missing() is not None:
        pytest.fail(f"the shipped testbed VLM is missing: {demo.vlm_missing()}")
    return demo.vlm_model()


def test_vlm_missing_names_the_path(tmp_path):
    why = demo.vlm_missing(str(tmp_path / "none.safetensors"))
    assert "none.safetensors" in why and "train_testbed_vlm.py" in why
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        demo.vlm_model(str(tmp_path / "none.safetensors"))


def test_vlm_answers_identity_settings_answer_as_stock(vlm):
    model, tokenizer = vlm
    for img, question, _ in demo.vlm_examples(2):
        answers = demo.vlm_answers(model, tokenizer, img, question, {
            "prune": {"strategy": "fastv", "keep": 1.0}, "visual_sink": {"p": 1.0, "tau": 6.0},
            "head_modulation": {"strategy": "pai", "alpha": 0.0}})
        assert [a.method for a in answers] == ["stock", "prune", "visual_sink", "head_modulation"]
        assert len({a.answer for a in answers}) == 1
    assert not visattn.applied(model)


def test_vlm_answers_draw_kept_found_and_selected_tokens(vlm):
    model, tokenizer = vlm
    img, question, _ = demo.vlm_examples(1)[0]
    seen = []
    answers = demo.vlm_answers(model, tokenizer, img, question, {
        "prune": {"strategy": "fastv", "keep": 0.25}, "visual_sink": {"p": 0.6, "tau": 6.0},
        "head_modulation": {"strategy": "imbalance", "alpha": 0.5}}, progress=lambda f, text: seen.append(text))
    notes = {a.method: a.note for a in answers}
    assert notes["prune"] == "kept 16 of 64 image tokens in decoder layer 2 (others darkened)"
    assert "visual sink" in notes["visual_sink"] and "selected" in notes["head_modulation"]
    assert all(a.drawing.size == (demo.DISPLAY, demo.DISPLAY) for a in answers)
    assert seen[-1] == "done"
    plphp = demo.vlm_answers(model, tokenizer, img, question, {"prune": {"strategy": "plphp", "keep": 0.5}})
    assert "kv head 0" in plphp[1].note
    avisc = demo.vlm_answers(model, tokenizer, img, question, {"head_modulation": {"strategy": "avisc"}})
    assert re.fullmatch(r"([1-9]|[1-5][0-9]|6[0-3]) blind image tokens \(red\): .*", avisc[1].note), avisc[1].note


def test_vlm_answers_reject_words_outside_the_vocabulary(vlm):
    model, tokenizer = vlm
    img = demo.vlm_examples(1)[0][0]
    with pytest.raises(ValueError, match="vocabulary"):
        demo.vlm_answers(model, tokenizer, img, "is there a zebra?", {})
    with pytest.raises(ValueError, match="ask a question"):
        demo.vlm_answers(model, tokenizer, img, "  ", {})


# ---------------------------------------------------------------------------------------------------------------
# diffusion


def test_frames_strip_and_gif(tmp_path):
    frames = demo.to_frames(torch.rand(3, 3, 8, 8))
    assert frames.shape == (3, 8, 8, 3) and frames.dtype == np.uint8
    strip = demo.frame_strip([frames, frames], height=16, gap=2)
    assert strip.size == (3 * 18 - 2, 2 * 18 - 2)
    gif = Image.open(demo.write_gif(frames, tmp_path / "a.gif", size=32))
    assert gif.n_frames == 3 and gif.size == (32, 32)


def test_video_missing_names_the_path(tmp_path):
    why = demo.video_missing(str(tmp_path / "none.safetensors"))
    assert "none.safetensors" in why and "none.json" in why
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        demo.video_model(str(tmp_path / "none.safetensors"))


def test_video_compare_same_noise_dense_vs_sparse():
    from visattn.testbed.video import build_video_dit

    model = build_video_dit({"num_layers": 1, "frames": 8, "size": 16}).eval()  # 8x4x4 grid: 2 tiles of 4x4x4
    model.default_steps, model.default_guidance = 1, 1.0
    seen = []
    identity = demo.video_compare(model, 0, seed=0, steps=2, guidance=2.0, strategy="tile_topk", keep=1.0,
                                  progress=lambda f, text: seen.append(f))
    assert identity.dense.shape == (8, 16, 16, 3) and identity.psnr > 60  # keep=1.0 attends to every tile
    assert seen[-1] == 1.0 and seen == sorted(seen)
    sparse = demo.video_compare(model, 0, seed=0, steps=2, guidance=2.0, strategy="tile_topk", keep=0.5)
    assert (sparse.dense == identity.dense).all() and sparse.psnr < identity.psnr
    assert sparse.dense_seconds > 0 and sparse.sparse_seconds > 0
    assert not visattn.applied(model.transformer)


# ---------------------------------------------------------------------------------------------------------------
# the command


def test_demo_command_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--port", "1"])
    assert exit_.value.code == 2
    assert 'pip install "visattn[demo]"' in capsys.readouterr().err


def test_demo_app_builds_its_three_tabs():
    app = load_demo_app().build("cpu")
    ids = {block.elem_id for block in app.blocks.values()}
    assert {"tab-vit", "tab-vlm", "tab-video", "vit-analyse", "vlm-ask", "video-run"} <= ids


def test_video_quality_warns_below_the_bar(tmp_path):
    import json

    from visattn.testbed.video import QUALITY_BAR, SHIPPED_VIDEO_DIT

    shipped = json.loads(SHIPPED_VIDEO_DIT.with_suffix(".json").read_text())["class_accuracy"]
    assert (demo.video_quality() is None) == (shipped >= QUALITY_BAR)
    for accuracy, warned in ((0.25, True), (0.9, False)):
        (tmp_path / "v.json").write_text(json.dumps({"class_accuracy": accuracy}))
        note = demo.video_quality(str(tmp_path / "v.safetensors"))
        assert (note is not None) == warned
        if warned:
            assert "below its quality bar" in note and "25%" in note
