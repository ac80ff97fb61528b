"""``sparse_video`` as a diffusers attention backend, so that diffusers' context parallelism runs it.

diffusers scales a video DiT over GPUs with context parallelism (``ContextParallelConfig``,
``model.enable_parallelism``): the sequence is split across ranks, and the split is undone inside the
attention backend that ``dispatch_attention_fn`` calls — Ulysses (DeepSpeed-Ulysses, Jacobs et al.,
2023) exchanges shards all-to-all so that each rank holds the whole sequence for ``H / degree`` heads;
ring attention (Liu et al., 2023) keeps each rank's query shard and passes the key/value shards
round (or gathers them), merging partial softmaxes through their log-sum-exp. A processor that intercepts SDPA never
sees that exchange, so the sparse attention of :mod:`visattn.processors.sparse_video` is registered
as the backend ``visattn_sparse`` (:func:`visattn.frameworks.diffusers.register_attention_backend`),
which ``model.set_attention_backend("visattn_sparse")`` selects and ``enable_parallelism`` accepts.

    backend = visattn.diffusers.SparseVideoAttnBackend(transformer, strategy="tile_topk", keep=0.1)
    transformer.set_attention_backend("visattn_sparse")
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))  # before or after
    ...
    backend.detach()   # hooks removed; select another backend with set_attention_backend

or ``visattn.apply(transformer, "sparse_video", keep=0.1, install="attention_backend")``, which points
the processors at the backend itself and is undone exactly by ``visattn.remove`` (each processor's
previous ``_attention_backend`` restored; diffusers' process-wide active backend is never changed).

The backend is a function of q, k, v only, so :class:`SparseVideoAttnBackend` gives it the rest: hooks
on the model make it the backend's current model for the duration of each forward (a per-thread stack)
and read the token grid, text length, timestep and running layer of each call
(:class:`~visattn.processors.sparse_video.SparseVideoSchedule`, the same schedule the processor uses).
Calls that the schedule leaves dense — cross-attention, dense layers and steps, identity settings —
go to the backend each layer used before (diffusers' native SDPA by default), with the same parallel
config, so they are exactly stock.

What works and what does not (diffusers 0.42.1):

- No parallelism: the families whose self-attention processors call ``dispatch_attention_fn`` (Wan and its
  VACE variant, SkyReels-V2, LTX, HunyuanVideo and 1.5, Flux, Chroma, Flux2, Qwen-Image); the output equals
  the processor installation's. The others (CogVideoX, Mochi, SD3, AuraFlow, CogView4, Lumina2, PixArt, DiT)
  call SDPA directly and never reach a backend: ``install="attention_backend"`` is refused there, use
  ``install="processor"``.
- Ulysses (``ulysses_degree > 1``, ``ring_degree == 1``): Wan, LTX-Video, Flux, Flux.2 and Qwen-Image
  (:data:`visattn.frameworks.diffusers.PARALLEL_FAMILIES`, each tested against one process; Qwen-Image on diffusers
  0.42.1, whose Ulysses attention gathers its text mask with the keys: under 0.37 the stock model fails). After the
  all-to-all each rank has every token of its heads, and every strategy routes each head on its own q and k, so
  routing and kernel are unchanged and the output equals the single-GPU output up to floating-point differences
  elsewhere in the model. Wan's and LTX-Video's self-attention is the grid alone. Flux's, Flux.2's and Qwen-Image's
  join the text to the grid, and diffusers' plans split the text and the grid each across the ranks, so the gathered
  sequence interleaves them rank by rank (``[text_0, grid_0, text_1, grid_1]``): the backend reads it in joint order
  and writes the output back (:func:`visattn.frameworks.diffusers.shard_order`); that needs equal shards
  (``ulysses_anything`` is refused); a key mask (Qwen-Image's text mask) is reordered with the keys. Per-head
  ``sliding_tile`` windows are refused (a rank holds a subset of the heads). Other families are refused: HunyuanVideo
  and others have no plan. LTX-Video runs without its text mask: with it, its stock model fails under Ulysses in
  diffusers 0.42.1.
- Ring attention (``ring_degree > 1``, alone or with Ulysses): Wan, Flux, Flux.2 and Qwen-Image, each tested against
  one process (ring alone on two, Ulysses x ring on four). LTX-Video is not tested under ring: its cross-attention
  runs under the ring too and needs a dense backend that returns the log-sum-exp (below), which the CPU tests have
  none of. Routing ranks a query block's kv blocks over the whole sequence, so each rank gathers the sequence from the
  whole context-parallel group (queries, keys, values and a key mask, as diffusers' ``rotate_method="allgather"``
  gathers the keys and values; :func:`visattn.frameworks.diffusers.ring_attention`), routes on it as one process would
  (every rank picks the same blocks), and runs the kernel for the query blocks that hold its own tokens only (``rows``
  of :func:`~visattn.processors.sparse_video.sparse_video_attention`): the attention work is split across the ranks,
  the gathered keys and values cost what diffusers' own gather costs, and the queries one more gather. No log-sum-exp
  merge is needed, since every rank sees every key; with Ulysses too, its head split is not used (not xDiT's USP
  exchange: every rank gathers every head). ``permute`` is refused (its blocks are not tiles), as are unequal shards
  (``ring_anything``, ``ulysses_anything``). diffusers' native SDPA backend cannot serve the dense calls under ring
  attention (it returns no log-sum-exp): select a backend that does for them (flash attention on GPUs) before
  applying.
- Inference only under parallelism (diffusers asks the backend for a backward op; it raises).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ...errors import OptionError, ShapeError, UnsupportedModelError
from ...frameworks.base import PerThread
from ...patching import Patcher
from .attention import sparse_video_attention
from .config import SparseVideoConfig
from .schedule import SparseVideoSchedule

BACKEND = "visattn_sparse"

_RUNNING: PerThread[list[SparseVideoAttnBackend]] = PerThread(list)  # this thread's running models, innermost last


def visattn_sparse(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, _parallel_config: Any = None) -> Tensor:
    """The function registered as diffusers attention backend ``visattn_sparse`` (``[B, S, H, D]`` tensors):
    hands the call to the :class:`SparseVideoAttnBackend` of the model running now."""
    running = _RUNNING.get()
    if not running:
        raise UnsupportedModelError(
            f"the attention backend {BACKEND!r} ran outside a model prepared for it: make "
            f"visattn.diffusers.SparseVideoAttnBackend(model, ...) before model.set_attention_backend({BACKEND!r}), "
            f"or use visattn.apply(model, 'sparse_video', install='attention_backend')")
    return running[-1].attend(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa, parallel_config=_parallel_config)


class SparseVideoAttnBackend:
    """``sparse_video`` for one diffusers model through the attention backend ``visattn_sparse`` (module doc).

    Construction checks the family and the options, registers the backend (once per process), records
    the backend each attention layer uses now (for the calls left dense) and installs the hooks;
    ``select(patcher)`` points the processors at the backend (what ``visattn.apply`` does);
    ``detach()`` removes the hooks.
    """

    def __init__(self, model: nn.Module, *, patcher: Patcher | None = None, config: SparseVideoConfig | None = None,
                 **options: Any) -> None:
        from ...frameworks import diffusers as fw

        self.config = SparseVideoConfig.resolve(config, options)
        self._fw = fw
        self._family = type(model).__name__
        self._joint = bool(fw.family_of(model).text)  # self-attention holds the text (or other tokens) and the grid
        direct = [name for (name, module), kind in zip(fw.attention_layers(model), fw.layer_kinds(model))
                  if kind == "self" and not hasattr(module.processor, "_attention_backend")]
        if direct:
            raise UnsupportedModelError(
                f"sparse_video's attention backend serves layers whose processors call dispatch_attention_fn; the "
                f"processors of {self._family} ({', '.join(direct[:3])}{', ...' if len(direct) > 3 else ''}) call "
                f"SDPA directly: use install='processor' (visattn.diffusers.SparseVideoAttnProcessor) for it")
        self._model = model
        parallel = getattr(model, "_parallel_config", None)
        if parallel is not None and parallel.context_parallel_config is not None:
            self._check_parallel(parallel.context_parallel_config)
        self._patcher = patcher or Patcher()
        self.backend = fw.register_attention_backend(BACKEND, visattn_sparse, context_parallel=True)
        self._dense = fw.dense_backends(model, exclude=self.backend)
        self._schedule = SparseVideoSchedule(model, self.config, self._patcher)

        def enter(args: tuple, kwargs: dict[str, Any]) -> None:
            _RUNNING.get().append(self)

        def leave(output: Any) -> None:
            running = _RUNNING.get()
            if running:
                running.pop()

        fw.around_call(model, self._patcher, enter, leave, always=True)
        if patcher is None:  # made by the user (visattn.apply guards the model itself): refuse copies until detach()
            self._patcher.refuse_copies(model, "sparse_video")

    def sparse_layers(self) -> list[int]:
        """Indices (in attention-layer order) of the layers whose attention this backend makes sparse."""
        return sorted(self._schedule.eligible)

    def select(self, patcher: Patcher) -> None:
        """Point the model's attention processors at this backend; ``patcher`` undoes it exactly."""
        self._fw.select_attention_backend(self._model, patcher, self.backend)

    def detach(self) -> None:
        """Remove the hooks this backend installed on its model."""
        self._patcher.undo()

    def _check_parallel(self, cp: Any) -> None:
        """Raise unless sparse attention can run under the context-parallel config ``cp`` (module doc)."""
        if self._family not in self._fw.PARALLEL_FAMILIES:
            raise UnsupportedModelError(
                f"sparse_video under context parallelism supports {', '.join(self._fw.PARALLEL_FAMILIES)} (tested); "
                f"not {self._family}")
        if cp.ring_degree > 1:
            self._fw.require_equal_shards(cp)
            if self.config.permute != "none":
                raise OptionError("sparse_video: permute cannot run under ring context parallelism (each rank "
                                  "computes the query blocks of its shard, and permute's blocks are not tiles)")
            return
        self._fw.require_ulysses(cp)
        if self._joint and getattr(cp, "ulysses_anything", False):
            raise UnsupportedModelError(
                f"sparse_video under context parallelism needs equal text and grid shards on every rank for the "
                f"joint attention of {self._family}; ulysses_anything=True is not supported there")
        if self.config.window is not None and isinstance(self.config.window[0], tuple):
            raise OptionError("sparse_video: per-head sliding_tile windows cannot run under Ulysses context "
                              "parallelism (each rank holds a subset of the heads); give one window for all heads")

    def _sparse(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, scale: float | None,
                layout: Any, rows: Tensor | None = None) -> Tensor:
        """:func:`sparse_video_attention` on ``[B, S, H, D]`` tensors holding the whole sequence (``rows``: the
        query tokens whose output is wanted, None: all)."""
        if query.shape[1] != layout.num_tokens:
            raise ShapeError(f"sparse_video: the attention backend got {query.shape[1]} tokens for a layer whose "
                             f"layout has {layout.num_tokens} (grid {layout.grid})")
        if attn_mask is not None and attn_mask.ndim == 2:  # [B, S_kv] key padding, as diffusers' native backend
            attn_mask = attn_mask[:, None, None, :]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return sparse_video_attention(q, k, v, layout, self.config, scale=scale, attn_mask=attn_mask,
                                      rows=rows).transpose(1, 2)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, *, attn_mask: Tensor | None, dropout_p: float,
               is_causal: bool, scale: float | None, enable_gqa: bool, parallel_config: Any) -> Tensor:
        """One backend call: sparse where the schedule says so, else the layer's previous backend."""
        index = self._schedule.running_layer
        cp = None if parallel_config is None else parallel_config.context_parallel_config
        layout = None
        if index is not None and not dropout_p and not is_causal and key.shape[1] == query.shape[1]:
            # under parallelism the call holds this rank's shard: equal text and grid shards (joint attention) or
            # the grid's shard alone, whose layout is the grid
            degree = 1 if cp is None else cp.ulysses_degree * cp.ring_degree
            tokens = query.shape[1] if cp is None else query.shape[1] * degree if self._joint else None
            layout = self._schedule.layout(index, tokens, query.device)
        if layout is None:
            return self._fw.dispatch_attention(
                self._dense.get(index, self._fw.NATIVE_BACKEND), query, key, value, parallel_config,
                attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if cp is None:
            return self._sparse(query, key, value, attn_mask, scale, layout)
        self._check_parallel(cp)
        order = self._fw.shard_order(layout, degree, query.device) if self._joint else None

        def whole(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, s: float | None,
                  rows: Tensor | None = None) -> Tensor:
            """The gathered sequence (rank order); joint attention read in joint order and written back."""
            if mask is not None and (mask.shape[-1] != q.shape[1] or (mask.ndim > 2 and mask.shape[-2] != 1)):
                raise UnsupportedModelError(
                    f"sparse_video under context parallelism takes a key mask over the {q.shape[1]} gathered "
                    f"tokens; got a mask of shape {tuple(mask.shape)} (diffusers 0.37 does not gather masks under "
                    f"Ulysses)")
            if order is None:
                return self._sparse(q, k, v, mask, s, layout, rows)
            out = self._sparse(q[:, order], k[:, order], v[:, order], None if mask is None else mask[..., order],
                               s, layout, None if rows is None else rows[order])
            return torch.empty_like(out).index_copy_(1, order, out)

        if cp.ring_degree > 1:
            return self._fw.ring_attention(lambda q, k, v, mask, rows: whole(q, k, v, mask, scale, rows), query,
                                           key, value, attn_mask, parallel_config)
        return self._fw.ulysses_attention(whole, query, key, value, attn_mask, scale, parallel_config)
