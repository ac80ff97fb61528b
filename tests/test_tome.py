"""tome: r=0 reproduces stock bit for bit, merging counts and sources are right, identical patches
collapse without changing the output, sizes weight the average, and bad input is refused."""

import functools
import math
import re

import pytest
import timm
import torch
from interpreter import run_interpreted
from tiny_models import VIT_VARIANTS, tiny_clip, tiny_vit

import visattn
from visattn.core.merge import bipartite_soft_matching, log_size_bias, merge_wavg, parse_r
from visattn.errors import OptionError, UnsupportedModelError

_vit = functools.partial(tiny_vit, depth=4)
VITS = {kind: functools.partial(_vit, **cfg) for kind, cfg in VIT_VARIANTS.items()}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_restored(model, snapshot, x, ref):
    sd, classes = snapshot
    after = model.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], sd[k]) for k in sd)
    assert [type(m) for m in model.modules()] == classes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("kind", sorted(VITS))
def test_r0_reproduces_stock_and_remove_restores(kind):
    model = VITS[kind]()
    sizes = [(32, 32), (48, 40)] if kind == "dynamic_size" else [(32, 32)]
    snapshot = _snapshot(model)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref = model(x)
        handle = visattn.apply(model, "tome", r=0)
        with torch.no_grad():
            assert torch.equal(model(x), ref)
        assert handle.size is None and len(set(handle.token_counts)) == 1
        visattn.remove(model)
        _assert_restored(model, snapshot, x, ref)
        visattn.apply(model, "tome", r=3, trace_source=True)
        with torch.no_grad():
            assert model(x).shape == ref.shape
        visattn.remove(model)
        _assert_restored(model, snapshot, x, ref)


def test_open_clip_tower_r0_identity_merging_and_remove():
    clip = tiny_clip(layers=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, ref_tower = clip.encode_image(x), clip.visual(x)
    snapshot = _snapshot(clip.visual)
    visattn.apply(clip, "tome", r=0)
    with torch.no_grad():
        assert torch.equal(clip.encode_image(x), ref)
    visattn.remove(clip)
    handle = visattn.apply(clip, "tome", r=4, trace_source=True)
    with torch.no_grad():
        out = clip.encode_image(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert handle.token_counts == [17, 13, 9]
    assert handle.source.shape == (2, 5, 17) and torch.equal(handle.source.sum(1), torch.ones(2, 17, dtype=torch.long))
    visattn.remove(clip)
    _assert_restored(clip.visual, snapshot, x, ref_tower)
    with torch.no_grad():
        assert torch.equal(clip.encode_image(x), ref)


@pytest.mark.parametrize("kind", ["plain", "layerscale_qknorm_registers", "dynamic_size"])
def test_token_counts_sizes_and_sources(kind):
    model = VITS[kind]()
    prefix = model.num_prefix_tokens
    handle = visattn.apply(model, "tome", r=[5, 3, 100], trace_source=True)
    h, w = (48, 40) if kind == "dynamic_size" else (32, 32)
    n0 = prefix + (h // 8) * (w // 8)
    with torch.no_grad():
        model(torch.randn(3, 3, h, w))
    img = n0 - prefix
    expected = [n0, n0 - 5, n0 - 8]
    expected.append(expected[-1] - (expected[-1] - prefix) // 2)  # r=100 is clamped to half the image tokens
    assert handle.token_counts == expected
    source = handle.source
    assert source.shape == (3, expected[-1], n0)  # block 3 has r=0
    # every input token is held by exactly one final token; prefix tokens only by themselves
    assert torch.equal(source.sum(1), torch.ones(3, n0, dtype=torch.long))
    assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix, dtype=torch.bool).expand(3, -1, -1))
    # sizes count the patches each token holds
    assert torch.equal(handle.size, source.sum(-1).float())
    assert handle.size[:, prefix:].sum(-1).tolist() == [img] * 3


def test_identical_patches_collapse_and_output_is_unchanged():
    """Every patch the same and no position embedding: all image tokens stay identical in every
    block, so merging them (r large: halving each block) must not change the output, because
    proportional attention gives a token of size s the weight of s identical tokens."""
    model = _vit(init_values=1e-2, qk_norm=True, reg_tokens=2, depth=4)
    with torch.no_grad():
        model.pos_embed.zero_()
    x = torch.randn(2, 3, 1, 1).expand(2, 3, 32, 32).contiguous()
    with torch.no_grad():
        ref = model.forward_features(x)
        handle = visattn.apply(model, "tome", r=100, trace_source=True)
        out = model.forward_features(x)
    assert handle.token_counts == [19, 11, 7, 5]  # 3 prefix + 16 -> 8 -> 4 -> 2 -> 1 image tokens
    assert out.shape == (2, 4, 64)
    assert handle.size[:, 3:].tolist() == [[16.0], [16.0]]
    torch.testing.assert_close(out[:, :3], ref[:, :3], atol=1e-5, rtol=1e-5)  # class and registers
    torch.testing.assert_close(out[:, 3], ref[:, 3], atol=1e-5, rtol=1e-5)  # the one merged token
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(out), model.forward_head(ref), atol=1e-5, rtol=1e-5)
    visattn.remove(model)


def test_without_proportional_attention_identical_patches_change_the_class_token():
    model = _vit()
    with torch.no_grad():
        model.pos_embed.zero_()
        model.cls_token.normal_()
    x = torch.randn(1, 3, 1, 1).expand(1, 3, 32, 32).contiguous()
    with torch.no_grad():
        ref = model.forward_features(x)
        visattn.apply(model, "tome", r=[8], prop_attn=False)
        out = model.forward_features(x)
    assert not torch.allclose(out[:, 0], ref[:, 0], atol=1e-4)
    visattn.remove(model)


def test_size_weighted_average_by_hand():
    # prefix token 0; image tokens 1..4: A = {2, 4} (even positions), B = {1, 3}
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    size = torch.tensor([[1.0, 2.0, 3.0, 1.0, 1.0]])
    x = torch.tensor([[[9.0], [10.0], [20.0], [30.0], [40.0]]])
    merge, unmerge = bipartite_soft_matching(metric, 1, num_prefix=1, size=size)
    # token 2 is closest to token 1 (cos ~ 0.995): they merge; 4 stays (its best cos is 0)
    merged, new_size = merge_wavg(merge, x, size)
    assert new_size.tolist() == [[1.0, 5.0, 1.0, 1.0]]
    torch.testing.assert_close(merged, torch.tensor([[[9.0], [(2 * 10 + 3 * 20) / 5], [30.0], [40.0]]]))
    torch.testing.assert_close(unmerge(merged)[0, :, 0], torch.tensor([9.0, 16.0, 16.0, 30.0, 40.0]))
    torch.testing.assert_close(merge(x, "sum")[0, :, 0], torch.tensor([9.0, 30.0, 30.0, 40.0]))
    bias = log_size_bias(new_size, torch.float32)
    assert bias.shape == (1, 1, 1, 4) and bias.stride(0) % 16 == 0
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([0.0, math.log(5.0), 0.0, 0.0]))


def test_merge_gradient_is_the_transposed_weighted_average():
    """Several sources joining one destination: each token's gradient is s_i / s_G times its group's."""
    torch.manual_seed(0)
    metric = torch.randn(2, 21, 8)
    metric[:, 2::2] = metric[:, 1:2]  # every token of A is closest to token 1 of B: one large group
    size = torch.randint(1, 5, (2, 21)).float()
    merge, unmerge = bipartite_soft_matching(metric, 6, num_prefix=1, size=size)
    x = torch.randn(2, 21, 4, requires_grad=True)
    grad = torch.randn(2, 15, 4)
    (got,) = torch.autograd.grad(merge(x), x, grad)
    group_size = unmerge(merge.size[..., None])[..., 0]  # s_G of the group each input token joined
    torch.testing.assert_close(got, unmerge(grad) * (size / group_size)[..., None])
    assert (group_size > size).sum() > 6  # destinations shared by several sources were tested


def test_prefix_tokens_are_never_merged_and_r_is_clamped():
    metric = torch.ones(2, 9, 4)  # everything identical: the most tempting case
    merge, _ = bipartite_soft_matching(metric, 50, num_prefix=3)
    x = torch.arange(9.0)[None, :, None].expand(2, 9, 1)
    out = merge(x)
    assert out.shape == (2, 6, 1)  # 6 image tokens -> 3
    assert out[:, :3, 0].tolist() == [[0.0, 1.0, 2.0]] * 2
    merge, unmerge = bipartite_soft_matching(metric, 0)
    assert merge(x) is x and unmerge(x) is x


def test_parse_r_schedules():
    assert parse_r(4, 3) == [4, 4, 4]
    assert parse_r([1, 2], 4) == [1, 2, 0, 0]
    assert parse_r((4, -1.0), 3) == [8, 4, 0]
    assert parse_r((4, 1.0), 3) == [0, 4, 8]


def test_key_mask_padding_tokens_are_never_merged():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[1, 9:] = False  # sample 1: the last 8 tokens are padding
    mask = valid[:, None, None, :]
    handle = visattn.apply(model, "tome", r=[4], trace_source=True)
    with torch.no_grad():
        out = model.forward_features(x, attn_mask=mask)
    assert torch.isfinite(out).all() and handle.token_counts == [17, 13, 13, 13]
    groups = handle.source[1].long()
    for token in range(groups.shape[0]):
        members = groups[token].nonzero().flatten()
        assert valid[1, members].all() or not valid[1, members].any()  # padding stays apart
    visattn.remove(model)
    visattn.apply(model, "tome", r=2)
    with pytest.raises(ValueError, match="tome: only boolean key masks"), torch.no_grad():
        model.forward_features(x, attn_mask=torch.ones(17, 17, dtype=torch.bool))
    visattn.remove(model)


def kernel_cases() -> bool:
    """The Triton decision and merge against the PyTorch path (run in the interpreter, see below)."""
    import visattn.core.merge as cm
    from visattn.kernels import tome as kernels

    torch.manual_seed(0)
    for batch, n, prefix, r, sized in [(3, 17, 1, 4, 0), (2, 21, 4, 5, 1), (2, 16, 0, 8, 1), (1, 30, 3, 13, 0)]:
        metric, x = torch.randn(batch, n, 16), torch.randn(batch, n, 24)
        size = torch.randint(1, 5, (batch, n)).float() if sized else None
        ref = cm.decide(metric, r, prefix, size, None)
        kept, src, dst, new_size = kernels.match(metric, r, prefix, size)
        assert torch.equal(kept, ref.kept) and torch.equal(new_size, ref.size)
        assert torch.equal(src.sort(1).values, ref.src.sort(1).values)  # the same tokens merge, in another order
        assert kernels.unavailable_reason(metric, n - prefix) is None  # the dispatcher takes the kernels
        fused, _ = kernels.bipartite_soft_matching(metric, r, num_prefix=prefix, size=size, strict=True)
        eager, _ = cm.bipartite_soft_matching(metric, r, num_prefix=prefix, size=size)
        torch.testing.assert_close(fused(x), eager(x))
        x.requires_grad_()  # the fused average is differentiable: its gradient is the PyTorch path's
        grad = torch.randn(batch, n - r, 24)
        torch.testing.assert_close(torch.autograd.grad(fused(x), x, grad)[0], torch.autograd.grad(eager(x), x, grad)[0])
        # the residual sum fused into the merge: merge(x, add=y) is merge(x + y), with the same gradient for both
        y = torch.randn(batch, n, 24, requires_grad=True)
        torch.testing.assert_close(fused(x, "mean", y), eager(x + y))
        want = torch.autograd.grad(eager(x + y), (x, y), grad)
        for got, w in zip(torch.autograd.grad(fused(x, "mean", y), (x, y), grad), want):
            torch.testing.assert_close(got, w)
        assert not torch.equal(fused(x, "mean", y), fused(x))  # the branch is read
    # keys [B, H, N, D] strided as timm's qkv view: the match kernel averages the heads as it reads them
    qkv = torch.randn(2, 21, 3, 4, 16).permute(2, 0, 3, 1, 4)
    keys, x = qkv[1], torch.randn(2, 21, 24)
    ref = cm.decide(keys.mean(1), 5, 1, None, None)
    kept, src, _, new_size = kernels.match(keys, 5, 1, None)
    assert torch.equal(kept, ref.kept) and torch.equal(new_size, ref.size)
    assert torch.equal(src.sort(1).values, ref.src.sort(1).values)
    assert not torch.equal(kept, kernels.match(keys[:, :1], 5, 1, None)[0])  # every head is read
    fused, _ = kernels.bipartite_soft_matching(keys, 5, num_prefix=1, strict=True)
    torch.testing.assert_close(fused(x), cm.bipartite_soft_matching(keys.mean(1), 5, num_prefix=1)[0](x))
    # a ViT merging through the kernels compiles whole (the kernels are custom ops) and equals its eager forward
    model, images = _vit(), torch.randn(2, 3, 32, 32)
    visattn.apply(model, "tome", r=2, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(images), model(images))
    return True


def test_merge_kernel_fallback_is_logged_once_and_strict_refuses_it(caplog: pytest.LogCaptureFixture) -> None:
    from visattn import _logging
    from visattn.errors import KernelUnavailableError
    from visattn.kernels import tome as kernels

    metric, x = torch.randn(2, 17, 16), torch.randn(2, 17, 8)
    reason = kernels.unavailable_reason(metric, 16)
    if reason is None:
        pytest.skip("the merge kernels run here (CUDA or TRITON_INTERPRET=1)")
    with pytest.raises(KernelUnavailableError, match="strict=True forbids the fallback"):
        kernels.bipartite_soft_matching(metric, 4, num_prefix=1, strict=True)
    _logging._seen.discard(f"tome:{reason}")
    with caplog.at_level("WARNING", logger="visattn"):
        for _ in range(2):
            merge, _ = kernels.bipartite_soft_matching(metric, 4, num_prefix=1)
    assert [r.message for r in caplog.records].count(
        f"visattn tome merge kernels: {reason}; merging through PyTorch; falling back (logged once; pass "
        f"strict=True to make this an error)") == 1
    torch.testing.assert_close(merge(x), bipartite_soft_matching(metric, 4, num_prefix=1)[0](x))
    keys = torch.randn(2, 3, 17, 16)  # keys [B, H, N, D]: the fallback averages them over heads first
    torch.testing.assert_close(kernels.bipartite_soft_matching(keys, 4, num_prefix=1)[0](x),
                               bipartite_soft_matching(keys.mean(1), 4, num_prefix=1)[0](x))
    model = _vit()
    visattn.apply(model, "tome", r=2, strict=True)
    try:
        with pytest.raises(KernelUnavailableError), torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        visattn.remove(model)


def test_triton_kernels_match_the_pytorch_path():
    """The Triton decision and merge, run in Triton's interpreter, equal the PyTorch path (the merge's gradient
    too), and a ViT merging through them compiles without a graph break."""
    pytest.importorskip("triton")
    assert run_interpreted(__file__, "kernel_cases") is True


def test_options_and_models_refused():
    model = _vit()
    for bad in (-1, 2.5, True, (3, 2.0), [1, -1]):
        with pytest.raises(OptionError, match=rf"^tome: r must be an int >= 0, .* \(got {re.escape(repr(bad))}\)$"):
            visattn.apply(model, "tome", r=bad)
    with pytest.raises(OptionError, match="r lists 5 layers but this VisionTransformer has 4 blocks"):
        visattn.apply(model, "tome", r=[1] * 5)
    with pytest.raises(OptionError, match="ratio is an option for diffusers models, not timm models"):
        visattn.apply(model, "tome", ratio=0.5)
    for convnet in (timm.create_model("resnet18", pretrained=False, num_classes=2),
                    timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2,
                                      embed_dim=24, depths=(1, 1), num_heads=(1, 1), num_classes=2)):
        with pytest.raises(UnsupportedModelError, match="tome does not support the timm model"):
            visattn.apply(convnet, "tome", r=2)
    assert visattn.applied(model) == []
