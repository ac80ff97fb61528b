"""prune (strategy "cls", EViT): keep=1.0 reproduces stock bit for bit, the kept tokens are the most
attended by [CLS] and the rest fuse into one token weighted by that attention, counts follow
ceil(keep * N), and bad input is refused."""

import functools
import math

import pytest
import timm
import torch
from tiny_models import VIT_VARIANTS, tiny_clip, tiny_vit

import visattn
from visattn.core.merge import cls_attention, keep_top_and_fuse
from visattn.errors import OptionError, UnsupportedModelError

_vit = functools.partial(tiny_vit, depth=4)
VITS = {kind: functools.partial(_vit, **cfg) for kind, cfg in VIT_VARIANTS.items()
        if cfg.get("class_token", True)}


@pytest.mark.parametrize("kind", sorted(VITS))
def test_keep_1_reproduces_stock_and_remove_restores(kind):
    model = VITS[kind]()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    sizes = [(32, 32), (48, 40)] if kind == "dynamic_size" else [(32, 32)]
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref = model(x)
            visattn.apply(model, "prune", keep=1.0, layers=[0, 1, 2, 3])
            assert torch.equal(model(x), ref)
            visattn.remove(model)
            handle = visattn.apply(model, "prune", keep=0.5, layers=[1, 2])
            out = model(x)
            visattn.remove(model)
            assert torch.equal(model(x), ref)
        p, img = model.num_prefix_tokens, (h // 8) * (w // 8)
        after1 = p + math.ceil(0.5 * img) + 1
        assert handle.token_counts == [p + img, p + img, after1, p + math.ceil(0.5 * (after1 - p)) + 1]
        assert out.shape == ref.shape and torch.isfinite(out).all()
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert all(not m._forward_hooks for m in model.modules())


def test_default_layers_follow_evit():
    model = _vit(depth=12)
    handle = visattn.apply(model, "prune", keep=0.7)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    # 16 image tokens: blocks 3, 6, 9 keep ceil(0.7 n) and add the fused token
    assert handle.token_counts == [17] * 4 + [14] * 3 + [12] * 3 + [10] * 2
    visattn.remove(model)


def test_open_clip_tower_identity_and_pruning():
    clip = tiny_clip(layers=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = clip.encode_image(x)
        visattn.apply(clip, "prune", keep=1.0)
        assert torch.equal(clip.encode_image(x), ref)
        visattn.remove(clip)
        handle = visattn.apply(clip, "prune", keep=0.5, layers=[1])
        out = clip.encode_image(x)
        visattn.remove(clip)
        assert torch.equal(clip.encode_image(x), ref)
    assert handle.token_counts == [17, 17, 10, 10] and out.shape == ref.shape


def test_selection_and_fused_token_match_evit_by_hand():
    """At the pruning block the kept tokens are the top-k by [CLS] attention from the real q and k,
    and the fused token is sum_i a_i x_i over the others."""
    model = _vit(depth=1, reg_tokens=2)
    x = torch.randn(2, 3, 32, 32)
    block = model.blocks[0]
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        qkv = block.attn.qkv(block.norm1(tokens)).reshape(2, 19, 3, 4, 16).permute(2, 0, 3, 1, 4)
        q, k = block.attn.q_norm(qkv[0]), block.attn.k_norm(qkv[1])
        attn = ((q @ k.transpose(-1, -2)) * block.attn.scale).softmax(-1).mean(1)  # full map, for the check
        a = attn[:, 0, 3:]
        mid = tokens + block.ls1(block.attn(block.norm1(tokens)))
        top = a.topk(6, dim=-1).indices.sort(-1).values
        rest = torch.ones_like(a, dtype=torch.bool).scatter(1, top, False)
        fused = (a * rest)[..., None].mul(mid[:, 3:]).sum(1, keepdim=True)
        kept = mid[:, 3:].gather(1, top[..., None].expand(-1, -1, 64))
        pruned = torch.cat([mid[:, :3], kept, fused], 1)
        expected = pruned + block.ls2(block.mlp(block.norm2(pruned)))
        torch.testing.assert_close(cls_attention(q[:, :, :1], k, block.attn.scale)[:, 3:], a)
        visattn.apply(model, "prune", keep=6 / 16, layers=[0])
        out = model.blocks(tokens)
        visattn.remove(model)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_keep_top_and_fuse_by_hand():
    importance = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    x = torch.tensor([[[7.0], [1.0], [2.0], [3.0], [4.0]]])  # one prefix token, then 4 image tokens
    prune = keep_top_and_fuse(importance, 2, num_prefix=1)
    torch.testing.assert_close(prune(x)[0, :, 0], torch.tensor([7.0, 2.0, 4.0, 0.1 * 1 + 0.2 * 3]))
    assert keep_top_and_fuse(importance, 4)(x) is x


def test_key_mask_follows_kept_tokens():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    valid = torch.ones(2, 1, 1, 17, dtype=torch.bool)
    valid[1, ..., 9:] = False
    handle = visattn.apply(model, "prune", keep=0.5, layers=[1])
    with torch.no_grad():
        out = model.forward_features(x, attn_mask=valid)
    assert torch.isfinite(out).all() and handle.token_counts == [17, 17, 10, 10]
    visattn.remove(model)


def test_options_and_models_refused():
    model = _vit()
    for bad in (0, 0.0, -0.5, 1.5, "half"):
        with pytest.raises(OptionError, match=rf"^prune: keep must be a number in \(0.0, 1.0\] \(got {bad!r}\)$"):
            visattn.apply(model, "prune", keep=bad)
    with pytest.raises(OptionError, match="prune: strategy must be one of 'cls'"):
        visattn.apply(model, "prune", strategy="nope")
    with pytest.raises(OptionError, match="prune: on timm models only strategy 'cls'"):
        visattn.apply(model, "prune", strategy="fastv")
    with pytest.raises(OptionError, match="layers \\[4\\] out of range"):
        visattn.apply(model, "prune", layers=[4])
    with pytest.raises(UnsupportedModelError, match="prune: strategy 'cls' .* has no class token"):
        visattn.apply(_vit(class_token=False, global_pool="avg"), "prune")
    with pytest.raises(UnsupportedModelError, match="prune does not support the timm model ResNet"):
        visattn.apply(timm.create_model("resnet18", pretrained=False, num_classes=2), "prune")
    assert visattn.applied(model) == []
