"""isolation (IR-Diffusion) on the SDXL-like UNet and Flux: no subjects reproduces stock, references are
generated as in the stock model, the attention pattern it imposes on the target is exactly the
isolation + shared-reference pattern (checked through inspect's maps, in both orders of applying),
reposition maps the reference box onto the target box, and bad regions get clear errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402
from test_diffusers import B, T, _pixart, _run  # noqa: E402
from test_tome_diffusers import _build  # noqa: E402

import visattn  # noqa: E402
from visattn.core.regions import as_region, reposition, subject_map, token_mask  # noqa: E402
from visattn.frameworks import diffusers as adapter  # noqa: E402

# UNet: 16x16 latents = 128x128 px (attention at 8x8 and 4x4); Flux: 3x4 tokens = 48x64 px
SUBJECTS = {
    "sdxl": dict(target_regions=[(0, 0, 48, 64), (64, 64, 128, 128)],
                 reference_regions=[(64, 0, 128, 64), (0, 64, 64, 128)]),
    "flux": dict(target_regions=[(0, 0, 32, 16), (32, 32, 64, 48)],
                 reference_regions=[(32, 0, 64, 32), (0, 16, 32, 48)]),
}
FAMILIES = ("sdxl", "flux")  # built by test_tome_diffusers._build


@pytest.fixture(scope="module", params=FAMILIES)
def case(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, dict[str, Any], torch.Tensor]:
    return (request.param, *_build(request.param))


def _restored(model: torch.nn.Module, processors: dict) -> bool:
    return (all(m.processor is processors[n] for n, m in adapter.attention_layers(model))
            and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()))


def test_no_subjects_reproduces_stock_bit_for_bit(case) -> None:
    family, model, inputs, stock = case
    processors = {n: m.processor for n, m in adapter.attention_layers(model)}
    visattn.apply(model, "isolation")
    try:
        assert torch.equal(_run(model, inputs), stock)
    finally:
        visattn.remove(model)
    assert _restored(model, processors) and torch.equal(_run(model, inputs), stock)


def test_references_are_generated_as_in_the_stock_model(case) -> None:
    family, model, inputs, stock = case
    visattn.apply(model, "isolation", **SUBJECTS[family])
    try:
        out = _run(model, inputs)
    finally:
        visattn.remove(model)
    torch.testing.assert_close(out[0], stock[0], atol=1e-5, rtol=1e-5)  # batch element 0: the reference
    assert not torch.allclose(out[1], stock[1], atol=1e-3)  # element 1: the target


@pytest.mark.parametrize("inspect_first", [False, True])
def test_imposed_pattern_seen_through_inspect(case, inspect_first: bool) -> None:
    """Target rows: zero attention between different subjects; subject i sees its reference subject's
    keys, and nothing else sees reference keys; the reference attends to itself only."""
    family, model, inputs, stock = case
    processors = {n: m.processor for n, m in adapter.attention_layers(model)}
    regions = SUBJECTS[family]
    if inspect_first:
        handle = visattn.apply(model, "inspect")
        visattn.apply(model, "isolation", **regions)
    else:
        visattn.apply(model, "isolation", **regions)
        handle = visattn.apply(model, "inspect")
    try:
        _run(model, inputs)
    finally:
        visattn.remove(model)
    assert _restored(model, processors) and torch.equal(_run(model, inputs), stock)
    grid, text = adapter.call_grid(model, inputs)
    image_size = (grid[0] * (8 if family == "sdxl" else 16), grid[1] * (8 if family == "sdxl" else 16))
    targets = [as_region(r) for r in regions["target_regions"]]
    refs = [as_region(r) for r in regions["reference_regions"]]
    checked = 0
    for layer, name in handle.layer_names.items():
        module = dict(model.named_modules())[name]
        if getattr(module, "is_cross_attention", False):
            continue
        layer_grid = adapter.layer_grid(model, layer, grid)
        prefix = text if family == "flux" else 0
        ref_map, target_map = handle.maps[layer]  # the references' call, then the target's
        n = layer_grid[0] * layer_grid[1]
        assert ref_map.shape == (1, prefix + n, prefix + n)
        subject = torch.cat([torch.full((prefix,), -1), subject_map(targets, image_size, layer_grid)])
        owner = torch.cat([torch.full((len(reposition(r, t, image_size, layer_grid)[0]),), i)
                           for i, (r, t) in enumerate(zip(refs, targets))])
        probs = target_map[0]
        assert probs.shape == (prefix + n, prefix + n + len(owner))
        for i in range(len(targets)):
            rows = subject == i
            others = (subject >= 0) & (subject != i)
            assert rows.any() and others.any()
            assert torch.all(probs[rows][:, :prefix + n][:, others] == 0)
            assert torch.all(probs[rows][:, prefix + n:][:, owner != i] == 0)
            assert torch.all(probs[rows][:, prefix + n:][:, owner == i].sum(-1) > 0)
        assert torch.all(probs[subject < 0][:, prefix + n:] == 0)  # text and background: no reference keys
        torch.testing.assert_close(probs.sum(-1), torch.ones(prefix + n), atol=1e-5, rtol=0)
        checked += 1
    assert checked == len([1 for _, m in adapter.attention_layers(model) if not getattr(m, "is_cross_attention", 0)])


def test_reposition_scales_and_moves_the_reference_box_onto_the_target_box() -> None:
    size, grid = (64, 64), (8, 8)  # 8 px per token
    ref, tgt = as_region((0, 0, 16, 16)), as_region((32, 32, 64, 64))  # 2x2 tokens -> 4x4 tokens
    source, place = reposition(ref, tgt, size, grid)
    assert torch.equal(place, token_mask(tgt, size, grid).nonzero()[:, 0])
    rows, cols = source // 8, source % 8
    assert set(zip(rows.tolist(), cols.tolist())) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for s, p in zip(source.tolist(), place.tolist()):  # each reference token covers a 2x2 patch of the target
        assert (s // 8, s % 8) == ((p // 8 - 4) // 2, (p % 8 - 4) // 2)
    same, plc = reposition(ref, ref, size, grid)
    assert torch.equal(same, plc) and torch.equal(same, reposition(ref, tgt, size, grid, enabled=False)[0])
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[0:16, 0:8] = 255  # a mask region: only the left half of its bounding box... is the whole box
    region = as_region(Image.fromarray(mask))
    assert region.box == (0.0, 0.0, 8.0, 16.0) and token_mask(region, size, grid).sum() == 2


def test_pil_masks_work_like_the_equivalent_boxes() -> None:
    model, inputs, stock = _build("sdxl")
    outs = []
    for as_masks in (False, True):
        regions = {}
        for key, boxes in SUBJECTS["sdxl"].items():
            if as_masks:
                masks = []
                for x0, y0, x1, y1 in boxes:
                    m = np.zeros((128, 128), dtype=np.uint8)
                    m[y0:y1, x0:x1] = 255
                    masks.append(Image.fromarray(m))
                boxes = masks
            regions[key] = boxes
        handle = visattn.apply(model, "isolation", **regions)
        try:
            outs.append(_run(model, inputs))
        finally:
            visattn.remove(model)
        assert handle.image_size == (128, 128)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("opts,msg", [
    (dict(target_regions=[(0, 0, 8, 8)], reference_regions=[]), "1 target regions but 0 reference regions"),
    (dict(target_regions=[(0, 0, 8, 8)] * 3, reference_regions=[(0, 0, 8, 8)] * 3, references=2),
     "references=2 must be 1 .* or the number of subjects \\(3\\)"),
    (dict(target_regions=[(0, 0, 200, 8)], reference_regions=[(0, 0, 8, 8)], image_size=(128, 128)),
     r"target region 0 \(0.0, 0.0, 200.0, 8.0\) lies outside the 128x128 image"),
    (dict(target_regions=[Image.new("L", (100, 128), 255)], reference_regions=[(0, 0, 8, 8)], image_size=(128, 128)),
     "target region 0 is a 128x100 mask .* but the image is 128x128"),
    (dict(target_regions=[(8, 0, 4, 8)], reference_regions=[(0, 0, 8, 8)]), "must have x0 < x1"),
    (dict(target_regions=[np.zeros((128, 128))], reference_regions=[(0, 0, 8, 8)]), "mask is empty"),
    (dict(target_regions="left"), "target_regions must be a list of subject regions"),
    (dict(image_size=(128,)), r"image_size must be None or \(height, width\)"),
])
def test_bad_regions_raise_before_touching(opts: dict, msg: str) -> None:
    model, inputs, stock = _build("sdxl")
    with pytest.raises(visattn.OptionError, match=msg):
        visattn.apply(model, "isolation", **opts)
    assert "_visattn_handles" not in model.__dict__ and torch.equal(_run(model, inputs), stock)


def test_errors_known_only_at_call_time_and_unsupported_families() -> None:
    model, inputs, stock = _build("sdxl")
    visattn.apply(model, "isolation", target_regions=[(0, 0, 200, 8)], reference_regions=[(0, 0, 8, 8)])
    try:  # boxes only and no image_size: the image size (128x128) is known at the first call
        with pytest.raises(ValueError, match="lies outside the 128x128 image"):
            _run(model, inputs)
    finally:
        visattn.remove(model)
    visattn.apply(model, "isolation", references=2, **SUBJECTS["sdxl"])
    try:  # a batch of 2 is not made of groups of 2 references + 1 target
        with pytest.raises(ValueError, match="batch of 2 is not made of groups of 3"):
            _run(model, inputs)
    finally:
        visattn.remove(model)
    assert torch.equal(_run(model, inputs), stock)
    torch.manual_seed(0)
    pixart = _pixart()[0]
    with pytest.raises(visattn.UnsupportedModelError, match="UNet2DConditionModel, FluxTransformer2DModel"):
        visattn.apply(pixart, "isolation")
    with pytest.raises(visattn.MethodConflictError):
        visattn.apply(model, "isolation")
        visattn.apply(model, "tome", ratio=0.5)
    visattn.remove(model)
    assert B == 2 and T == 5
