"""timm models whose attention applies rotary embeddings or a relative position bias inside the layer (EVA02, DINOv3,
PE-core, the RoPE ViTs, BEiT): ``inspect`` records the very probabilities the layer attends with (checked against
timm's own unfused path, which materialises them), outputs stay bit-identical, ``remove()`` restores the model; the
methods that replace ``timm.layers.Attention`` refuse them at ``apply``. ``tome`` and ``prune`` run on the
EVA-style models with each token's rotary entry following it (checked against the full sequence with the dropped
tokens masked out)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch

import visattn
from visattn.errors import ShapeError, UnsupportedModelError
from visattn.frameworks import timm as adapter
from visattn.frameworks.base import SDPAIntercept

# tiny versions of each family (random weights): two blocks, 64-wide, 2 heads
MODELS = {
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64)),
    "pe_core": ("vit_pe_core_base_patch16_224", dict(img_size=64)),
    "rope_vit": ("vit_base_patch16_rope_224", dict(img_size=64)),
    "beit": ("beit_base_patch16_224", dict(img_size=64)),
}
ROTARY = ["eva02", "dinov3", "pe_core", "rope_vit", "rope_mixed", "naflex_rope"]
POSITIONED = [*ROTARY, "beit"]  # position embeddings inside the attention: rotary, or BEiT's relative bias
MODELS["rope_mixed"] = ("vit_base_patch16_rope_mixed_224", dict(img_size=64))  # rotary tables per layer and head
MODELS["naflex_rope"] = ("naflexvit_base_patch16_gap",  # NaFlexVit with EVA-style blocks and mixed rotary tables
                         dict(class_token=True, reg_tokens=3, rope_type="mixed", pos_embed="none"))


def _model(name: str, depth: int = 2) -> torch.nn.Module:
    arch, kwargs = MODELS[name]
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=0, depth=depth, embed_dim=64, num_heads=2,
                             **kwargs).eval()


def _image(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else (64, 96)  # NaFlexVit: any size
    return torch.randn(2, 3, *size)


@pytest.fixture(params=[n for n in MODELS if n not in ("rope_mixed", "naflex_rope")])
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


@pytest.mark.parametrize("arch", ROTARY)
def test_a_token_subset_attends_as_the_full_sequence_with_the_rest_masked(arch: str) -> None:
    """The oracle for follow_rope: a block's attention over some tokens, each with the rotary entry of its origin,
    equals the attention over all tokens with the others masked out as keys, at the kept rows."""
    model = _model(arch)
    block = model.blocks[1]
    seen: dict[str, torch.Tensor] = {}
    hook = block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], rope=kwargs["rope"]),
                                           with_kwargs=True)
    with torch.no_grad():
        model(_image(model))
    hook.remove()
    x, rope, npt = seen["x"], seen["rope"], block.attn.num_prefix_tokens
    n = x.shape[1]
    torch.manual_seed(2)
    picks = [torch.cat([torch.arange(npt), npt + torch.randperm(n - npt)[:7].sort().values]) for _ in range(2)]
    origin = torch.stack(picks)  # a different subset per sample
    keys = torch.zeros(2, n, dtype=torch.bool).scatter_(1, origin, True)
    with torch.no_grad():
        full = block.attn(block.norm1(x), rope=rope, attn_mask=keys[:, None, None, :])
        sub = block.attn(block.norm1(x.gather(1, origin[..., None].expand(-1, -1, x.shape[-1]))),
                         rope=adapter.follow_rope(rope, origin, npt))
    torch.testing.assert_close(sub, full.gather(1, origin[..., None].expand(-1, -1, full.shape[-1])),
                               atol=1e-5, rtol=1e-4)
    per_sample = rope.reshape((1,) * (4 - rope.dim()) + tuple(rope.shape)).expand(2, -1, -1, -1)  # patch dropout's
    with torch.no_grad():
        sub_per_sample = block.attn(block.norm1(x.gather(1, origin[..., None].expand(-1, -1, x.shape[-1]))),
                                    rope=adapter.follow_rope(per_sample, origin, npt))
    torch.testing.assert_close(sub_per_sample, sub)


def test_a_fused_token_is_not_rotated() -> None:
    model = _model("dinov3")
    rope = model.rope.get_embed(shape=model.patch_embed.grid_size)
    npt = model.num_prefix_tokens
    emb = adapter.follow_rope(rope, torch.tensor([[*range(npt), npt + 3, -1]]), npt)
    q = torch.randn(1, 2, 2, rope.shape[-1] // 2)
    rotated = timm.layers.apply_rot_embed_cat(q, emb, half=True)
    assert torch.equal(rotated[:, :, 1], q[:, :, 1]) and not torch.equal(rotated[:, :, 0], q[:, :, 0])


def _identity_then_run(model: torch.nn.Module, x: torch.Tensor, method: str, identity: dict,
                       options: dict) -> tuple[torch.Tensor, torch.Tensor, visattn.Handle]:
    """The stock output; ``method`` at its ``identity`` options checked bit-exact and removed; then applied with
    ``options`` (left applied): its output and handle."""
    with torch.no_grad():
        stock = model(x)
    visattn.apply(model, method, **identity)
    with torch.no_grad():
        assert torch.equal(model(x), stock)
    visattn.remove(model)
    handle = visattn.apply(model, method, **options)
    with torch.no_grad():
        return stock, model(x), handle


@pytest.mark.parametrize("arch", POSITIONED)
@pytest.mark.parametrize("method, identity, options", [("tome", dict(r=0), dict(r=3)),
                                                       ("prune", dict(keep=1.0), dict(keep=0.5, layers=[1, 2]))])
def test_tome_and_prune_on_models_with_positions_inside_attention(arch: str, method: str, identity: dict,
                                                                  options: dict) -> None:
    model = _model(arch, depth=3)
    x = _image(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stock, out, handle = _identity_then_run(model, x, method, identity, options)
    n = handle.token_counts[0]
    n_img = n - model.num_prefix_tokens
    if method == "tome":
        expected = [n, n - 3, n - 6]
    else:
        kept = -(-n_img // 2)
        expected = [n, n, model.num_prefix_tokens + kept + 1]
    assert handle.token_counts == expected
    assert out.shape == stock.shape and torch.isfinite(out).all() and not torch.equal(out, stock)
    visattn.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x), stock)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["eva02", "pe_core", "beit"])
def test_prune_ranks_tokens_by_the_attention_the_layer_computed(arch: str) -> None:
    """EViT's importance on a rotary model uses the keys as attention used them (rotated), on BEiT the relative
    position bias too: the tokens kept at the first pruning block are the most attended by the class token in the
    stock model's map (inspect)."""
    model = _model(arch, depth=3)
    x = _image(model)
    npt, n_img = model.num_prefix_tokens, model.patch_embed.num_patches
    handle = visattn.apply(model, "inspect", layers=[1])
    with torch.no_grad():
        model(x)
    attention = handle.last(1)[:, 0, npt:]  # head-averaged [CLS] row
    visattn.remove(model)
    expected = attention.topk(-(-n_img // 2), dim=-1).indices.sort(dim=-1).values
    handle = visattn.apply(model, "prune", keep=0.5, layers=[1])
    with torch.no_grad():
        model(x)
    origin = handle._calls.latest().origin
    visattn.remove(model)
    assert torch.equal(origin[:, npt:-1] - npt, expected) and (origin[:, -1] == -1).all()


def test_a_token_subset_attends_under_beit_bias_as_the_full_sequence_with_the_rest_masked() -> None:
    """The oracle for follow_bias: BEiT attention over some tokens, under the relative position bias of their
    origins, equals attention over all tokens with the others masked out as keys, at the kept rows."""
    model = _model("beit")
    block = model.blocks[1]
    x = torch.randn(2, model.patch_embed.num_patches + 1, 64)
    torch.manual_seed(2)
    origin = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(16)[:7].sort().values])
                          for _ in range(2)])
    keys = torch.zeros(2, 17).scatter_(1, origin, 1.0).log()[:, None, None, :]  # 0 where kept, -inf elsewhere

    def masked(call: dict) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(call["query"], call["key"], call["value"],
                                                                attn_mask=call["attn_mask"] + keys)

    with torch.no_grad():
        with SDPAIntercept(masked):
            full = block.attn(x)
        with adapter._biased_sdpa(block, SimpleNamespace(origin=origin, mask=lambda dtype: None), None):
            sub = block.attn(x.gather(1, origin[..., None].expand(-1, -1, 64)))
    torch.testing.assert_close(sub, full.gather(1, origin[..., None].expand(-1, -1, 64)), atol=1e-5, rtol=1e-4)


def test_beit_without_sdpa_is_refused_once_tokens_change() -> None:
    model = _model("beit")
    for _, m in adapter.attention_layers(model):
        m.fused_attn = False
    visattn.apply(model, "tome", r=2)
    try:
        with pytest.raises(UnsupportedModelError, match="BEiT attention computed without torch.nn.functional"):
            with torch.no_grad():
                model(_image(model))
    finally:
        visattn.remove(model)


def test_bra_refuses_a_relative_position_bias() -> None:
    model = _model("beit")
    with pytest.raises(UnsupportedModelError, match="bra works on timm.layers.Attention and the rotary attention of "
                                                    "EVA-style models; this Beit attends with timm.models.beit"):
        visattn.apply(model, "bra", n_win=1, topk=1)
    assert not visattn.applied(model)


def _naflex(class_token: bool = True) -> torch.nn.Module:
    """A NaFlexVit with a class token and seven registers (as RADIO's), or with neither."""
    torch.manual_seed(0)
    return timm.create_model("naflexvit_base_patch16_gap", pretrained=False, num_classes=0, depth=3, embed_dim=64,
                             num_heads=2, class_token=class_token, reg_tokens=7 if class_token else 0).eval()


@pytest.mark.parametrize("method, identity, options, counts", [
    ("tome", dict(r=0), dict(r=4), [8 + 24, 8 + 20, 8 + 16]),
    ("prune", dict(keep=1.0), dict(keep=0.5, layers=[1]), [8 + 24, 8 + 24, 8 + 12 + 1]),
])
def test_tome_and_prune_on_naflexvit_image_batches(method: str, identity: dict, options: dict,
                                                   counts: list[int]) -> None:
    """NaFlexVit (a class token and seven registers) called with an image batch of any size: identity
    bit-exact, tokens merged or pruned as on a ViT, remove() exact; its patch dictionaries are refused."""
    model = _naflex()
    x = torch.randn(2, 3, 64, 96)  # a 4 x 6 grid
    stock, out, handle = _identity_then_run(model, x, method, identity, options)
    assert handle.token_counts == counts and out.shape == stock.shape and not torch.equal(out, stock)
    patches = {"patches": torch.randn(2, 24, 16 * 16 * 3), "patch_coord": torch.zeros(2, 24, 2, dtype=torch.long),
               "patch_valid": torch.ones(2, 24, dtype=torch.bool)}
    with pytest.raises(ShapeError, match="NaFlexVit's patch dictionaries .* are not supported; call the model with "
                                         "an image batch"):
        model(patches)
    visattn.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x), stock)


def test_prune_refuses_a_naflexvit_without_class_token() -> None:
    with pytest.raises(UnsupportedModelError, match="has no class token"):
        visattn.apply(_naflex(class_token=False), "prune")


def test_bra_on_naflexvit_routes_the_grid_of_each_image_batch() -> None:
    from test_bra import _expected_mask

    from visattn.core import attention

    model = _naflex()
    x = torch.randn(2, 3, 64, 128)  # a 4 x 8 grid
    npt = model.num_prefix_tokens

    def masked(call: dict) -> torch.Tensor:
        q, k, v = call["query"], call["key"], call["value"]
        return attention(q, k, v, mask=_expected_mask(q, k, npt, (4, 8), 2, 2))

    with torch.no_grad(), SDPAIntercept(masked):
        expected = model(x)
    handle = visattn.apply(model, "bra", n_win=2, topk=2)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert handle.routes[0].shape == (2, 4, 2)
    with pytest.raises(ShapeError, match="does not divide the 3x8 patch grid"):
        model(torch.randn(1, 3, 48, 128))
    visattn.remove(model)
