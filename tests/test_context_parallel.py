"""sparse_video as the diffusers attention backend ``visattn_sparse`` (issue 11): registered so that
``set_attention_backend`` selects it; the single-process path reproduces the processor's output and the identity
setting reproduces stock; remove() restores the previous backends; two CPU processes under diffusers' context
parallelism (gloo), Ulysses and ring, give the single-process output of sparse_video and of inspect's maps
on Wan, LTX-Video (Ulysses only), Flux, Flux.2 and Qwen-Image (issue 22); unsupported models and options raise clear
errors."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import ContextParallelConfig  # noqa: E402
from diffusers.models._modeling_parallel import ParallelConfig  # noqa: E402
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, attention_backend  # noqa: E402
from test_diffusers import BUILDERS, _run  # noqa: E402
from tiny_dits import BUILDERS as DIT_BUILDERS  # noqa: E402

import visattn  # noqa: E402
from visattn.errors import OptionError, UnsupportedModelError  # noqa: E402
from visattn.frameworks.diffusers import attention_layers  # noqa: E402

SPARSE = dict(keep=0.5, tile=(1, 2, 2))  # the tiny Wan's 2x4x4 grid: 8 blocks, 4 kept per query block


def _model(family: str = "wan") -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    model, inputs, *_ = BUILDERS[family]() if family in BUILDERS else DIT_BUILDERS[family]()
    return model.eval(), inputs


# Two ranks: each family's options (the tiny grids: Wan 2x4x4 tokens, LTX-Video 2x3x4, Flux, Flux.2 and Qwen-Image
# 3x4) and its inputs with 4 text tokens (Qwen-Image: a ragged text mask), so that diffusers splits the text into
# equal shards. LTX-Video without its text mask: with it diffusers 0.42.1's Ulysses attention fails in the stock
# model ("output with shape [2, 1, 24, 4] doesn't match the broadcast shape [2, 2, 24, 4]").
PARALLEL = {"wan": SPARSE, "ltx": dict(keep=0.5, tile=(1, 1, 2)), "flux": dict(keep=0.5, tile=(1, 2)),
            "flux2": dict(keep=0.5, tile=(1, 2)), "qwenimage": dict(keep=0.5, tile=(1, 2))}
# LTX-Video's cross-attention runs under the ring too, and no CPU backend returns the log-sum-exp that diffusers'
# ring attention needs ("Native attention does not support return_lse=True"): its ring is not run here.
NO_RING = ("ltx",)
DIFFUSERS = tuple(int(p) for p in diffusers.__version__.split(".")[:2])
# Qwen-Image's joint attention takes a text mask: diffusers 0.42.1's Ulysses attention gathers it with the keys,
# 0.37's does not, and its stock model fails under Ulysses ("The size of tensor a (16) must match the size of
# tensor b (2)"). Releases in between were not tried.
FAMILY_PARAMS = [pytest.param(f, marks=pytest.mark.skipif(
    f == "qwenimage" and DIFFUSERS < (0, 42), reason="diffusers 0.37's Ulysses attention drops Qwen-Image's mask"))
    for f in PARALLEL]


def _parallel_case(family: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    model, inputs = _model(family)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :4]
    if "encoder_hidden_states_mask" in inputs:
        inputs["encoder_hidden_states_mask"] = inputs["encoder_hidden_states_mask"][:, :4]
    if family == "ltx":
        inputs["encoder_attention_mask"] = None
    if "txt_ids" in inputs:
        inputs["txt_ids"] = inputs["txt_ids"][:4]
    if family == "flux2":  # its plan splits batched ids [B, S, 4]
        for name in ("img_ids", "txt_ids"):
            inputs[name] = inputs[name][None].expand(2, -1, -1)
    return model, inputs


def _backends(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Each attention processor's own attributes (where a selected backend is recorded)."""
    return [dict(module.processor.__dict__) for _, module in attention_layers(model)]


@pytest.fixture(autouse=True)
def _keep_active_backend():
    """``set_attention_backend`` also sets diffusers' process-wide active backend: put it back after each test."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = active


def test_set_attention_backend_selects_the_registered_backend_and_matches_the_processor() -> None:
    model, inputs = _model()
    visattn.apply(model, "sparse_video", **SPARSE)
    by_processor = _run(model, inputs)
    visattn.remove(model)
    backend = visattn.diffusers.SparseVideoAttnBackend(model, **SPARSE)
    assert "visattn_sparse" in _AttentionBackendRegistry._supports_context_parallel
    model.set_attention_backend("visattn_sparse")
    assert {p._attention_backend for p in model.attn_processors.values()} == {"visattn_sparse"}
    assert torch.equal(_run(model, inputs), by_processor)
    model.reset_attention_backend()
    backend.detach()


@pytest.mark.parametrize("family", ["wan", "flux", "hunyuanvideo"])
def test_backend_reproduces_the_processor_and_remove_restores(family: str) -> None:
    model, inputs = _model(family)
    ref, before = _run(model, inputs), _backends(model)
    tile = SPARSE["tile"] if family != "flux" else (1, 2)
    visattn.apply(model, "sparse_video", keep=0.5, tile=tile)
    by_processor = _run(model, inputs)
    visattn.remove(model)
    handle = visattn.apply(model, "sparse_video", keep=0.5, tile=tile, install="attention_backend")
    by_backend = _run(model, inputs)
    handle.remove()
    assert torch.equal(by_backend, by_processor) and not torch.equal(by_backend, ref)
    assert _backends(model) == before and torch.equal(_run(model, inputs), ref)


def test_identity_reproduces_stock_and_dense_calls_keep_the_previous_backend() -> None:
    model, inputs = _model()
    ref = _run(model, inputs)
    visattn.apply(model, "sparse_video", keep=1.0, install="attention_backend")
    assert torch.equal(_run(model, inputs), ref)
    visattn.remove(model)

    model.set_attention_backend("_native_math")  # a user's earlier choice
    math_ref, before = _run(model, inputs), _backends(model)
    visattn.apply(model, "sparse_video", keep=1.0, dense_layers=1, install="attention_backend")
    assert torch.equal(_run(model, inputs), math_ref)
    visattn.remove(model)
    assert _backends(model) == before
    assert {p._attention_backend for p in model.attn_processors.values()} == {"_native_math"}


def test_shard_order_finds_each_joint_token_in_the_gathered_sequence() -> None:
    from visattn.core.layout import TokenLayout
    from visattn.errors import ShapeError
    from visattn.frameworks.diffusers import shard_order

    before = TokenLayout(num_tokens=10, grid=(2, 3), grid_start=4, text=((0, 4),))  # gathered: t t g g g | t t g g g
    assert shard_order(before, 2, torch.device("cpu")).tolist() == [0, 1, 5, 6, 2, 3, 4, 7, 8, 9]
    after = TokenLayout(num_tokens=10, grid=(2, 3), text=((6, 10),))  # gathered: g g g t t | g g g t t
    assert shard_order(after, 2, torch.device("cpu")).tolist() == [0, 1, 2, 5, 6, 7, 3, 4, 8, 9]
    assert shard_order(before, 1, torch.device("cpu")).tolist() == list(range(10))
    with pytest.raises(ShapeError, match="4 text and 6 grid tokens .* equal shards"):
        shard_order(before, 3, torch.device("cpu"))


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(OptionError, match="install must be one of 'processor', 'attention_backend'"):
        visattn.apply(_model()[0], "sparse_video", install="backend")
    cogvideox, _ = _model("cogvideox")
    with pytest.raises(UnsupportedModelError, match=r"dispatch_attention_fn; the processors of CogVideoX.*"
                                                    r"\(transformer_blocks.0.attn1\) call SDPA directly: use "
                                                    "install='processor'"):
        visattn.apply(cogvideox, "sparse_video", install="attention_backend")
    assert not visattn.applied(cogvideox)

    stock, inputs = _model()  # a model nobody prepared, run with the backend selected process-wide
    visattn.diffusers.SparseVideoAttnBackend(_model()[0])  # registers the backend
    with attention_backend("visattn_sparse"), pytest.raises(UnsupportedModelError, match="ran outside a model"):
        _run(stock, inputs)

    for family, config, match in [
            ("hunyuanvideo", ContextParallelConfig(ulysses_degree=2), "supports WanTransformer3DModel, LTXVideo.*"
                                                                     "FluxTransformer2DModel, Flux2.*not Hunyuan"),
            ("flux", ContextParallelConfig(ulysses_degree=2, ulysses_anything=True), "ulysses_anything=True is not")]:
        model, _ = _model(family)
        model._parallel_config = ParallelConfig(context_parallel_config=config)  # as enable_parallelism records it
        with pytest.raises(UnsupportedModelError, match=match):
            visattn.apply(model, "sparse_video", install="attention_backend")
    model, _ = _model()
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    with pytest.raises(OptionError, match="permute cannot run under ring context parallelism"):
        visattn.apply(model, "sparse_video", permute="cluster", install="attention_backend")
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    with pytest.raises(OptionError, match="per-head sliding_tile windows cannot run under Ulysses"):
        visattn.apply(model, "sparse_video", strategy="sliding_tile", window=((1, 1, 1), (1, 3, 3)),
                      install="attention_backend")


# ------------------------------------------------------------------------------------------------------------
# Two or four CPU processes (gloo) under diffusers' own context parallelism


def _join(rank: int, world: int, port: int) -> None:
    """Make this forked process rank ``rank`` of a gloo group of ``world`` on this CPU-only host."""
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    # diffusers 0.42.1 places the rank on device `rank % torch.accelerator.device_count()`, 0 on a CPU-only host
    torch.accelerator.device_count = lambda: 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _leave() -> None:
    # rank 0 hosts the store: leaving before the other ranks have built their meshes resets their sockets
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _spawn(target: Any, world: int, family: str) -> dict[int, Any]:
    """Run ``target(rank, world, port, family, results)`` in ``world`` forked processes; each rank's result."""
    # fork, not spawn: a spawned rank re-imports diffusers (~10 s on two cores) before it can start
    context = multiprocessing.get_context("fork")
    results, port = context.Queue(), _free_port()
    ranks = [context.Process(target=target, args=(r, world, port, family, results)) for r in range(world)]
    for p in ranks:
        p.start()
    try:
        got = dict(results.get(timeout=90) for _ in ranks)
    finally:
        for p in ranks:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, result in got.items():
        assert isinstance(result, dict), f"rank {rank} failed:\n{result}"
    return got


def _rank(rank: int, world: int, port: int, family: str, results: Any) -> None:
    """One rank: the tiny ``family`` model (same seed as the parent) under Ulysses degree ``world``: stock, sparse,
    inspect, and inspect applied before the model was made parallel (refused); then under ring degree ``world``:
    sparse."""
    try:
        _join(rank, world, port)
        model, inputs = _parallel_case(family)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        stock = _run(model, inputs)
        visattn.apply(model, "sparse_video", install="attention_backend", **PARALLEL[family])
        sparse = _run(model, inputs)
        visattn.remove(model)
        restored = torch.equal(_run(model, inputs), stock)
        handle = visattn.apply(model, "inspect", per_head=True)
        _run(model, inputs)
        maps = {layer: handle.last(layer).numpy() for layer in handle.maps}
        visattn.remove(model)
        early, _ = _parallel_case(family)  # inspect applied before the model is made parallel: refused at the call
        visattn.apply(early, "inspect")
        early.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        try:
            _run(early, inputs)
            late = ""
        except UnsupportedModelError as err:
            late = str(err)
        ring_sparse = None
        if family not in NO_RING:
            ring, _ = _parallel_case(family)
            ring.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
            # (the stock model cannot run here: diffusers' ring attention needs a backend that returns the
            # log-sum-exp, which the native SDPA does not; the sparse layers are visattn's, and Wan's cross-attention
            # runs locally)
            visattn.apply(ring, "sparse_video", install="attention_backend", **PARALLEL[family])
            ring_sparse = _run(ring, inputs).numpy()
        results.put((rank, dict(stock=stock.numpy(), sparse=sparse.numpy(), restored=restored, maps=maps, late=late,
                                ring_sparse=ring_sparse)))
        _leave()
    except BaseException:
        results.put((rank, traceback.format_exc()))


def _usp_rank(rank: int, world: int, port: int, family: str, results: Any) -> None:
    """One rank of four: the tiny ``family`` model under Ulysses 2 x ring 2, sparse."""
    try:
        _join(rank, world, port)
        model, inputs = _parallel_case(family)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, ring_degree=world // 2))
        visattn.apply(model, "sparse_video", install="attention_backend", **PARALLEL[family])
        results.put((rank, dict(sparse=_run(model, inputs).numpy())))
        _leave()
    except BaseException:
        results.put((rank, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_two_processes_under_ulysses_and_under_ring_equal_one_process(family: str) -> None:
    """Wan attends over the grid alone; Flux and Flux.2 join the text to it, and each rank holds a shard of both, so
    the gathered sequence interleaves them and the backend reorders it for the routing and back. Under ring
    attention each rank gathers the sequence, routes as one process would and computes its own query blocks.
    inspect records on every rank the per-head maps of one process (Wan's cross-attention included, which runs
    without the all-to-all), and refuses a model made parallel after it was applied."""
    model, inputs = _parallel_case(family)
    stock_ref = _run(model, inputs)
    visattn.apply(model, "sparse_video", install="attention_backend", **PARALLEL[family])
    sparse_ref = _run(model, inputs)
    visattn.remove(model)
    handle = visattn.apply(model, "inspect", per_head=True)
    _run(model, inputs)
    maps_ref = {layer: handle.last(layer) for layer in handle.maps}
    visattn.remove(model)
    for result in _spawn(_rank, 2, family).values():
        torch.testing.assert_close(torch.from_numpy(result["stock"]), stock_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(result["sparse"]), sparse_ref, rtol=1e-5, atol=1e-5)
        assert (torch.from_numpy(result["sparse"]) - stock_ref).abs().max() > 1e-2  # the sparse path ran
        assert result["restored"]
        if family not in NO_RING:
            torch.testing.assert_close(torch.from_numpy(result["ring_sparse"]), sparse_ref, rtol=1e-5, atol=1e-5)
        # inspect: every rank records the maps of one process (all heads, tokens in the joint order)
        assert result["maps"].keys() == maps_ref.keys()
        for layer, expected in maps_ref.items():
            torch.testing.assert_close(torch.from_numpy(result["maps"][layer]), expected, rtol=1e-5, atol=1e-6)
        assert "applied after model.enable_parallelism" in result["late"]


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_four_processes_under_ulysses_and_ring_together_equal_one_process(family: str) -> None:
    model, inputs = _parallel_case(family)
    visattn.apply(model, "sparse_video", install="attention_backend", **PARALLEL[family])
    sparse_ref = _run(model, inputs)
    for result in _spawn(_usp_rank, 4, family).values():
        torch.testing.assert_close(torch.from_numpy(result["sparse"]), sparse_ref, rtol=1e-5, atol=1e-5)
