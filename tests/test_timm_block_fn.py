"""timm's ``block_fn=`` entry points for ``tome`` and ``prune``: the same outputs as ``visattn.apply`` with the same
options, timm's parameter names (a stock checkpoint loads strictly), forwards of any batch one after another, and
clear errors for options a block class cannot take."""

from __future__ import annotations

import pytest
import timm
import torch

import visattn
import visattn.timm
from visattn.errors import OptionError

CFG = dict(pretrained=False, num_classes=5, img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)


@pytest.mark.parametrize("variant", [{}, dict(qk_norm=True, init_values=1e-2, reg_tokens=2)], ids=["plain", "regs"])
@pytest.mark.parametrize("method,options,factory", [
    ("tome", dict(r=3), lambda prefix: visattn.timm.tome_block(r=3, num_prefix_tokens=prefix)),
    ("tome", dict(r=[4, 0, 2]), lambda prefix: visattn.timm.tome_block(r=[4, 0, 2], num_prefix_tokens=prefix)),
    ("prune", dict(keep=0.5, layers=(1, 2)),
     lambda prefix: visattn.timm.prune_block(keep=0.5, layers=(1, 2), num_prefix_tokens=prefix)),
], ids=["tome", "tome-list", "prune"])
def test_block_fn_equals_apply_and_loads_stock_weights(variant, method, options, factory):
    stock = timm.create_model("vit_small_patch16_224", **CFG, **variant).eval()
    block_fn = factory(stock.num_prefix_tokens)
    model = timm.create_model("vit_small_patch16_224", block_fn=block_fn, **CFG, **variant).eval()
    model.load_state_dict(stock.state_dict())  # strict: timm's names
    assert model.state_dict().keys() == stock.state_dict().keys()
    for batch in (2, 3, 2):  # forwards one after another start afresh
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            visattn.apply(stock, method, **options)
            try:
                want = stock(x)
            finally:
                visattn.remove(stock)
            got = model(x)
        assert torch.equal(got, want)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        changed = not torch.equal(model(x), stock(x))
    assert changed  # the method did something; the stock model (built without block_fn) is stock


def test_block_fn_identity_settings_are_stock():
    stock = timm.create_model("vit_small_patch16_224", **CFG).eval()
    x = torch.randn(2, 3, 32, 32)
    for block_fn in (visattn.timm.tome_block(r=0), visattn.timm.prune_block(keep=1.0, layers=(1,))):
        model = timm.create_model("vit_small_patch16_224", block_fn=block_fn, **CFG).eval()
        model.load_state_dict(stock.state_dict())
        with torch.no_grad():
            assert torch.equal(model(x), stock(x))


def test_block_fn_refuses_what_it_cannot_take():
    with pytest.raises(OptionError, match="needs the model's depth"):
        visattn.timm.tome_block(r=(8, -0.5))
    with pytest.raises(OptionError, match="r must be"):
        visattn.timm.tome_block(r=-1)
    with pytest.raises(OptionError, match="give layers"):
        visattn.timm.prune_block(keep=0.5, layers=None)
    with pytest.raises(OptionError, match="keep"):
        visattn.timm.prune_block(keep=0.0, layers=(1,))
    with pytest.raises(OptionError, match="num_prefix_tokens"):
        visattn.timm.tome_block(num_prefix_tokens=-1)
