"""bra: bi-level routing attention on timm ViTs (BiFormer)."""

import functools

import pytest
import timm
import torch
from interpreter import run_interpreted
from tiny_models import VIT_VARIANTS, tiny_vit

import visattn
from visattn.core import attention
from visattn.errors import OptionError, ShapeError, UnsupportedModelError
from visattn.processors.bra import bi_level_routing_attention, route_regions

_vit = functools.partial(tiny_vit, patch_size=4, embed_dim=32, num_heads=2, num_classes=3)
MODELS = {kind: functools.partial(_vit, **cfg) for kind, cfg in VIT_VARIANTS.items()}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_topk_all_regions_reproduces_stock_and_remove_restores(kind):
    model = MODELS[kind]()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    visattn.apply(model, "bra", n_win=4, topk=16)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        assert torch.equal(model(x=x), ref)  # the image batch as a keyword
    visattn.remove(model)
    visattn.apply(model, "bra", n_win=2, topk=1, lepe=True)
    tokens = torch.randn(2, model.num_prefix_tokens + 64, 32)
    with torch.no_grad():
        routed = model.blocks[0].attn(tokens)
        assert not torch.allclose(routed, timm.layers.Attention.forward(model.blocks[0].attn, tokens), atol=1e-3)
    assert "blocks.0.attn.lepe.weight" in model.state_dict()
    visattn.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    assert type(model.blocks[0].attn) is timm.layers.Attention


def _expected_mask(q, k, num_prefix, grid, n_win, topk):
    """Token mask of BiFormer's routing, built independently in raster order."""
    b, h, n, d = q.shape
    gh, gw = grid
    rh, rw = gh // n_win, gw // n_win
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    region = (rows // rh) * n_win + cols // rw  # region id of each grid token
    onehot = torch.nn.functional.one_hot(region, n_win * n_win).float()  # [G, R]
    per_region = onehot / onehot.sum(0)
    qr = torch.einsum("bhgd,gr->brhd", q[:, :, num_prefix:].float(), per_region).reshape(b, -1, h * d)
    kr = torch.einsum("bhgd,gr->brhd", k[:, :, num_prefix:].float(), per_region).reshape(b, -1, h * d)
    chosen = (qr @ kr.transpose(1, 2)).topk(topk, dim=-1).indices  # [B, R, topk]
    allowed = torch.zeros(b, n_win * n_win, n_win * n_win, dtype=torch.bool)
    allowed.scatter_(-1, chosen, True)
    grid_mask = allowed[:, region][:, :, region]  # [B, G, G]
    mask = torch.ones(b, 1, n, n, dtype=torch.bool)
    mask[:, 0, num_prefix:, num_prefix:] = grid_mask
    return mask


@pytest.mark.parametrize("num_prefix,grid,n_win,topk", [(1, (8, 8), 4, 3), (5, (4, 6), 2, 1), (0, (16, 16), 2, 2)])
def test_routed_attention_matches_masked_reference(num_prefix, grid, n_win, topk):
    b, h, d = 2, 2, 8
    n = num_prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    out = bi_level_routing_attention(q, k, v, num_prefix=num_prefix, grid=grid, n_win=n_win, topk=topk,
                                     scale=d ** -0.5)
    ref = attention(q, k, v, mask=_expected_mask(q, k, num_prefix, grid, n_win, topk))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("num_prefix", [0, 2])
def test_gather_and_block_sparse_paths_agree(num_prefix):
    q, k, v = (torch.randn(2, 2, num_prefix + 64, 8, dtype=torch.float64) for _ in range(3))
    out = {path: bi_level_routing_attention(q, k, v, num_prefix=num_prefix, grid=(8, 8), n_win=2, topk=2, scale=0.3,
                                            path=path) for path in ("gather", "kernel")}
    torch.testing.assert_close(out["gather"], out["kernel"])
    with pytest.raises(OptionError, match="path must be one of"):
        bi_level_routing_attention(q, k, v, num_prefix=num_prefix, grid=(8, 8), n_win=2, topk=2, scale=0.3, path="x")


def test_factory_flag_keeps_timm_parameter_names():
    stock = _vit()
    routed = _vit(attn_layer=visattn.timm.bra(n_win=4, topk=2))
    by_name = _vit(attn_layer="visattn_bra", img_size=56, patch_size=4)  # 14x14 grid, default n_win=7
    assert routed.state_dict().keys() == stock.state_dict().keys()
    assert by_name.state_dict().keys() == _vit(img_size=56).state_dict().keys()
    routed.load_state_dict(stock.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert routed(x).shape == stock(x).shape
        assert by_name(torch.randn(1, 3, 56, 56)).shape == (1, 3)
    with_lepe = _vit(attn_layer=visattn.timm.bra(n_win=4, topk=2, lepe=True))
    missing = with_lepe.load_state_dict(stock.state_dict(), strict=False).missing_keys
    assert missing and all(".attn.lepe." in key for key in missing)


@pytest.mark.parametrize("prefix", [0, 1])
def test_lepe_adds_the_depthwise_conv_of_v_with_and_without_autograd(prefix):
    """LePE's LCE(V) joins the attention output before the projection; inference adds it in place, autograd out of
    place: both equal the attention with a zero conv plus the projected conv of v."""
    from visattn.timm import bra

    torch.manual_seed(0)
    layer = bra(n_win=2, topk=1, lepe=True, num_prefix_tokens=prefix)(32, num_heads=2, qkv_bias=True).eval()
    torch.nn.init.normal_(layer.lepe.weight)
    torch.nn.init.normal_(layer.lepe.bias)
    x = torch.randn(2, prefix + 64, 32)
    with torch.no_grad():
        inference = layer(x)
        v = layer.qkv(x)[..., 64:][:, prefix:]  # [B, h * w, C]
        lce = torch.nn.functional.conv2d(v.transpose(1, 2).reshape(2, 32, 8, 8), layer.lepe.weight, layer.lepe.bias,
                                         padding=2, groups=32).flatten(2).transpose(1, 2)
        weight, bias = layer.lepe.weight.clone(), layer.lepe.bias.clone()
        layer.lepe.weight.zero_(), layer.lepe.bias.zero_()
        expected = layer(x)
        expected[:, prefix:] += lce @ layer.proj.weight.T
        layer.lepe.weight.copy_(weight), layer.lepe.bias.copy_(bias)
    trained = layer(x.clone().requires_grad_())
    trained.sum().backward()
    assert layer.lepe.weight.grad is not None and layer.qkv.weight.grad.abs().sum() > 0
    torch.testing.assert_close(inference, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained.detach(), inference, rtol=1e-6, atol=1e-6)


def test_errors():
    model = _vit()
    fits = r"n_win=3 does not divide the 8x8 patch grid; n_win values that fit: \[1, 2, 4, 8\]"
    with pytest.raises(ShapeError, match=fits):
        visattn.apply(model, "bra", n_win=3, topk=1)
    with pytest.raises(OptionError, match=r"topk must be <= n_win \*\* 2 = 4"):
        visattn.apply(model, "bra", n_win=2, topk=5)
    with pytest.raises(OptionError, match="topk must be an int >= 1"):
        visattn.apply(model, "bra", topk=0)
    with pytest.raises(UnsupportedModelError):
        visattn.apply(timm.create_model("resnet10t", pretrained=False), "bra")
    with pytest.raises(UnsupportedModelError, match="bra does not support the timm model PoolingVisionTransformer"):
        visattn.apply(timm.create_model("pit_ti_224", pretrained=False), "bra", n_win=3, topk=2)  # grids pooled
    with pytest.raises(OptionError, match="topk must be"):
        visattn.timm.bra(n_win=2, topk=9)
    assert visattn.applied(model) == []
    dyn = MODELS["dynamic_size"]()
    visattn.apply(dyn, "bra", n_win=4, topk=2)
    with pytest.raises(ShapeError, match="does not divide the 9x8 patch grid"):
        dyn(torch.randn(1, 3, 36, 32))
    visattn.remove(dyn)


def kernel_cases() -> dict[str, float]:
    """The routed path on the Triton kernel (interpreted) against the gather path in float64."""
    errors = {}
    for p in (0, 1, 3):
        torch.manual_seed(p)
        q, k, v = (torch.randn(1, 2, p + 64, 16, dtype=torch.float16) for _ in range(3))
        out = bi_level_routing_attention(q, k, v, num_prefix=p, grid=(8, 8), n_win=2, topk=2, scale=0.25,
                                         path="kernel", strict=True)
        ref = bi_level_routing_attention(q.double(), k.double(), v.double(), num_prefix=p, grid=(8, 8), n_win=2,
                                         topk=2, scale=0.25, path="gather")
        errors[str(p)] = float((out.double() - ref).abs().max())
    return errors


def test_block_sparse_path_runs_the_triton_kernel_like_the_gather_path():
    pytest.importorskip("triton")
    errors = run_interpreted(__file__, "kernel_cases")
    assert sorted(errors) == ["0", "1", "3"] and max(errors.values()) < 2e-3, errors


def test_handle_routes_are_the_regions_each_layer_routed_to():
    model = MODELS[sorted(MODELS)[0]]()
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    attn = model.blocks[1].attn
    hooks = [attn.q_norm.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
             attn.k_norm.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out))]
    handle = visattn.apply(model, "bra", n_win=2, topk=2, layers=[1])
    try:
        with torch.no_grad():
            model(x)
    finally:
        visattn.remove(model)
        for hook in hooks:
            hook.remove()
    assert sorted(handle.routes) == [1] and handle.routes[1].shape == (2, 4, 2)
    expected = route_regions(captured["q"], captured["k"], num_prefix=model.num_prefix_tokens,
                             grid=tuple(model.patch_embed.grid_size), n_win=2, topk=2)
    assert torch.equal(handle.routes[1], expected)
    identity = visattn.apply(model, "bra", n_win=2, topk=4)
    try:
        with torch.no_grad():
            model(x)
    finally:
        visattn.remove(model)
    assert identity.routes == {}  # the identity setting runs timm's dense attention


@pytest.mark.parametrize("arch, size", [("eva02_tiny_patch14_224", 56), ("vit_small_patch16_dinov3", 64),
                                        ("vit_base_patch16_rope_mixed_224", 64)])
def test_rotary_models_route_at_their_sdpa_call(arch, size):
    """EVA-style attention (rotary embeddings inside the layer): the SDPA call is answered by routed attention over
    the rotated q and k, equal to dense attention under BiFormer's region mask; identity and remove() exact."""
    from visattn.frameworks.base import SDPAIntercept

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, depth=2, embed_dim=64, num_heads=2,
                              img_size=size, init_values=1.0).eval()  # layer scale 1: the attention shows
    x = torch.randn(2, 3, size, size)
    grid, npt = tuple(model.patch_embed.grid_size), model.num_prefix_tokens
    with torch.no_grad():
        stock = model(x)

    def masked(call):
        q, k, v = call["query"], call["key"], call["value"]
        return attention(q, k, v, mask=_expected_mask(q, k, npt, grid, 2, 1))

    with torch.no_grad(), SDPAIntercept(masked):
        expected = model(x)
    visattn.apply(model, "bra", n_win=2, topk=4)
    with torch.no_grad():
        assert torch.equal(model(x), stock)
    visattn.remove(model)
    handle = visattn.apply(model, "bra", n_win=2, topk=1)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert not torch.equal(out, stock) and sorted(handle.routes) == [0, 1]
    assert handle.routes[0].shape == (2, 4, 1)
    visattn.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x), stock)
    with pytest.raises(OptionError, match="lepe=True needs timm.layers.Attention"):
        visattn.apply(model, "bra", n_win=2, topk=1, lepe=True)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
