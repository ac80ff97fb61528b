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

How tokens are removed. A stage at layer 0 (``cls``, ``star``'s first) runs in a forward pre-hook of
the language model: ``inputs_embeds``, the 2-D attention mask and the position ids (M-RoPE rows
included) are gathered at the kept positions, so every layer and its KV cache see the short
sequence. A stage at layer ``K >= 1`` runs in a pre-hook of decoder layer ``K``: the hidden states,
the 4-D mask (rows and columns), the rotary ``position_embeddings`` and ``position_ids`` are gathered,
and the same short versions are handed to every later layer in that forward. Kept tokens keep their
original positions. In later ``generate()`` steps the masks that transformers builds for the full
sequence are gathered to the columns each layer's cache holds (its kept prefill tokens, then the new
tokens), and position ids stay those of the full sequence, so generation continues exactly as a model
whose caches hold only the kept tokens. Dynamic caches only (transformers' default).

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

from ...core.importance import (
    additive_bias,
    kept_indices,
    layer_retention,
    normalized,
    num_dropped,
    row_attention,
    transition_variation,
    vision_share,
)
from ...core.merge import cls_attention
from ...errors import OptionError, ShapeError, UnsupportedModelError
from ...frameworks import Target
from ...frameworks.base import LazyAdapter
from ...patching import Handle, Patcher

tfa = LazyAdapter("transformers")  # imported on first use: visattn imports without transformers

STRATEGIES = ("cls", "fastv", "star", "plphp", "transprune")
FAMILIES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Qwen2VLForConditionalGeneration",
            "Qwen2_5_VLForConditionalGeneration")
#: Strategies that read the vision tower's [CLS] attention, and the models that have it.
CLS_STRATEGIES, CLS_FAMILIES = ("cls", "star"), ("LlavaForConditionalGeneration",)
#: FastV's K; STAR's second stage sits at L // 2.
DEFAULT_LAYER = 2


@dataclass
class Stage:
    """One pruning step: before decoder layer ``layer`` (0 = the language model's input), keep ``keep``
    of the visual tokens present, ranked by ``score()`` (``[B, N]`` over the current sequence)."""

    layer: int
    keep: float
    score: Callable[[], Tensor]


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


def _gather_positions(positions: Tensor, index: Tensor) -> Tensor:
    """Position ids ``[B | 1, N]`` or M-RoPE's ``[R, B | 1, N]`` at per-sample ``index`` ``[B, n]``."""
    if positions.dim() == 3:
        rows = positions.expand(-1, index.shape[0], -1)
        return rows.gather(2, index[None].expand(rows.shape[0], -1, -1))
    return _gather_seq(positions, index, -1)


def _gather_rotary(table: Tensor, index: Tensor) -> Tensor:
    """Rotary cos/sin ``[B, N, D]``, or ``[R, B, N, D]`` (M-RoPE sections first, as Qwen2-VL's text model
    passes them in transformers 5.6), at per-sample ``index`` ``[B, n]``."""
    if table.dim() == 4:
        return _gather_seq(table.transpose(0, 1), index, 2).transpose(0, 1)
    return _gather_seq(table, index, 1)


class VlmPruner:
    """The pruning state of one model: the stages, what the hooks captured in the current forward, and
    which prefill positions each layer's KV cache holds (for later ``generate()`` steps)."""

    def __init__(self, model: nn.Module, keep: float, captured: dict[str, Any]) -> None:
        self.model, self.keep, self.captured = model, keep, captured
        self.stages: dict[int, Stage] = {}
        self.image_token_id = int(model.config.image_token_id)
        self.prefill = False
        self.visual: Tensor | None = None  # [B, N] candidates in the current sequence (prefill)
        self.input_kept: Tensor | None = None  # positions of the prompt kept at the input, [B, n]
        self.prompt_length = 0  # the prompt's length before / after the input stage
        self.input_length = 0
        #: per decoder layer, the positions of the language model's input its cache holds (None: all)
        self.columns: dict[int, Tensor] = {}
        self.current: dict[str, Any] | None = None  # short decoder kwargs of this forward
        self.decode_masks: dict[int, Tensor | None] = {}
        #: per stage layer, the kept positions of the last prefill, in the prompt's positions
        self.kept: dict[int, Tensor] = {}

    # -- the model's forward: is this a prefill, where are the image tokens --------------------------

    def start(self, call: tfa.ModelCall) -> None:
        self.prefill = call.prefill
        self.current, self.decode_masks = None, {}
        if not self.prefill:
            if not self.prompt_length:
                raise ShapeError("prune: a forward with a filled KV cache must follow a prefill of the pruned "
                                 "model (generate() does this)")
            return
        input_ids, attention_mask = call.input_ids, call.attention_mask
        if input_ids is None:
            raise ShapeError("prune: the model must be called with input_ids (image tokens are found there "
                             "from config.image_token_id); got inputs_embeds only")
        visual = input_ids == self.image_token_id
        if attention_mask is not None and attention_mask.dim() == 2:
            visual &= attention_mask.bool()
        missing = (visual.sum(-1) == 0).nonzero()[:, 0].tolist()
        if missing:
            raise ShapeError(f"prune: sample(s) {missing} of the batch hold no image tokens "
                             f"(config.image_token_id={self.image_token_id}); every sample needs an image")
        self.visual, self.columns, self.kept = visual, {}, {}
        self.input_kept, self.prompt_length = None, input_ids.shape[1]

    # -- stage at the language model's input ---------------------------------------------------------

    def language_model_inputs(self, call: tfa.ModelCall) -> dict[str, Any]:
        """The language model's keyword arguments for this call: the input stage's short sequence in a
        prefill, the 2-D mask and positions that fit the shortened cache in a later step."""
        kwargs = call.keywords()
        embeds, mask, positions = call.inputs_embeds, call.attention_mask, call.position_ids
        if embeds is None:
            raise ShapeError("prune: the language model must be called with inputs_embeds")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ShapeError("prune: the language model must get a 2-D attention mask [batch, tokens] (or none)")
        stage = self.stages.get(0)
        if self.prefill:
            if stage is not None:
                dropped = num_dropped(stage.keep, self.visual.sum(-1))
                if dropped:
                    kept = kept_indices(stage.score(), self.visual, dropped)
                    if positions is None:
                        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
                    kwargs.update(inputs_embeds=_gather_seq(embeds, kept, 1),
                                  position_ids=_gather_positions(positions, kept))
                    if mask is not None:
                        kwargs["attention_mask"] = _gather_seq(mask, kept, 1)
                    self.visual = _gather_seq(self.visual, kept, 1)
                    self.input_kept, self.kept[0] = kept, kept
            self.input_length = kwargs["inputs_embeds"].shape[1]
        elif self.input_kept is not None:
            if mask is not None:
                prompt = _gather_seq(mask[:, :self.prompt_length], self.input_kept, 1)
                kwargs["attention_mask"] = torch.cat([prompt, mask[:, self.prompt_length:]], dim=1)
            if positions is None:
                past = call.past_length + self.prompt_length - self.input_length
                kwargs["position_ids"] = torch.arange(embeds.shape[1], device=embeds.device)[None] + past
        return kwargs

    # -- stages inside the decoder ---------------------------------------------------------------------

    def decoder_layer_inputs(self, index: int, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        if self.prefill:
            if self.current is not None:
                kwargs.update(self.current)
            stage = self.stages.get(index)
            if index and stage is not None:
                dropped = num_dropped(stage.keep, self.visual.sum(-1))
                if dropped:
                    hidden = self._drop(stage, dropped, hidden, kwargs)
            return hidden
        columns = self.columns.get(index)
        mask = kwargs.get("attention_mask")
        if columns is not None and mask is not None:
            if id(columns) not in self.decode_masks:
                extra = torch.arange(self.input_length, mask.shape[-1], device=mask.device)
                columns = torch.cat([columns, extra.expand(columns.shape[0], -1)], dim=1)
                self.decode_masks[id(self.columns[index])] = _gather_seq(mask, columns, -1)
            kwargs["attention_mask"] = self.decode_masks[id(self.columns[index])]
        return hidden

    def _drop(self, stage: Stage, dropped: int, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        kept = kept_indices(stage.score(), self.visual, dropped)
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        cos, sin = kwargs["position_embeddings"]
        if cos.dim() not in (3, 4):
            raise ShapeError(f"prune: expected rotary position embeddings [batch, tokens, dim] (or M-RoPE's "
                             f"[sections, batch, tokens, dim]); got {tuple(cos.shape)}")
        if isinstance(mask, Tensor):
            mask = _gather_seq(_gather_seq(mask, kept, -2), kept, -1)
        elif mask is not None:
            raise ShapeError(f"prune: decoder layers must get a 4-D attention mask tensor; got {type(mask).__name__}")
        self.current = {"attention_mask": mask, "position_embeddings": (_gather_rotary(cos, kept),
                                                                        _gather_rotary(sin, kept)),
                        "position_ids": None if positions is None else _gather_positions(positions, kept)}
        kwargs.update(self.current)
        self.visual = _gather_seq(self.visual, kept, 1)
        before = self.columns.get(stage.layer)
        columns = kept if before is None else before.gather(1, kept)
        num_layers = len(tfa.decoder_layers(self.model))
        for later in range(stage.layer, num_layers):
            self.columns[later] = columns
        self.kept[stage.layer] = columns if self.input_kept is None else self.input_kept.gather(1, columns)
        return _gather_seq(hidden, kept, 1)

    # -- PLPHP: per-layer, per-head pruning of the KV cache after prefill -------------------------------

    def prune_cache(self, cache: Any) -> None:
        rows: dict[int, Tensor] = self.captured.get("rows", {})
        if not self.prefill or cache is None or not rows:
            return
        layers = sorted(rows)
        counts = self.visual.sum(-1)
        shares = torch.stack([vision_share(rows[i], self.visual) for i in layers])
        for i, retention in zip(layers, layer_retention(shares, self.keep).tolist()):
            dropped = num_dropped(retention, counts)
            if not dropped:
                continue
            entry = cache.layers[i]
            batch, kv_heads, n, _ = entry.keys.shape
            per_head = rows[i].view(batch, kv_heads, -1, n).mean(2)  # [B, Hkv, N]
            candidates = self.visual[:, None, :].expand(batch, kv_heads, n)
            kept = kept_indices(per_head.reshape(-1, n), candidates.reshape(-1, n), dropped).view(batch, kv_heads, -1)
            # non-visual tokens first, in the same order in every head, then each head's own visual tokens
            order = (self.visual.gather(1, kept.flatten(1)).view_as(kept) * n + kept).argsort(-1)
            kept = kept.gather(-1, order)
            index = kept[..., None].expand(-1, -1, -1, entry.keys.shape[-1])
            entry.keys, entry.values = entry.keys.gather(2, index), entry.values.gather(2, index)
            self.columns[i] = kept[:, 0]
            self.kept[i] = kept


class PruneVlmHandle(Handle):
    """Handle of ``prune`` on a vision-language model. ``kept`` maps each pruning layer (0 = the language
    model's input) to the prompt positions kept by the last prefill, ``[B, n]`` (PLPHP: ``[B, Hkv, n]``
    per layer, the positions each kv head keeps in its cache)."""

    def __init__(self, *args: Any, pruner: VlmPruner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pruner = pruner

    @property
    def kept(self) -> dict[int, Tensor]:
        return dict(self._pruner.kept)


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
        layer = num_layers // 2 if options["strategy"] == "star" else DEFAULT_LAYER
    if not 1 <= layer < num_layers:
        raise OptionError(f"prune: layer must be a decoder layer in 1..{num_layers - 1} for this "
                          f"{target.family} (got {layer}{' by default' if options['layer'] is None else ''})")
    return layer


def check_target(target: Target, options: dict[str, Any]) -> None:
    """Every check of ``prune`` on a transformers model, before anything is touched."""
    strategy, model = options["strategy"], target.model
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
        why = ("its vision tower has no [CLS] token" if target.family.startswith("Qwen") else
               "its anyres features are rearranged (unpadded, newline tokens) after the vision tower")
        raise UnsupportedModelError(f"prune: strategy {strategy!r} ranks image tokens by the vision tower's [CLS] "
                                    f"attention and supports {', '.join(CLS_FAMILIES)}; {target.family} is refused "
                                    f"because {why}; use strategy 'fastv' or 'transprune'")
    if options["ensemble_layers"] is not None:
        if strategy not in CLS_STRATEGIES:
            raise OptionError(f"prune: option 'ensemble_layers' applies to strategies 'cls' and 'star' "
                              f"(got strategy {strategy!r})")
        count = _num_vision_layers(model)
        bad = [i for i in options["ensemble_layers"] if i >= count]
        if bad:
            raise OptionError(f"prune: ensemble_layers {bad} out of range; the vision tower has {count} layers "
                              f"(0..{count - 1})")
    if strategy == "cls":
        if options["layer"] is not None:
            raise OptionError("prune: strategy 'cls' drops tokens at the language model's input; option 'layer' "
                              "applies to 'fastv', 'star', 'plphp' and 'transprune'")
    else:
        resolve_layer(target, options)


def install(target: Target, patcher: Patcher, options: dict[str, Any]) -> PruneVlmHandle:
    model, strategy, keep = target.model, options["strategy"], options["keep"]
    layer = 0 if strategy == "cls" else resolve_layer(target, options)
    language = tfa.language_layers(model)
    decoder = model.get_decoder()
    captured: dict[str, Any] = {}  # what the decoder's hooks recorded in this forward
    # the vision tower's [CLS] attention per layer; transformers >= 5.23's generate() runs the vision tower
    # before the model's forward, so these live until the input stage reads them
    vision_scores: dict[int, Tensor] = {}
    pruner = VlmPruner(model, keep, captured)

    def last_row_attention(index: int) -> Callable[[], Tensor]:
        return lambda: captured["rows"][index].mean(1)

    stages: list[Stage] = []
    routes: dict[int, Callable[..., None]] = {}  # attention layer -> what its call records
    vision_routes: set[int] = set()  # layers whose routes record in every call, not only in a prefill
    if strategy in CLS_STRATEGIES:
        vision_layers = options["ensemble_layers"] or _feature_layers(model)
        skip_cls = 1 if model.config.vision_feature_select_strategy == "default" else 0

        def record_cls(index: int) -> Callable[..., None]:
            def record(query: Tensor, key: Tensor, scale: float, mask: Tensor | None) -> None:
                vision_scores[index] = cls_attention(query[:, :, :1], key, scale, additive_bias(mask))

            return record

        def cls_score() -> Tensor:
            if len(vision_scores) != len(vision_layers):
                raise ShapeError("prune: strategy 'cls' needs the image features of this call (pixel_values)")
            per_image = torch.stack(list(vision_scores.values())).mean(0)[:, skip_cls:].flatten()
            vision_scores.clear()
            visual = pruner.visual
            if per_image.numel() != int(visual.sum()):
                raise ShapeError(f"prune: the vision tower gave {per_image.numel()} image features for "
                                 f"{int(visual.sum())} image tokens")
            return torch.zeros(visual.shape, device=per_image.device).masked_scatter(visual, per_image)

        for i in vision_layers:
            routes[i] = record_cls(i)
        vision_routes.update(vision_layers)
        stages.append(Stage(0, math.sqrt(keep) if strategy == "star" else keep, cls_score))
    if strategy in ("fastv", "star", "plphp", "transprune"):
        def record_rows(index: int) -> Callable[..., None]:
            """Record, per head, the attention of the last row (transprune: the instruction's rows, averaged)."""
            def record(query: Tensor, key: Tensor, scale: float, mask: Tensor | None) -> None:
                span = slice(-instruction_rows() if strategy == "transprune" else -1, None)
                bias = additive_bias(None if mask is None else mask[..., span, :])
                probs = row_attention(query[:, :, span], key, scale, bias)
                captured.setdefault("rows", {})[index] = probs.mean(2)

            return record

        def instruction_rows() -> int:
            """Rows of the text after each sample's last image token (left padding aligns the ends)."""
            visual = pruner.visual
            last = visual.shape[1] - 1 - visual.flip(1).int().argmax(1)
            return max(int((visual.shape[1] - 1 - last).min()), 1)

        observed = range(layer, len(language)) if strategy == "plphp" else [layer - 1]
        for i in observed:
            routes[language[i]] = record_rows(i)
        if strategy in ("fastv", "star"):
            stages.append(Stage(layer, math.sqrt(keep) if strategy == "star" else keep, last_row_attention(layer - 1)))
        if strategy == "transprune":
            def transprune_score() -> Tensor:
                visual = pruner.visual
                return (normalized(captured["transition"], visual)
                        + normalized(captured["rows"][layer - 1].mean(1), visual))

            stages.append(Stage(layer, keep, transprune_score))

    pruner.stages = {stage.layer: stage for stage in stages}

    def make_route(index: int, module: nn.Module, implementation: str) -> tfa.Route:
        record = routes[index]

        def route(call: Callable[..., Any], module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            if index in vision_routes or pruner.prefill:
                scaling = kwargs.get("scaling")
                mask = tfa.stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal"))
                record(query, key, query.shape[-1] ** -0.5 if scaling is None else scaling, mask)
            return call(module, query, key, value, attention_mask, **kwargs)

        return route

    if keep < 1.0:
        tfa.route_attention(model, patcher, sorted(routes), make_route)

    def model_pre(call: tfa.ModelCall) -> None:
        captured.clear()
        pruner.start(call)

    tfa.on_call(model, patcher, model_pre)
    if keep < 1.0:
        tfa.on_call(decoder, patcher, pruner.language_model_inputs)
        layers = tfa.decoder_layers(model)
        for index in range(layer if strategy != "cls" else len(layers), len(layers)):
            def layer_inputs(call: tfa.ModelCall, index: int = index) -> dict[str, Any]:
                kwargs = call.keywords()
                hidden = pruner.decoder_layer_inputs(index, kwargs.pop("hidden_states"), kwargs)
                return {"hidden_states": hidden, **kwargs}

            tfa.on_call(layers[index], patcher, layer_inputs)
        if strategy == "transprune":
            def transition(call: tfa.ModelCall, output: Any) -> None:
                if pruner.prefill:
                    after = output[0] if isinstance(output, tuple) else output
                    captured["transition"] = transition_variation(call.arguments["hidden_states"], after)

            tfa.after_call(layers[layer - 1], patcher, transition)
        if strategy == "plphp":
            tfa.after_call(decoder, patcher, lambda call, output: pruner.prune_cache(tfa.output_cache(output)))
    return PruneVlmHandle("prune", model, options, patcher, pruner=pruner)
