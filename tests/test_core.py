"""Reference attention in core/: agrees with SDPA, and block-sparse agrees with an explicit mask."""

import pytest
import torch
import torch.nn.functional as F

from visattn.core import TokenLayout, attention, attention_probs, block_mask, block_sparse_attention_reference
from visattn.errors import ShapeError


def test_dense_matches_sdpa_with_bias_and_mask():
    q, k, v = (torch.randn(2, 4, 9, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(attention(q, k, v, bias=bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    mask = torch.rand(9, 9) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(attention(q, k, v, mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_grouped_kv_heads_repeat():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    ref = attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(attention(q, k, v), ref)


def test_empty_rows_give_zero_output_and_minus_inf_lse():
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    out, lse = attention(q, k, v, mask=mask, return_lse=True)
    assert torch.all(out[0, 0, 2] == 0) and lse[0, 0, 2] == float("-inf")
    assert torch.isfinite(out).all()


def test_probs_rows_sum_to_one_and_chunking_changes_nothing():
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    full = attention_probs(q, k, head_mean=False)
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 3, 10))
    torch.testing.assert_close(attention_probs(q, k, query_chunk=3), full.mean(1))


def test_block_sparse_reference_equals_masked_dense():
    b, h, n, d, bq, bk = 1, 2, 10, 8, 4, 3   # ragged: 3 q blocks, 4 kv blocks
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    idx = torch.tensor([[[[0, 3], [1, 0], [2, 0]], [[3, 0], [0, 0], [1, 2]]]])
    cnt = torch.tensor([[[2, 1, 0], [1, 0, 2]]])
    out = block_sparse_attention_reference(q, k, v, idx, cnt, block_q=bq, block_k=bk, always_kv=[(9, 10)])
    mask = torch.zeros(b, h, n, n, dtype=torch.bool)
    for hh in range(h):
        for qb in range(3):
            for j in range(int(cnt[0, hh, qb])):
                kb = int(idx[0, hh, qb, j])
                mask[0, hh, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk] = True
    mask[..., 9] = True
    assert torch.equal(block_mask(idx, cnt, num_q=n, num_kv=n, block_q=bq, block_k=bk, always_kv=[(9, 10)]), mask)
    torch.testing.assert_close(out, attention(q, k, v, mask=mask))


@pytest.mark.parametrize("idx,cnt,msg", [
    (torch.tensor([[[[0, 5]]]]), torch.tensor([[[2]]]), "out of range"),
    (torch.tensor([[[[1, 1]]]]), torch.tensor([[[2]]]), "twice"),
    (torch.tensor([[[[0, 1]]]], dtype=torch.float32), torch.tensor([[[2]]]), "int32 or int64"),
    (torch.tensor([[[0, 1]]]), torch.tensor([[[2]]]), r"\[B, H, q_blocks, max_kv\]"),
    (torch.tensor([[[[0, 1]]]]), torch.tensor([[[3]]]), r"kv_counts must lie in"),
])
def test_invalid_block_lists_raise(idx, cnt, msg):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ShapeError, match=msg):
        block_sparse_attention_reference(q, q, q, idx, cnt, block_q=4, block_k=2)


def test_token_layout():
    lay = TokenLayout.for_vit(197, 1)
    assert lay.grid == (14, 14) and lay.grid_span == (1, 197)
    with pytest.raises(ShapeError, match="square"):
        TokenLayout.for_vit(200, 1)
    with pytest.raises(ShapeError, match="outside"):
        TokenLayout(num_tokens=10, text=((5, 12),))
    assert TokenLayout(num_tokens=30, grid=(2, 3, 4), grid_start=6, text=((0, 6),)).num_text_tokens == 6
