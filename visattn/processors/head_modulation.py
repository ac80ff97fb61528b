"""``head_modulation``: give generated tokens more of the image, by logit or by head, in transformers VLMs.

One option ``alpha`` (identity 0: the stock model runs untouched) and four published recipes:

- ``strategy="pai"`` — Liu et al., 2024, "Paying More Attention to Image: A Training-Free Method for
  Alleviating Hallucination in LVLMs" (Eq. 4): for the generating query row (the last row of every
  forward: the prompt's last token, then each generated token), image logits become
  ``l_j + alpha * |l_j|`` before the softmax (:func:`visattn.core.redistribute.amplify_logits`), in
  decoder layers 2..31 (PAI's ``[2, 32)``, clipped to the model's depth). PAI's contrastive logit
  refinement with a text-only pass is not part of this method.
- ``strategy="vhr"`` — He et al., 2024, "Cracking the Code of Hallucination in LVLMs with Vision-aware
  Head Divergence": a head's vision-aware head divergence is ``VHD_h = || o_h(image) - o_h(no image) ||``,
  its attention output for the prompt's last token with and without the image; the ``top`` fraction of
  heads of each layer with the largest VHD have their outputs scaled by ``1 + alpha`` for the
  generating rows. Calibration, per prompt: at every forward without a past the model runs once more
  first, without KV cache and computing logits for the last token only, with the image columns hidden
  from every non-image token in every decoder layer (the text then reads as if the image were
  removed, positions unchanged); each layer records its last-row head outputs. The real pass then
  measures ``o_h(image)`` layer by layer, so a layer's VHD sees the reinforcement of the layers before
  it (only the last token's stream differs). Cost: one extra prefill per prompt (about 2x prefill
  time, no extra memory for a cache); decode steps add one multiply per layer.
- ``strategy="imbalance"`` — "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
  Vision-Language Model" (2025), as we read its two components. Dual-stream token selection, per image
  (:func:`visattn.core.redistribute.dual_stream_selection`): the ``select`` fraction of patches most
  attended by the [CLS] token in the vision tower's first layer (locally informative) joined with the
  ``select`` fraction whose projected features differ most from their 4 spatial neighbours (spatially
  significant, :func:`~visattn.core.redistribute.spatial_contrast`). Head-specific modulation: a head's
  visual sensitivity ``w_h`` is its attention share on the image for the prompt's last token, over the
  largest share in its layer; the generating rows' logits on selected tokens become
  ``l_j + alpha * w_h * |l_j|``. LLaVA (CLIP tower with [CLS], ``vision_feature_select_strategy="default"``)
  only.
- ``strategy="avisc"`` — Woo et al., 2024, "Don't Miss the Forest for the Trees: Attentional Vision Calibration
  for Large Vision Language Models" (Sec. 3). Blind tokens (:func:`visattn.core.redistribute.blind_tokens`):
  in the forward without a past, the prompt's last row's attention, averaged over heads, in each of
  ``decoder_layers``; the layers that give the image most of that row's attention, the fewest whose share reaches
  ``layer_gamma``, are averaged, and the image tokens at or above ``mean + lamb * std`` of the image tokens' are
  blind. A second, "blind" model runs beside the real one with its own KV cache: at the prompt, its input
  embeddings of every other image token are zeroed (the authors' "zeros" masking), so it sees the image through
  the blind tokens only; at each decode step it takes the same new tokens. The forward's logits become
  ``(1 + alpha) * l - alpha * l_blind`` (:func:`~visattn.core.redistribute.contrast_logits`, Eq. 5), with the
  tokens whose logit ``l`` is below ``log(beta) + max l`` removed (``-inf``, the adaptive plausibility
  constraint). As in the authors' code, the blind tokens are chosen once per prompt: their embeddings enter the
  blind model's cache at the prompt only. Defaults are the authors' (alpha 1, beta 0.1, layer_gamma 0.5; their
  evaluation scripts use lamb 0.99, the paper's rule mean + std is lamb 1). Cost: a second forward of every call
  (about 2x the compute) and a second KV cache; the loss of a forward with ``labels`` is the stock model's. On
  Qwen3-VL the vision features that deepstack adds in the first decoder layers reach the blind model unmasked.

The methods act on query rows that generate a token. The stock SDPA (or eager) attention runs for
every row, and only the generating row is recomputed explicitly where logits change
(:func:`~visattn.core.redistribute.attend_rows`); PAI's and imbalance's decode steps take the fused kernel
on CUDA (:mod:`visattn.kernels.reweighted_decode`). With ``pai`` a cached ``generate()`` computes what
a forward over the same tokens computes for its last row; ``vhr`` and ``imbalance`` measure their
head weights once per prompt (at the forward without a past) and keep them for its decode steps.
``avisc`` changes the logits instead, of every position the forward returns.
Batches with left padding and the KV cache work on LLaVA (1.5, NeXT, OneVision), Qwen2-VL, Qwen2.5-VL,
PaliGemma, Idefics3, InternVL and Qwen3-VL (tested; ``imbalance``: LLaVA only); image positions come from
``config.image_token_id``. Sliding-window layers (Gemma 3's) keep only the last keys in their cache: they are left
out of the default ``decoder_layers`` and refused in a given one.

Options: ``strategy`` ("pai"), ``alpha`` (None = the strategy's default: 0.2, avisc 1.0; identity 0),
``decoder_layers`` (None = the strategy's layers: pai 2..31, the others all; indices of the language model's
decoder layers, from 0), ``top`` (0.5, vhr: fraction of heads reinforced per layer), ``select`` (0.25,
imbalance: fraction of image tokens each selection stream picks), ``beta`` (0.1), ``lamb`` (1.0) and
``layer_gamma`` (0.5) for avisc.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.attention import attention_probs
from ..core.redistribute import (
    amplify_logits,
    attend_rows,
    blind_tokens,
    contrast_logits,
    dual_stream_selection,
    spatial_contrast,
)
from ..errors import OptionError, ShapeError, UnsupportedModelError
from ..frameworks import Target
from ..frameworks.base import LazyAdapter, PerThread
from ..kernels import reweighted_decode
from ..options import bool_option, choice_option, float_option, layers_option
from ..patching import Handle, Patcher
from ..registry import Method, register
from ._lvlm import ImageKeys, full_layers, image_token_id, write_rows

tfa = LazyAdapter("transformers")  # imported on first use: visattn imports without transformers

STRATEGIES = ("pai", "vhr", "imbalance", "avisc")
#: ``alpha=None``: each strategy's own strength (AvisC's authors contrast the logits with alpha 1).
DEFAULT_ALPHA = {"pai": 0.2, "vhr": 0.2, "imbalance": 0.2, "avisc": 1.0}
#: PAI modulates decoder layers [2, 32) of LLaVA-1.5's 32.
PAI_LAYERS = range(2, 32)


class HeadModulationHandle(Handle):
    """Handle of ``head_modulation``; what it measured in the last forward without a past, per
    language-model layer (index into the model's attention layers). ``vhr``: ``vhd[layer]`` ``[B, H]``
    float32 and ``head_gains[layer]`` ``[B, H]`` (``1 + alpha`` for reinforced heads, else 1).
    ``imbalance``: ``selected`` ``[B, N]`` bool (the selected image tokens) and ``sensitivity[layer]``
    ``[B, H]`` (each head's image share over the layer's largest). ``avisc``: ``blind`` ``[B, N]`` bool (the blind
    image tokens of the prompt). Each thread measures its own forwards; read in a thread that ran none, these are
    another thread's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.measured: PerThread[_Measured] = PerThread(_Measured)

    @property
    def vhd(self) -> dict[int, Tensor]:
        return self.measured.latest().vhd

    @property
    def head_gains(self) -> dict[int, Tensor]:
        return self.measured.latest().head_gains

    @property
    def selected(self) -> Tensor | None:
        return self.measured.latest().selected

    @property
    def sensitivity(self) -> dict[int, Tensor]:
        return self.measured.latest().sensitivity

    @property
    def blind(self) -> Tensor | None:
        return self.measured.latest().blind


class _Measured:
    """What one thread's last forward without a past measured (the handle shows it) and its decode steps reuse."""

    def __init__(self) -> None:
        self.vhd: dict[int, Tensor] = {}
        self.head_gains: dict[int, Tensor] = {}
        self.gains: dict[int, Tensor] = {}  # vhr: head gains [B, 1, H, 1] in the attention output's dtype
        self.without: dict[int, Tensor] = {}  # vhr: last-row head outputs of the image-ablated pass
        self.ablating = False  # vhr: the image-ablated pass is running
        self.selected: Tensor | None = None
        self.sensitivity: dict[int, Tensor] = {}
        self.classes: Tensor | None = None  # imbalance: 2 on the selected image columns, else 0, [B, n] int8
        self.cls_attention: Tensor | None = None  # imbalance: the vision tower's [CLS] attention over patches
        # imbalance: ([CLS] attention, projector output) of the last images; generate() computes the image features
        # before the model's forward (transformers >= 5.23), so they wait here for the prefill that uses them
        self.features: tuple[Tensor, Tensor] | None = None
        self.attention: dict[int, Tensor] = {}  # avisc: the prompt's last row's attention per layer, [B, n] float32
        self.blind: Tensor | None = None  # avisc: the prompt's blind image tokens [B, n]
        self.blind_cache: Any = None  # avisc: the blind model's KV cache
        self.blinding = False  # avisc: the blind model is running


def _decoder_layers(strategy: str, chosen: tuple[int, ...] | None, depth: int, full: list[int]) -> list[int]:
    """The decoder layers (positions) to modulate: ``chosen``, or the strategy's default among the ``full`` ones
    (those attending to the whole sequence)."""
    if chosen is not None:
        bad = [i for i in chosen if i >= depth]
        if bad:
            raise OptionError(f"head_modulation: decoder_layers {bad} out of range; the model has {depth} decoder "
                              f"layers (0..{depth - 1})")
        sliding = [i for i in chosen if i not in full]
        if sliding:
            raise OptionError(f"head_modulation: decoder_layers {sliding} are sliding-window layers, whose KV cache "
                              f"keeps only the last keys (the image tokens' columns are not there while decoding); "
                              f"layers that attend to the whole sequence: {full}")
        return sorted(chosen)
    layers = [i for i in PAI_LAYERS if i < depth] if strategy == "pai" else list(range(depth))
    layers = [i for i in layers if i in full]
    if not layers:
        raise OptionError(f"head_modulation: strategy {strategy!r} modulates decoder layers "
                          f"{PAI_LAYERS.start}..{PAI_LAYERS.stop - 1}, and the model has only {depth}; "
                          f"pass decoder_layers")
    return layers


@register
class HeadModulation(Method):
    name = "head_modulation"
    summary = ("amplify generated tokens' attention to the image: PAI logits, VHR heads, imbalance-fixing selection "
               "or AvisC's blind-token contrast")
    paper = ("Liu et al., 2024, 'Paying More Attention to Image' (pai); He et al., 2024, 'Cracking the Code of "
             "Hallucination in LVLMs with Vision-aware Head Divergence' (vhr); 'Fixing Imbalanced Attention to "
             "Mitigate In-Context Hallucination of Large Vision-Language Model', 2025 (imbalance); Woo et al., 2024, "
             "'Don't Miss the Forest for the Trees: Attentional Vision Calibration for Large Vision Language Models' "
             "(avisc)")
    frameworks = ("transformers",)
    options = (
        choice_option("strategy", "pai", STRATEGIES,
                      doc="pai (image logits), vhr (vision-aware heads), imbalance (selected tokens, per head), "
                          "avisc (contrast with blind tokens)"),
        float_option("alpha", None, low=0.0, allow_none=True, identity=0.0,
                     doc="strength: logit gain (pai, imbalance), head output gain (vhr), logit contrast (avisc); "
                         "None = 0.2, avisc 1.0"),
        layers_option("decoder_layers", None,
                      doc="decoder layers to modulate (avisc: to find blind tokens in; 0-based); None = pai: 2..31, "
                          "the others: all"),
        float_option("top", 0.5, low=0.0, high=1.0, low_open=True,
                     doc="vhr: fraction of heads reinforced per layer").scoped(strategies=("vhr",)),
        float_option("select", 0.25, low=0.0, high=1.0, low_open=True,
                     doc="imbalance: fraction of image tokens each selection stream picks").scoped(
                         strategies=("imbalance",)),
        float_option("beta", 0.1, low=0.0, high=1.0, low_open=True,
                     doc="avisc: tokens whose logit is below log(beta) + the largest are removed").scoped(
                         strategies=("avisc",)),
        float_option("lamb", 1.0, doc="avisc: blind tokens have attention >= mean + lamb * std").scoped(
            strategies=("avisc",)),
        float_option("layer_gamma", 0.5, low=0.0, high=1.0, low_open=True,
                     doc="avisc: share of the image attention that the layers averaged must hold").scoped(
                         strategies=("avisc",)),
        bool_option("strict", False, doc="pai, imbalance: raise instead of falling back from the decode kernel to "
                                         "PyTorch").scoped(strategies=("pai", "imbalance")),
    )

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        super().check_target(target, options)
        image_token_id(target.model, self.name)
        model = target.model
        _decoder_layers(options["strategy"], options["decoder_layers"], len(tfa.language_layers(model)),
                        full_layers(model))
        if options["strategy"] == "imbalance":
            _projector(target.model)

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> HeadModulationHandle:
        model = target.model
        handle = HeadModulationHandle(self.name, model, options, patcher)
        language = tfa.language_layers(model)
        layers = [language[i] for i in _decoder_layers(options["strategy"], options["decoder_layers"], len(language),
                                                       full_layers(model))]
        alpha = DEFAULT_ALPHA[options["strategy"]] if options["alpha"] is None else options["alpha"]
        if options["strategy"] == "pai":
            keys = ImageKeys(model, patcher, self.name)
            make_route = _pai(keys, alpha, options["strict"])
        elif options["strategy"] == "vhr":
            keys, make_route = _vhr(model, patcher, handle, alpha, options["top"])
        elif options["strategy"] == "imbalance":
            keys = ImageKeys(model, patcher, self.name)
            make_route = _imbalance(model, patcher, keys, handle, alpha, options["select"], options["strict"])
        else:
            keys, make_route = _avisc(model, patcher, handle, alpha, options["beta"], options["lamb"],
                                      options["layer_gamma"])
        tfa.route_attention(model, patcher, layers, make_route)
        return handle


def _pai(keys: ImageKeys, alpha: float, strict: bool) -> tfa.RouteFactory:
    def make_route(layer: int, module: nn.Module, implementation: str) -> tfa.Route:
        def route(call: Any, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            if alpha == 0.0:
                return call(module, query, key, value, attention_mask, **kwargs)
            scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
            mask = tfa.stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal"))
            if query.shape[2] == 1:  # a decode step: one launch where the kernel runs
                classes = keys.once("pai_classes", lambda: keys.columns.to(torch.int8) * 2)
                out = reweighted_decode.decode_row(query, key, value, mask, classes, scale=scale, mode="pai",
                                                   alpha=alpha, strict=strict)
                if out is not None:
                    return out, None
            weight = keys.once("pai_weight", lambda: (alpha * keys.columns.float())[:, None, None, :])
            n = weight.shape[-1]

            def logits_fn(logits: Tensor) -> Tensor:
                logits[..., :n] = amplify_logits(logits[..., :n], weight)
                return logits

            if query.shape[2] == 1:  # a decode step: the generating row is the only row
                out = attend_rows(query, key, value, None, scale=scale, mask=mask, logits_fn=logits_fn)
                return out.transpose(1, 2), None
            out, _ = call(module, query, key, value, attention_mask, **kwargs)
            last = keys.last_row()
            new = attend_rows(query, key, value, last, scale=scale, mask=mask, logits_fn=logits_fn)
            return write_rows(out, new, last), None

        return route

    return make_route


def _vhr(model: nn.Module, patcher: Patcher, handle: HeadModulationHandle, alpha: float,
         top: float) -> tuple[ImageKeys, tfa.RouteFactory]:
    takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def calibrate(call: tfa.ModelCall) -> None:
        if alpha == 0.0 or not keys.fresh:
            return
        given = call.keywords(cache=None, use_cache=False)
        given.pop("labels", None)
        if "attention_mask" in given:
            given["attention_mask"] = _prompt_mask(given["attention_mask"])
        if takes_logits_to_keep:
            given["logits_to_keep"] = 1
        measured = handle.measured.get()
        measured.ablating = True
        try:
            with torch.no_grad():
                model.forward(**given)  # the model's own pre-hooks (ours included) do not run again
        finally:
            measured.ablating = False

    keys = ImageKeys(model, patcher, "head_modulation", then=calibrate)

    def make_route(layer: int, module: nn.Module, implementation: str) -> tfa.Route:
        def route(call: Any, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            if alpha == 0.0:
                return call(module, query, key, value, attention_mask, **kwargs)
            measured = handle.measured.get()
            if measured.ablating:
                mask = tfa.stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal"))
                hide = keys.columns[:, None, None, :key.shape[2]] & ~keys.image[:, None, :, None]
                if mask is None:
                    mask = ~hide
                elif mask.dtype == torch.bool:
                    mask = mask & ~hide
                else:
                    mask = mask.masked_fill(hide, torch.finfo(mask.dtype).min)
                out, weights = call(module, query, key, value, mask, **kwargs)
                measured.without[layer] = out[:, -1]
                return out, weights
            out, weights = call(module, query, key, value, attention_mask, **kwargs)
            if keys.fresh:
                vhd = (out[:, -1].float() - measured.without.pop(layer).float()).norm(dim=-1)
                reinforced = vhd.topk(math.ceil(top * vhd.shape[1]), dim=-1).indices
                head_gains = torch.ones_like(vhd).scatter_(1, reinforced, 1.0 + alpha)
                head_gains = torch.where(keys.columns.any(1, keepdim=True), head_gains, 1.0)  # no image: no VHD
                measured.vhd[layer], measured.head_gains[layer] = vhd, head_gains
                measured.gains[layer] = head_gains[:, None, :, None].to(out.dtype)
            out[:, -1:] *= measured.gains[layer]
            return out, weights

        return route

    return keys, make_route


def _prompt_mask(mask: Any) -> Any:
    """``mask`` for a forward of the prompt alone, without a cache: 4-D masks (one, or a dict of them by kind of
    layer) that ``generate()`` sized for a static cache's capacity cut to the prompt's keys."""
    if isinstance(mask, dict):
        return {kind: _prompt_mask(m) for kind, m in mask.items()}
    return mask[..., :mask.shape[-2]] if isinstance(mask, Tensor) and mask.dim() == 4 else mask


def _projector(model: nn.Module) -> nn.Module:
    """LLaVA's multimodal projector; refuses models whose image tokens are not the CLIP patches in order."""
    config = model.config
    projector = tfa.projector(model)
    if (type(model).__name__ != "LlavaForConditionalGeneration" or projector is None
            or getattr(config, "vision_feature_select_strategy", None) != "default"
            or not isinstance(getattr(config, "vision_feature_layer", None), int)):
        raise UnsupportedModelError(
            f"head_modulation: strategy 'imbalance' needs a vision tower [CLS] token whose patches are the image "
            f"tokens in order: LlavaForConditionalGeneration with vision_feature_select_strategy='default' and one "
            f"vision_feature_layer (got {type(model).__name__}); strategies 'pai' and 'vhr' support it")
    return projector


def _imbalance(model: nn.Module, patcher: Patcher, keys: ImageKeys, handle: HeadModulationHandle, alpha: float,
               select: float, strict: bool) -> tfa.RouteFactory:
    def cls_route(layer: int, module: nn.Module, implementation: str) -> tfa.Route:
        def route(call: Any, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            if alpha != 0.0:
                mask = tfa.stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal"))
                bias = mask if mask is not None and mask.dtype != torch.bool else None
                mask = mask if bias is None else None
                scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
                handle.measured.get().cls_attention = attention_probs(query[:, :, :1], key, scale=scale, bias=bias,
                                                                      mask=mask)[:, 0, 1:]
            return call(module, query, key, value, attention_mask, **kwargs)

        return route

    def record_features(call: tfa.ModelCall, output: Tensor) -> None:
        if alpha != 0.0:
            measured = handle.measured.get()
            measured.features, measured.cls_attention = (measured.cls_attention, output), None

    def select_tokens() -> Tensor:
        measured = handle.measured.get()
        if measured.features is None:
            raise ShapeError("head_modulation: strategy 'imbalance' needs the image features of the prompt "
                             "(pass pixel_values)")
        (cls, output), measured.features = measured.features, None
        side = math.isqrt(output.shape[1])
        chosen = dual_stream_selection(cls, spatial_contrast(output, (side, side)), select)
        if not torch.compiler.is_compiling():  # a host read; compiled, the stock model's own check stands
            count = int(keys.image.sum())
            if count != chosen.numel():
                raise ShapeError(f"head_modulation: {count} image tokens for {chosen.numel()} image patches")
        measured.selected = torch.zeros_like(keys.image).masked_scatter(keys.image, chosen.flatten())
        return measured.selected

    tfa.after_call(_projector(model), patcher, record_features)
    tfa.route_attention(model, patcher, [0], cls_route)

    def make_route(layer: int, module: nn.Module, implementation: str) -> tfa.Route:
        def route(call: Any, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            if alpha == 0.0:
                return call(module, query, key, value, attention_mask, **kwargs)
            scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
            mask = tfa.stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal"))
            measured = handle.measured.get()
            if not keys.fresh and query.shape[2] > 1 and not torch.compiler.is_compiling() and keys.image.any():
                raise ShapeError("head_modulation: strategy 'imbalance' selects image tokens when the prompt is first "
                                 "run; a cached continuation cannot add images")
            if keys.fresh:  # the head weights w_h and the selected columns, for this prompt and its decode steps
                image = keys.columns[:, None, None, :]
                share: list[Tensor] = []

                def measure(probs: Tensor) -> Tensor:
                    share.append((probs[..., :image.shape[-1]] * image).sum(-1)[..., 0])
                    return probs

                attend_rows(query, key, value, keys.last_row(), scale=scale, mask=mask, probs_fn=measure)
                measured.sensitivity[layer] = share[0] / share[0].amax(-1, keepdim=True).clamp_min(
                    torch.finfo(share[0].dtype).tiny)
                measured.classes = keys.once("classes", lambda: _classes(select_tokens(), image.shape[-1]))
            classes, sensitivity = measured.classes, measured.sensitivity[layer]
            if query.shape[2] == 1:  # a decode step: one launch where the kernel runs
                out = reweighted_decode.decode_row(query, key, value, mask, classes, scale=scale, mode="pai",
                                                   alpha=alpha, gain=sensitivity, strict=strict)
                if out is not None:
                    return out, None
            weight = alpha * sensitivity[:, :, None, None] * (classes == 2)[:, None, None, :].float()
            n = weight.shape[-1]  # the prompt's columns

            def logits_fn(logits: Tensor) -> Tensor:
                logits[..., :n] = amplify_logits(logits[..., :n], weight)
                return logits

            if query.shape[2] == 1:  # a decode step: the generating row is the only row
                out = attend_rows(query, key, value, None, scale=scale, mask=mask, logits_fn=logits_fn)
                return out.transpose(1, 2), None
            last = keys.last_row()
            out, _ = call(module, query, key, value, attention_mask, **kwargs)
            new = attend_rows(query, key, value, last, scale=scale, mask=mask, logits_fn=logits_fn)
            return write_rows(out, new, last), None

        return route

    return make_route


def _classes(selected: Tensor, width: int) -> Tensor:
    """The decode kernel's key classes ``[B, width]`` int8: 2 on the ``selected`` ``[B, q]`` columns, 0 elsewhere
    (a static cache's columns to come included)."""
    return F.pad(selected, (0, width - selected.shape[1])).to(torch.int8) * 2


def _avisc(model: nn.Module, patcher: Patcher, handle: HeadModulationHandle, alpha: float, beta: float, lamb: float,
           layer_gamma: float) -> tuple[ImageKeys, tfa.RouteFactory]:
    def contrast(call: tfa.ModelCall, output: Any) -> Any:
        if alpha == 0.0:
            return None
        if not isinstance(getattr(output, "logits", None), Tensor):
            raise UnsupportedModelError(f"head_modulation: strategy 'avisc' contrasts the logits of the model's "
                                        f"output, and {type(model).__name__} returned {type(output).__name__}; "
                                        f"call it with return_dict=True")
        measured = handle.measured.get()
        if keys.fresh:
            attention = torch.stack([measured.attention.pop(layer) for layer in sorted(measured.attention)], 1)
            prompt = keys.image.shape[1]
            measured.blind = blind_tokens(attention[..., :prompt], keys.columns[:, :prompt], layer_gamma, lamb)
        cache = measured.blind_cache
        # (after compiled decode steps on a static cache, which count on the device, num_keys is None)
        if not keys.fresh and (cache is None or keys.num_keys is not None
                               and cache.get_seq_length() != keys.num_keys - keys.image.shape[1]):
            raise ShapeError("head_modulation: strategy 'avisc' continues the blind model's KV cache beside the "
                             "model's, and this forward continues a cache the blind model did not build; start "
                             "from a forward without past_key_values (with use_cache)")
        measured.blinding = True
        try:
            with torch.no_grad():
                blind = model.forward(**call.keywords(cache=cache))  # the model's own hooks (ours too) do not run
        finally:
            measured.blinding = False
        measured.blind_cache = tfa.output_cache(blind)
        output.logits = contrast_logits(output.logits, blind.logits, alpha, beta)
        return output

    def empty_cache(call: tfa.ModelCall) -> None:
        """At a prompt, a copy of the model's cache before it fills (a static one's capacity with it): the blind
        model's; without a cache given, the blind model makes its own."""
        if alpha != 0.0 and keys.fresh:
            handle.measured.get().blind_cache = None if call.cache is None else copy.deepcopy(call.cache)

    def blind_inputs(call: tfa.ModelCall) -> dict[str, Any] | None:
        measured = handle.measured.get()
        if not (measured.blinding and keys.fresh):
            return None
        if call.inputs_embeds is None:
            raise UnsupportedModelError(f"head_modulation: strategy 'avisc' zeroes image embeddings at the language "
                                        f"model's input, and {type(model).__name__} passes it no inputs_embeds")
        hidden = keys.image & ~measured.blind  # the image tokens that only the real model sees
        return call.keywords(inputs_embeds=call.inputs_embeds.masked_fill(hidden[..., None], 0))

    keys = ImageKeys(model, patcher, "head_modulation", then=empty_cache)
    tfa.after_call(model, patcher, contrast)
    tfa.on_call(model.get_decoder(), patcher, blind_inputs)

    def make_route(layer: int, module: nn.Module, implementation: str) -> tfa.Route:
        def route(call: Any, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            measured = handle.measured.get()
            if alpha != 0.0 and keys.fresh and not measured.blinding:
                scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
                mask = tfa.stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal"))
                last = keys.last_row()

                def record(probs: Tensor) -> Tensor:
                    measured.attention[layer] = probs[:, :, 0].mean(1)
                    return probs

                attend_rows(query, key, value, last, scale=scale, mask=mask, probs_fn=record)
            return call(module, query, key, value, attention_mask, **kwargs)

        return route

    return keys, make_route
