"""visual_sink (VAR): sinks found from planted massive activations, redistribution exact against a dense
reference, p=1 bit-identical, generate() with the KV cache, errors. Tiny LLaVA, LLaVA-NeXT, Qwen2-VL and
Qwen2.5-VL models (tests/tiny_vlms.py) with a left-padded batch of two prompts of different lengths."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from interpreter import run_interpreted
from tiny_vlms import BUILDERS, IMAGE, PAD, assert_identity, build, forward_logits, generate, vlm_inputs

import visattn
from visattn.core.attention import attention_probs
from visattn.core.redistribute import find_sinks, redistribute
from visattn.frameworks import transformers as tfa
from visattn.patching import Patcher

SINK_DIM, OTHER_DIM, BIG = 3, 7, 1e4  # planted: the sink dimension, a massive dimension the reference lacks
TAU = 4.0  # RMS-normalised values reach sqrt(32) ~ 5.7 in these 32-wide models
OPTIONS = dict(p=0.6, tau=TAU, rho=1.0, summ=0.0)


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = build(request.param, "sdpa")
    return model, vlm_inputs(request.param, model)


def _plant(model: torch.nn.Module) -> tuple[Patcher, dict[str, torch.Tensor]]:
    """Massive activations at the first decoder layer's input of every forward over a whole prompt: in
    SINK_DIM at each sample's first real token and first image token, in OTHER_DIM at its last image token."""
    patcher, where = Patcher(), {}

    def ids(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        is_image = ids == IMAGE
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:  # none, or 4-D (a static cache): read the padding
            mask = ids != PAD
        where["first"] = mask[:, -ids.shape[1]:].int().argmax(1)
        where["image"] = is_image.int().argmax(1)
        where["last_image"] = ids.shape[1] - 1 - is_image.flip(1).int().argmax(1)

    def plant(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = args[0]
        if hidden.shape[1] == 1:
            return args, kwargs
        hidden = hidden.clone()
        rows = torch.arange(hidden.shape[0])
        hidden[rows, where["first"], SINK_DIM] += BIG
        hidden[rows, where["image"], SINK_DIM] += BIG
        hidden[rows, where["last_image"], OTHER_DIM] += BIG
        return (hidden, *args[1:]), kwargs

    patcher.add_hook(model.register_forward_pre_hook(ids, with_kwargs=True))
    patcher.add_hook(tfa.decoder_layers(model)[0].register_forward_pre_hook(plant, with_kwargs=True))
    return patcher, where


def _dense_reference(model: torch.nn.Module, patcher: Patcher, layer: int, sinks: torch.Tensor, ids: torch.Tensor,
                     mask: torch.Tensor) -> None:
    """Layer ``layer`` computes every row densely (all heads, float32) and applies ``redistribute`` to the
    text rows after the image: the definition, without the method's row picking and write-back."""
    image = (ids == IMAGE) & mask.bool()
    text = mask.bool() & ~image & (image.cumsum(1) > 0)

    def make_route(idx: int, module: torch.nn.Module, implementation: str) -> tfa.Route:
        def route(call: Any, module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
            full = tfa.stock_mask(implementation, module, q, k, attention_mask, kwargs.get("is_causal"))
            probs = attention_probs(q, k, scale=kwargs["scaling"], mask=full, head_mean=False)
            moved = redistribute(probs, sinks[:, None, None, :], image[:, None, None, :], p=OPTIONS["p"],
                                 rho=OPTIONS["rho"], summ=OPTIONS["summ"])
            probs = torch.where(text[:, None, :, None], moved, probs)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            return (probs @ v).transpose(1, 2).to(q.dtype), None

        return route

    tfa.route_attention(model, patcher, [layer], make_route)


# --- the math, on hand-made tensors ---

def test_redistribution_keeps_p_of_sink_mass_and_gives_the_rest_in_proportion() -> None:
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.1, 0.2],    # centric: image share 0.7, sink share 0.4/0.7
                          [0.1, 0.1, 0.0, 0.1, 0.7],    # image share 0.2 < summ 0.3: unchanged
                          [0.0, 0.5, 0.1, 0.1, 0.3]])   # sink share 0.5/0.7 > rho 0.6: unchanged
    image = torch.tensor([False, True, True, True, False])
    sink = torch.tensor([False, True, False, False, True])  # the text sink (column 4) is not an image sink
    out = redistribute(probs, sink, image, p=0.6, rho=0.6, summ=0.3)
    torch.testing.assert_close(out.sum(-1), torch.ones(3))
    torch.testing.assert_close(out[0, 1], torch.tensor(0.6 * 0.4))
    freed = 0.4 * 0.4
    torch.testing.assert_close(out[0, 2:4], probs[0, 2:4] + freed * probs[0, 2:4] / probs[0, 2:4].sum())
    torch.testing.assert_close(out[0, [0, 4]], probs[0, [0, 4]])
    assert torch.equal(out[1:], probs[1:])
    assert torch.equal(redistribute(probs, sink, image, p=1.0, rho=1.0, summ=0.0), probs)


def test_redistribution_of_random_rows_sums_to_one() -> None:
    probs = torch.randn(2, 4, 6, 50).softmax(-1)
    image = torch.zeros(2, 1, 1, 50, dtype=torch.bool)
    image[..., 10:40] = True
    sink = torch.rand(2, 1, 1, 50) < 0.1
    out = redistribute(probs, sink, image, p=0.3, rho=1.0, summ=0.0)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 4, 6))
    kept = (out * (sink & image)).sum(-1) / (probs * (sink & image)).sum(-1)
    torch.testing.assert_close(kept, torch.full_like(kept, 0.3))


def test_sink_dimensions_are_those_of_the_reference_token() -> None:
    hidden = torch.randn(2, 6, 64)
    hidden[0, 0, 5] = hidden[0, 3, 5] = hidden[1, 2, 9] = hidden[1, 4, 9] = 1e4
    hidden[0, 4, 11] = 1e4  # massive, but not in a sink dimension of sample 0
    dims, tokens = find_sinks(hidden, torch.tensor([0, 2]), tau=6.0)
    assert dims.nonzero().tolist() == [[0, 5], [1, 9]]
    assert tokens.nonzero().tolist() == [[0, 0], [0, 3], [1, 2], [1, 4]]


# --- on the four model families ---

def test_p_1_reproduces_stock_logits_andgenerate(case: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    model, inputs = case
    assert_identity(model, inputs, "visual_sink", p=1.0, tau=TAU)


def test_planted_sinks_are_found_and_redistribution_matches_the_dense_reference(
        case: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    model, inputs = case
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    planted, where = _plant(model)
    try:
        stock = forward_logits(model, inputs)
        handle = visattn.apply(model, "visual_sink", **OPTIONS)
        try:
            logits = forward_logits(model, inputs)
        finally:
            visattn.remove(model)
        layer = tfa.language_layers(model)[0]
        assert set(handle.sink_tokens) == {layer}  # every layer but the last
        dims, sinks = handle.sink_dims[layer], handle.sink_tokens[layer]
        assert dims.nonzero()[:, 1].tolist() == [SINK_DIM, SINK_DIM]
        assert sinks.nonzero().tolist() == [[b, int(where["image"][b])] for b in range(2)]
        reference = Patcher()
        _dense_reference(model, reference, layer, sinks, ids, mask)
        try:
            expected = forward_logits(model, inputs)
        finally:
            reference.undo()
    finally:
        planted.undo()
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=0)
    assert (logits[real] - stock[real]).abs().max() > 1e-4


def test_generate_with_cache_matches_full_forwards(case: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    model, inputs = case
    planted, _ = _plant(model)
    try:
        visattn.apply(model, "visual_sink", **OPTIONS)
        try:
            cached = generate(model, inputs)
            full = generate(model, inputs, use_cache=False)
            static = generate(model, inputs, cache_implementation="static")  # a 4-D mask over the cache's capacity
        finally:
            visattn.remove(model)
    finally:
        planted.undo()
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(cached, full) and torch.equal(static, cached)


def test_an_unpadded_prompt_takes_the_causal_path_and_generates_consistently() -> None:
    """No padding: transformers passes no mask (SDPA's is_causal) in prefill and decode."""
    model = build("llava", "sdpa")
    batch = vlm_inputs("llava", model)
    inputs = dict(input_ids=batch["input_ids"][1:, 1:], attention_mask=batch["attention_mask"][1:, 1:],
                  pixel_values=batch["pixel_values"][1:])
    assert bool(inputs["attention_mask"].all())
    planted, _ = _plant(model)
    try:
        stock = forward_logits(model, inputs)
        visattn.apply(model, "visual_sink", **OPTIONS)
        try:
            logits = forward_logits(model, inputs)
            cached, full = generate(model, inputs), generate(model, inputs, use_cache=False)
        finally:
            visattn.remove(model)
    finally:
        planted.undo()
    assert (logits - stock).abs().max() > 1e-4
    assert torch.equal(cached, full)


# --- errors ---

def test_bad_options_and_inputs_raise_clear_errors() -> None:
    model = BUILDERS["llava"]("sdpa").eval()
    for options, match in [(dict(p=1.5), r"p must be a number in \[0.0, 1.0\]"), (dict(p=-0.1), "p must be"),
                           (dict(tau=0), r"tau must be a number > 0"), (dict(rho=2), "rho must be"),
                           (dict(keep=0.5), "unknown option")]:
        with pytest.raises(visattn.OptionError, match=match):
            visattn.apply(model, "visual_sink", **options)
    assert not visattn.applied(model)
    text = torch.tensor([[5, 6, 7, 8]])
    visattn.apply(model, "visual_sink")
    try:
        with pytest.raises(visattn.ShapeError, match="no image tokens.*image_token_id = 90"):
            forward_logits(model, dict(input_ids=text))
        with pytest.raises(visattn.ShapeError, match="pass input_ids"):
            forward_logits(model, dict(inputs_embeds=torch.randn(1, 4, 32)))
    finally:
        visattn.remove(model)


def test_models_without_image_tokens_are_unsupported() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, ResNetConfig, ResNetModel

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=100))
    with pytest.raises(visattn.UnsupportedModelError, match="no image_token_id"):
        visattn.apply(llm, "visual_sink")
    with pytest.raises(visattn.UnsupportedModelError):
        visattn.apply(ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])), "visual_sink")


# --- the fused decode kernel (VAR and PAI), in Triton's interpreter ---

def kernel_cases() -> dict[str, str | None]:
    """Run in a child with TRITON_INTERPRET=1: the decode kernel against the PyTorch path, per case."""
    from visattn.core.redistribute import amplify_logits, attend_rows
    from visattn.kernels.reweighted_decode import decode_row, unavailable_reason

    results: dict[str, str | None] = {}
    gen = torch.Generator().manual_seed(0)
    # float16 only: Triton's interpreter multiplies bfloat16 tiles in tl.dot wrongly (errors of 1e10 on a 16x16
    # product); bfloat16 runs in the GPU tests below
    for dtype, tol in ((torch.float16, 2e-3),):
        for b, h, hkv, nk, d, n in [(2, 4, 2, 150, 64, 120), (3, 6, 2, 33, 80, 20), (2, 20, 1, 70, 32, 60)]:
            name = f"{str(dtype)[6:]}-{b}x{h}/{hkv}x{nk}x{d}"
            q, k, v = (torch.randn(b, x, m, d, generator=gen).to(dtype) for x, m in ((h, 1), (hkv, nk), (hkv, nk)))
            image = torch.zeros(b, n, dtype=torch.bool)
            image[:, 5:n - 3] = True
            sink = (torch.rand(b, n, generator=gen) < 0.15) & image
            mask = torch.ones(b, 1, 1, nk, dtype=torch.bool)
            mask[0, ..., :3] = False  # left padding
            scale = d ** -0.5
            padded = (torch.nn.functional.pad(x, (0, nk - n))[:, None, None] for x in (sink, image))
            sink_cols, image_cols = padded  # the kernel reads classes for the first n keys only
            var = dict(probs_fn=functools.partial(redistribute, sink=sink_cols, image=image_cols, p=0.3, rho=0.9,
                                                  summ=0.1))
            pai = dict(logits_fn=functools.partial(amplify_logits, weight=0.5 * image_cols.float()))
            gain = torch.rand(b, h, generator=gen) * 2  # imbalance: a weight per head
            per_head = dict(logits_fn=functools.partial(amplify_logits,
                                                        weight=0.5 * gain[:, :, None, None] * image_cols.float()))
            try:
                assert unavailable_reason(q, mask) is None
                plain = attend_rows(q.float(), k.float(), v.float(), None, scale=scale, mask=mask)
                cls = image.to(torch.int8) * 2  # 2: image token, 1: sink (VAR only)
                for mode, hooks, classes, g in (("var", var, cls - sink.to(torch.int8), None), ("pai", pai, cls, None),
                                                ("pai", per_head, cls, gain)):
                    ref = attend_rows(q.float(), k.float(), v.float(), None, scale=scale, mask=mask, **hooks)
                    assert float((ref - plain).norm() / plain.norm()) > 10 * tol, f"{mode}: the case changes nothing"
                    for splits in (1, 2, 5):  # one program per row; keys shared out in whole tiles (3 at 5)
                        got = decode_row(q, k, v, mask, classes, scale=scale, mode=mode, alpha=0.5, gain=g, p=0.3,
                                         rho=0.9, summ=0.1, splits=splits, strict=True).transpose(1, 2).float()
                        err = float((got - ref).norm() / ref.norm())
                        assert err < tol, f"{mode}, gain {g is not None}, {splits} splits: relative error {err:.2e}"
                results[name] = None
            except Exception as exc:  # reported by the test
                results[name] = f"{type(exc).__name__}: {exc}"
    return results


def test_decode_kernel_matches_the_pytorch_path_in_the_interpreter() -> None:
    results = run_interpreted(__file__, "kernel_cases", timeout=300)
    assert len(results) == 3 and all(r is None for r in results.values()), results


def compiled_kernel_case() -> str | None:
    """In a child with TRITON_INTERPRET=1: the decode kernel inside ``torch.compile`` (its op, one graph) equals
    the eager launch, for both modes, with and without a mask, a per-head gain, and keys shared out in two splits."""
    from visattn.kernels.reweighted_decode import decode_row

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, x, m, 32, generator=gen).half() for x, m in ((4, 1), (2, 100), (2, 100)))
    classes = (torch.rand(2, 90, generator=gen) * 3).to(torch.int8)
    mask = torch.rand(2, 1, 1, 100, generator=gen) > 0.2
    gain = torch.rand(2, 4, generator=gen)
    try:
        for mode, g, splits, m in [("var", None, 1, mask), ("var", None, 2, None), ("pai", None, 1, None),
                                   ("pai", gain, 2, mask)]:
            def step(q, k, v, m=m, mode=mode, g=g, splits=splits):
                return decode_row(q, k, v, m, classes, scale=0.2, mode=mode, alpha=0.5, gain=g, p=0.3, rho=0.9,
                                  summ=0.1, splits=splits, strict=True)

            torch._dynamo.reset()
            compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v)
            torch.testing.assert_close(compiled, step(q, k, v), rtol=0, atol=0)
        return None
    except Exception as exc:  # reported by the test
        return f"{type(exc).__name__}: {exc}"


def test_decode_kernel_compiles_as_one_op_in_the_interpreter() -> None:
    assert run_interpreted(__file__, "compiled_kernel_case", timeout=300) is None


def model_decode_case() -> str | None:
    """In a child with TRITON_INTERPRET=1: a decode step of visual_sink (planted sinks), pai and imbalance (per-head
    gains on the selected columns) on the fused kernel gives the attention outputs (every layer's o_proj input) of
    the PyTorch path, in a float16 tiny LLaVA."""
    from transformers import DynamicCache

    from visattn.kernels import reweighted_decode

    model = BUILDERS["llava"]("sdpa").half().eval()
    batch = {k: v.half() if v.is_floating_point() else v for k, v in vlm_inputs("llava", model).items()}
    step = torch.tensor([[11], [12]])
    available = reweighted_decode.unavailable_reason
    projections = [m for name, m in model.named_modules() if name.endswith("language_model.layers.0.self_attn.o_proj")
                   or name.endswith("language_model.layers.1.self_attn.o_proj")]
    assert len(projections) == 2

    def decode_outputs(method: str | None, options: dict, kernel: bool = True) -> torch.Tensor:
        """The attention outputs of one decode step; ``kernel``: strict (the kernel must run), else the PyTorch
        path."""
        reweighted_decode.unavailable_reason = available if kernel else (lambda q, mask: "the PyTorch path")
        planted, _ = _plant(model)
        if method is not None:
            visattn.apply(model, method, **options, strict=kernel)
        seen: list[torch.Tensor] = []
        hooks = [m.register_forward_pre_hook(lambda module, args: seen.append(args[0].float())) for m in projections]
        try:
            with torch.no_grad():
                cache = DynamicCache(config=model.config)
                model(**batch, past_key_values=cache)
                seen.clear()
                mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], 1)
                model(input_ids=step, attention_mask=mask, past_key_values=cache)
            return torch.stack(seen)
        finally:
            reweighted_decode.unavailable_reason = available
            for hook in hooks:
                hook.remove()
            if method is not None:
                visattn.remove(model)
            planted.undo()

    try:
        stock = decode_outputs(None, {})
        for method, options in [("visual_sink", dict(OPTIONS, p=0.0)),
                                ("head_modulation", dict(strategy="pai", alpha=2.0, decoder_layers=[0, 1])),
                                ("head_modulation", dict(strategy="imbalance", alpha=20.0))]:
            fused, reference = decode_outputs(method, options), decode_outputs(method, options, kernel=False)
            changed, error = float((reference - stock).abs().max()), float((fused - reference).abs().max())
            assert error < changed / 20, f"{method} {options}: {error:.2e} off; the method moves {changed:.2e}"
        return None
    except Exception as exc:  # reported by the test
        return f"{type(exc).__name__}: {exc}"


def test_decode_steps_on_the_fused_kernel_match_the_pytorch_path_in_the_interpreter() -> None:
    assert run_interpreted(__file__, "model_decode_case", timeout=300) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_kernel_eager_and_under_inductor_match_the_pytorch_path() -> None:
    """LLaVA-7B-sized decode rows (16 samples, 32 heads of 128, 700 keys, left padding): the eager launch and the
    op compiled by Inductor (``triton_op``: Inductor launches the kernel) against the PyTorch path, both modes."""
    from visattn.core.redistribute import amplify_logits, attend_rows
    from visattn.kernels.reweighted_decode import decode_row

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, nk, d, n = 16, 32, 700, 128, 650
    q, k, v = (torch.randn(b, h, m, d, generator=gen, device="cuda", dtype=torch.float16) for m in (1, nk, nk))
    image = torch.zeros(b, n, dtype=torch.bool, device="cuda")
    image[:, 40:616] = True
    sink = (torch.rand(b, n, generator=gen, device="cuda") < 0.02) & image
    mask = torch.ones(b, 1, 1, nk, dtype=torch.bool, device="cuda")
    mask[::2, ..., :7] = False
    cols = [torch.nn.functional.pad(x, (0, nk - n))[:, None, None] for x in (sink, image)]
    hooks = {"var": dict(probs_fn=functools.partial(redistribute, sink=cols[0], image=cols[1], p=0.3, rho=0.9,
                                                    summ=0.1)),
             "pai": dict(logits_fn=functools.partial(amplify_logits, weight=0.5 * cols[1].float()))}
    classes = {"var": image.to(torch.int8) * 2 - sink.to(torch.int8), "pai": image.to(torch.int8) * 2}
    with torch.inference_mode():
        for mode in ("var", "pai"):
            def row(q, k, v, mode=mode):
                return decode_row(q, k, v, mask, classes[mode], scale=d ** -0.5, mode=mode, alpha=0.5, p=0.3, rho=0.9,
                                  summ=0.1, strict=True)

            ref = attend_rows(q.float(), k.float(), v.float(), None, scale=d ** -0.5, mask=mask, **hooks[mode])
            torch._dynamo.reset()
            for got in (row(q, k, v), torch.compile(row, fullgraph=True)(q, k, v)):
                err = float((got.transpose(1, 2).float() - ref).norm() / ref.norm())
                assert err < 2e-3, f"{mode}: relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_kernel_follows_the_batch_and_the_splits_between_eager_launches() -> None:
    """Eager launches bind a compiled kernel and its grid per signature: a smaller batch (that no kernel argument
    shows) and every split count get their own, and each equals the PyTorch path."""
    from visattn.core.redistribute import amplify_logits, attend_rows
    from visattn.kernels.reweighted_decode import decode_row

    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, nk, d = 16, 32, 1158, 128
    q, k, v = (torch.randn(b, h, m, d, generator=gen, device="cuda", dtype=torch.bfloat16) for m in (1, nk, nk))
    image = torch.zeros(b, 646, dtype=torch.bool, device="cuda")
    image[:, 35:611] = True
    gain = torch.rand(b, h, generator=gen, device="cuda")
    weight = 0.5 * gain[:, :, None, None] * torch.nn.functional.pad(image, (0, nk - 646))[:, None, None].float()
    ref = attend_rows(q.float(), k.float(), v.float(), None, scale=d ** -0.5,
                      logits_fn=functools.partial(amplify_logits, weight=weight))
    with torch.inference_mode():
        for rows, splits in [(16, None), (1, None), (2, None), (16, 1), (16, 3), (2, 7)]:
            got = decode_row(q[:rows], k[:rows], v[:rows], None, image[:rows].to(torch.int8) * 2, scale=d ** -0.5,
                             mode="pai", alpha=0.5, gain=gain[:rows], splits=splits, strict=True)
            err = float((got.transpose(1, 2).float() - ref[:rows]).norm() / ref[:rows].norm())
            assert err < 1e-2, f"batch {rows}, splits {splits}: relative error {err:.2e}"


@pytest.mark.parametrize("method,options,identity", [
    ("visual_sink", dict(tau=1.0, rho=1.0, summ=0.0), dict(p=1.0)),
    ("head_modulation", dict(strategy="pai", alpha=0.5), dict(alpha=0.0)),
    ("head_modulation", dict(strategy="vhr", alpha=0.5), dict(strategy="vhr", alpha=0.0)),
])
def test_sliding_window_layers_run_stock_and_the_full_ones_the_method(method: str, options: dict,
                                                                      identity: dict) -> None:
    """Gemma 3: its sliding-window layer keeps only the last keys in its cache, so it runs stock; the full-attention
    layers run the method, in forward and generate(), and the identity setting changes nothing."""
    from tiny_vlms import gemma3, gemma3_inputs

    model, batch = gemma3(), gemma3_inputs()
    language = [tfa.attention_layers(model)[i][1] for i in tfa.language_layers(model)]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return model(**batch).logits, model.generate(**batch, max_new_tokens=4, do_sample=False)

    stock = run()
    for opts, same in ((identity, True), (options, False)):
        visattn.apply(model, method, **opts)
        try:
            routed = [tfa.ROUTES_ATTR in m.__dict__ for m in language]
            got = run()
        finally:
            visattn.remove(model)
        assert not routed[0] and any(routed[1:])  # the sliding-window layer is left alone
        assert torch.equal(got[0], stock[0]) == same and (not same or torch.equal(got[1], stock[1]))
    assert torch.equal(run()[0], stock[0])
    if method == "head_modulation":
        with pytest.raises(visattn.OptionError, match=r"decoder_layers \[0\] are sliding-window layers"):
            visattn.apply(model, method, decoder_layers=[0, 1])
        assert not visattn.applied(model)


def test_a_model_with_no_layer_to_change_is_refused_at_apply() -> None:
    from tiny_vlms import CLIP, PAD, TEXT
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**{**TEXT,
                         "num_hidden_layers": 1}), image_token_id=IMAGE, pad_token_id=PAD)
    model = LlavaForConditionalGeneration(config).eval()
    with pytest.raises(visattn.UnsupportedModelError, match="no decoder layer VAR can change: it changes every "
                                                            "decoder layer but the last"):
        visattn.apply(model, "visual_sink")
    assert not visattn.applied(model)
