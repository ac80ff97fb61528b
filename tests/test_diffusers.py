"""diffusers adapter: inspect leaves every supported family bit-identical, remove() restores it exactly,
q/k are the tensors stock attention uses, and the helpers (processors, call context, token layouts) work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

import visattn  # noqa: E402
from visattn.core.attention import attention_probs  # noqa: E402
from visattn.frameworks import diffusers as adapter  # noqa: E402
from visattn.patching import Patcher  # noqa: E402

B, T = 2, 5  # batch, text tokens


@dataclass
class Case:
    model: torch.nn.Module
    inputs: dict[str, Any]
    out: torch.Tensor  # stock output
    maps: list[tuple[int, int]]  # per attention layer, in execution order: (Nq, Nk) of its map
    grid: tuple[int, ...]  # call_grid of the inputs
    layouts: list[tuple[int, tuple[int, ...] | None, int, tuple]]  # per layer: num_tokens, grid, grid_start, text


def _run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _unet() -> tuple:
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    inputs = dict(sample=torch.randn(B, 4, 8, 8), timestep=torch.tensor([10, 10]),
                  encoder_hidden_states=torch.randn(B, T, 16))
    full, mid = (64, None, 0, ()), (16, None, 0, ())
    # down (8x8), mid (4x4), up (8x8, two attention blocks); each attn1 (self) then attn2 (cross)
    maps = [(64, 64), (64, T), (16, 16), (16, T), (64, 64), (64, T), (64, 64), (64, T)]
    layouts = [full, full, mid, mid, full, full, full, full]
    layouts = [(n, (8, 8) if n == 64 else (4, 4), s, t) for n, _, s, t in layouts]
    return model, inputs, maps, (8, 8), layouts


def _flux() -> tuple:
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    inputs = dict(hidden_states=torch.randn(B, 12, 4), encoder_hidden_states=torch.randn(B, T, 16),
                  pooled_projections=torch.randn(B, 8), timestep=torch.tensor([0.5, 0.5]), img_ids=img_ids,
                  txt_ids=torch.zeros(T, 3))
    joint = (T + 12, (3, 4), T, ((0, T),))  # text first, in the dual and the single block
    return model, inputs, [(17, 17)] * 2, (3, 4), [joint] * 2


def _sd3() -> tuple:
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, T, 16),
                  pooled_projections=torch.randn(B, 8), timestep=torch.tensor([10, 10]))
    joint, image = (16 + T, (4, 4), 0, ((16, 16 + T),)), (16, (4, 4), 0, ())  # text last; dual attn2: image only
    return model, inputs, [(21, 21), (16, 16), (21, 21)], (4, 4), [joint, image, joint]


def _wan() -> tuple:
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(B, 4, 2, 8, 8), timestep=torch.tensor([10, 10]),
                  encoder_hidden_states=torch.randn(B, T, 16))
    video = (32, (2, 4, 4), 0, ())  # self-attention: video only; cross-attention queries: video
    return model, inputs, [(32, 32), (32, T)] * 2, (2, 4, 4), [video] * 4


def _cogvideox() -> tuple:
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=T)
    inputs = dict(hidden_states=torch.randn(B, 3, 4, 8, 8), encoder_hidden_states=torch.randn(B, T, 16),
                  timestep=torch.tensor([10, 10]))
    return model, inputs, [(T + 48, T + 48)], (3, 4, 4), [(T + 48, (3, 4, 4), T, ((0, T),))]


def _hunyuan() -> tuple:
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    inputs = dict(hidden_states=torch.randn(B, 4, 2, 8, 8), timestep=torch.tensor([10, 10]),
                  encoder_hidden_states=torch.randn(B, T, 16),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
                  pooled_projections=torch.randn(B, 8), guidance=torch.tensor([3.0, 3.0]))
    joint = (32 + T, (2, 4, 4), 0, ((32, 32 + T),))  # text last (padded text masked out)
    return model, inputs, [(T, T), (37, 37), (37, 37)], (2, 4, 4), [(T, None, 0, ((0, T),)), joint, joint]


def _pixart() -> tuple:
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=4, cross_attention_dim=16, caption_channels=16, norm_num_groups=4, use_additional_conditions=False)
    inputs = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, T, 16),
                  timestep=torch.tensor([10, 10]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs, [(16, 16), (16, T)] * 2, (4, 4), [(16, (4, 4), 0, ())] * 4


BUILDERS = {"unet": _unet, "flux": _flux, "sd3": _sd3, "wan": _wan, "cogvideox": _cogvideox,
            "hunyuanvideo": _hunyuan, "pixart": _pixart}


def _single(family: str) -> Case:
    torch.manual_seed(0)
    model, inputs, maps, grid, layouts = BUILDERS[family]()
    model.eval()
    return Case(model, inputs, _run(model, inputs), maps, grid, layouts)


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request: pytest.FixtureRequest) -> Case:
    return _single(request.param)


def _processors(model: torch.nn.Module) -> dict[str, Any]:
    return {name: module.processor for name, module in adapter.attention_layers(model)}


def test_layers_match_diffusers_processors_in_execution_order(case: Case) -> None:
    names = [n for n, _ in adapter.attention_layers(case.model)]
    assert sorted(f"{n}.processor" for n in names) == sorted(case.model.attn_processors)
    seen: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.append(n)) for n, m in case.model.named_modules()
             if n in names]
    try:
        _run(case.model, case.inputs)
    finally:
        for h in hooks:
            h.remove()
    assert seen == names


def test_inspect_is_bit_identical_and_remove_restores_everything(case: Case) -> None:
    model = case.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = _processors(model)
    handle = visattn.apply(model, "inspect")
    assert torch.equal(_run(model, case.inputs), case.out)
    assert len(handle.maps) == len(case.maps)
    for layer, (nq, nk) in enumerate(case.maps):
        (probs,) = handle.maps[layer]
        assert probs.shape == (B, nq, nk)
        torch.testing.assert_close(probs.sum(-1), torch.ones(B, nq), atol=1e-5, rtol=0)
    visattn.remove(model)
    assert torch.equal(_run(model, case.inputs), case.out)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert all(p is processors[n] for n, p in _processors(model).items())
    assert not model._forward_hooks and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_call_grid_and_token_layout_per_family(case: Case) -> None:
    grid, text_tokens = adapter.call_grid(case.model, case.inputs)
    assert grid == case.grid and text_tokens == T
    for layer, (num_tokens, layer_grid, grid_start, text) in enumerate(case.layouts):
        layout = adapter.token_layout(case.model, layer, grid, case.maps[layer][0])
        assert (layout.num_tokens, layout.grid, layout.grid_start, layout.text) == (
            num_tokens, layer_grid, grid_start, text), layer
        assert layout.num_tokens == case.maps[layer][0]  # the query length inspect recorded


def test_install_context_tracks_timestep_step_and_layer(case: Case) -> None:
    model, patcher = case.model, Patcher()
    ctx = adapter.install_context(model, patcher).get()  # this thread's context
    seen: list[int | None] = []
    probes = [m.register_forward_pre_hook(lambda m, a: seen.append(ctx.layer))
              for _, m in adapter.attention_layers(model)]
    try:
        assert ctx.step == -1
        _run(model, case.inputs)
        later = dict(case.inputs, timestep=case.inputs["timestep"] * 0.5)
        assert torch.equal(_run(model, later), _run(model, later))  # context hooks change nothing
    finally:
        for p in probes:
            p.remove()
        patcher.undo()
    assert ctx.step == 2
    torch.testing.assert_close(ctx.timestep, case.inputs["timestep"] * 0.5)
    n = len(case.maps)
    assert seen == list(range(n)) * 3 and ctx.layer is None
    assert ctx.extra == {"grid": case.grid}
    assert torch.equal(_run(model, case.inputs), case.out)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# --- one model is enough for what follows -------------------------------------------------------------


@pytest.fixture(scope="module")
def flux() -> Case:
    return _single("flux")


@pytest.fixture(scope="module")
def pixart() -> Case:
    return _single("pixart")


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))


def test_inspect_maps_equal_reference_from_independent_qk(flux: Case) -> None:
    """q/k rebuilt from the weights (projections, qk-norm, text first, rotary) give inspect's exact map."""
    model = flux.model
    layers = adapter.attention_layers(model)
    calls: dict[int, dict[str, Any]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, kw, i=i: calls.__setitem__(i, kw), with_kwargs=True)
             for i, (_, m) in enumerate(layers)]
    handle = visattn.apply(model, "inspect")
    try:
        _run(model, flux.inputs)
    finally:
        visattn.remove(model)
        for h in hooks:
            h.remove()
    for i, (_, attn) in enumerate(layers):
        kw = calls[i]
        with torch.no_grad():
            x, heads = kw["hidden_states"], attn.heads
            q, k = attn.norm_q(_split(attn.to_q(x), heads)), attn.norm_k(_split(attn.to_k(x), heads))
            text = kw.get("encoder_hidden_states")
            if text is not None:  # dual block: text tokens first
                q = torch.cat([attn.norm_added_q(_split(attn.add_q_proj(text), heads)), q], dim=1)
                k = torch.cat([attn.norm_added_k(_split(attn.add_k_proj(text), heads)), k], dim=1)
            plain = attention_probs(q.transpose(1, 2), k.transpose(1, 2))
            rope = kw["image_rotary_emb"]
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            ref = attention_probs(q.transpose(1, 2), k.transpose(1, 2))
        torch.testing.assert_close(handle.maps[i][0], ref, atol=1e-6, rtol=0)
        assert not torch.allclose(handle.maps[i][0], plain, atol=1e-4)  # rotary embeddings were applied


def test_processor_attending_twice_reports_both_calls() -> None:
    """Wan image-to-video cross-attention attends to the image tokens, then to the (512) text tokens."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32, image_dim=8,
        added_kv_proj_dim=24).eval()
    inputs = dict(hidden_states=torch.randn(B, 4, 2, 8, 8), timestep=torch.tensor([10, 10]),
                  encoder_hidden_states=torch.randn(B, 512, 16), encoder_hidden_states_image=torch.randn(B, 3, 8))
    stock = _run(model, inputs)
    handle = visattn.apply(model, "inspect")
    try:
        assert torch.equal(_run(model, inputs), stock)
    finally:
        visattn.remove(model)
    assert [tuple(m.shape) for m in handle.maps[0]] == [(B, 32, 32)]
    assert [tuple(m.shape) for m in handle.maps[1]] == [(B, 32, 3), (B, 32, 512)]


def test_bad_inputs_raise_documented_errors(flux: Case) -> None:
    model = flux.model
    with pytest.raises(visattn.OptionError, match="out of range"):
        visattn.apply(model, "inspect", layers=[2])
    with pytest.raises(visattn.OptionError):
        visattn.apply(model, "inspect", colour="red")
    visattn.apply(model, "inspect", layers=[0])
    try:
        with pytest.raises(visattn.MethodConflictError):
            visattn.apply(model, "inspect")
    finally:
        visattn.remove(model)
    with pytest.raises(visattn.UnsupportedModelError, match="no attention layers"):
        adapter.attention_layers(model.x_embedder)
    with pytest.raises(visattn.UnsupportedModelError, match="FluxTransformer2DModel"):
        adapter.token_layout(diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4), 0, (2, 2), 0)
    assert torch.equal(_run(model, flux.inputs), flux.out)


def test_layer_without_sdpa_raises_instead_of_recording_nothing(pixart: Case) -> None:
    model, patcher = pixart.model, Patcher()
    adapter.set_processors(model, patcher, lambda i, name, m: AttnProcessor() if i == 0 else None)
    try:
        visattn.apply(model, "inspect", layers=[0])
        with pytest.raises(visattn.UnsupportedModelError, match="scaled_dot_product_attention"):
            _run(model, pixart.inputs)
    finally:
        visattn.remove(model)
        patcher.undo()
    assert torch.equal(_run(model, pixart.inputs), pixart.out)


def test_set_processors_swaps_chosen_layers_and_undo_restores_the_same_objects(flux: Case) -> None:
    model, patcher = flux.model, Patcher()
    before = _processors(model)
    calls: list[str] = []

    class Counting(type(before["transformer_blocks.0.attn"])):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            calls.append(type(attn).__name__)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    adapter.set_processors(model, patcher, lambda i, name, m: Counting() if name.startswith("single") else None)
    swapped = _processors(model)
    assert isinstance(swapped["single_transformer_blocks.0.attn"], Counting)
    assert swapped["transformer_blocks.0.attn"] is before["transformer_blocks.0.attn"]
    assert model.attn_processors["single_transformer_blocks.0.attn.processor"] is swapped[
        "single_transformer_blocks.0.attn"]
    assert torch.equal(_run(model, flux.inputs), flux.out) and calls == ["FluxAttention"]
    patcher.undo()
    assert all(p is before[n] for n, p in _processors(model).items())
    assert torch.equal(_run(model, flux.inputs), flux.out)


# --- pipelines ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit_pipe() -> diffusers.DiTPipeline:
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, norm_num_groups=4, num_embeds_ada_norm=10)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8)
    pipe = diffusers.DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: diffusers.DiTPipeline, steps: int = 2) -> torch.Tensor:
    return pipe(class_labels=[1], num_inference_steps=steps, guidance_scale=1.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_pipeline_is_detected_and_its_transformer_inspected(dit_pipe: diffusers.DiTPipeline) -> None:
    stock = _generate(dit_pipe)
    handle = visattn.apply(dit_pipe, "inspect")
    assert handle.model is dit_pipe.transformer and visattn.applied(dit_pipe) == [handle]
    assert (_generate(dit_pipe) == stock).all()
    assert [tuple(m.shape) for m in handle.maps[0]] == [(1, 16, 16)] * 2  # one map per denoising step
    visattn.remove(dit_pipe)
    assert (_generate(dit_pipe) == stock).all()


def test_install_context_counts_pipeline_steps(dit_pipe: diffusers.DiTPipeline) -> None:
    patcher = Patcher()
    contexts = adapter.install_context(dit_pipe.transformer, patcher)
    try:
        _generate(dit_pipe, steps=3)
    finally:
        patcher.undo()
    ctx = contexts.get()
    assert ctx.step == 2
    assert int(ctx.timestep.flatten()[0]) == int(dit_pipe.scheduler.timesteps[-1])
    assert ctx.extra == {"grid": (4, 4)}  # DiT: a family with a known token layout


def test_pipeline_without_denoiser_is_rejected() -> None:
    class SchedulerOnly(diffusers.DiffusionPipeline):
        def __init__(self, scheduler: diffusers.DDIMScheduler) -> None:
            super().__init__()
            self.register_modules(scheduler=scheduler)

    with pytest.raises(visattn.UnsupportedTargetError, match="neither a .transformer nor a .unet"):
        visattn.apply(SchedulerOnly(diffusers.DDIMScheduler()), "inspect")
