"""``inspect``: record attention maps without changing a single output bit.

Not a paper's method but the tool every paper's figures rely on: the softmax attention
``A = softmax(q k^T / sqrt(d) + bias)`` of chosen layers, head-averaged (or per head on request),
recorded on every call of those layers. The framework adapter hands over the exact q and k the
stock attention uses; the map is computed beside the stock computation, ``query_chunk`` rows at a
time, so at most one layer's per-head map for one chunk is in memory. Works on timm and open_clip
ViTs, diffusers UNets and DiTs, and transformers models; under diffusers' Ulysses context parallelism
(Wan, Flux, Flux.2, Qwen-Image; :func:`visattn.frameworks.diffusers.parallel_observer`) every rank records
the maps one process would. There is nothing to make identical: the method never changes outputs.

Options: ``layers`` (None = all), ``per_head`` (False), ``query_chunk`` (1024), ``to_cpu`` (True).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.attention import attention_probs
from ..frameworks import Target
from ..frameworks.base import Observer, PerThread, Sink, adapter, select_layers
from ..frameworks.diffusers_layers import LayerProcessor, StockLayer
from ..options import bool_option, int_option, layers_option, validate_options
from ..patching import Handle, Patcher
from ..registry import Method, register


class InspectHandle(Handle):
    """Handle of ``inspect``: ``maps[layer]`` is the list of maps recorded for that layer, one per call.

    A map is ``[B, Nq, Nk]`` (head-averaged) or ``[B, H, Nq, Nk]`` (``per_head=True``), float32.
    ``layer_names[layer]`` is the module's qualified name. Each thread records its own calls: ``maps`` read
    in a thread holds that thread's calls (in a thread that ran no forward, another thread's), so two threads
    sharing the model never mix their maps.
    """

    def __init__(self, *args: Any, layer_names: dict[int, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layer_names = layer_names
        self._records: PerThread[dict[int, list[Tensor]]] = PerThread(lambda: {i: [] for i in layer_names})

    @property
    def maps(self) -> dict[int, list[Tensor]]:
        return self._records.latest()

    def record(self, layer: int, probs: Tensor) -> None:
        """Append the map of a call of ``layer`` to this thread's record (on the CPU if ``to_cpu``)."""
        self._records.get()[layer].append(probs.cpu() if self.options["to_cpu"] and not probs.is_meta else probs)

    def clear(self) -> None:
        """Forget the maps this thread recorded (other threads' records are theirs)."""
        for calls in self._records.get().values():
            calls.clear()

    def last(self, layer: int) -> Tensor:
        """The map of the most recent call of ``layer``."""
        if not self.maps.get(layer):
            raise KeyError(f"no map recorded for layer {layer}; recorded layers: {sorted(self.maps)}")
        return self.maps[layer][-1]

    def save_png(self, path: str | Path, layer: int, image: Any = None, *, query: int | str = "mean",
                 grid: tuple[int, int] | None = None, key_span: tuple[int, int] | None = None,
                 sample: int = 0) -> Path:
        """Render the last map of ``layer`` (over ``image`` if given) to a PNG (see :mod:`visattn.render`)."""
        from ..render import attention_heatmap, render_map

        heat = attention_heatmap(self.last(layer), query=query, grid=grid, key_span=key_span, sample=sample)
        return render_map(heat, path, image=image)


@register
class Inspect(Method):
    name = "inspect"
    summary = "record attention maps of chosen layers, outputs unchanged"
    paper = "- (analysis tool: softmax(q k^T / sqrt(d)) as in Vaswani et al., 2017, 'Attention Is All You Need')"
    frameworks = ("timm", "open_clip", "diffusers", "transformers")
    composes_with = frozenset({"isolation"})
    options = (
        layers_option("layers", None, doc="attention layers to record (indices into the model's attention layers)"),
        bool_option("per_head", False, doc="keep one map per head instead of the head average"),
        int_option("query_chunk", 1024, low=1, doc="query rows computed at a time (memory bound)"),
        bool_option("to_cpu", True, doc="move recorded maps to the CPU (a meta-device model's stay on meta)"),
    )

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        super().check_target(target, options)
        _chosen(target.framework, target.model, options)

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> InspectHandle:
        fw = adapter(target.framework)
        names, chosen = _chosen(target.framework, target.model, options)
        handle = InspectHandle(self.name, target.model, options, patcher,
                               layer_names={i: names[i] for i in chosen})
        fw.observe_attention(target.model, patcher, chosen, _recorder(handle, options, patcher))
        return handle


def _chosen(framework: str, model: Any, options: dict[str, Any]) -> tuple[list[str], list[int]]:
    """The names of ``model``'s attention layers and the indices of those ``options["layers"]`` chooses (by default
    every layer with a softmax map: a diffusers model's linear-attention layers are left out)."""
    fw = adapter(framework)
    names = [n for n, _ in fw.attention_layers(model)]
    without = fw.linear_attention(model) if framework == "diffusers" else None
    return names, select_layers(names, options["layers"], "inspect", without)


def _recorder(handle: InspectHandle, options: dict[str, Any], patcher: Patcher) -> Observer:
    """The observer that records each observed call's map into ``handle`` (through a :class:`Sink`, so a compiled
    forward records too, without a graph break), until ``patcher`` is undone."""
    sink = Sink(handle.record)
    patcher.on_undo(sink.close)

    @torch.no_grad()
    def observer(layer: int, q: Tensor, k: Tensor, scale: float, mask: Tensor | None) -> None:
        bias = None
        if mask is not None and mask.dtype != torch.bool:
            bias, mask = mask, None
        probs = attention_probs(q, k, scale=scale, bias=bias, mask=mask, head_mean=not options["per_head"],
                                query_chunk=options["query_chunk"])
        sink(layer, probs)

    return observer


class InspectAttnProcessor(LayerProcessor):
    """``inspect`` as a diffusers attention processor made for ``model`` (a UNet or DiT).

    ``model.set_attn_processor(p := InspectAttnProcessor(model, layers=[3]))`` records the chosen layers' maps in
    ``p.handle`` (an :class:`InspectHandle`: ``maps``, ``last(layer)``, ``clear()``, ``save_png``) exactly as
    ``visattn.apply(model, "inspect", layers=[3])`` does (each layer's processor runs inside an SDPA observer);
    ``model.set_attn_processor(p.stock_processors)`` stops it. Options as for ``visattn.apply``.
    """

    method = "inspect"

    def __init__(self, model: Any, **options: Any) -> None:
        self.options = validate_options("inspect", Inspect.options, options)
        self._names, self._chosen = _chosen("diffusers", model, self.options)
        super().__init__(model)

    def setup(self) -> None:
        self.handle = InspectHandle("inspect", self._model, self.options, self._patcher,
                                    layer_names={i: self._names[i] for i in self._chosen})
        from ..frameworks.diffusers import parallel_observer

        self._observer = parallel_observer(self._model, self._patcher, _recorder(self.handle, self.options,
                                                                                 self._patcher))

    def run(self, layer: StockLayer, attn: Any, hidden_states: Tensor, kwargs: dict[str, Any]) -> Any:
        from ..frameworks.diffusers import observed

        if layer.index not in self.handle.layer_names:
            return layer.stock(attn, hidden_states, **kwargs)
        return observed(layer.index, layer.name, layer.stock, self._observer,
                        lambda: layer.stock(attn, hidden_states, **kwargs))
