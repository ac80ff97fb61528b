"""``sparse_video`` — block-sparse self-attention for diffusion transformers (the video and image
DiTs of ``config.FAMILIES``: Wan and its VACE variant, SkyReels-V2, LTX, CogVideoX, HunyuanVideo and 1.5, Mochi,
Flux, Chroma, Flux.2, Qwen-Image, SD3, AuraFlow, CogView4, Lumina 2, PixArt, DiT).

Every strategy is a routing rule on one token layout and one kernel
(:mod:`visattn.kernels.block_sparse`). The grid tokens of a layer are permuted from raster order into
tile order (:func:`visattn.core.routing.tile_order`: ``tile`` = 4x4x4 for video, 8x8 for images;
grids the tile does not divide get smaller edge tiles, nothing is padded), and a block is a run of
``prod(tile)`` consecutive tokens in that order — one tile where the tile divides the grid. For each
query block, a strategy lists the kv blocks it visits:

- ``tile_topk`` — VSA (Zhang et al., "Faster Video Diffusion with Trainable Sparse Attention",
  2025), coarse stage, used training-free: tile queries and keys are the means of q and k over a
  block, ``S = scale * Q_t K_t^T`` (the coarse attention logits), and each query block keeps its
  ``ceil(keep * n_blocks)`` best kv blocks, or with ``top_p`` the fewest whose ``softmax(S)`` mass
  reaches ``top_p`` (XAttention-style). Its own block is always kept. The fine stage is the kernel.
  With ``score='antidiagonal'`` (XAttention, Xu et al., 2025) a block pair is scored instead by the
  attention mass its strided antidiagonals estimate: with ``S = stride`` (8 by default; it must divide the
  block), query group ``r`` and key group ``c`` of ``S`` tokens each give ``a_rc = sum_s q_{rS+S-1-s} . k_{cS+s}``,
  each query group's ``softmax_c(scale * a_rc / S)`` is summed over the groups of a block pair, and blocks are
  kept by that mass (top-k, or top-p over each row's normalised mass: XAttention's threshold).
  (:func:`visattn.core.routing.antidiagonal_scores`.) Every key enters the estimate, where the mean-pooled
  score sees only the block's average key.
- ``rectified`` — Rectified SpaAttn (2025) on top of ``tile_topk``. The pooled map
  ``P = softmax_j(scale * q_i . k_j + log n_j)`` over pooled kv blocks ``j`` (``n_j`` tokens each)
  and the text keys is the implicit full-attention reference. Isolated-pooling attention
  reallocation (IPAR): the sparse output, normalised over the kept keys only, is rescaled by the
  reference's kept mass ``r_i = sum_{j kept} P_ij``. Gain-aware pooling rectification (GAPR): a
  dropped block adds its pooled contribution ``P_ij * v_j`` (``v_j`` the mean of v over the block)
  where the gain beats the pooling error. Pooling replaces ``sum_y exp(logit_y)`` by
  ``n_j * exp(mean logit)``, off by a factor ``~exp(var / 2)`` for logits of variance ``var`` inside
  the block; with isotropic keys ``var = scale^2 |q_i|^2 d_j / D`` (``d_j`` = mean squared distance of
  the block's keys from their mean), so the block is added when the relative error
  ``exp(var / 2) - 1`` is below the relative gain 1, i.e. ``var / 2 < ln 2``. The paper's exact error
  estimate differs; this is our reading of its condition.
- ``sliding_tile`` — STA (sliding tile attention): each query tile attends to the ``window`` of
  kv tiles around it (in tiles, per axis), shifted inwards at the grid's border so that every tile
  sees the same number of tiles; one window for all heads or one per head. ``window_stride`` and
  ``window_dilation`` (per axis, in tiles; 1 by default) make it Generalized Neighborhood Attention (GNA,
  Hassani et al., 2025): the tiles of an axis are split into ``dilation`` interleaved sub-grids (same
  coordinate modulo the dilation), a query tile attends within its own sub-grid, and ``stride`` consecutive
  query tiles of a sub-grid share the window centred on their group (``stride = window``: blocked
  attention, non-overlapping windows). GNA states window, stride and dilation in tokens; stated in whole
  tiles, as here, every configuration is one of its "perfectly block-sparse" ones where the tile divides the
  grid: a query block's kv set is whole kv blocks, and the kernel never visits a partly used block (on a
  ragged grid a block may span two tiles and visits the union of their windows).
- ``grat`` — GRAT ("Grouping First, Attending Smartly", 2025): the query tokens of a tile (a
  contiguous group) share one kv set: the ``surrounding`` tiles (Chebyshev distance
  ``<= grat_radius`` in tiles, not shifted at the border) or ``criss_cross``: the tiles on the
  three lines through the query tile (tiles that differ from it in at most one tile coordinate;
  row and column in 2D).

Where a block covers several tiles (ragged edges), it visits the union of their kv tiles' blocks.

``permute`` (tile_topk and rectified; :mod:`.permutation`): before routing, each head's grid tokens are
reordered so that the keys a query block needs share fewer kv blocks (PBS-Attn, "Sparser Block-Sparse
Attention via Token Permutation", 2025): ``'importance'`` sorts the keys by the attention mass the pooled
queries give them, ``'cluster'`` sorts queries and keys by k-means cluster (semantic clustering). The
output is put back in the layer's order; ``'none'`` (default) keeps the tile order.
:func:`~.recall.attention_recall` measures what a routing keeps: the share of dense attention mass on the
blocks it lists.

Text tokens (any token of a joint sequence outside the grid: text, registers, image embeddings; the family
table of :mod:`visattn.frameworks.diffusers` says whether they come before or after the grid) are always
attended and always attend: grid queries see them through the kernel's always-attended ranges, text queries
run dense SDPA over the whole sequence under their own rows of the mask. A text mask (per sample; a key-padding
mask, or the product of a query and a key mask as Chroma and HunyuanVideo 1.5 build them) is honoured exactly:
masked text keys are left out of each sample's kv sequence. A mask on grid keys, one that differs between grid
queries (SkyReels-V2's diffusion-forcing causal mask), or an additive float mask raises ``ShapeError``.
Layers that are not self- or joint attention over a grid stay stock: cross-attention, text refiners
(HunyuanVideo's, Lumina 2's).

Schedule: the first ``dense_steps`` denoising steps and the first ``dense_layers`` sparse-eligible
layers (self/joint attention over a grid, in execution order) run stock attention. A step is a
distinct timestep: repeated calls at one timestep (classifier-free guidance run as two calls) are one
step, and a timestep larger than the last one starts a new generation at step 0.

Options and identity values: ``strategy`` ('tile_topk'); ``keep`` (None: 0.25 for tile_topk, 0.5 for rectified;
identity 1.0), ``top_p``
(None; identity 1.0), ``score`` ('mean'), ``stride`` (None: 8, with score='antidiagonal' only) and
``permute`` ('none') for tile_topk and rectified; ``tile`` (None: 4x4x4 / 8x8); ``window`` (None:
3 tiles per axis; identity: the tile grid's size), ``window_stride`` and ``window_dilation`` (None: 1 per
axis; a stride must not exceed the window) for sliding_tile; ``grat_pattern`` ('surrounding')
and ``grat_radius`` (1; identity: >= the tile grid's largest side, surrounding) for grat;
``dense_steps`` (0), ``dense_layers`` (0); ``strict`` (False: the PyTorch reference is used, logged
once, where the Triton kernel cannot run); ``install`` ('processor'; 'attention_backend' for diffusers'
context parallelism, see :mod:`visattn.processors.sparse_video.backend`). At an identity setting the
layer calls stock SDPA itself, so the output is bit-identical to stock.

Defaults, and why (measured on the trained testbed video DiT, 64 clips sampled stock and patched from the same
noise with ``tile=(2, 2, 2)``, beside Wan 2.1 1.3B's attention at 81x480x832 on the H200; BENCHMARKS.md, "Testbed
video DiT"; class accuracy of stock's clips 0.78, and about +-0.06 of noise on 64 clips):

- ``strategy='tile_topk'`` with ``keep=0.25``: a quarter of the blocks keeps 0.55 class accuracy, 13.4 dB and
  0.66 of the attention mass at 2.4x Wan's attention speed; ``keep=0.5`` buys 0.18 of accuracy for half that
  speed (0.73 at 1.3x), ``keep=0.1`` loses another 0.16 (0.39) for 5.2x. Fixed windows (``sliding_tile``) reach
  the same accuracy at the same kept fraction and run faster, but keep less of the clip and of the attention
  (12.2 dB and recall 0.46 at a quarter) and cannot follow the content: tile_topk is the default.
- ``rectified`` with ``keep=0.5`` (1.25x at Wan): its correction gives the highest PSNR against stock at every
  level (19.1 / 17.6 / 17.2 dB at keep 0.5 / 0.25 / 0.1; tile_topk 16.6 / 13.4 / 12.6), yet below 0.5 its class
  accuracy falls fastest (0.60 at 0.5, 0.29 at 0.25): the colours and layout stay, the outline goes.
- ``score='mean'``: the antidiagonal scores choose nearly the same blocks (recall 0.65 against 0.66 at keep
  0.25, accuracy within the noise) and take 6.3 ms of routing at Wan's 32,760 tokens (1.15x instead of 2.44x).
- ``permute='none'``: ``'importance'`` loses recall (0.45 against 0.66 at keep 0.25: one global sort of the keys
  breaks the locality tile order gives); ``'cluster'`` keeps recall and PSNR but not class accuracy (0.50
  against 0.55 at a quarter, 0.63 against 0.73 at a half) and costs 15 ms at Wan (0.6x).
- ``sliding_tile``: ``window`` 3 tiles per axis (a tile and its neighbours), stride and dilation 1.
  Fixed windows skip the routing (2.75x against 2.44x at a quarter of the blocks). The blocked form
  (``window_stride = window``) measured the same; a dilation lists more blocks where the tile does not divide the
  grid. Window 3 keeps 27 tiles of the grid's: 0.42 of the testbed's 4x4x4 tiles but 0.04 of Wan's 6x8x13 at
  81x480x832, far sparser than any point measured: there give a larger window (5x4x6 keeps a quarter, 4x8x8 a
  half).
- ``grat``: ``'surrounding'`` with radius 1 keeps more than ``'criss_cross'`` (accuracy 0.54 against 0.42,
  recall 0.50 against 0.43) and is the faster of the two at Wan (10.4x against 9.0x; it lists fewer of Wan's
  larger tile grid).
- ``dense_steps=0``, ``dense_layers=0``: every step and layer sparse, so the speed is the one asked for. Dense
  first steps buy quality back (measured on the previous, width-256 weights): at keep 0.25, 6 of 25 steps dense
  raise the PSNR from 13.0 to 15.4 dB and 3 of 25 the class accuracy from 0.59 to 0.65 (32 clips, within their
  noise), at the cost of those steps' share at stock speed.

Installation (diffusers): ``visattn.apply(pipe_or_model, "sparse_video", ...)`` or
``model.set_attn_processor(visattn.diffusers.SparseVideoAttnProcessor(model, ...))``; see
:class:`SparseVideoAttnProcessor` for why the processor keeps the stock processors' math.

The method is this package, one module per concern:

- :mod:`.config`: the options (``OPTIONS``, ``INSTALL``) and their validated form :class:`SparseVideoConfig`;
- :mod:`.routing`: the tile geometry (:func:`geometry`) and one router per strategy (``ROUTERS``, looked up by
  :func:`route_blocks`), with the rectified strategy's correction of the sparse output;
- :mod:`.permutation`: the per-head token orders of ``permute``;
- :mod:`.recall`: :func:`attention_recall`, the dense attention mass a routing keeps, and :class:`RecallMeter`,
  which measures it on a stock model's own calls;
- :mod:`.attention`: :func:`sparse_video_attention`, a plain function of ``[B, H, N, D]`` tensors and a layout;
- :mod:`.schedule`: :class:`SparseVideoSchedule`, which layers of a diffusers model run sparse in the current call;
- :mod:`.processor`: :class:`SparseVideoAttnProcessor`, the diffusers attention processor (``install="processor"``);
- :mod:`.backend`: :class:`SparseVideoAttnBackend`, the same attention as the diffusers attention backend
  ``visattn_sparse`` (``install="attention_backend"``), which context parallelism wraps;
- here: the :class:`SparseVideo` method that ``visattn.apply(model, "sparse_video", ...)`` runs.
"""

from __future__ import annotations

from typing import Any

from ...frameworks import Target
from ...patching import Handle, Patcher
from ...registry import Method, register
from .attention import sparse_video_attention
from .backend import SparseVideoAttnBackend
from .config import FAMILIES, INSTALL, OPTIONS, SparseVideoConfig
from .processor import SparseVideoAttnProcessor
from .recall import RecallMeter, attention_recall
from .routing import geometry, route_blocks
from .schedule import SparseVideoSchedule

__all__ = ["RecallMeter", "SparseVideo", "SparseVideoAttnBackend", "SparseVideoAttnProcessor", "SparseVideoConfig",
           "SparseVideoSchedule", "attention_recall", "geometry", "route_blocks", "sparse_video_attention"]


@register
class SparseVideo(Method):
    name = "sparse_video"
    summary = ("block-sparse video/image DiT attention: tile top-k (VSA), Rectified SpaAttn, sliding tiles (STA, GNA), "
               "GRAT")
    paper = ("VSA (Zhang et al., 2025); Rectified SpaAttn (2025); STA, sliding tile attention (2025); "
             "GRAT (2025); XAttention (antidiagonal scoring, top-p selection; 2025); GNA, generalized neighborhood "
             "attention (2025); PBS-Attn, token permutation (2025)")
    frameworks = ("diffusers",)
    families = {"diffusers": FAMILIES}
    options = (*OPTIONS, INSTALL)

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        super().check_target(target, options)
        SparseVideoConfig(**{k: v for k, v in options.items() if k != "install"})  # the checks across options

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> Handle:
        from ...frameworks import diffusers as fw

        config = SparseVideoConfig(**{k: v for k, v in options.items() if k != "install"})  # apply checked them
        if options["install"] == "attention_backend":
            SparseVideoAttnBackend(target.model, patcher=patcher, config=config).select(patcher)
        else:
            processor = SparseVideoAttnProcessor(target.model, patcher=patcher, config=config)
            sparse = set(processor.sparse_layers())
            fw.set_processors(target.model, patcher, lambda idx, name, module: processor if idx in sparse else None)
        return Handle(self.name, target.model, options, patcher)

