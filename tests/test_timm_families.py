"""timm models whose attention applies rotary embeddings or a relative position bias inside the layer (EVA02, DINOv3,
PE-core, the RoPE ViTs, BEiT): ``inspect`` records the very probabilities the layer attends with (checked against
timm's own unfused path, which materialises them), outputs stay bit-identical, ``remove()`` restores the model; the
methods that replace ``timm.layers.Attention`` refuse them at ``apply``."""

from __future__ import annotations

import pytest
import timm
import torch

import visattn
from visattn.errors import UnsupportedModelError
from visattn.frameworks import timm as adapter

# tiny versions of each family (random weights): two blocks, 64-wide, 2 heads
MODELS = {
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64)),
    "pe_core": ("vit_pe_core_base_patch16_224", dict(img_size=64)),
    "rope_vit": ("vit_base_patch16_rope_224", dict(img_size=64)),
    "beit": ("beit_base_patch16_224", dict(img_size=64)),
}


def _model(name: str) -> torch.nn.Module:
    arch, kwargs = MODELS[name]
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=0, depth=2, embed_dim=64, num_heads=2,
                             **kwargs).eval()


def _image(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, *model.patch_embed.img_size)


@pytest.fixture(params=list(MODELS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def _unfused_probs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities as timm's unfused path computes them (the input of ``attn_drop``)."""
    probs: list[torch.Tensor] = []
    layers = [m for _, m in adapter.attention_layers(model)]
    hooks = [m.attn_drop.register_forward_hook(lambda mod, args, out: probs.append(args[0])) for m in layers]
    for m in layers:
        m.fused_attn = False
    try:
        with torch.no_grad():
            model(x)
    finally:
        for m in layers:
            m.fused_attn = True
        for h in hooks:
            h.remove()
    return probs


def test_inspect_records_the_probabilities_the_layer_attends_with(name: str) -> None:
    model = _model(name)
    x = _image(model)
    with torch.no_grad():
        stock = model(x)
    expected = _unfused_probs(model, x)
    assert len(expected) == len(adapter.attention_layers(model)) == 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = visattn.apply(model, "inspect", per_head=True)
    with torch.no_grad():
        out = model(x)
    visattn.remove(model)
    assert torch.equal(out, stock)
    for layer, probs in enumerate(expected):
        torch.testing.assert_close(handle.last(layer), probs, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(x), stock)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_inspect_refuses_a_layer_that_runs_without_sdpa() -> None:
    model = _model("eva02")
    for _, m in adapter.attention_layers(model):
        m.fused_attn = False
    visattn.apply(model, "inspect")
    try:
        with pytest.raises(UnsupportedModelError, match=r"ran without torch.nn.functional.scaled_dot_product_attention "
                                                        r"\(fused_attn=False"):
            with torch.no_grad():
                model(_image(model))
    finally:
        visattn.remove(model)


def test_bra_refuses_attention_with_rotary_or_relative_bias(name: str) -> None:
    model = _model(name)
    with pytest.raises(UnsupportedModelError, match="bra works on timm.layers.Attention; this .* attends with timm"):
        visattn.apply(model, "bra", n_win=1, topk=1)
    assert not visattn.applied(model)
