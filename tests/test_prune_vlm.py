"""``prune`` on transformers vision-language models: tokens really removed, the right ones, in every step.

Tiny random-weight LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL models (tests/tiny_vlms.py),
fed two left-padded prompts of different lengths. The references are independent of visattn's hooks:
transformers' own eager attention weights and hidden states for the scores, and the stock model whose
attention masks hide the dropped tokens (removal must equal masking, for every kept token and every
generated token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_vlms import BUILDERS, IMAGE, PAD, build, fresh_static_cache, llava, vlm_inputs

import visattn
from visattn.frameworks import transformers as tfa
from visattn.patching import Patcher

NEW_TOKENS = 5


PRUNED = [f for f in BUILDERS if f != "paligemma"]  # refused (test_paligemma_and_gemma3_are_refused_with_the_reason)


@pytest.fixture(scope="module", params=PRUNED)
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, torch.nn.Module], dict[str, torch.Tensor]]:
    models = {impl: build(request.param, impl) for impl in ("sdpa", "eager")}
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    return request.param, models, vlm_inputs(request.param, models["sdpa"])


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    fresh_static_cache(model)
    with torch.no_grad():
        if kwargs:
            return model.generate(**inputs, **kwargs, do_sample=False, return_dict_in_generate=True,
                                  output_logits=True)
        return model(**inputs)


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    return _run(model, inputs, max_new_tokens=NEW_TOKENS)


def _top(scores: torch.Tensor, visual: torch.Tensor, keep: float) -> torch.Tensor:
    """Independent selection: per sample, every non-visual position and the best visual ones."""
    dropped = min(n - math.ceil(keep * n) for n in visual.sum(-1).tolist())
    kept = []
    for b in range(scores.shape[0]):
        vis = visual[b].nonzero()[:, 0]
        low = vis[scores[b, vis].argsort()[:dropped]]
        row = torch.ones(scores.shape[1], dtype=torch.bool)
        row[low] = False
        kept.append(row.nonzero()[:, 0])
    return torch.stack(kept)


def _masked_reference(model: torch.nn.Module, kept: torch.Tensor, prompt: int, first: int) -> Patcher:
    """The stock model with the prompt positions not in ``kept`` hidden from decoder layers >= ``first``."""
    patcher = Patcher()
    llm = tfa.language_layers(model)

    def make_route(index: int, module: torch.nn.Module, implementation: str) -> Callable[..., Any]:
        def route(call: Callable[..., Any], module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
            mask = tfa.stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal"))
            visible = torch.ones(kept.shape[0], key.shape[2], dtype=torch.bool)
            visible[:, :prompt] = False
            visible.scatter_(1, kept, True)
            mask = mask & visible[:, None, None, :]
            return call(module, query, key, value, mask, **{**kwargs, "is_causal": False})

        return route

    tfa.route_attention(model, patcher, llm[first:], make_route)
    return patcher


def _check_against_masked_reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor], kept: torch.Tensor,
                                    first: int, pruned_logits: torch.Tensor, pruned: Any) -> None:
    prompt = inputs["input_ids"].shape[1]
    patcher = _masked_reference(model, kept, prompt, first)
    try:
        reference_logits = _run(model, inputs).logits
        reference = _generate(model, inputs)
    finally:
        patcher.undo()
    real = inputs["attention_mask"].gather(1, kept).bool()
    expected = reference_logits.gather(1, kept[..., None].expand(-1, -1, reference_logits.shape[-1]))
    torch.testing.assert_close(pruned_logits[real], expected[real], atol=1e-5, rtol=0)
    assert torch.equal(pruned.sequences, reference.sequences)
    for step, (ours, theirs) in enumerate(zip(pruned.logits, reference.logits)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=f"generated token {step}")


def _check_input_stage(model: torch.nn.Module, inputs: dict[str, torch.Tensor], expected: torch.Tensor,
                       **options: Any) -> None:
    """``prune`` at the language model's input keeps the prompt positions ``expected``, its caches hold them, and
    it computes what the stock model computes with the other positions hidden from every decoder layer."""
    handle = visattn.apply(model, "prune", **options)
    try:
        logits = _run(model, inputs).logits
        assert torch.equal(handle.kept[0], expected)
        result = _generate(model, inputs)
    finally:
        visattn.remove(model)
    assert _cache_lengths(result) == [expected.shape[1] + NEW_TOKENS - 1] * len(result.past_key_values.layers)
    _check_against_masked_reference(model, inputs, expected, 0, logits, result)


def _cache_lengths(result: Any) -> list[int]:
    cache = result.past_key_values
    return [cache.layers[i].keys.shape[-2] for i in range(len(cache.layers))]


def test_keep_one_is_bit_identical_in_forward_and_generate(case: tuple) -> None:
    family, models, inputs = case
    model = models["sdpa"]
    # every strategy the family takes (cls and star need LLaVA's [CLS] token)
    strategies = ["fastv", "plphp", "transprune"] + (["star", "cls", "zo", "vflowopt"] if family == "llava" else [])
    def static(model: torch.nn.Module) -> Any:
        return _run(model, inputs, max_new_tokens=NEW_TOKENS, cache_implementation="static")

    stock_logits, stock, stock_static = _run(model, inputs).logits, _generate(model, inputs), static(model)
    for strategy in strategies:
        at_input = strategy in ("cls", "zo")
        visattn.apply(model, "prune", strategy=strategy, keep=1.0, **({} if at_input else {"layer": 1}))
        try:
            logits, result, result_static = _run(model, inputs).logits, _generate(model, inputs), static(model)
        finally:
            visattn.remove(model)
        assert torch.equal(logits, stock_logits), strategy
        for ours, theirs in ((result, stock), (result_static, stock_static)):
            assert torch.equal(ours.sequences, theirs.sequences), strategy
            assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits)), strategy


def test_remove_after_pruned_generations_restores_the_model_exactly(case: tuple) -> None:
    """Every strategy, really pruning (keep 0.5) through a generation with each cache: remove() leaves each module's
    hooks and attributes as they were (transformers' own included) and the stock logits and tokens."""
    family, models, inputs = case
    model = models["sdpa"]
    _generate(model, inputs)  # transformers installs its own hooks at a model's first call
    names = {name: set(vars(m)) for name, m in model.named_modules()}
    _run(model, inputs, max_new_tokens=2, cache_implementation="static")
    # what transformers' own static generate() leaves on the model (_previous_max_cache_length; 5.6: _cache)
    own = {name: set(vars(m)) - names[name] for name, m in model.named_modules()}

    def state() -> list[tuple[str, list, list, set]]:
        return [(name, list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()), set(vars(m)) - own[name])
                for name, m in model.named_modules()]

    before, weights = state(), {k: v.clone() for k, v in model.state_dict().items()}
    stock, stock_tokens = _run(model, inputs).logits, _generate(model, inputs).sequences
    for strategy in ["fastv", "plphp", "transprune"] + (["star", "cls", "zo", "vflowopt"] if family == "llava" else []):
        visattn.apply(model, "prune", strategy=strategy, keep=0.5,
                      **({} if strategy in ("cls", "zo") else {"layer": 1}))
        try:
            _generate(model, inputs)
            if strategy != "plphp":
                _run(model, inputs, max_new_tokens=2, cache_implementation="static")
        finally:
            visattn.remove(model)
        assert state() == before, strategy
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), strategy
        assert torch.equal(_run(model, inputs).logits, stock), strategy
        assert torch.equal(_generate(model, inputs).sequences, stock_tokens), strategy


def test_fastv_keeps_what_the_last_token_attends_to_and_equals_masking(case: tuple) -> None:
    family, models, inputs = case
    model, keep = models["sdpa"], 0.5
    ids, prompt = inputs["input_ids"], inputs["input_ids"].shape[1]
    with torch.no_grad():
        attentions = models["eager"](**inputs, output_attentions=True).attentions
    visual = (ids == IMAGE) & inputs["attention_mask"].bool()
    expected = _top(attentions[0][:, :, -1].float().mean(1), visual, keep)  # decoder layer K-1 = 0
    handle = visattn.apply(model, "prune", strategy="fastv", keep=keep, layer=1)
    try:
        logits = _run(model, inputs).logits
        assert torch.equal(handle.kept[1], expected)
        result = _generate(model, inputs)
    finally:
        visattn.remove(model)
    kept = expected.shape[1]
    assert kept < prompt and logits.shape[1] == kept
    assert _cache_lengths(result) == [prompt + NEW_TOKENS - 1, kept + NEW_TOKENS - 1]  # layer 1 really shorter
    _check_against_masked_reference(model, inputs, expected, 1, logits, result)


def test_transprune_ranks_by_transition_plus_instruction_attention(case: tuple) -> None:
    family, models, inputs = case
    model, keep = models["sdpa"], 0.5
    with torch.no_grad():
        out = models["eager"](**inputs, output_attentions=True, output_hidden_states=True)
    visual = (inputs["input_ids"] == IMAGE) & inputs["attention_mask"].bool()
    before, after = out.hidden_states[0].float(), out.hidden_states[1].float()
    ttv = ((after.norm(dim=-1) - before.norm(dim=-1)).abs() / before.norm(dim=-1)
           + 1 - torch.nn.functional.cosine_similarity(before, after, dim=-1))
    last_image = max(int(row.nonzero().max()) for row in visual)
    iga = out.attentions[0][:, :, last_image + 1:].float().mean((1, 2))

    def unit(x: torch.Tensor) -> torch.Tensor:  # min-max over each sample's image tokens
        lows = torch.stack([x[b][visual[b]].min() for b in range(2)])[:, None]
        highs = torch.stack([x[b][visual[b]].max() for b in range(2)])[:, None]
        return (x - lows) / (highs - lows)

    expected = _top(unit(ttv) + unit(iga), visual, keep)
    handle = visattn.apply(model, "prune", strategy="transprune", keep=keep, layer=1)
    try:
        logits = _run(model, inputs).logits
        result = _generate(model, inputs)
    finally:
        visattn.remove(model)
    assert torch.equal(handle.kept[1], expected)
    _check_against_masked_reference(model, inputs, expected, 1, logits, result)


def test_plphp_prunes_the_kv_cache_per_head_after_prefill(case: tuple) -> None:
    family, models, inputs = case
    model, keep = models["sdpa"], 0.5
    prompt = inputs["input_ids"].shape[1]
    stock = _run(model, inputs).logits
    with torch.no_grad():
        attentions = models["eager"](**inputs, output_attentions=True).attentions
    visual = (inputs["input_ids"] == IMAGE) & inputs["attention_mask"].bool()
    row = attentions[1][:, :, -1].float()  # [B, H, N] at decoder layer 1
    per_head = row.view(2, 2, 2, -1).mean(2)  # 4 query heads share 2 kv heads
    handle = visattn.apply(model, "prune", strategy="plphp", keep=keep, layer=1)
    try:
        out = _run(model, inputs)
        result = _generate(model, inputs)
    finally:
        visattn.remove(model)
    assert torch.equal(out.logits, stock)  # prefill is not pruned
    kept = handle.kept[1]  # [B, Hkv, n]: one layer pruned, so its retention is keep
    for h in range(2):
        assert torch.equal(kept[:, h].sort(-1).values, _top(per_head[:, h], visual, keep))
    assert kept.shape[-1] < prompt
    assert _cache_lengths(out) == [prompt, kept.shape[-1]]  # a plain forward's cache is pruned too
    assert _cache_lengths(result) == [prompt + NEW_TOKENS - 1, kept.shape[-1] + NEW_TOKENS - 1]
    # decoding from the per-head caches equals the stock model whose decode steps hide, in each kv head of
    # layer 1, the prompt tokens that head dropped
    visible = torch.zeros(2, 2, prompt, dtype=torch.bool).scatter(2, kept, True).repeat_interleave(2, dim=1)
    patcher = Patcher()

    def make_route(index: int, module: torch.nn.Module, implementation: str) -> Callable[..., Any]:
        def route(call: Callable[..., Any], module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
            if query.shape[2] == 1:
                mask = tfa.stock_mask(implementation, module, query, key, attention_mask)
                new = torch.ones(2, 4, key.shape[2] - prompt, dtype=torch.bool)
                attention_mask = mask & torch.cat([visible, new], dim=2)[:, :, None, :]
            return call(module, query, key, value, attention_mask, **kwargs)

        return route

    tfa.route_attention(model, patcher, [tfa.language_layers(model)[1]], make_route)
    try:
        reference = _generate(model, inputs)
    finally:
        patcher.undo()
    assert torch.equal(result.sequences, reference.sequences)
    for ours, theirs in zip(result.logits, reference.logits):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_cls_keeps_what_the_vision_cls_token_attends_to_and_equals_masking() -> None:
    models = {impl: build("llava", impl) for impl in ("sdpa", "eager")}
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    model, inputs, keep = models["sdpa"], vlm_inputs("llava", models["sdpa"]), 0.5
    with torch.no_grad():
        vision = models["eager"].model.vision_tower(inputs["pixel_values"], output_attentions=True)
    cls = vision.attentions[0][:, :, 0, 1:].float().mean(1)  # feature layer -2 of 2: layer 0's [CLS] row
    visual = (inputs["input_ids"] == IMAGE) & inputs["attention_mask"].bool()
    scores = torch.zeros(visual.shape).masked_scatter(visual, cls.flatten())
    expected = _top(scores, visual, keep)
    _check_input_stage(model, inputs, expected, strategy="cls", keep=keep)


def test_zo_keeps_sensitive_and_diverse_tokens_and_equals_masking() -> None:
    """ZOO-Prune against a loop written from the paper: central differences of the projector along each seeded
    direction in turn, then the greedy pick of sensitivity times distance to the nearest pick."""
    model = build("llava", "sdpa")
    image = [IMAGE] * 4  # two images per prompt: eight image tokens each
    ids = torch.tensor([[5, 6, *image, 7, *image, 8, 9], [PAD, 5, *image, 7, *image, 8, 9]])
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=torch.randn(4, 3, 28, 28))
    seen: dict[str, torch.Tensor] = {}
    projector = model.model.multi_modal_projector
    hook = projector.register_forward_hook(lambda module, args, out: seen.update(x=args[0], p=out))
    try:
        _run(model, inputs)
    finally:
        hook.remove()
    directions = torch.nn.functional.normalize(torch.randn(6, seen["x"].shape[-1],
                                                           generator=torch.Generator().manual_seed(3)), dim=-1)
    visual = (ids == IMAGE) & inputs["attention_mask"].bool()
    kept = []
    for b in range(2):
        x, features = seen["x"][2 * b:2 * b + 2].flatten(0, 1), seen["p"][2 * b:2 * b + 2].flatten(0, 1)
        with torch.no_grad():
            s = torch.stack([(projector(x + 0.05 * u) - projector(x - 0.05 * u)).norm(dim=-1) / 0.1
                             for u in directions]).mean(0)
        w = (s - s.min()) / (s.max() - s.min())
        chosen = [int(w.argmax())]
        while len(chosen) < 3:  # keep 0.375 of 8
            distance = 1 - torch.nn.functional.cosine_similarity(features[:, None], features[chosen][None], dim=-1)
            key = w * distance.min(1).values
            key[chosen] = -1
            chosen.append(int(key.argmax()))
        positions = visual[b].nonzero()[:, 0]
        row = ~visual[b]
        row[positions[chosen]] = True
        kept.append(row.nonzero()[:, 0])
    expected = torch.stack(kept)
    _check_input_stage(model, inputs, expected, strategy="zo", keep=0.375, directions=6, step=0.05, seed=3)


def test_vflowopt_recycles_what_it_prunes_per_image_and_ranks_by_global_tokens_and_entropy() -> None:
    """VFlowOpt against loops written from the paper: relevance from transformers' own vision attentions (the mean row
    of the tokens receiving more than threshold times the mean), patch entropy from the pixels, the recycled token of
    each image (one cell of 2 x 2 patches) the importance-weighted mean of its pruned tokens at the most important
    one's place; then, before layer 1, the kept tokens ranked by the same importance."""
    models = {impl: build("llava", impl) for impl in ("sdpa", "eager")}
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    model = models["sdpa"]
    image = [IMAGE] * 4  # two images per prompt: eight image tokens each, four per image
    ids = torch.tensor([[5, 6, *image, 7, *image, 8, 9], [PAD, 5, *image, 7, *image, 8, 9]])
    pixels = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=pixels)
    with torch.no_grad():
        attention = models["eager"].model.vision_tower(pixels, output_attentions=True).attentions[0].mean(1)
    importance = []
    for i in range(4):
        received = attention[i].mean(0)
        glob = (received > 1.0 * received.mean()).nonzero()[:, 0]
        relevance = attention[i][glob].mean(0)[1:]  # without the [CLS] column
        grey = pixels[i].mean(0)
        levels = ((grey - grey.min()) / (grey.max() - grey.min()) * 255).round().long()
        entropy = []
        for r in range(2):
            for c in range(2):
                p = torch.bincount(levels[14 * r:14 * r + 14, 14 * c:14 * c + 14].flatten(), minlength=256) / 196
                entropy.append(float(-(p[p > 0] * p[p > 0].log2()).sum()))
        importance.append(relevance + 0.5 * torch.tensor(entropy).softmax(0))
    seen: dict[str, torch.Tensor] = {}
    decoder = model.get_decoder()
    before = decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["inputs_embeds"]),
                                               with_kwargs=True)
    handle = visattn.apply(model, "prune", strategy="vflowopt", keep=0.25, cell=2, threshold=1.0, entropy=0.5)
    after = decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(y=kw["inputs_embeds"]),
                                              with_kwargs=True)
    try:
        _run(model, inputs)
    finally:
        before.remove(), after.remove()
        visattn.remove(model)
    visual = (ids == IMAGE) & inputs["attention_mask"].bool()
    kept, recycled, ranked = [], [], []
    for b in range(2):
        score = torch.cat(importance[2 * b:2 * b + 2])
        positions = visual[b].nonzero()[:, 0]
        order = score.argsort(descending=True).tolist()
        plain, rest = order[:2], order[2:]  # sqrt(0.25) of 8 = 4 kept: 2 plainly, then one per image
        leaders = [next(t for t in rest if t // 4 == image) for image in range(2)]
        x = seen["x"][b].clone()
        for leader in leaders:
            group = [t for t in rest if t // 4 == leader // 4]
            w = score[group]
            x[positions[leader]] = (w[:, None] * seen["x"][b, positions[group]]).sum(0) / w.sum()
        row = ~visual[b]
        row[positions[plain + leaders]] = True
        kept.append(row.nonzero()[:, 0])
        recycled.append(x[kept[-1]])
        # before layer 1: sqrt(0.25) of the 4 = 2 kept, by importance (a recycled token by its leader's)
        mine = sorted(plain + leaders, key=lambda t: -score[t])[:2]
        row = ~visual[b]
        row[positions[mine]] = True
        ranked.append(row.nonzero()[:, 0])
    assert torch.equal(handle.kept[0], torch.stack(kept))
    torch.testing.assert_close(seen["y"], torch.stack(recycled), atol=1e-6, rtol=0)
    assert torch.equal(handle.kept[1], torch.stack(ranked))


def test_recycled_selection_keeps_the_budget_when_a_cell_has_nothing_left() -> None:
    from visattn.core.importance import recycled_selection

    scores = torch.tensor([[0.0, 9.0, 8.0, 1.0, 2.0, 3.0, 0.0]])  # a text token, then six image tokens
    candidates = torch.tensor([[False, True, True, True, True, True, True]])
    cells = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])  # three cells of two image tokens
    kept, target = recycled_selection(scores, candidates, cells, dropped=2)
    # 4 kept: 1 plainly (9.0); cell 0's other token (8.0) leads it alone; cells 1 and 2 lead with 2.0 and 3.0; no fill
    assert kept.tolist() == [[0, 1, 2, 4, 5]] and target.tolist() == [[-1, -1, 2, 4, 4, 5, 5]]
    kept, target = recycled_selection(scores, candidates, cells, dropped=1)
    # 5 kept: 2 plainly (9.0, 8.0), so cell 0 has nothing left: the best remaining non-leader (1.0) is kept as is
    assert kept.tolist() == [[0, 1, 2, 3, 4, 5]] and target.tolist() == [[-1, -1, -1, -1, 4, 5, 5]]


def test_diverse_ranks_trade_sensitivity_for_distance() -> None:
    from visattn.core.importance import diverse_ranks

    features = torch.tensor([[[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.7, 0.7], [5.0, 5.0]]])
    sensitivity = torch.tensor([[1.0, 0.9, 0.5, 0.0, 9.0]])
    candidates = torch.tensor([[True, True, True, True, False]])  # the last is text: never ranked
    # 0 first (most sensitive); then 2 (far) beats 1 (close to 0, more sensitive); 3 has weight 0
    assert diverse_ranks(sensitivity, features, candidates, 2).tolist() == [[2.0, 0.0, 1.0, 0.0, 0.0]]
    assert diverse_ranks(sensitivity, features, candidates, 9).tolist() == [[9.0, 7.0, 8.0, 6.0, 0.0]]
    flat = diverse_ranks(torch.ones(1, 5), features, candidates, 2)  # constant sensitivity: distance alone
    assert flat.tolist() == [[2.0, 0.0, 1.0, 0.0, 0.0]]


def test_kept_order_ranks_every_layer_and_head_as_kept_indices_does_one_at_a_time() -> None:
    from visattn.core.importance import kept_indices, kept_order

    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 2, 4, 12, generator=generator)  # [layers, batch, kv heads, tokens]
    candidates = torch.zeros(2, 12, dtype=torch.bool)
    candidates[0, 2:9] = True
    candidates[1, 4:11] = True  # seven candidates each, text around them
    dropped = [0, 3, 7]
    order = kept_order(scores, candidates[:, None], torch.tensor(dropped).view(-1, 1, 1, 1))
    for layer, count in enumerate(dropped):
        for head in range(4):
            kept = order[layer, :, head, :12 - count]
            expected = kept_indices(scores[layer, :, head], candidates, count)
            assert torch.equal(kept.sort(-1).values, expected)
            # non-candidates first, in the same (increasing) order in every head, then the kept candidates
            assert torch.equal(candidates.gather(1, kept), (torch.arange(12 - count) >= 5).expand(2, -1))
            assert (kept[:, :5].diff() > 0).all() and (kept[:, 5:].diff() > 0).all()


def test_star_drops_at_the_input_then_at_the_middle_layer() -> None:
    model = build("llava", "sdpa")
    ids = torch.tensor([[5, 6] + [IMAGE] * 4 + [7, 8, 9], [PAD, 5] + [IMAGE] * 4 + [7, 8, 9]])
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=torch.randn(2, 3, 28, 28))
    handle = visattn.apply(model, "prune", strategy="star", keep=0.25, layer=1)
    try:
        result = _generate(model, inputs)
    finally:
        visattn.remove(model)
    # sqrt(0.25) = 0.5: 4 -> 2 image tokens at the input, then 2 -> 1 before layer 1
    assert handle.kept[0].shape == (2, 7) and handle.kept[1].shape == (2, 6)
    assert set(handle.kept[1][0].tolist()) <= set(handle.kept[0][0].tolist())
    assert _cache_lengths(result) == [7 + NEW_TOKENS - 1, 6 + NEW_TOKENS - 1]


def test_errors() -> None:
    model = llava("sdpa").eval()
    inputs = vlm_inputs("llava", model)
    with pytest.raises(visattn.OptionError, match=r"keep must be a number in \(0.0, 1.0\]"):
        visattn.apply(model, "prune", strategy="fastv", keep=0.0)
    with pytest.raises(visattn.OptionError, match=r"keep must be"):
        visattn.apply(model, "prune", strategy="fastv", keep=1.5)
    with pytest.raises(visattn.OptionError, match=r"layer must be a decoder layer in 1\.\.1"):
        visattn.apply(model, "prune", strategy="fastv")  # FastV's default K=2 on a 2-layer model
    with pytest.raises(visattn.OptionError, match="'ensemble_layers' applies to strategies 'cls' and 'star'"):
        visattn.apply(model, "prune", strategy="fastv", layer=1, ensemble_layers=[0])
    with pytest.raises(visattn.OptionError, match="ensemble_layers \\[5\\] out of range"):
        visattn.apply(model, "prune", strategy="cls", ensemble_layers=[5])
    with pytest.raises(visattn.OptionError, match="'layer' applies to 'fastv'"):
        visattn.apply(model, "prune", strategy="cls", layer=1)
    with pytest.raises(visattn.OptionError, match="'layers' applies to timm and open_clip"):
        visattn.apply(model, "prune", strategy="fastv", layer=1, layers=[1])
    with pytest.raises(visattn.UnsupportedModelError, match="no \\[CLS\\] token.*use strategy 'fastv'"):
        visattn.apply(BUILDERS["qwen2_vl"]("sdpa"), "prune", strategy="cls")
    with pytest.raises(visattn.UnsupportedModelError, match="'zo' perturbs the multimodal projector's input.*"
                                                            "Qwen2VLForConditionalGeneration's image tokens are not"):
        visattn.apply(BUILDERS["qwen2_vl"]("sdpa"), "prune", strategy="zo")
    with pytest.raises(visattn.OptionError, match="strategy 'zo' drops tokens at the language model's input"):
        visattn.apply(model, "prune", strategy="zo", layer=1)
    with pytest.raises(visattn.OptionError, match="directions must be an int >= 1"):
        visattn.apply(model, "prune", strategy="zo", directions=0)
    with pytest.raises(visattn.UnsupportedModelError, match="'vflowopt' reads each image token's patch.*"
                                                            "Qwen2VLForConditionalGeneration's image tokens are not"):
        visattn.apply(BUILDERS["qwen2_vl"]("sdpa"), "prune", strategy="vflowopt", layer=1)
    with pytest.raises(visattn.OptionError, match=r"ceil\(sqrt\(keep\) \* 4\) = 2 tokens of each image at the "
                                                  r"input, fewer than its 4 recycled tokens"):
        visattn.apply(model, "prune", strategy="vflowopt", keep=0.25, cell=1)
    with pytest.raises(visattn.OptionError, match="strategy 'cls' does not use threshold"):
        visattn.apply(model, "prune", strategy="cls", threshold=2.0)
    full = llava("sdpa").eval()
    full.config.vision_feature_select_strategy = "full"
    with pytest.raises(visattn.UnsupportedModelError, match="passes the \\[CLS\\] feature too"):
        visattn.apply(full, "prune", strategy="vflowopt")
    with pytest.raises(visattn.OptionError, match="strategy 'fastv' does not use step"):
        visattn.apply(model, "prune", strategy="fastv", layer=1, step=0.1)
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, vocab_size=100))
    with pytest.raises(visattn.UnsupportedModelError, match="supported: LlavaForConditionalGeneration"):
        visattn.apply(llm, "prune", strategy="fastv", layer=1)
    assert not visattn.applied(model)
    visattn.apply(model, "prune", strategy="fastv", keep=0.5, layer=1)
    try:
        text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
        text_only["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, 5)
        with pytest.raises(visattn.ShapeError, match=r"sample\(s\) \[0, 1\] of the batch hold no image tokens"):
            _run(model, text_only)
        with pytest.raises(visattn.ShapeError, match="must be called with input_ids"):
            _run(model, {"inputs_embeds": torch.randn(2, 3, 32)})
        with pytest.raises(visattn.UnsupportedModelError, match=r"transformers \d.*expected a transformers Cache"):
            _run(model, {**inputs, "past_key_values": ((torch.zeros(1),),)})  # a legacy tuple cache
        # with a static cache: right padding (generate() masks slots by position), a cache allocated already
        pads = (inputs["attention_mask"] == 0).sum(1).tolist()
        right = {name: torch.stack([row.roll(-p) for row, p in zip(inputs[name], pads)])
                 for name in ("input_ids", "attention_mask")}
        padded = [b for b, p in enumerate(pads) if p]
        with pytest.raises(visattn.ShapeError, match=rf"sample\(s\) \{padded} of the batch have padding after real"):
            _run(model, {**inputs, **right}, max_new_tokens=2, cache_implementation="static")
        from transformers import StaticCache

        cache = StaticCache(config=model.config.get_text_config(), max_cache_len=32)
        cache.early_initialization(batch_size=2, num_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
        with pytest.raises(visattn.UnsupportedModelError, match=r"was allocated already \(early_initialization\(\)"):
            _run(model, {**inputs, "past_key_values": cache})
    finally:
        visattn.remove(model)
    visattn.apply(model, "prune", strategy="plphp", keep=0.5, layer=1)
    try:
        with pytest.raises(visattn.UnsupportedModelError, match="'plphp' sets each layer's cache length from each "
                                                                 "prompt's attention"):
            _run(model, inputs, max_new_tokens=2, cache_implementation="static")
    finally:
        visattn.remove(model)


def test_a_static_cache_holds_the_kept_tokens_and_decodes_as_the_dynamic_one(case: tuple) -> None:
    """With generate(cache_implementation="static") each layer's preallocated cache has the slots of the tokens that
    reach it and of the tokens to come, all of them filled, and the generation equals the dynamic cache's (itself
    checked against masking above)."""
    family, models, inputs = case
    model = models["sdpa"]
    prompt = inputs["input_ids"].shape[1]
    stock = _run(model, inputs, max_new_tokens=NEW_TOKENS, cache_implementation="static").past_key_values
    capacity = stock.layers[0].max_cache_len
    assert capacity >= prompt + NEW_TOKENS - 1
    for strategy in ["fastv", "transprune"] + (["star", "cls", "zo", "vflowopt"] if family == "llava" else []):
        at_input = strategy in ("cls", "zo")
        handle = visattn.apply(model, "prune", strategy=strategy, keep=0.5, **({} if at_input else {"layer": 1}))
        try:
            dynamic = _generate(model, inputs)
            static = _run(model, inputs, max_new_tokens=NEW_TOKENS, cache_implementation="static")
            kept = handle.kept
        finally:
            visattn.remove(model)
        assert torch.equal(static.sequences, dynamic.sequences), strategy
        for ours, theirs in zip(static.logits, dynamic.logits):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=strategy)
        held = [kept[max(k for k in kept if k <= i)].shape[1] if any(k <= i for k in kept) else prompt
                for i in range(len(stock.layers))]  # the prompt tokens each layer holds
        layers = static.past_key_values.layers
        assert [layer.keys.shape[-2] for layer in layers] == [n + capacity - prompt for n in held], strategy
        assert [int(layer.cumulative_length.reshape(-1)[0]) for layer in layers] == [
            n + NEW_TOKENS - 1 for n in held], strategy
        assert _cache_lengths(dynamic) == [n + NEW_TOKENS - 1 for n in held] and min(held) < prompt, strategy


def test_vision_language_options_are_refused_on_timm() -> None:
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, embed_dim=48, num_heads=2,
                            img_size=32, patch_size=8, num_classes=2)
    for options in ({"strategy": "fastv"}, {"layer": 1}, {"ensemble_layers": [0]}):
        with pytest.raises(visattn.OptionError, match="only strategy 'cls' with options keep and layers"):
            visattn.apply(vit, "prune", **options)
    assert not visattn.applied(vit)


def test_paligemma_and_gemma3_are_refused_with_the_reason() -> None:
    from tiny_vlms import gemma3

    for model in (build("paligemma", "sdpa"), gemma3()):
        with pytest.raises(visattn.UnsupportedModelError, match="Gemma.*4-D masks? before its language model"):
            visattn.apply(model, "prune", strategy="fastv", layer=1)
        assert not visattn.applied(model)


def test_qwen3_vl_drops_tokens_after_its_deepstack_layers_only() -> None:
    """Qwen3-VL adds vision features to the image tokens in its first decoder layers (DeepStack): pruning before the
    last of them is refused at apply; from it on, pruning runs."""
    from transformers import Qwen3VLForConditionalGeneration

    config = build("qwen3_vl", "sdpa").config
    config.vision_config.deepstack_visual_indexes = [0, 1]
    config.text_config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(visattn.OptionError, match=r"DeepStack .* layers 0\.\.1, so tokens can be dropped from layer 2 "
                                                  r"on \(got 1\); pass layer >= 2"):
        visattn.apply(model, "prune", strategy="fastv", layer=1)
    assert not visattn.applied(model)
    inputs = vlm_inputs("qwen3_vl", model)
    handle = visattn.apply(model, "prune", strategy="fastv", keep=0.5, layer=2)
    try:
        logits = _run(model, inputs).logits
    finally:
        visattn.remove(model)
    assert logits.shape[1] < inputs["input_ids"].shape[1] and torch.isfinite(logits).all()  # visual tokens dropped
    assert handle.kept
