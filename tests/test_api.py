"""The public surface: apply / remove / methods, the registry, options and the documented errors."""

import subprocess
import sys

import pytest
import timm
import torch

import visattn
from visattn import registry
from visattn.errors import (
    MethodConflictError,
    NotAppliedError,
    OptionError,
    UnknownMethodError,
    UnsupportedModelError,
    UnsupportedTargetError,
    VisattnError,
)
from visattn.options import choice_option, float_option, int_option, validate_options


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=3).eval()


def test_methods_lists_inspect_with_options():
    info = visattn.methods()["inspect"]
    assert set(info["frameworks"]) == {"timm", "open_clip", "diffusers", "transformers"}
    assert info["options"]["query_chunk"]["default"] == 1024 and info["paper"]
    tome, sparse = visattn.methods()["tome"]["options"], visattn.methods()["sparse_video"]["options"]
    assert tome["r"]["frameworks"] == ["timm", "open_clip"] and tome["ratio"]["frameworks"] == ["diffusers"]
    assert sparse["window"]["strategies"] == ["sliding_tile"] and "strategies" not in sparse["tile"]


def test_unknown_method_lists_known(vit):
    with pytest.raises(UnknownMethodError, match="known methods: .*inspect"):
        visattn.apply(vit, "no_such_method")


def test_unsupported_target_names_frameworks():
    with pytest.raises(UnsupportedTargetError, match="timm, open_clip, diffusers, transformers"):
        visattn.apply(torch.nn.Linear(2, 2), "inspect")


def test_unsupported_model_family():
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    with pytest.raises(UnsupportedModelError, match=r"has no attention layer visattn reads \(timm.layers.Attention, "):
        visattn.apply(cnn, "inspect")
    assert "_visattn_handles" not in cnn.__dict__


@pytest.mark.parametrize("opts,msg", [
    ({"layers": [9]}, r"layers \[9\] out of range; this model has 2"),
    ({"layers": "all"}, "layers must be None"),
    ({"query_chunk": 0}, r"query_chunk must be an int >= 1 \(got 0\)"),
    ({"per_head": 1}, "per_head must be True or False"),
    ({"colour": "red"}, "unknown option.*colour.*accepted: layers, per_head, query_chunk, to_cpu"),
])
def test_bad_options_raise_before_touching(vit, opts, msg):
    with pytest.raises(OptionError, match=msg) as err:
        visattn.apply(vit, "inspect", **opts)
    assert isinstance(err.value, (ValueError, VisattnError))
    assert visattn.applied(vit) == [] and all(not m._forward_hooks for m in vit.modules())


def test_second_method_conflicts_and_remove_twice(vit):
    handle = visattn.apply(vit, "inspect")
    with pytest.raises(MethodConflictError, match="cannot be applied on top of inspect"):
        visattn.apply(vit, "inspect")
    assert visattn.applied(vit) == [handle]
    visattn.remove(vit)
    with pytest.raises(NotAppliedError):
        visattn.remove(vit)
    handle.remove()  # a removed handle stays removed


def test_failed_install_is_rolled_back(vit):
    class Broken(registry.Method):
        name, paper, frameworks = "broken_for_test", "-", ("timm",)

        def install(self, target, patcher, options):
            patcher.set_attr(target.model, "marker", 1)
            raise RuntimeError("boom")

    registry.register(Broken)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            visattn.apply(vit, "broken_for_test")
        assert "marker" not in vit.__dict__ and visattn.applied(vit) == []
    finally:
        registry._REGISTRY.pop("broken_for_test")


def test_option_validators():
    opts = (int_option("r", 0, low=0), float_option("keep", 1.0, low=0, high=1, low_open=True),
            choice_option("strategy", "cls", ["cls", "fastv"]))
    assert validate_options("m", opts, {"keep": 1}) == {"r": 0, "keep": 1.0, "strategy": "cls"}
    with pytest.raises(OptionError, match=r"m: keep must be a number in \(0, 1\] \(got 0\)"):
        validate_options("m", opts, {"keep": 0})
    with pytest.raises(OptionError, match="r must be an int >= 0"):
        validate_options("m", opts, {"r": True})
    with pytest.raises(OptionError, match="strategy must be one of 'cls', 'fastv'"):
        validate_options("m", opts, {"strategy": "star"})
    with pytest.raises(OptionError, match="keep must be"):
        validate_options("m", opts, {"keep": float("nan")})
    with pytest.raises(OptionError, match=r"keep must be a number in \(0, 1\] \(got 1000.*\.\.\. \(401 characters\)\)"):
        validate_options("m", opts, {"keep": 10**400})  # too large for a float: an OptionError, not OverflowError


@pytest.mark.parametrize("method,options", [("tome", {"r": 2}), ("prune", {"keep": 0.5})])
def test_a_token_changing_method_on_itself_is_a_conflict_not_an_unsupported_model(vit, method, options):
    visattn.apply(vit, method, **options)
    try:
        for second in ("tome", "prune"):
            with pytest.raises(MethodConflictError, match=f"{second} cannot be applied on top of {method}"):
                visattn.apply(vit, second, **options if second == method else {})
    finally:
        visattn.remove(vit)


def test_imports_without_any_framework_installed():
    """A core install (torch, numpy, pillow) imports visattn and lists every method."""
    code = (
        "import sys, importlib.util\n"
        "blocked = ('timm', 'open_clip', 'diffusers', 'transformers')\n"
        "for name in blocked: sys.modules[name] = None\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] in blocked else find(n, *a)\n"
        "import visattn\n"
        "print(sorted(visattn.methods()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'sparse_video'" in out and "'tome'" in out and "'visual_sink'" in out


def test_composing_methods_stack_and_unwind_newest_first(vit):
    class First(registry.Method):
        name, paper, frameworks, composes_with = "first_for_test", "-", ("timm",), frozenset({"second_for_test"})

        def install(self, target, patcher, options):
            patcher.set_attr(target.model, "order", ["first"])
            return visattn.Handle(self.name, target.model, options, patcher)

    class Second(First):
        name, composes_with = "second_for_test", frozenset({"first_for_test"})

        def install(self, target, patcher, options):
            patcher.set_attr(target.model, "order", target.model.order + ["second"])
            return visattn.Handle(self.name, target.model, options, patcher)

    for cls in (First, Second):
        registry.register(cls)
    try:
        first = visattn.apply(vit, "first_for_test")
        visattn.apply(vit, "second_for_test")
        assert vit.order == ["first", "second"]
        with pytest.raises(MethodConflictError, match="remove the methods applied after it first"):
            first.remove()
        visattn.remove(vit)
        assert "order" not in vit.__dict__ and visattn.applied(vit) == []
    finally:
        for cls in (First, Second):
            registry._REGISTRY.pop(cls.name)


@pytest.mark.parametrize("method,options", [("inspect", {}), ("tome", {"r": 2}), ("bra", {"n_win": 2, "topk": 1})])
def test_a_patched_model_refuses_deepcopy_pickle_and_save_until_removed(vit, method, options):
    import copy
    import io
    import pickle

    from visattn import CopyError

    before = dict(vit.__dict__)
    visattn.apply(vit, method, **options)
    try:
        for attempt, what in [(lambda: copy.deepcopy(vit), "a copy would share"),
                              (lambda: copy.deepcopy(torch.nn.Sequential(vit)), "a copy would share"),
                              (lambda: pickle.dumps(vit), "cannot be pickled"),
                              (lambda: torch.save(vit, io.BytesIO()), "save model.state_dict")]:
            with pytest.raises(CopyError, match=what) as err:
                attempt()
            assert isinstance(err.value, VisattnError) and method in str(err.value)
        torch.save(vit.state_dict(), io.BytesIO())  # the state dict saves
    finally:
        visattn.remove(vit)
    assert vit.__dict__.keys() == before.keys()
    twin = copy.deepcopy(vit)
    pickle.loads(pickle.dumps(vit))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin(x), vit(x))


@pytest.mark.parametrize("method,options", [("inspect", {}), ("bra", {"n_win": 2, "topk": 1}), ("tome", {"r": 2}),
                                            ("prune", {"keep": 0.5})])
def test_a_meta_device_model_runs_patched(method, options):
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3).eval().to("meta")
    handle = visattn.apply(model, method, **options)
    try:
        assert model(torch.randn(2, 3, 32, 32, device="meta")).shape == (2, 3)
        if method == "inspect":
            assert handle.maps[0][0].is_meta and handle.maps[0][0].shape == (2, 17, 17)
    finally:
        visattn.remove(model)
