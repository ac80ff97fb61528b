"""torch.compile: the methods that add no graph break to a timm ViT keep it that way (dynamo's explain; the
stock model has none). tome's breaks are issue 17's."""

from __future__ import annotations

import pytest
import timm
import torch

import visattn


@pytest.mark.parametrize("method,options", [("inspect", {}), ("prune", {"keep": 0.5}),
                                            ("bra", {"n_win": 2, "topk": 1})])
def test_no_graph_break_beyond_stock(method: str, options: dict) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)

    def breaks() -> int:
        torch._dynamo.reset()
        return torch._dynamo.explain(model)(x).graph_break_count

    assert breaks() == 0
    handle = visattn.apply(model, method, **options)
    try:
        assert breaks() == 0
        if method == "bra":
            assert handle.routes == {}  # routes are recorded in eager forwards only
            with torch.no_grad():
                model(x)
            assert sorted(handle.routes) == [0, 1]
    finally:
        visattn.remove(model)
        torch._dynamo.reset()
