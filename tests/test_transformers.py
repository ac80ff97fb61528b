"""transformers vision-language models: inspect through AttentionInterface, exactly and reversibly.

Tiny random-weight LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL models, each built once per module in
"sdpa" and "eager" (same weights), fed a batch of two left-padded prompts of different lengths with
image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tiny_vlms import BUILDERS, CLIP, IMAGE, PAD, TEXT, build, forward_logits, generate, llava, prompts, vlm_inputs

import visattn
from visattn.frameworks import transformers as tfa
from visattn.patching import Patcher


@dataclass
class Case:
    family: str
    models: dict[str, torch.nn.Module]  # "sdpa" and "eager", same weights
    inputs: dict[str, torch.Tensor]


#: Per vision layer, the maps of one forward: one call per batch of crops (LLaVA: [CLS] + 2x2 patches;
#: LLaVA-NeXT and -OneVision: 2 + 3 crops), per image (Qwen2-VL's SDPA path splits at cu_seqlens) or per window
#: (Qwen2.5-VL).
VISION_MAPS = {
    "llava": [[(2, 5, 5)]] * 2,
    "llava_next": [[(5, 5, 5)]] * 2,
    "llava_onevision": [[(5, 4, 4)]] * 2,  # SigLIP: no [CLS], 2x2 patches per crop
    "paligemma": [[(2, 4, 4)]] * 2,  # SigLIP, one 28px image per sample
    "idefics3": [[(2, 4, 4)]] * 2,
    "internvl": [[(2, 5, 5)]] * 2,  # InternViT keeps a [CLS] token
    "qwen2_vl": [[(1, 16, 16)] * 2] * 2,
    "qwen2_5_vl": [[(1, 4, 4)] * 8, [(1, 16, 16)] * 2],  # layer 0 windowed, layer 1 full attention
    "qwen3_vl": [[(1, 16, 16)] * 2] * 2,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request: pytest.FixtureRequest) -> Case:
    models = {impl: build(request.param, impl) for impl in ("sdpa", "eager")}
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    return Case(request.param, models, vlm_inputs(request.param, models["sdpa"]))


def _generate(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=4, do_sample=False)


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every config object of the model: the top one, its sub-configs (recursively), its modules'."""
    found, todo = {}, [model.config] + [m.config for m in model.modules() if hasattr(m, "config")]
    while todo:
        config = todo.pop()
        if id(config) not in found:
            found[id(config)] = config
            todo += [getattr(config, key) for key in config.sub_configs if getattr(config, key, None) is not None]
    return list(found.values())


def _implementations(model: torch.nn.Module) -> list[Any]:
    return [c.__dict__.get("_attn_implementation_internal") for c in _configs(model)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_inspect_leaves_logits_bit_identical_and_remove_restores_everything(case: Case, impl: str) -> None:
    model = case.models[impl]
    stock = forward_logits(model, case.inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    implementations = _implementations(model)
    llm = tfa.language_layers(model)
    handle = visattn.apply(model, "inspect", layers=[0, llm[-1]])
    assert torch.equal(forward_logits(model, case.inputs), stock)
    assert handle.maps[0] and handle.maps[llm[-1]]
    visattn.remove(model)
    assert _implementations(model) == implementations
    assert not any(tfa.ROUTES_ATTR in m.__dict__ for m in model.modules())
    assert torch.equal(forward_logits(model, case.inputs), stock)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_maps_have_the_right_shape_and_attended_rows_sum_to_one(case: Case) -> None:
    model, ids = case.models["sdpa"], case.inputs["input_ids"]
    names = [n for n, _ in tfa.attention_layers(model)]
    llm = tfa.language_layers(model)
    assert llm == [2, 3] and len(names) == 4  # the 2 vision-tower layers first, then the 2 decoder layers
    handle = visattn.apply(model, "inspect")
    try:
        forward_logits(model, case.inputs)
    finally:
        visattn.remove(model)
    shapes = {i: [tuple(m.shape) for m in maps] for i, maps in handle.maps.items()}
    n = ids.shape[1]
    assert shapes == {0: VISION_MAPS[case.family][0], 1: VISION_MAPS[case.family][1], 2: [(2, n, n)], 3: [(2, n, n)]}
    real = case.inputs["attention_mask"].bool()
    for layer, maps in handle.maps.items():
        for m in maps:
            sums = m.sum(-1)[real] if layer in llm else m.sum(-1)  # left-padding rows attend to nothing
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


def test_llm_map_matches_eager_output_attentions(case: Case) -> None:
    """The recorded map equals transformers' own eager attention weights: q, k, rotary (M-RoPE) and
    the padding mask reach the observer as the stock attention uses them."""
    model = case.models["sdpa"]
    llm = tfa.language_layers(model)
    handle = visattn.apply(model, "inspect", layers=llm)
    try:
        forward_logits(model, case.inputs)
    finally:
        visattn.remove(model)
    with torch.no_grad():
        reference = case.models["eager"](**case.inputs, output_attentions=True).attentions
    real = case.inputs["attention_mask"].bool()
    for i, layer in enumerate(llm):
        expected = reference[i].float().mean(dim=1)
        torch.testing.assert_close(handle.last(layer)[real], expected[real], atol=1e-5, rtol=0)


def test_vision_map_matches_clip_eager_attentions() -> None:
    sdpa, eager = llava("sdpa").eval(), llava("eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    pixels = torch.randn(2, 3, 28, 28)
    handle = visattn.apply(sdpa, "inspect", layers=[0, 1])
    try:
        with torch.no_grad():
            sdpa.model.vision_tower(pixels)
    finally:
        visattn.remove(sdpa)
    with torch.no_grad():
        reference = eager.model.vision_tower(pixels, output_attentions=True).attentions
    for layer in (0, 1):
        torch.testing.assert_close(handle.last(layer), reference[layer].float().mean(dim=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_with_cache_is_unchanged(case: Case, impl: str) -> None:
    model = case.models[impl]
    stock = _generate(model, case.inputs)
    llm = tfa.language_layers(model)
    handle = visattn.apply(model, "inspect", layers=llm[0])
    try:
        tokens = _generate(model, case.inputs)
    finally:
        visattn.remove(model)
    assert torch.equal(tokens, stock)
    n = case.inputs["input_ids"].shape[1]
    assert [tuple(m.shape) for m in handle.maps[llm[0]]] == [(2, n, n)] + [(2, 1, n + t) for t in range(1, 4)]


def test_image_token_spans_on_a_left_padded_batch(case: Case) -> None:
    model, ids, mask = case.models["sdpa"], case.inputs["input_ids"], case.inputs["attention_mask"]
    layout = tfa.image_token_spans(model, ids, mask)
    assert layout.num_tokens == ids.shape[1] and len(layout.image) == 2
    for b, spans in enumerate(layout.image):
        (start, end), = spans
        assert (ids[b, start:end] == IMAGE).all() and (ids[b, :start] != IMAGE).all() and (ids[b, end:] != IMAGE).all()
    assert layout.image[0][0][0] != layout.image[1][0][0]  # different prompt lengths: different offsets


def test_image_token_spans_finds_every_run_and_ignores_padding() -> None:
    model = SimpleNamespace(config=SimpleNamespace(image_token_id=IMAGE))
    ids = torch.tensor([[IMAGE, PAD, 5, IMAGE, IMAGE, 6, IMAGE],
                        [PAD, PAD, PAD, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
    assert tfa.image_token_spans(model, ids, mask).image == (((3, 5), (6, 7)), ())
    assert tfa.image_token_spans(model, ids).image == (((0, 1), (3, 5), (6, 7)), ())
    with pytest.raises(visattn.ShapeError, match="batch, tokens"):
        tfa.image_token_spans(model, ids[0])


def test_bad_inputs_raise_documented_errors(case: Case) -> None:
    model = case.models["sdpa"]
    count = len(tfa.attention_layers(model))
    with pytest.raises(visattn.OptionError, match=rf"out of range.*0\.\.{count - 1}"):
        visattn.apply(model, "inspect", layers=[count])
    with pytest.raises(visattn.OptionError, match="unknown option"):
        visattn.apply(model, "inspect", layer=0)
    visattn.apply(model, "inspect", layers=0)
    try:
        with pytest.raises(visattn.MethodConflictError):
            visattn.apply(model, "inspect", layers=1)
    finally:
        visattn.remove(model)
    assert not visattn.applied(model)


def test_unsupported_attention_implementation_is_refused_untouched() -> None:
    model = llava("sdpa").eval()
    text = model.config.text_config
    object.__setattr__(text, "_attn_implementation_internal", "flash_attention_2")
    before = _implementations(model)
    with pytest.raises(visattn.UnsupportedModelError, match="attn_implementation=\"sdpa\""):
        visattn.apply(model, "inspect", layers=tfa.language_layers(model))
    assert _implementations(model) == before and not visattn.applied(model)


def test_model_without_attention_interface_layers_is_unsupported() -> None:
    from transformers import ResNetConfig, ResNetModel

    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    with pytest.raises(visattn.UnsupportedModelError, match="supported: LLaVA \\(1.5, NeXT, OneVision\\), PaliGemma"):
        visattn.apply(model, "inspect")


def test_set_attn_implementation_to_a_visattn_name_calls_straight_through() -> None:
    model = llava("sdpa").eval()
    ids, mask = prompts([4, 4])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 28, 28))
    stock = forward_logits(model, batch)
    model.set_attn_implementation("visattn_sdpa")
    assert model.config.text_config._attn_implementation == "visattn_sdpa"
    assert torch.equal(forward_logits(model, batch), stock)
    handle = visattn.apply(model, "inspect", layers=tfa.language_layers(model))
    forward_logits(model, batch)
    visattn.remove(model)
    assert model.config.text_config._attn_implementation == "visattn_sdpa"  # left as the user set it
    assert len(handle.maps[tfa.language_layers(model)[0]]) == 1


def test_decoder_layers_and_on_call_read_every_generate_step(case: Case) -> None:
    model = case.models["sdpa"]
    layers = tfa.decoder_layers(model)
    assert len(layers) == TEXT["num_hidden_layers"]
    patcher = Patcher()
    calls: list[tuple[tfa.ModelCall, int]] = []
    tfa.on_call(model, patcher, lambda call: calls.append((call, tfa.held_tokens(call.cache))))
    try:
        _generate(model, case.inputs)
    finally:
        patcher.undo()
    assert len(calls) == 4  # prefill and 3 cached decode steps for 4 new tokens
    prompt = case.inputs["input_ids"].shape[1]
    assert calls[0][0].images and calls[0][1] == 0
    assert calls[0][0].input_ids.shape == (2, prompt)
    for step, (call, held) in enumerate(calls[1:], 1):
        assert not call.images
        assert held == prompt + step - 1  # the cache is read under either name
        assert call.input_ids.shape == (2, 1)
        assert call.attention_mask.shape == (2, prompt + step)
    assert not model._forward_pre_hooks


def test_read_call_takes_the_cache_under_either_name_and_refuses_what_is_not_a_cache() -> None:
    model = llava("sdpa").eval()
    ids, mask = prompts([4, 4])
    with torch.no_grad():
        cache = tfa.output_cache(model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 28, 28),
                                       use_cache=True))
    for name in tfa.CACHE_ARGUMENTS:
        call = tfa.read_call(model, (ids[:, :1],), {"attention_mask": mask, name: cache})
        assert call.cache is cache and tfa.held_tokens(call.cache) == ids.shape[1]
        assert call.keywords(cache=None)[name] is None
    assert tfa.read_call(model, (ids,), {}).keywords(cache=None)["cache"] is None
    with pytest.raises(visattn.UnsupportedModelError, match=r"transformers \d.*expected a transformers Cache"):
        tfa.read_call(model, (ids,), {"past_key_values": ((torch.zeros(1),),)})
    with pytest.raises(visattn.UnsupportedModelError, match=r"transformers \d"):
        tfa.read_call(model, (ids,), {"input_ids": ids})


def test_a_model_whose_forward_takes_no_input_ids_is_refused_before_patching() -> None:
    class Odd(torch.nn.Module):
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return pixels

    with pytest.raises(visattn.UnsupportedModelError, match="input_ids, attention_mask, cache or past_key_values"):
        tfa.check_calling_convention(Odd())


def test_set_attn_implementation_entry_points() -> None:
    """``visattn_sdpa`` is stock attention until visattn.apply routes it; ``visattn_visual_sink`` and
    ``visattn_head_modulation`` are accepted by transformers and refuse at the first forward, naming visattn.apply."""
    import visattn.transformers  # noqa: F401  (registers the names; import visattn does when transformers is loaded)

    model = build("llava", "sdpa")
    batch = vlm_inputs("llava", model)
    stock = forward_logits(model, batch)
    model.set_attn_implementation("visattn_sdpa")
    assert torch.equal(forward_logits(model, batch), stock)
    for method in ("visual_sink", "head_modulation"):
        model.set_attn_implementation(f"visattn_{method}")
        with pytest.raises(visattn.UnsupportedModelError, match=rf"visattn.apply\(model, '{method}'"):
            forward_logits(model, batch)
    model.set_attn_implementation("sdpa")
    assert torch.equal(forward_logits(model, batch), stock)


@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers compiles flex attention on first use, which Inductor's CPU backend fails to build here (torch
    2.14: a C++ compile error); the tests run flex attention's eager implementation (same math, same masks)."""
    import transformers.integrations.flex_attention as fa
    from torch.nn.attention.flex_attention import flex_attention

    wrapped = fa.WrappedFlexAttention(False)
    monkeypatch.setattr(wrapped, "_compiled_flex_attention", flex_attention)


FLEX_CASES = [("inspect", {}, None), ("visual_sink", dict(p=1.0), dict(tau=1.0, rho=1.0, summ=0.0)),
              ("head_modulation", dict(alpha=0.0, decoder_layers=[0, 1]), dict(alpha=0.5, decoder_layers=[0, 1])),
              ("prune", dict(strategy="cls", keep=1.0), dict(strategy="cls", keep=0.5))]


def _flex_against_sdpa(model: torch.nn.Module, sdpa: torch.nn.Module, batch: dict[str, torch.Tensor], method: str,
                       identity: dict, options: dict | None, tokens: bool) -> list[tuple[Any, ...]]:
    """``method`` at ``identity`` on the flex ``model``: logits and generate() bit-exact; then at ``options`` on
    ``model`` and on ``sdpa``: their logits (and generated tokens, with ``tokens``), for the caller to compare."""
    stock, generated = forward_logits(model, batch), generate(model, batch)
    visattn.apply(model, method, **identity)
    try:
        assert torch.equal(forward_logits(model, batch), stock) and torch.equal(generate(model, batch), generated)
    finally:
        visattn.remove(model)
    outputs = []
    for m in (model, sdpa) if options is not None else ():
        visattn.apply(m, method, **options)
        try:
            outputs.append((forward_logits(m, batch), *((generate(m, batch),) if tokens else ())))
        finally:
            visattn.remove(m)
    return outputs


@pytest.mark.parametrize("family", ["llava", "idefics3"])
@pytest.mark.parametrize("method,identity,options", FLEX_CASES, ids=[c[0] for c in FLEX_CASES])
def test_flex_attention_models(eager_flex: None, family: str, method: str, identity: dict,
                               options: dict | None) -> None:
    """Loaded with flex attention: identity bit-exact in forward and generate(), the method's output that of the same
    model loaded with sdpa (flex attention's BlockMask read as the dense mask it stands for), remove() exact."""
    if method == "prune" and family != "llava":
        pytest.skip("prune's cls strategy needs a vision [CLS] token (LLaVA)")
    model, sdpa = build(family, "flex_attention"), build(family, "sdpa")
    batch = vlm_inputs(family, model)
    implementations = _implementations(model)
    stock = forward_logits(model, batch)
    outputs = _flex_against_sdpa(model, sdpa, batch, method, identity, options, tokens=True)
    if outputs:
        torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-6, rtol=0)
        assert torch.equal(outputs[0][1], outputs[1][1])
    assert _implementations(model) == implementations and torch.equal(forward_logits(model, batch), stock)


def test_prune_inside_the_language_model_refuses_flex_attention(eager_flex: None) -> None:
    model = build("llava", "flex_attention")
    for strategy in ("fastv", "transprune", "plphp", "star"):
        with pytest.raises(visattn.UnsupportedModelError, match=f"strategy '{strategy}' drops tokens inside the "
                                                                f"language model.*flex attention passes a BlockMask"):
            visattn.apply(model, "prune", strategy=strategy, layer=1)
    assert not visattn.applied(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (transformers compiles flex attention)")
@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_compiled_flex_and_flash_attention_on_the_gpu(implementation: str) -> None:
    """On the GPU transformers runs flex attention compiled: the methods still give what the sdpa model gives.
    flash_attention_2 where flash-attn is installed: refused at apply, untouched."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if implementation == "flash_attention_2":
        pytest.importorskip("flash_attn")
    # compiled flex attention needs heads of at least 16 dimensions: a wider tiny LLaVA (16 per head everywhere)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), image_token_id=IMAGE, pad_token_id=PAD,
                         text_config=LlamaConfig(**{**TEXT, "hidden_size": 64, "intermediate_size": 128}))

    def make(impl: str) -> torch.nn.Module:
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=impl).eval().cuda()
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, None
        return model

    model, sdpa = make(implementation), make("sdpa")
    batch = {k: v.cuda() for k, v in vlm_inputs("llava", model).items()}
    if implementation == "flash_attention_2":
        with pytest.raises(visattn.UnsupportedModelError, match="attn_implementation=\"sdpa\""):
            visattn.apply(model, "inspect")
        assert not visattn.applied(model)
        return
    for method, identity, options in FLEX_CASES:
        outputs = _flex_against_sdpa(model, sdpa, batch, method, identity, options, tokens=False)
        if outputs:
            torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-4, rtol=1e-4)
