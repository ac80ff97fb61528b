"""``visual_sink``: Visual Attention Redistribution (VAR) for LLaVA-style models in transformers.

Paper: Kang et al., 2025, "See What You Are Told: Visual Attention Sink in Large Multimodal Models".
In every decoder layer but the last:

1. Sinks (Sec. 3). The layer's input hidden states are RMS-normalised; the sink dimensions are those in
   which the first real token of the sample (the language model's own sink) exceeds ``tau``, and the
   visual sink tokens are the image tokens that exceed ``tau`` in one of them
   (:func:`visattn.core.redistribute.find_sinks`). Nothing is hard-coded: the dimensions are read from
   each prompt's hidden states, layer by layer, and kept on the handle (``sink_dims``, ``sink_tokens``).
2. Image-centric heads (Sec. 4.1). For each text query row (a real, non-image token with an image
   before it: the prompt's text after the image and every generated token) and each head, the row
   counts as image-centric when its image share is ``>= summ`` and the sinks' share of that is ``<= rho``.
3. Redistribution (Sec. 4.2, :func:`visattn.core.redistribute.redistribute`): in those rows the sink
   columns keep ``p`` of their weight; the rest goes to the other image tokens in proportion to their
   weight. Rows still sum to one.

The decision is per row, so a cached ``generate()`` computes what a full forward over the same
tokens computes. Models run with ``attn_implementation="sdpa"`` (or ``"eager"``, ``"flex_attention"``): the stock
attention runs for every row, and only text rows of layers with sinks are recomputed explicitly
(:func:`~visattn.core.redistribute.attend_rows`); a decode step (one generated row) replaces the stock
attention by the fused decode kernel on CUDA (:mod:`visattn.kernels.reweighted_decode`, at SDPA's speed), or by
the explicit computation elsewhere. Batches, left padding and the KV cache work on LLaVA (1.5, NeXT, OneVision),
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, PaliGemma, Idefics3 and InternVL (tested); image positions come from
``config.image_token_id``. Sliding-window layers (Gemma 3's) keep only the last keys in their cache: they run stock,
the full-attention layers run VAR.

Options: ``p`` (0.6; identity 1.0: the stock attention runs untouched), ``tau`` (20), ``rho`` (0.5),
``summ`` (0.2). ``tau`` is the paper's value for 4096-wide models; an RMS-normalised value cannot
exceed ``sqrt(hidden_size)``, so small models need a smaller one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..core.redistribute import attend_rows, find_sinks, redistribute
from ..errors import UnsupportedModelError
from ..frameworks import Target
from ..frameworks.base import LazyAdapter, PerThread
from ..kernels import reweighted_decode
from ..options import bool_option, float_option
from ..patching import Handle, Patcher
from ..registry import Method, register
from ._lvlm import ImageKeys, full_layers, image_token_id, write_rows

tfa = LazyAdapter("transformers")  # imported on first use: visattn imports without transformers


class _Sinks:
    """What one thread's last forward without a past found, per layer, and its decode steps reuse."""

    def __init__(self) -> None:
        self.dims: dict[int, Tensor] = {}
        self.tokens: dict[int, Tensor] = {}
        self.present: dict[int, bool] = {}  # the layer has sinks (always True when found in a compiled forward)
        # the sink tokens of every changed layer in one tensor [layers, B, N] (the same as ``tokens``): what the decode
        # steps read, so that a compiled step's CUDA graph copies one input before each replay, not one per layer
        self.stacked: Tensor | None = None


class VisualSinkHandle(Handle):
    """Handle of ``visual_sink``. Per language-model layer (index into the model's attention layers),
    from the last forward without a past (this thread's; read in a thread that ran none, another thread's):
    ``sink_dims[layer]`` ``[B, C]`` bool (the sink dimensions of each sample) and ``sink_tokens[layer]``
    ``[B, N]`` bool (its visual sink tokens)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.found: PerThread[_Sinks] = PerThread(_Sinks)

    @property
    def sink_dims(self) -> dict[int, Tensor]:
        return self.found.latest().dims

    @property
    def sink_tokens(self) -> dict[int, Tensor]:
        return self.found.latest().tokens


@register
class VisualSink(Method):
    name = "visual_sink"
    summary = "VAR: move attention from visual sink tokens to the other image tokens in image-centric heads"
    paper = "Kang et al., 2025, 'See What You Are Told: Visual Attention Sink in Large Multimodal Models'"
    frameworks = ("transformers",)
    options = (
        float_option("p", 0.6, low=0.0, high=1.0, identity=1.0,
                     doc="fraction of the sink tokens' attention they keep in image-centric heads"),
        float_option("tau", 20.0, low=0.0, low_open=True,
                     doc="massive-activation threshold on RMS-normalised hidden states"),
        float_option("rho", 0.5, low=0.0, high=1.0, doc="image-centric: sink share of the image attention <= rho"),
        float_option("summ", 0.2, low=0.0, high=1.0, doc="image-centric: image share of the attention >= summ"),
        bool_option("strict", False, doc="raise instead of falling back from the decode kernel to PyTorch"),
    )

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        super().check_target(target, options)
        image_token_id(target.model, self.name)
        if not _layers(target.model):
            raise UnsupportedModelError(f"{self.name}: {target.family} has no decoder layer VAR can change: it "
                                        f"changes every decoder layer but the last, sliding-window layers left out")

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> VisualSinkHandle:
        model = target.model
        handle = VisualSinkHandle(self.name, model, options, patcher)
        chosen = _layers(model)
        language, decoder = tfa.language_layers(model), tfa.decoder_layers(model)
        layers = [language[i] for i in chosen]
        keys = ImageKeys(model, patcher, self.name)
        p, tau, rho, summ, strict = (options[k] for k in ("p", "tau", "rho", "summ", "strict"))

        def detect(layer: int, slot: int) -> Callable[[tfa.ModelCall], None]:
            def hook(call: tfa.ModelCall) -> None:
                if not keys.fresh:  # a continuation adds no image tokens the sinks could be among
                    return
                found = handle.found.get()
                dims, tokens = find_sinks(call.arguments["hidden_states"], keys.first_real, tau)
                if slot == 0:
                    found.stacked = torch.empty((len(chosen), *tokens.shape), dtype=torch.bool, device=tokens.device)
                found.stacked[slot] = tokens & keys.image
                found.dims[layer], found.tokens[layer] = dims, found.stacked[slot]
                # which layers have sinks is read on the host in eager forwards only (a read breaks a graph)
                found.present[layer] = torch.compiler.is_compiling() or bool(found.tokens[layer].any())

            return hook

        for slot, i in enumerate(chosen):
            tfa.on_call(decoder[i], patcher, detect(language[i], slot))
        slots = {language[i]: slot for slot, i in enumerate(chosen)}

        def make_route(layer: int, module: nn.Module, implementation: str) -> tfa.Route:
            def route(call: Any, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
                found = handle.found.get()
                if p == 1.0 or not found.present[layer]:
                    return call(module, query, key, value, attention_mask, **kwargs)
                scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
                mask = tfa.stock_mask(implementation, module, query, key, attention_mask, kwargs.get("is_causal"))
                image = keys.columns  # every key column; the sinks are among the prompt's
                n = image.shape[1]
                decoding = query.shape[2] == 1 and not keys.fresh  # a decode step: one generated text row
                if decoding:  # the kernel's key classes, of every layer at once (launches are a decode step's cost)
                    classes = keys.once("classes", lambda: image.to(torch.int8) * 2 - F.pad(
                        found.stacked, (0, n - found.stacked.shape[-1])).to(torch.int8))[slots[layer]]
                    out = reweighted_decode.decode_row(query, key, value, mask, classes, scale=scale, mode="var",
                                                       p=p, rho=rho, summ=summ, strict=strict)
                    if out is not None:
                        return out, None
                sinks = F.pad(found.stacked[slots[layer]], (0, n - found.stacked.shape[-1]))

                def probs_fn(probs: Tensor) -> Tensor:
                    probs[..., :n] = redistribute(probs[..., :n], sinks[:, None, None, :], image[:, None, None, :],
                                                  p=p, rho=rho, summ=summ)
                    return probs

                if decoding:
                    out = attend_rows(query, key, value, None, scale=scale, mask=mask, probs_fn=probs_fn)
                    return out.transpose(1, 2), None
                out, weights = call(module, query, key, value, attention_mask, **kwargs)
                picked = keys.text_rows()
                if picked is None:
                    return out, weights
                index, valid = picked
                new = attend_rows(query, key, value, index, scale=scale, mask=mask, probs_fn=probs_fn)
                return write_rows(out, new, index, valid), None

            return route

        tfa.route_attention(model, patcher, layers, make_route)
        return handle


def _layers(model: nn.Module) -> list[int]:
    """The decoder layers VAR changes (positions): every layer but the last, sliding-window layers left out."""
    return [i for i in full_layers(model) if i < len(tfa.decoder_layers(model)) - 1]
