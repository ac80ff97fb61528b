"""The sparse attention as a function of tensors: :func:`sparse_video_attention` of a ``[B, H, N, D]`` sequence
and its token layout, grid queries routed (:mod:`.routing`) through the block-sparse kernel, text queries dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.layout import TokenLayout
from ...core.routing import take_tokens, token_words
from ...errors import ShapeError
from ...kernels import block_sparse_attention
from .config import SparseVideoConfig
from .permutation import permute_grid, scatter_tokens
from .routing import Geometry, _rectify, geometry, route_blocks


def _attend_grid(qg: Tensor, k: Tensor, v: Tensor, config: SparseVideoConfig, geo: Geometry,
                 scale: float, blocks: Tensor | None = None) -> Tensor:
    """Grid queries over grid blocks (routed) and every other key of ``k``, ``v`` (always attended).

    With ``permute``, each head's grid queries and keys are reordered first (:mod:`.permutation`) and the
    queries' outputs put back at the end. ``blocks`` (bool ``[num_blocks]``): the query blocks whose output is
    needed; the others visit no kv block (their rows are left unspecified).
    """
    ng = geo.num_grid
    q_order = None
    if config.permute != "none":
        q_order, qg, (k, v) = permute_grid(config.permute, qg, (k, v), geo.block, scale)
    idx, cnt = route_blocks(qg, k[:, :, :ng], config, geo, scale)
    if blocks is not None:
        cnt = cnt * blocks.to(cnt.dtype)
    always = [(ng, k.shape[2])] if k.shape[2] > ng else None
    out = block_sparse_attention(qg, k, v, idx, cnt, block_q=geo.block, block_k=geo.block, scale=scale,
                                 always_kv=always, strict=config.strict, check_values=False)
    if config.strategy == "rectified":
        out = _rectify(out, qg, k, v, idx, cnt, geo, scale)
    return out if q_order is None else scatter_tokens(out, q_order)


def _mask4(mask: Tensor) -> Tensor:
    """An SDPA mask as ``[B | 1, H | 1, Nq | 1, Nk]``."""
    return mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))


def grid_keys(mask: Tensor, batch: int, rows: tuple[int, int]) -> Tensor | None:
    """The keys that the queries in ``[start, end) = rows`` (the grid queries) attend under the SDPA ``mask``, as
    boolean ``[B, Nk]`` (True = attend); ``None`` if they attend every key.

    Every grid query of a sample must see the same keys (a key-padding mask, or a query mask times a key mask
    as Chroma and HunyuanVideo 1.5 build them): a mask that differs between grid queries or heads, or a float
    mask other than 0 / -inf over them, raises :class:`ShapeError`. The grid rows are read as a view (a
    ``[B, 1, N, N]`` mask is gigabytes at video lengths), and compared by reducing them: the rows agree where
    every one and any one attend alike.
    """
    m = _mask4(mask)
    if m.shape[2] != 1:
        m = m[:, :, rows[0]:rows[1]]
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == float("-inf"))).all()):
            raise ShapeError("sparse_video: a float attention mask over grid queries must hold only 0 and -inf "
                             "(an additive bias cannot be routed)")
        m = m == 0
    keys = m.all(dim=2).all(dim=1)
    if not torch.equal(keys, m.any(dim=2).any(dim=1)):
        raise ShapeError(f"sparse_video: grid queries must share one key mask (got a mask of shape "
                         f"{tuple(mask.shape)} that varies over heads or grid queries)")
    keys = keys.expand(batch, m.shape[-1])
    return None if bool(keys.all()) else keys


def _attend_text(qt: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Text queries attend densely to every key, as in stock."""
    if qt.shape[2] == 0:
        return qt
    return F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != qt.shape[1])


def sparse_video_attention(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, config: SparseVideoConfig, *,
                           scale: float | None = None, attn_mask: Tensor | None = None,
                           rows: Tensor | None = None) -> Tensor:
    """Sparse self-attention of a ``[B, H, N, D]`` sequence laid out as ``layout`` (grid plus text tokens).

    Grid queries follow ``config.strategy``; non-grid (text) tokens are always attended and attend
    densely. ``attn_mask`` (an SDPA mask) may mask text keys per sample; every grid query of a sample must see the
    same keys (:func:`grid_keys`), and text queries attend under their own rows of it, as in stock.
    ``rows`` (bool ``[N]``, None: all): the query tokens whose output is wanted (a rank's shard under ring
    attention); query blocks that hold none of them visit no kv block, and the other rows of the output are
    unspecified. Routing still sees every query, so the wanted rows equal those of a call without ``rows``.
    ``permute`` does not take ``rows`` (its query blocks are not the tiles).
    """
    if layout.grid is None:
        raise ShapeError("sparse_video: the layer's token layout has no grid")
    n = q.shape[2]
    if n != layout.num_tokens or k.shape[2] != n:
        raise ShapeError(f"sparse_video: expected {layout.num_tokens} query and key tokens for grid {layout.grid} "
                         f"and {layout.num_text_tokens} text tokens; got {n} and {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    geo = geometry(tuple(layout.grid), layout.grid_start, n, config.tile_for(layout.grid), q.device)
    ng = geo.num_grid
    blocks = None
    if rows is not None:
        if config.permute != "none":
            raise ShapeError("sparse_video: permute cannot compute a subset of the query rows (ring attention)")
        wanted = F.pad(rows[geo.perm[:ng]], (0, geo.num_blocks * geo.block - ng))  # tile order, last block padded
        blocks = wanted.view(geo.num_blocks, geo.block).any(dim=1)  # no host read
    qp, kp, vp = (take_tokens(t, geo.perm) for t in (q, k, v))
    keys = text_mask = None
    if attn_mask is not None:
        keys = grid_keys(attn_mask, q.shape[0], layout.grid_span)
        text_mask = _mask4(attn_mask)
        text_mask = (text_mask if text_mask.shape[2] == 1 else text_mask[:, :, geo.perm[ng:]])[..., geo.perm]
    if keys is None:
        out_grid = _attend_grid(qp[:, :, :ng], kp, vp, config, geo, scale, blocks)
    else:
        keys = keys[:, geo.perm]
        if not bool(keys[:, :ng].all()):
            raise ShapeError("sparse_video: the attention mask masks grid tokens; only text keys may be masked")
        out_grid = torch.empty_like(qp[:, :, :ng])
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(keys.cpu()):
            groups.setdefault(tuple(row.nonzero().flatten().tolist()), []).append(i)
        for kept_keys, samples in groups.items():
            sel, cols = torch.tensor(samples, device=q.device), torch.tensor(kept_keys, device=q.device)
            out_grid[sel] = _attend_grid(qp[sel, :, :ng], kp[sel][:, :, cols], vp[sel][:, :, cols], config, geo,
                                         scale, blocks)
    out_text = _attend_text(qp[:, :, ng:], kp, vp, text_mask, scale)
    if ng == n:
        return take_tokens(out_grid, geo.inverse)
    out = out_grid.new_empty(*out_grid.shape[:2], n, out_grid.shape[3])
    for part, index in ((out_grid, geo.perm[:ng]), (out_text, geo.perm[ng:])):
        token_words(out).index_copy_(2, index, token_words(part.contiguous()))
    return out
