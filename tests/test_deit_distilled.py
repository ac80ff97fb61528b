"""DeiT distilled (timm ``VisionTransformerDistilled``, the baseline of the ToMe and EViT papers): two prefix tokens,
class and distillation, which ``tome`` never merges and ``prune`` always keeps; identity settings are stock."""

from __future__ import annotations

import pytest
import timm
import torch

import visattn


@pytest.fixture(scope="module")
def deit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=64, depth=3, num_heads=4, num_classes=5).eval()


@pytest.mark.parametrize("method,identity,options,counts", [
    ("tome", dict(r=0), dict(r=3), [18, 15, 12]),
    ("prune", dict(keep=1.0), dict(keep=0.5, layers=(1,)), [18, 18, 11]),  # 2 prefix + 8 kept + 1 fused
])
def test_two_prefix_tokens_are_kept_and_identity_is_stock(deit, method, identity, options, counts):
    assert deit.num_prefix_tokens == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stock = deit(x)
        for opts in (identity, options):
            handle = visattn.apply(deit, method, **opts)
            try:
                out = deit(x)
            finally:
                visattn.remove(deit)
            if opts is identity:
                assert torch.equal(out, stock)
            else:
                assert not torch.equal(out, stock) and handle.token_counts == counts
                if method == "tome":
                    assert torch.equal(handle.size[:, :2], torch.ones(2, 2))  # class and distillation tokens alone
        assert torch.equal(deit(x), stock)
