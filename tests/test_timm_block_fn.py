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


@pytest.mark.parametrize("name, flag, says", [
    ("vit_base_patch16_xp_224", "bra", r"ParallelScalingBlock blocks never build the attn_layer they are given"),
    ("vit_pwee_patch16_reg1_gap_256", "bra", r"ParallelScalingBlock blocks never build the attn_layer"),
    ("vit_dpwee_patch16_reg1_gap_256", "bra", r"DiffParallelScalingBlock blocks never build the attn_layer"),
    ("vit_dwee_patch16_reg1_gap_256", "bra", r"changes the model's parameter names \(\d+ of the stock model's "
                                             r"missing, e.g. blocks.0.attn.lambda_k1\): it replaces the stock "
                                             r"model's Block blocks with DiffAttention"),
    ("vit_base_patch16_xp_224", "tome", r"changes the model's parameter names .* replaces the stock model's "
                                        r"ParallelScalingBlock blocks"),
])
def test_a_flag_the_model_would_ignore_or_rename_is_refused(name, flag, says):
    """timm builds parallel-block ViTs without the attn_layer it is given, and lets attn_layer replace a model's own
    DiffAttention: create_model refuses visattn's flags there instead of a silent stock or renamed model."""
    value = dict(attn_layer="visattn_bra") if flag == "bra" else dict(block_fn=visattn.timm.tome_block(r=2))
    with pytest.raises(OptionError, match=says):
        timm.create_model(name, pretrained=False, depth=2, **value)
    timm.create_model(name, pretrained=False, depth=2)  # without the flag: timm's own function, unchanged


def test_flags_on_models_that_take_them_build_as_before():
    lepe = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2,
                             attn_layer=visattn.timm.bra(n_win=2, topk=1, lepe=True))
    assert any(".attn.lepe." in k for k in lepe.state_dict())
    naflex = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=2, attn_layer="visattn_bra")
    assert all(isinstance(b.attn, visattn.processors.bra.timm_layer()) for b in naflex.blocks)
