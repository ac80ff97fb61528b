"""The block-sparse Triton kernel matches the dense-masked reference, forward and backward.

CPU tests run the Triton kernels in Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before
Triton is first imported, which other tests may already have done, so the interpreted cases run in
one child process started with it (``run_cases``), and each test reads its case's result. GPU tests
(``-m gpu``) run the compiled kernels at full shapes and skip without CUDA.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from interpreter import run_interpreted

from visattn import _logging
from visattn.core.attention import attention, block_mask, block_sparse_attention_reference
from visattn.errors import KernelUnavailableError, ShapeError
from visattn.kernels.block_sparse import block_sparse_attention

TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


def random_lists(b: int, h: int, nqb: int, nkb: int, max_kv: int, gen: torch.Generator,
                 device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random kv blocks per query block, random counts, query block 0 with an empty list."""
    idx = torch.stack([torch.randperm(nkb, generator=gen)[:max_kv] for _ in range(b * h * nqb)])
    cnt = torch.randint(0, max_kv + 1, (b, h, nqb), generator=gen)
    cnt[..., 0] = 0
    return idx.view(b, h, nqb, max_kv).to(device), cnt.to(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check_against_reference(b: int, h: int, hkv: int, n: int, d: int, block_q: int, block_k: int,
                            dtype: torch.dtype, *, always=None, broadcast: bool = False, lse_grad: bool = False,
                            device: str = "cpu", max_kv: int = 3, seed: int = 0, compiled: bool | str = False,
                            ordered: bool = False, strided: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(b, hkv, n, d, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(b, hkv, n, d, generator=gen).to(device, dtype).requires_grad_()
    nqb, nkb = -(-n // block_q), -(-n // block_k)
    idx, cnt = random_lists(1 if broadcast else b, 1 if broadcast else h, nqb, nkb, min(max_kv, nkb), gen, device)
    do = torch.randn(b, h, n, d, generator=gen).to(device, dtype)
    w = torch.randn(b, h, n, generator=gen).to(device)
    order = torch.randperm(n, generator=gen).to(device) if ordered else None

    def loss(out, lse):
        value = (out.float() * do.float()).sum()
        return value + (lse * w).sum() if lse_grad else value

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if strided:  # [B, N, H, D] in memory, as a projection's output viewed per head
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        return block_sparse_attention(q, k, v, idx, cnt, block_q=block_q, block_k=block_k, always_kv=always,
                                      order=order, return_lse=True, strict=True, check_values=not compiled)

    if compiled:  # the registered ops, traced whole (no graph break) forward and backward
        attend = torch.compile(attend, backend="aot_eager" if compiled is True else compiled, fullgraph=True)
    out, lse = attend(q, k, v)
    loss(out, lse).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = block_sparse_attention_reference(qf, kf, vf, idx, cnt, block_q=block_q, block_k=block_k,
                                                        always_kv=always, order=order, return_lse=True)
    loss(ref_out, ref_lse).backward()

    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert rel(out, ref_out) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max() < 1e-2
    if not always:  # query block 0 lists nothing and nothing is always attended: zero output
        first = order[:block_q] if ordered else torch.arange(block_q)
        assert not finite[..., first].any() and not out[..., first, :].any()
    for name, got, want in zip("qkv", grads, (qf.grad, kf.grad, vf.grad)):
        assert torch.isfinite(got).all(), f"d{name} has non-finite values"
        assert rel(got, want) < tol, f"d{name}: relative error {rel(got, want):.2e}"


CASES = {
    "fp16": dict(b=1, h=2, hkv=2, n=64, d=16, block_q=16, block_k=16, dtype=torch.float16),
    "bf16-ragged-gqa": dict(b=1, h=2, hkv=1, n=70, d=16, block_q=16, block_k=32, dtype=torch.bfloat16),
    "always-padded-headdim": dict(b=2, h=2, hkv=2, n=50, d=20, block_q=16, block_k=16, dtype=torch.float16,
                                  always=[(0, 5), (30, 34)], lse_grad=True),
    "odd-blocks-always": dict(b=1, h=2, hkv=2, n=90, d=16, block_q=24, block_k=40, dtype=torch.float16,
                              always=[(0, 7)]),
    "bf16-d64-broadcast-lists": dict(b=2, h=2, hkv=2, n=96, d=64, block_q=32, block_k=32, dtype=torch.bfloat16,
                                     broadcast=True, always=[(90, 96)]),
    "compiled-always-lse-grad": dict(b=2, h=2, hkv=1, n=50, d=20, block_q=16, block_k=16, dtype=torch.float16,
                                     always=[(0, 5), (30, 34)], lse_grad=True, compiled=True),
    "compiled": dict(b=1, h=2, hkv=2, n=64, d=16, block_q=16, block_k=16, dtype=torch.bfloat16, compiled=True),
    "ordered-strided": dict(b=2, h=2, hkv=2, n=64, d=16, block_q=16, block_k=16, dtype=torch.float16,
                            ordered=True, strided=True),
    "ordered-always-ragged-gqa": dict(b=1, h=2, hkv=1, n=70, d=20, block_q=16, block_k=32, dtype=torch.bfloat16,
                                      ordered=True, always=[(64, 70)], lse_grad=True),
    "compiled-ordered-strided": dict(b=1, h=2, hkv=2, n=48, d=16, block_q=16, block_k=16, dtype=torch.float16,
                                     ordered=True, strided=True, always=[(0, 3)], compiled=True),
}


def check_dense_identity() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=gen).half() for _ in range(3))
    idx = torch.arange(3).expand(1, 2, 3, 3).contiguous()
    cnt = torch.full((1, 2, 3), 3)
    out = block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16, strict=True)
    assert rel(out, attention(q.float(), k.float(), v.float())) < 1e-2


def run_cases() -> dict[str, str | None]:
    """Run every interpreted case in this process: case name -> None (passed) or the failure."""
    checks = {name: (lambda kw=kw: check_against_reference(**kw)) for name, kw in CASES.items()}
    checks["dense-identity"] = check_dense_identity
    results: dict[str, str | None] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = None
        except Exception as exc:  # reported by the test of that case
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str | None]:
    return run_interpreted(__file__, "run_cases")


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_forward_and_gradients(interpreted_results, case):
    assert interpreted_results[case] is None, interpreted_results[case]


def test_every_block_listed_reproduces_dense_attention(interpreted_results):
    assert interpreted_results["dense-identity"] is None, interpreted_results["dense-identity"]


@pytest.mark.parametrize("bad, message", [
    ("out_of_range", "out of range"),
    ("duplicate", "twice"),
    ("float_dtype", "int32 or int64"),
    ("wrong_shape", "do not fit"),
    ("count_too_large", "kv_counts must lie"),
])
def test_invalid_block_lists_raise_shape_error(bad, message):
    q = k = v = torch.randn(1, 2, 64, 16)
    idx = torch.tensor([0, 1, 2, 3]).expand(1, 2, 4, 4).clone()
    cnt = torch.full((1, 2, 4), 2)
    if bad == "out_of_range":
        idx[0, 1, 2, 0] = 4
    elif bad == "duplicate":
        idx[0, 0, 1, 1] = idx[0, 0, 1, 0]
    elif bad == "float_dtype":
        idx = idx.float()
    elif bad == "wrong_shape":
        idx, cnt = idx[:, :, :3], cnt[:, :, :3]
    else:
        cnt[0, 0, 0] = 5
    with pytest.raises(ShapeError, match=message):
        block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16)


def test_bad_blocks_and_ranges_raise_shape_error():
    q = k = v = torch.randn(1, 2, 64, 16)
    idx, cnt = torch.zeros(1, 1, 4, 1, dtype=torch.int32), torch.ones(1, 1, 4, dtype=torch.int32)
    with pytest.raises(ShapeError, match="block_q must be a positive int"):
        block_sparse_attention(q, k, v, idx, cnt, block_q=0, block_k=16)
    with pytest.raises(ShapeError, match="always_kv"):
        block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16, always_kv=[(10, 70)])
    with pytest.raises(ShapeError, match="multiple of kv heads"):
        block_sparse_attention(q, k[:, :1].expand(1, 3, 64, 16), v[:, :1].expand(1, 3, 64, 16), idx, cnt,
                               block_q=16, block_k=16)


def test_order_routes_blocks_over_the_permuted_tokens():
    """The reference's ``order``: dense attention under the block mask moved back to the tokens' own rows
    (``mask[order[i], order[j]] = routed[i, j]``), without taking the tokens into that order."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 48, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    idx, cnt = random_lists(2, 2, 3, 3, 2, gen)
    order = torch.randperm(48, generator=gen)
    routed = block_mask(idx, cnt, num_q=48, num_kv=48, block_q=16, block_k=16, always_kv=[(40, 48)])
    mask = torch.zeros_like(routed)
    mask[:, :, order[:, None], order[None, :]] = routed
    out, lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_q=16, block_k=16, always_kv=[(40, 48)],
                                                order=order, return_lse=True)
    want, want_lse = attention(q, k, v, mask=mask, return_lse=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    # the CPU entry point falls back to the same reference
    assert torch.equal(block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16, always_kv=[(40, 48)],
                                              order=order), out)


@pytest.mark.parametrize("order, message", [
    (torch.arange(47), "permutation of the 48"),
    (torch.arange(48).float(), "int32 or int64"),
    (torch.zeros(48, dtype=torch.long), "permutation of the 48"),
])
def test_bad_order_raises_shape_error(order, message):
    q = k = v = torch.randn(1, 2, 48, 16)
    idx, cnt = torch.zeros(1, 1, 3, 1, dtype=torch.int32), torch.ones(1, 1, 3, dtype=torch.int32)
    with pytest.raises(ShapeError, match=message):
        block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16, order=order)
    with pytest.raises(ShapeError, match="Nq == Nk"):
        block_sparse_attention(q[:, :, :32], k, v, idx[:, :, :2], cnt[:, :, :2], block_q=16, block_k=16,
                               order=torch.arange(32))


def test_cpu_dispatch_falls_back_once_and_strict_raises(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_logging, "_seen", set())
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    idx, cnt = random_lists(1, 2, 3, 3, 2, gen)
    with caplog.at_level(logging.WARNING, logger="visattn"):
        out = block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16)
        block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16)
    assert len([r for r in caplog.records if "PyTorch reference" in r.getMessage()]) == 1
    ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_q=16, block_k=16)
    assert torch.equal(out, ref)
    with pytest.raises(KernelUnavailableError, match="strict"):
        block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16, strict=True)


@pytest.fixture
def compiled():
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("needs a CUDA GPU (and Triton's interpreter off)")


@pytest.mark.gpu
@pytest.mark.parametrize("d, block, dtype", [(128, 64, torch.bfloat16), (128, 128, torch.bfloat16),
                                              (64, 128, torch.float16)])
def test_gpu_kernel_matches_reference_at_full_shapes(compiled, d, block, dtype):
    check_against_reference(1, 4, 4, 4096, d, block, block, dtype, device="cuda", max_kv=8)
    check_against_reference(2, 4, 2, 4000, d, block, block, dtype, device="cuda", max_kv=8,
                            always=[(0, 77), (2000, 2100)], seed=1)
    check_against_reference(2, 4, 4, 4096, d, block, block, dtype, device="cuda", max_kv=8, ordered=True,
                            strided=True, always=[(4000, 4096)], seed=2)
    # inside torch.compile with Inductor: the kernels launched from Inductor's own code (torch.library.triton_op)
    check_against_reference(1, 4, 2, 4000, d, block, block, dtype, device="cuda", max_kv=8, ordered=True,
                            always=[(0, 77)], lse_grad=True, seed=3, compiled="inductor")



@pytest.mark.gpu
def test_gpu_eager_launches_from_the_compiled_kernel_cache(compiled):
    """Eager inference: the first launch of a signature goes through Triton, later ones call the compiled
    kernel directly (``_runtime.Kernel``); new data of the same shapes, and another alignment, stay exact."""
    from visattn.kernels.block_sparse import _FWD

    gen = torch.Generator().manual_seed(4)
    idx, cnt = random_lists(2, 4, 16, 16, 4, gen, "cuda")
    with torch.inference_mode():
        for offset in (0, 0, 0, 4, 4):  # 4 halves (8 bytes) change the pointers' alignment modulo 16 bytes
            q, k, v = (torch.randn(2, 4, 2048 * 64 + offset, generator=gen).cuda().half()[..., offset:]
                       .view(2, 4, 2048, 64) for _ in range(3))
            out = block_sparse_attention(q, k, v, idx, cnt, block_q=128, block_k=128, strict=True)
            ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, block_q=128,
                                                   block_k=128)
            assert rel(out, ref) < TOL[torch.float16]
    assert len(_FWD._compiled) >= 2  # one signature per alignment


def test_launch_table_sends_a_known_signature_straight_to_its_compiled_kernel(monkeypatch):
    """``_runtime.Kernel`` without a GPU: a stand-in Triton kernel records how each launch reached it. The first
    launch of a signature goes through the kernel (Triton's binding and autotuning) and is kept; a second with new
    data of the same signature calls the kept launcher with the constexpr values appended; a tensor at another
    address modulo 16, another shape or another int is a new signature."""
    from visattn.kernels import _runtime

    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("direct", grid, args))

    class Jit:
        arg_names = ["X", "n", "BLOCK"]

        def __getitem__(self, grid):
            def launch(*args, **meta):
                calls.append(("triton", grid(meta), args, meta))
                return Compiled()
            return launch

    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    kernel = _runtime.Kernel("unused", "unused")
    kernel.__dict__["jit"] = Jit()
    grid = lambda meta: (4 // meta["BLOCK"],)  # noqa: E731
    buf = torch.zeros(16, dtype=torch.float32)
    x, y, moved = buf[:8], buf[8:], buf[1:9]
    kernel(grid, x, 8, BLOCK=2)
    kernel(grid, y, 8, BLOCK=2)
    assert calls == [("triton", (2,), (x, 8), {"BLOCK": 2}), ("direct", (2, 1, 1), (y, 8, 2))]
    for args in ((moved, 8), (buf[:4], 8), (x, 4)):
        calls.clear()
        kernel(grid, *args, BLOCK=2)
        assert [c[0] for c in calls] == ["triton"], args
    assert len(kernel._compiled) == 4
