"""head_modulation (pai, vhr, imbalance, avisc): alpha=0 bit-identical, PAI exact against a dense reference, VHR's
divergence against an image-ablated reference, AvisC's blind tokens and contrast against stock forwards,
generate() with the KV cache, errors. Tiny LLaVA, LLaVA-NeXT, Qwen2-VL and
Qwen2.5-VL models (tests/tiny_vlms.py) with a left-padded batch of two prompts of different lengths."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_vlms import (
    BUILDERS,
    IMAGE,
    TEXT,
    assert_identity,
    build,
    causal_prompt,
    forward_logits,
    generate,
    vlm_inputs,
)

import visattn
from visattn.core.attention import attention_logits
from visattn.core.redistribute import amplify_logits
from visattn.frameworks import transformers as tfa
from visattn.patching import Patcher

ALPHA = 0.5


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = build(request.param, "sdpa")
    return model, vlm_inputs(request.param, model)


def _route_llm(model: torch.nn.Module, layers: list[int], fn: Any) -> Patcher:
    """Replace the attention of LLM ``layers`` by ``fn(idx, implementation, module, q, k, v, mask, scaling)``."""
    patcher = Patcher()

    def make_route(idx: int, module: torch.nn.Module, implementation: str) -> tfa.Route:
        def route(call: Any, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
            mask = tfa.stock_mask(implementation, module, q, k, attention_mask, kwargs.get("is_causal"))
            return fn(idx, call, module, q, k, v, attention_mask, mask, kwargs), None

        return route

    tfa.route_attention(model, patcher, layers, make_route)
    return patcher


@pytest.mark.parametrize("strategy", ["pai", "vhr", "avisc"])
def test_alpha_0_reproduces_stock_logits_andgenerate(case: tuple[torch.nn.Module, dict[str, torch.Tensor]],
                                                      strategy: str) -> None:
    model, inputs = case
    assert_identity(model, inputs, "head_modulation", strategy=strategy, alpha=0.0, decoder_layers=[0, 1])


def test_pai_matches_the_dense_reference_and_leaves_earlier_rows_bit_identical(
        case: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    model, inputs = case
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    image = ((ids == IMAGE) & real).float()[:, None, None, :]
    stock = forward_logits(model, inputs)
    visattn.apply(model, "head_modulation", strategy="pai", alpha=ALPHA, decoder_layers=[0, 1])
    try:
        logits = forward_logits(model, inputs)
    finally:
        visattn.remove(model)

    def dense(idx: int, call: Any, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Any,
              mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
        logits = attention_logits(q, k, scale=kwargs["scaling"])
        logits[..., -1:, :] = amplify_logits(logits[..., -1:, :], ALPHA * image)  # the generating row only
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(-1).nan_to_num(0.0)
        return (probs @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)).transpose(1, 2).to(q.dtype)

    reference = _route_llm(model, tfa.language_layers(model), dense)
    try:
        expected = forward_logits(model, inputs)
    finally:
        reference.undo()
    if causal_prompt(model):
        assert torch.equal(logits[:, :-1], stock[:, :-1])
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    assert (logits[:, -1] - stock[:, -1]).abs().max() > 1e-5  # ten times the tolerance above


def test_pai_generate_with_cache_matches_full_forwards(case: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    model, inputs = case
    stock = generate(model, inputs)
    visattn.apply(model, "head_modulation", strategy="pai", alpha=ALPHA, decoder_layers=[0, 1])
    try:
        cached = generate(model, inputs)
        full = generate(model, inputs, use_cache=False)
    finally:
        visattn.remove(model)
    assert cached.shape == stock.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("strategy", ["pai", "vhr", "imbalance", "avisc"])
def test_a_static_cache_generates_as_the_dynamic_one(case: tuple[torch.nn.Module, dict[str, torch.Tensor]],
                                                    strategy: str) -> None:
    """With ``cache_implementation="static"`` generate() hands the model a 4-D mask over the cache's capacity and
    the layers keys of that length: the image columns follow, and the tokens are those of the default cache."""
    model, inputs = case
    if strategy == "imbalance" and not isinstance(model, BUILDERS["llava"]("sdpa").__class__):
        pytest.skip("imbalance: LLaVA only")
    options = dict(decoder_layers=[0, 1]) if strategy == "pai" else dict(lamb=0.0) if strategy == "avisc" else {}
    def run(**kwargs: Any) -> Any:
        return generate(model, inputs, output_logits=True, return_dict_in_generate=True, **kwargs)

    stock = run()
    visattn.apply(model, "head_modulation", strategy=strategy, alpha=ALPHA, **options)
    try:
        dynamic, static = run(), run(cache_implementation="static")
    finally:
        visattn.remove(model)
    assert torch.equal(static.sequences, dynamic.sequences)
    for ours, theirs in zip(static.logits, dynamic.logits):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert max((a - b).nan_to_num(0.0, 0.0, 0.0).abs().max() for a, b in zip(dynamic.logits, stock.logits)) > 1e-5


def test_a_static_cache_keeps_one_image_column_tensor_for_the_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers compiles static-cache decoding with CUDA graphs, where a tensor that one replay made is
    overwritten by the next: the image columns must be the prefill's tensor, written in place, in every step (and a
    new one in each generation)."""
    from visattn.processors._lvlm import ImageKeys

    seen: list[torch.Tensor] = []  # kept alive, so that no address is reused
    start = ImageKeys._start

    def spy(self: ImageKeys, call: Any) -> None:
        start(self, call)
        seen.append(self.columns)

    monkeypatch.setattr(ImageKeys, "_start", spy)
    model = build("llava", "sdpa")
    padded = vlm_inputs("llava", model)
    unpadded = {name: value[1:, 1:] if value.dim() == 2 else value[1:] for name, value in padded.items()}
    # (the longer prompt without its padding token): transformers passes no
    assert unpadded["attention_mask"].all()  # mask in a static cache's prefill, only in its decode steps
    visattn.apply(model, "head_modulation", strategy="pai", alpha=ALPHA, decoder_layers=[0, 1])
    try:
        for inputs in (padded, unpadded):
            seen.clear()
            generate(model, inputs, cache_implementation="static")
            static = list(seen)
            assert len(static) == 5 and all(t is static[0] for t in static)  # the prefill, four decode steps: one
        seen.clear()
        generate(model, padded)
    finally:
        visattn.remove(model)
    assert len({t.data_ptr() for t in seen}) == 5  # the default cache grows: a new tensor each step


def test_pai_on_an_unpadded_prompt_takes_the_causal_path_and_generates_consistently() -> None:
    """No padding: transformers passes no mask (SDPA's is_causal) in prefill and decode."""
    model = build("llava", "sdpa")
    batch = vlm_inputs("llava", model)
    inputs = dict(input_ids=batch["input_ids"][1:, 1:], attention_mask=batch["attention_mask"][1:, 1:],
                  pixel_values=batch["pixel_values"][1:])
    assert bool(inputs["attention_mask"].all())
    stock = forward_logits(model, inputs)
    visattn.apply(model, "head_modulation", strategy="pai", alpha=ALPHA, decoder_layers=[0, 1])
    try:
        logits = forward_logits(model, inputs)
        cached, full = generate(model, inputs), generate(model, inputs, use_cache=False)
    finally:
        visattn.remove(model)
    assert torch.equal(logits[:, :-1], stock[:, :-1]) and (logits[:, -1] - stock[:, -1]).abs().max() > 1e-4
    assert torch.equal(cached, full)


def test_vhr_divergence_is_measured_against_an_image_ablated_pass(
        case: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    model, inputs = case
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    image = (ids == IMAGE) & real
    layer = tfa.language_layers(model)[0]
    handle = visattn.apply(model, "head_modulation", strategy="vhr", alpha=ALPHA, decoder_layers=[0], top=0.5)
    try:
        forward_logits(model, inputs)
        tokens = generate(model, inputs)
    finally:
        visattn.remove(model)
    recorded: dict[bool, torch.Tensor] = {}

    def last_row(ablate: bool) -> Any:
        def fn(idx: int, call: Any, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Any,
               mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
            if ablate:  # text rows cannot see the image in any decoder layer
                attention_mask = mask & ~(image[:, None, None, :] & ~image[:, None, :, None])
            out = call(module, q, k, v, attention_mask, **kwargs)[0]
            if idx == layer:
                recorded[ablate] = out[:, -1].float()
            return out

        return fn

    for ablate in (False, True):
        patcher = _route_llm(model, tfa.language_layers(model), last_row(ablate))
        try:
            forward_logits(model, inputs)
        finally:
            patcher.undo()
    vhd = (recorded[False] - recorded[True]).norm(dim=-1)
    torch.testing.assert_close(handle.vhd[layer], vhd, atol=1e-6, rtol=1e-5)
    heads = TEXT["num_attention_heads"]
    top = vhd.topk(math.ceil(heads / 2), dim=-1).indices
    expected = torch.ones(2, heads).scatter_(1, top, 1 + ALPHA)
    assert torch.equal(handle.head_gains[layer], expected)
    assert tokens.shape == (2, ids.shape[1] + 5)


def test_vhr_changes_the_generating_row_only(case: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    """(Only the generating row's attention: on a prefix that attends both ways the earlier rows see it.)"""
    model, inputs = case
    stock = forward_logits(model, inputs)
    visattn.apply(model, "head_modulation", strategy="vhr", alpha=ALPHA)
    try:
        logits = forward_logits(model, inputs)
    finally:
        visattn.remove(model)
    if causal_prompt(model):
        assert torch.equal(logits[:, :-1], stock[:, :-1])
    assert (logits[:, -1] - stock[:, -1]).abs().max() > 1e-4


def test_bad_options_and_inputs_raise_clear_errors() -> None:
    model = BUILDERS["llava"]("sdpa").eval()
    for options, match in [(dict(alpha=-0.1), r"alpha must be a number >= 0.0"),
                           (dict(strategy="vcd"), r"strategy must be one of 'pai', 'vhr', 'imbalance', 'avisc'"),
                           (dict(decoder_layers=[0, 5]), r"decoder_layers \[5\] out of range.*2 decoder layers"),
                           (dict(), r"modulates decoder layers 2..31.*only 2; pass decoder_layers"),
                           (dict(strategy="vhr", top=0), "top must be a number in"),
                           (dict(strategy="vhr", select=0.25), "strategy 'vhr' does not use select"),
                           (dict(top=0.5, strict=False), "strategy 'pai' does not use top"),
                           (dict(strategy="avisc", beta=0), r"beta must be a number in \(0.0, 1.0\] \(got 0\)"),
                           (dict(strategy="avisc", layer_gamma=1.5), r"layer_gamma must be a number in \(0.0, 1.0\]"),
                           (dict(strategy="avisc", lamb="1"), r"lamb must be a number \(got '1'\)"),
                           (dict(strategy="vhr", beta=0.1), "strategy 'vhr' does not use beta"),
                           (dict(strategy="vhr", strict=True), "strategy 'vhr' does not use strict"),
                           (dict(alpha="0.2"), r"alpha must be a number >= 0.0 or None")]:
        with pytest.raises(visattn.OptionError, match=match):
            visattn.apply(model, "head_modulation", **options)
    assert not visattn.applied(model)
    visattn.apply(model, "head_modulation", decoder_layers=[0, 1])
    try:
        with pytest.raises(visattn.ShapeError, match="no image tokens"):
            forward_logits(model, dict(input_ids=torch.tensor([[5, 6, 7, 8]])))
    finally:
        visattn.remove(model)
    for strategy in ("pai", "imbalance"):
        visattn.apply(model, "head_modulation", strategy=strategy, decoder_layers=[0, 1], strict=True)
        try:  # float32 on the CPU: the decode kernel cannot run, and strict=True refuses the PyTorch path
            with pytest.raises(visattn.KernelUnavailableError, match="pai decode kernel: .*strict=True forbids"):
                generate(model, vlm_inputs("llava", model))
        finally:
            visattn.remove(model)
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=100))
    with pytest.raises(visattn.UnsupportedModelError, match="no image_token_id"):
        visattn.apply(llm, "head_modulation", decoder_layers=[0])


# --- imbalance (LLaVA only) ---

def test_imbalance_selects_both_streams_and_matches_the_dense_reference() -> None:
    from visattn.core.attention import attention_probs
    from visattn.core.redistribute import dual_stream_selection, spatial_contrast

    model = build("llava", "sdpa")
    inputs = vlm_inputs("llava", model)
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    image = (ids == IMAGE) & real
    stock, tokens = forward_logits(model, inputs), generate(model, inputs)
    visattn.apply(model, "head_modulation", strategy="imbalance", alpha=0.0)
    try:
        assert torch.equal(forward_logits(model, inputs), stock) and torch.equal(generate(model, inputs), tokens)
    finally:
        visattn.remove(model)
    handle = visattn.apply(model, "head_modulation", strategy="imbalance", alpha=ALPHA, select=0.5)
    try:
        logits = forward_logits(model, inputs)
        assert generate(model, inputs).shape == (2, ids.shape[1] + 5)
    finally:
        visattn.remove(model)

    seen: dict[str, torch.Tensor] = {}

    def cls_row(idx: int, call: Any, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: Any, mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
        seen["cls"] = attention_probs(q[:, :, :1], k, scale=kwargs["scaling"])[:, 0, 1:]
        return call(module, q, k, v, attention_mask, **kwargs)[0]

    patcher = _route_llm(model, [0], cls_row)  # attention layer 0: the vision tower's first layer
    patcher.add_hook(model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, out: seen.update(features=out)))
    try:
        forward_logits(model, inputs)
    finally:
        patcher.undo()
    chosen = dual_stream_selection(seen["cls"], spatial_contrast(seen["features"], (2, 2)), 0.5)
    selected = torch.zeros_like(image)
    selected[image] = chosen.flatten()
    assert torch.equal(handle.selected, selected) and selected.sum() > 2

    def dense(idx: int, call: Any, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Any,
              mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
        logits = attention_logits(q, k, scale=kwargs["scaling"])
        share = (logits.masked_fill(~mask, float("-inf"))[..., -1, :].softmax(-1) * image[:, None]).sum(-1)
        weight = ALPHA * (share / share.amax(-1, keepdim=True))[:, :, None, None] * selected[:, None, None, :]
        logits[..., -1:, :] = amplify_logits(logits[..., -1:, :], weight)  # the prompt's last token: generating
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        return (probs @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)).transpose(1, 2).to(q.dtype)

    reference = _route_llm(model, tfa.language_layers(model), dense)
    try:
        expected = forward_logits(model, inputs)
    finally:
        reference.undo()
    assert torch.equal(logits[:, :-1], stock[:, :-1])
    torch.testing.assert_close(logits[:, -1], expected[:, -1], atol=1e-6, rtol=0)
    assert (logits[:, -1] - stock[:, -1]).abs().max() > 1e-5  # ten times the tolerance above


def test_imbalance_needs_a_cls_token_model() -> None:
    model = BUILDERS["qwen2_vl"]("sdpa").eval()
    with pytest.raises(visattn.UnsupportedModelError, match="strategy 'imbalance' needs a vision tower"):
        visattn.apply(model, "head_modulation", strategy="imbalance")


# --- avisc ---

def test_blind_tokens_follow_the_authors_rule() -> None:
    """Per sample: rank layers by their image attention, keep the fewest reaching layer_gamma of it, average them,
    and mark the image tokens at or above mean + lamb * std (AvisC's avisc_sample.py, written out as a loop)."""
    from visattn.core.redistribute import blind_tokens

    torch.manual_seed(0)
    attention = torch.rand(3, 5, 12).softmax(-1)
    image = torch.zeros(3, 12, dtype=torch.bool)
    image[0, 2:8], image[1, 4:12], image[2, 0:3] = True, True, True
    for layer_gamma, lamb in [(0.5, 1.0), (0.9, 0.0), (0.01, -0.5), (1.0, 0.5)]:
        expected = torch.zeros_like(image)
        for b in range(3):
            cols = image[b].nonzero().flatten()
            per_layer = attention[b][:, cols]
            share = per_layer.sum(-1) / per_layer.sum()
            count = int((share.sort(descending=True).values.cumsum(0) < layer_gamma).sum()) + 1
            mean_attention = per_layer[share.topk(min(count, 5)).indices].mean(0)
            threshold = mean_attention.mean() + lamb * mean_attention.std()
            expected[b, cols[mean_attention >= threshold]] = True
        assert torch.equal(blind_tokens(attention, image, layer_gamma, lamb), expected)
    assert blind_tokens(attention, image, 0.5, 0.0).sum(-1).min() > 0  # above the mean: never empty


def _zeroing(model: torch.nn.Module, hidden: torch.Tensor) -> Patcher:
    """Zero the language model's input embeddings at ``hidden`` ``[B, N]`` (prompt forwards only)."""
    patcher = Patcher()

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        embeds = kwargs["inputs_embeds"]
        zero = F.pad(hidden, (0, embeds.shape[1] - hidden.shape[1]))
        kwargs["inputs_embeds"] = embeds.masked_fill(zero[..., None], 0)
        return args, kwargs

    patcher.add_hook(model.get_decoder().register_forward_pre_hook(pre, with_kwargs=True))
    return patcher


def _longer(batch: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``batch`` with its prompt continued by the tokens of ``ids`` after it (text, attended)."""
    extra = ids[:, batch["input_ids"].shape[1]:]
    longer = dict(batch, input_ids=ids, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(extra)], 1))
    for name in ("token_type_ids", "mm_token_type_ids"):  # PaliGemma's prefix marks, Qwen's modality ids
        if name in batch:
            longer[name] = torch.cat([batch[name], torch.zeros_like(extra) + (name == "token_type_ids")], 1)
    return longer


def test_avisc_matches_stock_forwards_in_forward_and_generate(
        case: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    """The blind tokens are those of the stock model's last-row attention; the logits are the contrast of the stock
    logits with those of the stock model whose other image embeddings are zeroed, in a forward and at every step of
    a cached generate() (against forwards without cache over the tokens generated so far)."""
    from visattn.core.attention import attention_probs
    from visattn.core.redistribute import blind_tokens, contrast_logits

    model, inputs = case
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    image = (ids == IMAGE) & real
    options = dict(alpha=ALPHA, beta=0.95, lamb=0.0, layer_gamma=0.6)
    handle = visattn.apply(model, "head_modulation", strategy="avisc", **options)
    try:
        logits = forward_logits(model, inputs)
        blind = handle.blind.clone()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, suppress_tokens=[IMAGE, 1, 2, 3])
    finally:
        visattn.remove(model)
    rows: dict[int, torch.Tensor] = {}

    def last_row(idx: int, call: Any, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attention_mask: Any, mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
        rows[idx] = attention_probs(q, k, scale=kwargs["scaling"], mask=mask)[:, -1]  # head mean, the last row
        return call(module, q, k, v, attention_mask, **kwargs)[0]

    patcher = _route_llm(model, tfa.language_layers(model), last_row)
    try:
        stock = forward_logits(model, inputs)
    finally:
        patcher.undo()
    expected_blind = blind_tokens(torch.stack([rows[i] for i in sorted(rows)], 1), image, 0.6, 0.0)
    assert torch.equal(blind, expected_blind) and 0 < blind.sum() < image.sum()
    assert torch.equal(handle.blind, blind)  # generate()'s prompt chose the same

    def contrasted(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        plain = forward_logits(model, batch)
        patcher = _zeroing(model, image & ~blind)
        try:
            return contrast_logits(plain, forward_logits(model, batch), ALPHA, 0.95)
        finally:
            patcher.undo()

    expected = contrasted(inputs)
    assert torch.equal(expected.isinf(), logits.isinf()) and expected.isinf().any()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert (logits - stock).nan_to_num(0.0, 0.0, 0.0).abs().max() > 1e-3
    for step, step_logits in enumerate(out.logits):
        prefix = out.sequences[:, :ids.shape[1] + step]
        want = contrasted(_longer(inputs, prefix))[:, -1]
        assert torch.equal(want.isinf(), step_logits.isinf()), step
        torch.testing.assert_close(step_logits, want, atol=1e-5, rtol=1e-5)


def test_avisc_refuses_a_cache_it_did_not_build() -> None:
    model = build("llava", "sdpa")
    inputs = vlm_inputs("llava", model)
    with torch.no_grad():
        cache = model(**inputs).past_key_values
    visattn.apply(model, "head_modulation", strategy="avisc")
    try:
        more = dict(input_ids=torch.tensor([[5], [6]]),
                    attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1))
        with pytest.raises(visattn.ShapeError, match="continues a KV cache .* did not see being built"):
            with torch.no_grad():
                model(**more, past_key_values=cache)
        with torch.no_grad():
            model(**inputs, use_cache=False)  # no blind cache either
        with pytest.raises(visattn.ShapeError, match="blind model did not build"), torch.no_grad():
            model(**more, past_key_values=cache)
    finally:
        visattn.remove(model)
