"""diffusers entry points: ``model.set_attn_processor(P(model, **options))`` gives what ``visattn.apply`` gives with
the same options, for tome (both scopes), isolation, inspect and sparse_video on UNets and DiTs;
``model.set_attn_processor(p.stock_processors)`` gives stock outputs again, and ``p.detach()`` leaves no hook."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

import tiny_dits  # noqa: E402
from test_diffusers import BUILDERS, _run  # noqa: E402
from test_isolation import SUBJECTS  # noqa: E402
from test_tome_diffusers import FAMILIES as TOME_FAMILIES  # noqa: E402

import visattn  # noqa: E402
import visattn.diffusers as vd  # noqa: E402
from visattn.errors import CopyError, OptionError, UnsupportedModelError  # noqa: E402


def _model(family: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    builders = {**BUILDERS, **TOME_FAMILIES}
    model, inputs = builders[family]()[:2]
    return model.eval(), inputs


def _maps(handle: Any) -> dict[int, list[torch.Tensor]]:
    return {layer: list(maps) for layer, maps in handle.maps.items()}


CASES = [("tome", "unet", dict(ratio=0.5)), ("tome", "unet", dict(ratio=0.5, scope="block")),
         ("tome", "sdxl", dict(ratio=0.5, max_downsample=4)), ("tome", "pixart", dict(ratio=0.5)),
         ("tome", "sd3", dict(ratio=0.5, scope="block")), ("tome", "flux", dict(ratio=0.5)),
         ("tome", "flux", dict(ratio=0.5, scope="block")),
         ("isolation", "sdxl", SUBJECTS["sdxl"]), ("isolation", "flux", SUBJECTS["flux"]),
         ("inspect", "unet", dict(layers=[0, 2])), ("inspect", "flux", {}), ("inspect", "wan", dict(per_head=True)),
         ("sparse_video", "wan", dict(keep=0.5, tile=(1, 2, 2)))]
PROCESSORS = {"tome": vd.TomeAttnProcessor, "isolation": vd.IsolationAttnProcessor,
              "inspect": vd.InspectAttnProcessor, "sparse_video": vd.SparseVideoAttnProcessor}


@pytest.mark.parametrize("method,family,options", CASES, ids=[f"{m}-{f}-{i}" for i, (m, f, _) in enumerate(CASES)])
def test_processor_equals_apply_and_the_stock_processors_undo_it(method, family, options):
    model, inputs = _model(family)
    stock = _run(model, inputs)
    handle = visattn.apply(model, method, **options)
    applied = _run(model, inputs)
    recorded = _maps(handle) if method == "inspect" else getattr(handle, "token_counts", None)
    visattn.remove(model)
    if method != "inspect":
        assert not torch.equal(applied, stock)  # the method changed something

    processor = PROCESSORS[method](model, **options)
    model.set_attn_processor(processor)
    assert torch.equal(_run(model, inputs), applied)
    if method == "inspect":
        got = _maps(processor.handle)
        assert got.keys() == recorded.keys()
        assert all(len(got[k]) == len(recorded[k]) and all(map(torch.equal, got[k], recorded[k])) for k in got)
    elif method == "tome":
        assert processor.token_counts == recorded
    with pytest.raises(CopyError):
        copy.deepcopy(model)
    model.set_attn_processor(processor.stock_processors)
    assert torch.equal(_run(model, inputs), stock)  # the framework's own call undoes it
    processor.detach()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert torch.equal(_run(copy.deepcopy(model), inputs), stock)


def test_processors_check_their_options_and_model_first():
    model, _ = _model("unet")
    before = dict(model.attn_processors)
    with pytest.raises(OptionError, match="ratio"):
        vd.TomeAttnProcessor(model, ratio=1.5)
    with pytest.raises(OptionError, match="unknown option"):
        vd.TomeAttnProcessor(model, r=8)  # a timm option
    with pytest.raises(OptionError, match="target regions"):
        vd.IsolationAttnProcessor(model, target_regions=[(0, 0, 8, 8)])
    with pytest.raises(OptionError, match="layers"):
        vd.InspectAttnProcessor(model, layers=[99])
    sana = tiny_dits.BUILDERS["sana"]()[0]  # linear self-attention: nothing for tome to shorten
    with pytest.raises(UnsupportedModelError, match="tome does not support the diffusers model Sana"):
        vd.TomeAttnProcessor(sana)
    assert dict(model.attn_processors) == before
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in (*model.modules(), *sana.modules()))
    assert "__deepcopy__" not in model.__dict__ and "__deepcopy__" not in sana.__dict__
