"""timm and open_clip: inspect leaves outputs bit-identical, records the true attention, remove() restores."""

import functools

import open_clip
import pytest
import torch
from tiny_models import VIT_VARIANTS, tiny_clip, tiny_vit

import visattn
from visattn.core import attention_probs
from visattn.frameworks.timm import vit_layout

VITS = {kind: functools.partial(tiny_vit, **cfg) for kind, cfg in VIT_VARIANTS.items()}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _check_apply_remove(model, x, layers, expected_maps):
    with torch.no_grad():
        ref = model(x)
    sd, classes = _snapshot(model), [type(m) for m in model.modules()]
    handle = visattn.apply(model, "inspect", layers=layers)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, ref), "inspect changed the output"
    for layer, shape in expected_maps.items():
        (amap,) = handle.maps[layer]
        assert tuple(amap.shape) == shape
        torch.testing.assert_close(amap.sum(-1), torch.ones(shape[:-1]))
    visattn.remove(model)
    assert not handle.active and visattn.applied(model) == []
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    after = model.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], sd[k]) for k in sd)
    assert [type(m) for m in model.modules()] == classes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    return handle


@pytest.mark.parametrize("kind", sorted(VITS))
def test_timm_inspect_identity_and_remove(kind):
    model = VITS[kind]()
    n = model.num_prefix_tokens + 16
    _check_apply_remove(model, torch.randn(2, 3, 32, 32), [0, 1], {0: (2, n, n), 1: (2, n, n)})


def test_timm_dynamic_image_size_records_each_size():
    model = VITS["dynamic_size"]()
    handle = visattn.apply(model, "inspect", layers=[1])
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 48, 32))
    assert [tuple(m.shape) for m in handle.maps[1]] == [(1, 17, 17), (1, 25, 25)]
    assert vit_layout(model, 25, image_size=(48, 32)).grid == (6, 4)
    visattn.remove(model)


def test_timm_map_is_the_true_attention():
    model = VITS["layerscale_qknorm_registers"]()
    x = torch.randn(1, 3, 32, 32)
    handle = visattn.apply(model, "inspect", layers=[1], per_head=True)
    with torch.no_grad():
        model(x)
    visattn.remove(model)
    # recompute layer 1's attention by hand from the stock modules
    with torch.no_grad():
        h = model.patch_embed(x)
        h = model.norm_pre(model._pos_embed(h))
        h = model.blocks[0](h)
        attn = model.blocks[1].attn
        y = model.blocks[1].norm1(h)
        qkv = attn.qkv(y).reshape(1, h.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    torch.testing.assert_close(handle.last(1), attention_probs(q, k, head_mean=False))


def test_open_clip_visual_tower_and_whole_model():
    model = tiny_clip()
    x = torch.randn(2, 3, 32, 32)
    _check_apply_remove(model.visual, x, [1], {1: (2, 17, 17)})
    handle = visattn.apply(model, "inspect", layers=[0])  # a whole CLIP model is patched through its visual tower
    assert handle.model is model.visual and visattn.applied(model) == [handle]
    with torch.no_grad():
        model.encode_image(x)
    assert tuple(handle.last(0).shape) == (2, 17, 17)
    visattn.remove(model)
    assert visattn.applied(model.visual) == []


def test_open_clip_map_matches_mha_weights():
    tower = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=64, layers=1, heads=4,
                                                    mlp_ratio=2.0, output_dim=16).eval()
    x = torch.randn(1, 3, 32, 32)
    seen = {}
    blk = tower.transformer.resblocks[0]
    hook = blk.ln_1.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o))
    handle = visattn.apply(tower, "inspect")
    with torch.no_grad():
        tower(x)
        _, weights = blk.attn(seen["y"], seen["y"], seen["y"], need_weights=True, average_attn_weights=True)
    hook.remove()
    visattn.remove(tower)
    torch.testing.assert_close(handle.last(0), weights, atol=1e-5, rtol=1e-4)
