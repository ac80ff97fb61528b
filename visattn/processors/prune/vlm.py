"""``prune`` for vision-language models in transformers: visual tokens really removed, in stages.

The transformers module of :mod:`visattn.processors.prune`. Strategies (scores in
:mod:`visattn.core.importance`):

- ``"fastv"`` — FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2"): decoder
  layers ``0..K-1`` see every token; inside layer ``K-1``'s attention the last token's attention row
  ``mean_h softmax(q_last k^T / sqrt(d) + m)`` is computed from q and K (so SDPA needs no attention
  weights); before layer ``K`` the least attended visual tokens are dropped. ``layer`` is ``K``
  (default 2, FastV's).
- ``"cls"`` — VTC-CLS ("[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"): the
  vision tower's [CLS] attention at the layer whose output feeds the projector (or the mean over
  ``ensemble_layers``) ranks each image's tokens; the dropped ones never enter the language model.
  LLaVA-1.5 (``LlavaForConditionalGeneration``) only: LLaVA-NeXT rearranges crop features (unpadding,
  newline tokens) and Qwen2-VL's vision tower has no [CLS] token, so both are refused with an error
  that names ``fastv``.
- ``"star"`` — STAR ("Stage-Wise Attention-Guided Token Reduction"): ``cls`` at the input keeping
  ``sqrt(keep)`` of the visual tokens, then ``fastv``-style cross-modal attention before ``layer``
  (default ``L // 2``) keeping ``sqrt(keep)`` of those: about ``keep`` in all.
- ``"transprune"`` — TransPrune ("Token Transition Pruning"): before ``layer`` (default 2), visual
  tokens ranked by token transition variation across layer ``K-1`` plus instruction-guided attention
  (the attention of the text after the last image, rows computed from q and K), each min-max
  normalised.
- ``"plphp"`` — PLPHP ("Per-Layer Per-Head Vision Token Pruning"): prefill runs unpruned and records,
  at every layer from ``layer`` (default 2) on, the last token's attention; when the language model
  returns, each layer's retention is ``min(1, keep * v_l / mean v)`` from its share ``v_l`` of
  attention on vision, and each kv head of that layer keeps its own most attended visual tokens in the
  KV cache (non-visual tokens first, in the same order in every head), so decoding reads shorter,
  per-layer caches. Prefill logits are the stock ones.
- ``"zo"`` — ZOO-Prune (Kim et al., 2025, "Training-Free Token Pruning via Zeroth-Order Gradient Estimation in
  Vision-Language Models"): at the language model's input, each image token's sensitivity is the projector's
  response to ``directions`` random unit perturbations of its input of size ``step`` (central differences, the
  same directions for every token, drawn from ``seed``), and the kept tokens are picked greedily for sensitivity
  times cosine distance to those already picked (:func:`~visattn.core.importance.zeroth_order_sensitivity`,
  :func:`~visattn.core.importance.diverse_ranks`). Defaults are the authors' (64 directions, step 0.01). Cost:
  ``2 * directions`` projector passes over the image tokens (chunked) and a greedy pass of ``kept`` rounds.
  LLaVA-1.5 only: the other families' image tokens are not their projector's outputs one for one.
- ``"vflowopt"`` — VFlowOpt (Yang et al., 2025, "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information
  Flow-Guided Optimization", ICCV 2025): each image token's importance is its context relevance at the vision-tower
  layer that feeds the projector, the mean attention row of the global tokens (those receiving more than
  ``threshold`` times the mean attention), ``a_j = mean_{g in G} A_gj``, plus ``entropy`` times the softmax over the
  image of its patch's grey-level information entropy (:func:`~visattn.core.importance.global_relevance`,
  :func:`~visattn.core.importance.patch_entropy`). Pruning is progressive: at the language model's input each
  sample keeps ``sqrt(keep)`` of its image tokens, and the pruned ones of each cell of ``cell x cell`` patches are
  recycled into one token, their importance-weighted mean, at the place of the cell's most important pruned token
  (:func:`~visattn.core.importance.recycled_selection`; each image keeps as many tokens plainly as its cells fewer);
  before ``layer`` (default ``L // 2``) the kept tokens are ranked by the same importance (a recycled token by its
  place's) and ``sqrt(keep)`` of them kept. The paper also searches each model's pruning settings (the stage ratios,
  ``threshold``, ``cell``, the entropy weight) by Bayesian optimisation of the last token's final hidden state against
  the unpruned model's; that search is not run here: the stages split ``keep`` as STAR's do, and the defaults sit
  among the authors' released settings for LLaVA-OneVision (``threshold`` 28.7 to 39.3, cells of 11.8 to 17.4
  patches on its 27 x 27 grid, entropy weight 0). LLaVA-1.5 only (the image tokens must be the vision tower's
  patches, in order), with ``vision_feature_select_strategy="default"``.

How tokens are removed. A stage at layer 0 (``cls``, ``star``'s first) runs in a forward pre-hook of
the language model: ``inputs_embeds``, the 2-D attention mask and the position ids (M-RoPE rows
included) are gathered at the kept positions, so every layer and its KV cache see the short
sequence. A stage at layer ``K >= 1`` runs in a pre-hook of decoder layer ``K``: the hidden states,
the 4-D mask (rows and columns), the rotary ``position_embeddings`` and ``position_ids`` are gathered,
and the same short versions are handed to every later layer in that forward. Kept tokens keep their
original positions. In later ``generate()`` steps the masks that transformers builds for the full
sequence are gathered to the columns each layer's cache holds (its kept prefill tokens, then the new
tokens), and position ids stay those of the full sequence, so generation continues exactly as a model
whose caches hold only the kept tokens.

Caches: transformers' default dynamic cache, and the static one that ``generate(cache_implementation="static")``
makes and compiles decoding for. A static layer allocates its slots at its first update, so before the prefill
reaches a layer, a stage gives that layer (and the later ones) as many fewer slots as it drops tokens
(:func:`visattn.frameworks.transformers.reserve`): each layer holds its kept tokens and the tokens to come, and a
decode step attends over that many slots instead of the whole prompt's. ``generate()`` then passes 4-D masks over
layer 0's slots; a stage gathers their kept rows and the columns ``[kept, the free slots]``, and in decode steps each
pruned layer's mask is gathered the same way. Those masks index slots by the prompt's positions, which is right when
padding comes first (left padding, which generate() needs anyway); other padding is refused with a static cache, as
are ``plphp`` (each prompt would give the layers other lengths, and the compiled decode step would recompile) and
caches allocated before the prefill (``early_initialization()``).

Batches: image positions come from ``config.image_token_id`` per sample (left padding included);
every sample drops the same number of visual tokens, ``min_b (n_b - ceil(keep * n_b))``, so each keeps
at least ``ceil(keep * n_b)`` of its ``n_b`` and tensors stay rectangular. Every sample must hold
image tokens. ``keep=1.0`` drops nothing and touches no tensor: bit-identical logits and generations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ...core.attention import attention_probs
from ...core.importance import (
    additive_bias,
    diverse_ranks,
    global_relevance,
    kept_indices,
    kept_order,
    layer_retention,
    normalized,
    num_dropped,
    patch_entropy,
    recycle,
    recycled_selection,
    row_attention,
    transition_variation,
    vision_share,
    zeroth_order_sensitivity,
)
from ...core.merge import cls_attention
from ...errors import OptionError, ShapeError, UnsupportedModelError
from ...frameworks import Target
from ...frameworks.base import LazyAdapter, PerThread
from ...patching import Handle, Patcher
from .._lvlm import attended_keys

tfa = LazyAdapter("transformers")  # imported on first use: visattn imports without transformers

STRATEGIES = ("cls", "fastv", "star", "plphp", "transprune", "zo", "vflowopt")
#: Strategies that drop tokens at the language model's input only (option ``layer`` does not apply).
INPUT_STRATEGIES = ("cls", "zo")
FAMILIES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
            "LlavaOnevisionForConditionalGeneration", "Idefics3ForConditionalGeneration",
            "InternVLForConditionalGeneration", "Qwen2VLForConditionalGeneration",
            "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")
#: Families refused with a reason of their own.
REFUSED = {
    "PaliGemmaForConditionalGeneration": "it builds its prefix-LM attention mask (image and prompt tokens attend to "
                                         "each other both ways) as a 4-D mask before its language model, and prune "
                                         "drops tokens from the language model's 2-D padding mask",
    "Gemma3ForConditionalGeneration": "it builds its attention masks (image tokens attending to each other both "
                                      "ways, sliding windows) as 4-D masks before its language model, and prune "
                                      "drops tokens from the language model's 2-D padding mask",
}
#: Strategies that read the vision tower's [CLS] attention, and the models that have it.
CLS_STRATEGIES, CLS_FAMILIES = ("cls", "star"), ("LlavaForConditionalGeneration",)
_ANYRES = "its anyres features are rearranged (unpadded, newline tokens) after the vision tower"
#: Why a family with a [CLS] token cannot rank by it (the others' vision towers have none).
NO_CLS = {"LlavaNextForConditionalGeneration": _ANYRES, "LlavaOnevisionForConditionalGeneration": _ANYRES,
          "InternVLForConditionalGeneration": "its projector merges neighbouring patches (pixel shuffle) after the "
                                              "vision tower"}
#: Models whose image tokens are their projector's outputs, one for one and in order (``zo`` perturbs its input,
#: ``vflowopt`` reads each image's patches on the vision tower's grid).
PATCH_FAMILIES = ("LlavaForConditionalGeneration",)
#: FastV's K; STAR's second stage sits at L // 2.
DEFAULT_LAYER = 2


class Selection:
    """One pruning decision, ToMe's ``merge`` pattern for token removal: the prompt positions each sample
    keeps, ``kept`` ``[B, n]`` (ascending), applied alike to everything laid out along the sequence; each sample
    drops ``dropped`` visual tokens."""

    def __init__(self, kept: Tensor, dropped: int, recycled: tuple[Tensor, Tensor] | None = None) -> None:
        self.kept, self.dropped = kept, dropped
        #: VFlowOpt: the weight of each token and the position of the recycled token it is merged into (or -1)
        self.recycled = recycled

    def tokens(self, x: Tensor, dim: int = 1) -> Tensor:
        """Hidden states, embeddings or a 2-D mask, at the kept positions along ``dim``."""
        return _gather_seq(x, self.kept, dim)

    def embeddings(self, x: Tensor) -> Tensor:
        """Embeddings ``[B, N, C]`` at the kept positions, the recycled ones (if any) the merge of their tokens."""
        return self.tokens(x if self.recycled is None else recycle(x, *self.recycled))

    def positions(self, positions: Tensor) -> Tensor:
        """Position ids ``[B | 1, N]`` or M-RoPE's ``[R, B | 1, N]``."""
        if positions.dim() == 3:
            rows = positions.expand(-1, self.kept.shape[0], -1)
            return rows.gather(2, self.kept[None].expand(rows.shape[0], -1, -1))
        return _gather_seq(positions, self.kept, -1)

    def rotary(self, table: Tensor) -> Tensor:
        """Rotary cos/sin ``[B, N, D]``, or ``[R, B, N, D]`` (M-RoPE sections first, as Qwen2-VL's text model
        passes them in transformers 5.6)."""
        if table.dim() == 4:
            return _gather_seq(table.transpose(0, 1), self.kept, 2).transpose(0, 1)
        return _gather_seq(table, self.kept, 1)

    def mask(self, mask: Tensor) -> Tensor:
        """A 4-D attention mask ``[B, 1, N, K]``: its kept rows; its columns of the kept tokens, then those after the
        sequence (``K > N`` with a static cache: the slots that later tokens fill)."""
        rows, columns = mask.shape[-2:]
        after = torch.arange(rows, columns, device=mask.device).expand(self.kept.shape[0], -1)
        return _gather_seq(_gather_seq(mask, self.kept, -2), torch.cat([self.kept, after], 1), -1)

    def of(self, positions: Tensor) -> Tensor:
        """The kept ones of ``positions`` ``[B, N]`` (the positions of the current sequence in an earlier one)."""
        return positions.gather(1, self.kept)


class CacheSelection:
    """PLPHP's decision for one decoder layer: the positions each kv head keeps in the layer's cache,
    ``kept`` ``[B, Hkv, n]``, non-visual tokens first (in the same order in every head), then the head's own
    visual tokens."""

    def __init__(self, kept: Tensor) -> None:
        self.kept = kept

    def apply(self, entry: Any) -> None:
        """Shorten the keys and values of the cache layer ``entry`` in place."""
        index = self.kept[..., None].expand(-1, -1, -1, entry.keys.shape[-1])
        entry.keys, entry.values = entry.keys.gather(2, index), entry.values.gather(2, index)


@dataclass
class Stage:
    """One pruning step: before decoder layer ``layer`` (0 = the language model's input), keep ``keep``
    of the visual tokens present, ranked by ``score(generation)`` (``[B, N]`` over the current sequence)."""

    layer: int
    keep: float
    score: Callable[[Generation], Tensor]
    #: VFlowOpt, at the input only: the grid cell of each visual token ``[B, N]``; the pruned ones are recycled
    cells: Callable[[Generation], Tensor] | None = None

    def decide(self, generation: Generation) -> Selection | None:
        """This stage's :class:`Selection` in ``generation``'s prefill (``None``: it drops nothing)."""
        dropped = num_dropped(self.keep, generation.counts)
        if not dropped:
            return None
        score = self.score(generation)
        if self.cells is None:
            return Selection(kept_indices(score, generation.visual, dropped), dropped)
        kept, target = recycled_selection(score, generation.visual, self.cells(generation), dropped)
        return Selection(kept, dropped, (score, target))


def _gather_seq(x: Tensor, index: Tensor, dim: int) -> Tensor:
    """``x`` gathered along ``dim`` (a sequence dimension) at per-sample ``index`` ``[B, n]``; ``x``'s
    leading dimension is the batch (or 1, broadcast)."""
    dim = dim % x.ndim
    x = x.expand(index.shape[0], *x.shape[1:])
    shape = [1] * x.ndim
    shape[0], shape[dim] = index.shape
    full = list(x.shape)
    full[dim] = index.shape[1]
    return x.gather(dim, index.view(shape).expand(full))


class Generation:
    """What one thread's generation carries between the hooks: whether this forward is a prefill, where the
    visual tokens are, what the hooks captured, and which prefill positions each layer's KV cache holds (for
    later ``generate()`` steps). One per thread, reset by each prefill."""

    def __init__(self) -> None:
        self.prefill = False
        #: the tokens the KV cache (its layer 0) held when this forward started (in compiled decode steps on a static
        #: cache, its count on the device: :func:`~visattn.frameworks.transformers.held_tokens`)
        self.past_length: int | Tensor = 0
        self.visual: Tensor | None = None  # [B, N] candidates in the current sequence (prefill)
        self.counts: list[int] = []  # candidates per sample in the current sequence (prefill)
        self.instruction = 1  # the rows of text after the last image token of every sample (at least 1)
        self.input_kept: Tensor | None = None  # positions of the prompt kept at the input, [B, n]
        self.static: list[Any] | None = None  # the layers of a static KV cache, given their lengths in the prefill
        self.prompt_length = 0  # the prompt's length before / after the input stage
        self.input_length = 0
        #: per decoder layer, the positions of the language model's input its cache holds (absent: all), with the
        #: layer whose pruning decided them (layers sharing a decision share one decode mask, keyed by that layer)
        self.columns: dict[int, tuple[int, Tensor]] = {}
        self.current: dict[str, Any] | None = None  # short decoder kwargs of this forward
        self.decode_masks: dict[int, Tensor] = {}
        #: per stage layer, the kept positions of the last prefill, in the prompt's positions
        self.kept: dict[int, Tensor] = {}
        #: what the attention routes and layer hooks recorded in this forward: "rows" (per layer, the last rows'
        #: attention per head), "transition" (transprune)
        self.captured: dict[str, Any] = {}
        #: the vision tower's [CLS] attention per layer; transformers >= 5.23's generate() runs the vision tower
        #: before the model's forward, so these live until the input stage reads them
        self.vision_scores: dict[int, Tensor] = {}
        #: zo: the projector's input and output for the last images (kept, like the scores above, for the prefill)
        self.projected: tuple[Tensor, Tensor] | None = None
        #: vflowopt: the entropy of each patch of the last images, [images, patches]
        self.entropy: Tensor | None = None

    def select(self, selection: Selection) -> None:
        """The candidates after ``selection`` drops its tokens from the current sequence."""
        self.visual = selection.tokens(self.visual)
        self.counts = [n - selection.dropped for n in self.counts]


class VlmPruner:
    """``prune`` on one vision-language model: its stages, and each thread's :class:`Generation`."""

    def __init__(self, model: nn.Module, keep: float, per_layer: bool = False) -> None:
        self.model, self.keep = model, keep
        #: PLPHP: each prompt's attention sets each layer's cache length
        self.per_layer = per_layer
        self.stages: dict[int, Stage] = {}
        self.image_token_id = int(model.config.image_token_id)
        self.num_layers = len(tfa.decoder_layers(model))
        self.generations: PerThread[Generation] = PerThread(Generation)

    # -- the model's forward: is this a prefill, where are the image tokens --------------------------

    def start(self, call: tfa.ModelCall) -> None:
        gen = self.generations.get()
        gen.past_length = tfa.held_tokens(call.cache)
        gen.prefill = tfa.first_forward(gen.past_length)
        gen.current, gen.decode_masks, gen.captured = None, {}, {}
        if not gen.prefill:
            if not gen.prompt_length:
                raise ShapeError("prune: a forward with a filled KV cache must follow a prefill of the pruned "
                                 "model (generate() does this)")
            return
        input_ids, attention_mask = call.input_ids, call.attention_mask
        if input_ids is None:
            raise ShapeError("prune: the model must be called with input_ids (image tokens are found there "
                             "from config.image_token_id); got inputs_embeds only")
        static = tfa.static_layers(call.cache, "prune") if self.keep < 1.0 else None
        if static is not None and self.per_layer:
            raise UnsupportedModelError(
                "prune: strategy 'plphp' sets each layer's cache length from each prompt's attention, so with a "
                "static KV cache (generate(cache_implementation=\"static\")) the compiled decoding would recompile "
                "for every prompt; generate with the default dynamic cache, or use a strategy that drops tokens in "
                "stages ('fastv', 'transprune', 'star', 'cls', 'zo')")
        n = input_ids.shape[1]
        real = attended_keys(attention_mask, n)
        real = torch.ones_like(input_ids, dtype=torch.bool) if real is None else real[:, :n]
        visual = (input_ids == self.image_token_id) & real
        after = visual.flip(1).int().argmax(1)  # tokens after each sample's last image token (left padded: the text)
        late = (real[:, :-1] > real[:, 1:]).sum(-1)  # padding after a real token
        # How many tokens each stage drops depends on these counts: the one host read of a prompt (under
        # torch.compile, the one graph break prune adds)
        counts, after, late = torch.stack([visual.sum(-1), after, late]).tolist()
        missing = [b for b, n in enumerate(counts) if not n]
        if missing:
            raise ShapeError(f"prune: sample(s) {missing} of the batch hold no image tokens "
                             f"(config.image_token_id={self.image_token_id}); every sample needs an image")
        right = [b for b, n in enumerate(late) if n]
        if static is not None and right:
            raise ShapeError(f"prune: sample(s) {right} of the batch have padding after real tokens; with a static "
                             f"KV cache generate() masks the cache's slots by the prompt's positions, which stay "
                             f"in place when tokens are dropped only if padding comes first: pad on the left "
                             f"(tokenizer.padding_side = \"left\"), or generate with the default dynamic cache")
        gen.visual, gen.counts, gen.instruction, gen.columns, gen.kept = visual, counts, max(min(after), 1), {}, {}
        gen.static = static
        gen.input_kept, gen.prompt_length = None, input_ids.shape[1]

    # -- stage at the language model's input ---------------------------------------------------------

    def language_model_inputs(self, call: tfa.ModelCall) -> dict[str, Any]:
        """The language model's keyword arguments for this call: the input stage's short sequence in a
        prefill, the 2-D mask and positions that fit the shortened cache in a later step."""
        gen = self.generations.get()
        kwargs = call.keywords()
        embeds, mask, positions = call.inputs_embeds, call.attention_mask, call.position_ids
        if embeds is None:
            raise ShapeError("prune: the language model must be called with inputs_embeds")
        # a 2-D padding mask, or with a static KV cache generate()'s 4-D masks over the cache's slots (for models
        # with kinds of layers, a dict of them by kind)
        masks = list(mask.values()) if isinstance(mask, dict) else [] if mask is None else [mask]
        if not all(isinstance(m, Tensor) and m.dim() in (2, 4) for m in masks):
            raise ShapeError(f"prune: the language model must get an attention mask [batch, tokens] (or none; with a "
                             f"static KV cache, [batch, 1, tokens, slots], or a dict of them); got "
                             f"{[tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__ for m in masks]}")
        stage = self.stages.get(0)
        if gen.prefill:
            selection = None if stage is None else stage.decide(gen)
            if selection is not None:
                if positions is None:
                    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
                kwargs.update(inputs_embeds=selection.embeddings(embeds), position_ids=selection.positions(positions))
                if mask is not None:
                    def short(m: Tensor) -> Tensor:
                        return selection.tokens(m) if m.dim() == 2 else selection.mask(m)

                    kwargs["attention_mask"] = ({kind: short(m) for kind, m in mask.items()}
                                                if isinstance(mask, dict) else short(mask))
                if gen.static is not None:
                    tfa.reserve(gen.static, selection.dropped)
                gen.select(selection)
                gen.input_kept = gen.kept[0] = selection.kept
            gen.input_length = kwargs["inputs_embeds"].shape[1]
        elif gen.input_kept is not None:
            if isinstance(mask, Tensor) and mask.dim() == 2:  # (generate() sizes 4-D masks for the cache's slots)
                prompt = _gather_seq(mask[:, :gen.prompt_length], gen.input_kept, 1)
                kwargs["attention_mask"] = torch.cat([prompt, mask[:, gen.prompt_length:]], dim=1)
            if positions is None:
                past = gen.past_length + gen.prompt_length - gen.input_length
                kwargs["position_ids"] = torch.arange(embeds.shape[1], device=embeds.device)[None] + past
        return kwargs

    # -- stages inside the decoder ---------------------------------------------------------------------

    def decoder_layer_inputs(self, index: int, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        gen = self.generations.get()
        if gen.prefill:
            if gen.current is not None:
                kwargs.update(gen.current)
            stage = self.stages.get(index)
            selection = None if not index or stage is None else stage.decide(gen)
            return hidden if selection is None else self._drop(gen, stage, selection, hidden, kwargs)
        decided = gen.columns.get(index)
        mask = kwargs.get("attention_mask")
        if decided is not None and mask is not None:
            source, columns = decided
            if source not in gen.decode_masks:
                extra = torch.arange(gen.input_length, mask.shape[-1], device=mask.device)
                full = torch.cat([columns, extra.expand(columns.shape[0], -1)], dim=1)
                gen.decode_masks[source] = _gather_seq(mask, full, -1)
            kwargs["attention_mask"] = gen.decode_masks[source]
        return hidden

    def _drop(self, gen: Generation, stage: Stage, selection: Selection, hidden: Tensor,
              kwargs: dict[str, Any]) -> Tensor:
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        cos, sin = kwargs["position_embeddings"]
        if cos.dim() not in (3, 4):
            raise ShapeError(f"prune: expected rotary position embeddings [batch, tokens, dim] (or M-RoPE's "
                             f"[sections, batch, tokens, dim]); got {tuple(cos.shape)}")
        if isinstance(mask, Tensor):
            mask = selection.mask(mask)
        elif mask is not None:
            raise ShapeError(f"prune: decoder layers must get a 4-D attention mask tensor; got {type(mask).__name__}")
        gen.current = {"attention_mask": mask, "position_embeddings": (selection.rotary(cos), selection.rotary(sin)),
                       "position_ids": None if positions is None else selection.positions(positions)}
        kwargs.update(gen.current)
        if gen.static is not None:
            tfa.reserve(gen.static[stage.layer:], selection.dropped)
        gen.select(selection)
        before = gen.columns.get(stage.layer)
        columns = selection.kept if before is None else selection.of(before[1])
        for later in range(stage.layer, self.num_layers):
            gen.columns[later] = stage.layer, columns
        gen.kept[stage.layer] = columns if gen.input_kept is None else gen.input_kept.gather(1, columns)
        return selection.tokens(hidden)

    # -- PLPHP: per-layer, per-head pruning of the KV cache after prefill -------------------------------

    def prune_cache(self, cache: Any) -> None:
        gen = self.generations.get()
        rows: dict[int, Tensor] = gen.captured.get("rows", {})
        if not gen.prefill or cache is None or not rows:
            return
        layers = sorted(rows)
        probs = torch.stack([rows[i] for i in layers])  # [L, B, H, N]
        retention = layer_retention(vision_share(probs, gen.visual), self.keep)
        # each layer's cache length follows from its attention: a host read (under torch.compile a graph break);
        # everything else is ranked for all layers and kv heads at once, so the host enqueues little after it
        dropped = [num_dropped(r, gen.counts) for r in retention.tolist()]
        if not any(dropped):
            return
        layer_count, batch, _, n = probs.shape
        kv_heads = cache.layers[layers[0]].keys.shape[1]
        per_head = probs.view(layer_count, batch, kv_heads, -1, n).mean(3)  # [L, B, Hkv, N]
        order = kept_order(per_head, gen.visual[:, None], torch.tensor(dropped, device=probs.device).view(-1, 1, 1, 1))
        for i, count, ranked in zip(layers, dropped, order):
            if count:
                selection = CacheSelection(ranked[..., :n - count])
                selection.apply(cache.layers[i])
                gen.columns[i] = i, selection.kept[:, 0]
                gen.kept[i] = selection.kept


class PruneVlmHandle(Handle):
    """Handle of ``prune`` on a vision-language model. ``kept`` maps each pruning layer (0 = the language
    model's input) to the prompt positions kept by the last prefill (this thread's; read in a thread that ran
    none, another thread's), ``[B, n]`` (PLPHP: ``[B, Hkv, n]`` per layer, the positions each kv head keeps in
    its cache)."""

    def __init__(self, *args: Any, pruner: VlmPruner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pruner = pruner

    @property
    def kept(self) -> dict[int, Tensor]:
        return dict(self._pruner.generations.latest().kept)


def _num_vision_layers(model: nn.Module) -> int:
    return len(tfa.attention_layers(model)) - len(tfa.language_layers(model))


def _feature_layers(model: nn.Module) -> list[int]:
    """The vision-tower layers whose outputs LLaVA's projector reads (``config.vision_feature_layer``)."""
    selected = model.config.vision_feature_layer
    count = _num_vision_layers(model)
    layers = [selected] if isinstance(selected, int) else list(selected)
    return [layer % (count + 1) - 1 for layer in layers]


def resolve_layer(target: Target, options: dict[str, Any]) -> int:
    num_layers = len(tfa.decoder_layers(target.model))
    layer = options["layer"]
    if layer is None:
        layer = num_layers // 2 if options["strategy"] in ("star", "vflowopt") else DEFAULT_LAYER
    given = f"{layer}{' by default' if options['layer'] is None else ''}"
    if not 1 <= layer < num_layers:
        raise OptionError(f"prune: layer must be a decoder layer in 1..{num_layers - 1} for this "
                          f"{target.family} (got {given})")
    stacked = len(getattr(getattr(target.model.config, "vision_config", None), "deepstack_visual_indexes", None) or ())
    if options["strategy"] != "plphp" and layer < stacked:  # PLPHP drops from the cache after the prefill
        raise OptionError(f"prune: {target.family} adds DeepStack vision features to the image tokens' hidden states "
                          f"in decoder layers 0..{stacked - 1}, so tokens can be dropped from layer {stacked} on "
                          f"(got {given}); pass layer >= {stacked}")
    return layer


def check_target(target: Target, options: dict[str, Any]) -> None:
    """Every check of ``prune`` on a transformers model, before anything is touched."""
    strategy, model = options["strategy"], target.model
    if target.family in REFUSED:
        raise UnsupportedModelError(f"prune does not support {target.family}: {REFUSED[target.family]}; "
                                    f"supported: {', '.join(FAMILIES)}")
    if target.family not in FAMILIES:
        raise UnsupportedModelError(f"prune does not support the transformers model {target.family}; "
                                    f"supported: {', '.join(FAMILIES)}")
    if getattr(model.config, "image_token_id", None) is None:
        raise UnsupportedModelError(f"prune: {target.family}'s config has no image_token_id")
    tfa.check_calling_convention(model)
    if options["layers"] is not None:
        raise OptionError("prune: option 'layers' applies to timm and open_clip models; on transformers models "
                          "'layer' says where tokens are dropped")
    if strategy in CLS_STRATEGIES and target.family not in CLS_FAMILIES:
        why = NO_CLS.get(target.family, "its vision tower has no [CLS] token")
        raise UnsupportedModelError(f"prune: strategy {strategy!r} ranks image tokens by the vision tower's [CLS] "
                                    f"attention and supports {', '.join(CLS_FAMILIES)}; {target.family} is refused "
                                    f"because {why}; use strategy 'fastv' or 'transprune'")
    if strategy in ("zo", "vflowopt") and target.family not in PATCH_FAMILIES:
        what = ("perturbs the multimodal projector's input token by token" if strategy == "zo" else
                "reads each image token's patch on the vision tower's grid")
        raise UnsupportedModelError(f"prune: strategy {strategy!r} {what} and supports {', '.join(PATCH_FAMILIES)}; "
                                    f"{target.family}'s image tokens are not its projector's outputs one for one "
                                    f"(crops rearranged, patches merged); use strategy 'fastv' or 'transprune'")
    if strategy == "vflowopt":
        if model.config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(f"prune: strategy 'vflowopt' lays the image tokens out on the patch grid, and "
                                        f"this model passes the [CLS] feature too (vision_feature_select_strategy="
                                        f"{model.config.vision_feature_select_strategy!r}; supported: 'default')")
        side, per_side = _patch_grid(model, options["cell"])
        first = math.ceil(math.sqrt(options["keep"]) * side ** 2)
        if first < per_side ** 2:
            raise OptionError(f"prune: strategy 'vflowopt' keeps ceil(sqrt(keep) * {side ** 2}) = {first} tokens of "
                              f"each image at the input, fewer than its {per_side ** 2} recycled tokens (cells of "
                              f"cell={options['cell']} patches on a {side}x{side} grid); raise keep or cell")
    implementation = str(model.config.get_text_config()._attn_implementation).removeprefix(tfa.PREFIX)
    if strategy not in INPUT_STRATEGIES and implementation == "flex_attention":
        raise UnsupportedModelError(f"prune: strategy {strategy!r} drops tokens inside the language model, gathering "
                                    f"the rows and columns of its 4-D attention mask, and flex attention passes a "
                                    f"BlockMask, which cannot be gathered; load the model with "
                                    f"attn_implementation=\"sdpa\" or \"eager\", or use strategy 'cls' or 'zo' "
                                    f"(LLaVA)")
    if options["ensemble_layers"] is not None:
        if strategy not in CLS_STRATEGIES:
            raise OptionError(f"prune: option 'ensemble_layers' applies to strategies 'cls' and 'star' "
                              f"(got strategy {strategy!r})")
        count = _num_vision_layers(model)
        bad = [i for i in options["ensemble_layers"] if i >= count]
        if bad:
            raise OptionError(f"prune: ensemble_layers {bad} out of range; the vision tower has {count} layers "
                              f"(0..{count - 1})")
    if strategy in INPUT_STRATEGIES:
        if options["layer"] is not None:
            raise OptionError(f"prune: strategy {strategy!r} drops tokens at the language model's input; option "
                              f"'layer' applies to 'fastv', 'star', 'plphp', 'transprune' and 'vflowopt'")
    else:
        resolve_layer(target, options)


#: ``record(generation, query, key, scale, mask)``: what an observed attention layer keeps of its call.
Recorder = Callable[[Generation, Tensor, Tensor, float, "Tensor | None"], None]


@dataclass
class Plan:
    """What a strategy's builder returns: its stages, the attention layers it observes (index in
    ``attention_layers`` -> recorder; those in ``every_call`` record in every call, the others in prefills),
    and the hooks it needs (transprune's transition after layer ``transition_after``, PLPHP's cache pruning, zo's
    record of the projector's input and output, vflowopt's of the images' pixels)."""

    stages: list[Stage]
    routes: dict[int, Recorder]
    every_call: frozenset[int] = frozenset()
    transition_after: int | None = None
    prunes_cache: bool = False
    projector: bool = False
    #: called with the vision tower's ``pixel_values`` in each of its calls
    pixels: Callable[[Generation, Tensor], None] | None = None


def _cls_plan(model: nn.Module, options: dict[str, Any], keep: float) -> Plan:
    """VTC-CLS's stage at the language model's input (``cls``, and ``star``'s first stage)."""
    vision_layers = options["ensemble_layers"] or _feature_layers(model)
    skip_cls = 1 if model.config.vision_feature_select_strategy == "default" else 0

    def record(index: int) -> Recorder:
        def run(gen: Generation, query: Tensor, key: Tensor, scale: float, mask: Tensor | None) -> None:
            gen.vision_scores[index] = cls_attention(query[:, :, :1], key, scale, additive_bias(mask))

        return run

    def score(gen: Generation) -> Tensor:
        return _on_sequence(gen, _recorded_scores(gen, len(vision_layers), "cls", skip_cls))

    return Plan([Stage(0, keep, score)], {i: record(i) for i in vision_layers}, frozenset(vision_layers))


def _recorded_scores(gen: Generation, layers: int, strategy: str, skip: int) -> Tensor:
    """What the ``layers`` recording vision-tower layers scored this call's images, averaged over them and taken (the
    record is cleared): ``[images, features]``, without each image's first ``skip`` (its [CLS] token)."""
    if len(gen.vision_scores) != layers:
        raise ShapeError(f"prune: strategy {strategy!r} needs the image features of this call (pixel_values)")
    per_image = torch.stack(list(gen.vision_scores.values())).mean(0)[:, skip:]
    gen.vision_scores.clear()
    return per_image


def _on_sequence(gen: Generation, per_image: Tensor) -> Tensor:
    """Scores of this call's image features ``[images, features]``, in order, at the visual tokens of the current
    sequence: ``[B, N]``, 0 elsewhere."""
    if per_image.numel() != sum(gen.counts):
        raise ShapeError(f"prune: the vision tower gave {per_image.numel()} image features for "
                         f"{sum(gen.counts)} image tokens")
    return torch.zeros(gen.visual.shape, device=per_image.device).masked_scatter(gen.visual, per_image.flatten())


def _zo_plan(model: nn.Module, options: dict[str, Any], keep: float) -> Plan:
    """ZOO-Prune's stage at the language model's input."""
    projector = tfa.projector(model)
    width = next(m for m in projector.modules() if isinstance(m, nn.Linear)).in_features  # the projector's input
    generator = torch.Generator().manual_seed(options["seed"])  # drawn here: a generator is opaque to dynamo
    directions = torch.nn.functional.normalize(torch.randn(options["directions"], width, generator=generator), dim=-1)

    def score(gen: Generation) -> Tensor:
        if gen.projected is None:
            raise ShapeError("prune: strategy 'zo' needs the image features of this call (pixel_values)")
        (inputs, outputs), gen.projected = gen.projected, None
        if outputs.shape[:-1].numel() != sum(gen.counts):
            raise ShapeError(f"prune: the projector gave {outputs.shape[:-1].numel()} image features for "
                             f"{sum(gen.counts)} image tokens")
        with torch.no_grad():
            sensitivity = zeroth_order_sensitivity(projector, inputs, directions, options["step"])
        visual = gen.visual
        per_token = torch.zeros(visual.shape, device=visual.device).masked_scatter(visual, sensitivity.flatten())
        features = outputs.new_zeros(*visual.shape, outputs.shape[-1]).masked_scatter(
            visual[..., None].expand(-1, -1, outputs.shape[-1]), outputs.flatten(0, -2))
        return diverse_ranks(per_token, features, visual, max(gen.counts) - num_dropped(keep, gen.counts))

    return Plan([Stage(0, keep, score)], {}, projector=True)


def _vflowopt_plan(model: nn.Module, options: dict[str, Any], layer: int) -> Plan:
    """VFlowOpt's stages: at the language model's input, pruning with recycling; before ``layer``, pruning by the
    same importance (each keeping ``sqrt(keep)``)."""
    vision_layers = _feature_layers(model)
    side, per_side = _patch_grid(model, options["cell"])
    threshold, weight, keep = options["threshold"], options["entropy"], math.sqrt(options["keep"])

    def record(index: int) -> Recorder:
        def run(gen: Generation, query: Tensor, key: Tensor, scale: float, mask: Tensor | None) -> None:
            probs = attention_probs(query, key, scale=scale, bias=additive_bias(mask))
            gen.vision_scores[index] = global_relevance(probs, threshold)

        return run

    def pixels(gen: Generation, images: Tensor) -> None:
        gen.entropy = patch_entropy(images, images.shape[-1] // side)

    def score(gen: Generation) -> Tensor:
        if weight and gen.entropy is None:
            raise ShapeError("prune: strategy 'vflowopt' needs the image features of this call (pixel_values)")
        per_image = _recorded_scores(gen, len(vision_layers), "vflowopt", 1)  # (the [CLS] token is not shown)
        if weight:
            per_image = per_image + weight * gen.entropy.softmax(-1)
        gen.entropy = None
        gen.captured["importance"] = _on_sequence(gen, per_image)
        return gen.captured["importance"]

    def cells(gen: Generation) -> Tensor:
        index = (gen.visual.cumsum(1) - 1).clamp_min(0)  # among the sample's image tokens
        image, patch = index // side ** 2, index % side ** 2
        return image * per_side ** 2 + patch // side // options["cell"] * per_side + patch % side // options["cell"]

    def later(gen: Generation) -> Tensor:
        importance = gen.captured["importance"]
        return importance if gen.input_kept is None else importance.gather(1, gen.input_kept)

    return Plan([Stage(0, keep, score, cells), Stage(layer, keep, later)], {i: record(i) for i in vision_layers},
                frozenset(vision_layers), pixels=pixels if weight else None)


def _patch_grid(model: nn.Module, cell: int) -> tuple[int, int]:
    """The side of the vision tower's patch grid, and the cells of ``cell`` patches along it."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return side, math.ceil(side / cell)


def _rows_recorder(index: int, instruction: bool) -> Recorder:
    """Record, per head, the attention of the last row (``instruction``: the rows of the text after the last
    image, averaged) of decoder layer ``index``."""

    def run(gen: Generation, query: Tensor, key: Tensor, scale: float, mask: Tensor | None) -> None:
        span = slice(-gen.instruction if instruction else -1, None)
        bias = additive_bias(None if mask is None else mask[..., span, :])
        gen.captured.setdefault("rows", {})[index] = row_attention(query[:, :, span], key, scale, bias).mean(2)

    return run


def _last_rows(index: int) -> Callable[[Generation], Tensor]:
    return lambda gen: gen.captured["rows"][index].mean(1)


def plan(model: nn.Module, options: dict[str, Any], layer: int) -> Plan:
    """The :class:`Plan` of ``options["strategy"]``, dropping tokens before decoder layer ``layer``."""
    strategy, keep = options["strategy"], options["keep"]
    language = tfa.language_layers(model)
    if strategy == "cls":
        return _cls_plan(model, options, keep)
    if strategy == "zo":
        return _zo_plan(model, options, keep)
    if strategy == "vflowopt":
        return _vflowopt_plan(model, options, layer)
    if strategy == "plphp":  # the last row from ``layer`` on; pruning happens in the cache after prefill
        routes = {language[i]: _rows_recorder(i, False) for i in range(layer, len(language))}
        return Plan([], routes, prunes_cache=True)
    observe = {language[layer - 1]: _rows_recorder(layer - 1, strategy == "transprune")}
    if strategy == "fastv":
        return Plan([Stage(layer, keep, _last_rows(layer - 1))], observe)
    if strategy == "star":
        first = _cls_plan(model, options, math.sqrt(keep))
        return Plan([*first.stages, Stage(layer, math.sqrt(keep), _last_rows(layer - 1))], {**first.routes, **observe},
                    first.every_call)

    def transprune_score(gen: Generation) -> Tensor:
        return (normalized(gen.captured["transition"], gen.visual)
                + normalized(gen.captured["rows"][layer - 1].mean(1), gen.visual))

    return Plan([Stage(layer, keep, transprune_score)], observe, transition_after=layer - 1)


def install(target: Target, patcher: Patcher, options: dict[str, Any]) -> PruneVlmHandle:
    """Install the strategy's :class:`Plan` on ``target.model`` through the transformers adapter's services."""
    model, strategy, keep = target.model, options["strategy"], options["keep"]
    layer = 0 if strategy in INPUT_STRATEGIES else resolve_layer(target, options)
    chosen = plan(model, options, layer)
    pruner = VlmPruner(model, keep, per_layer=chosen.prunes_cache)
    pruner.stages = {stage.layer: stage for stage in chosen.stages}

    def make_route(index: int, module: nn.Module, implementation: str) -> tfa.Route:
        record = chosen.routes[index]

        def route(call: Callable[..., Any], module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            gen = pruner.generations.get()
            if index in chosen.every_call or gen.prefill:
                scaling = kwargs.get("scaling")
                mask = tfa.stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal"))
                n = query.shape[-2]  # the keys of a prefill (a static cache's are followed by its free slots)
                record(gen, query, key[..., :n, :], query.shape[-1] ** -0.5 if scaling is None else scaling,
                       None if mask is None else mask[..., :n])
            return call(module, query, key, value, attention_mask, **kwargs)

        return route

    tfa.on_call(model, patcher, pruner.start)
    if keep < 1.0:
        if chosen.routes:
            tfa.route_attention(model, patcher, sorted(chosen.routes), make_route)
        tfa.on_call(model.get_decoder(), patcher, pruner.language_model_inputs)
        layers = tfa.decoder_layers(model)
        for index in range(layer if strategy not in INPUT_STRATEGIES else len(layers), len(layers)):
            def layer_inputs(call: tfa.ModelCall, index: int = index) -> dict[str, Any]:
                kwargs = call.keywords()
                hidden = pruner.decoder_layer_inputs(index, kwargs.pop("hidden_states"), kwargs)
                return {"hidden_states": hidden, **kwargs}

            tfa.on_call(layers[index], patcher, layer_inputs)
        if chosen.transition_after is not None:
            def transition(call: tfa.ModelCall, output: Any) -> None:
                gen = pruner.generations.get()
                if gen.prefill:
                    after = output[0] if isinstance(output, tuple) else output
                    gen.captured["transition"] = transition_variation(call.arguments["hidden_states"], after)

            tfa.after_call(layers[chosen.transition_after], patcher, transition)
        if chosen.prunes_cache:
            tfa.after_call(model.get_decoder(), patcher,
                           lambda call, output: pruner.prune_cache(tfa.output_cache(output)))
        if chosen.projector:
            def projected(call: tfa.ModelCall, output: Tensor) -> None:
                pruner.generations.get().projected = next(iter(call.arguments.values())), output

            tfa.after_call(tfa.projector(model), patcher, projected)
        if chosen.pixels is not None:
            def pixels(call: tfa.ModelCall) -> None:
                chosen.pixels(pruner.generations.get(), call.arguments["pixel_values"])

            tfa.on_call(tfa.vision_tower(model), patcher, pixels)
    return PruneVlmHandle("prune", model, options, patcher, pruner=pruner)
