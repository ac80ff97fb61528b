"""The base of visattn's diffusers attention processors (:class:`LayerProcessor`), importable without diffusers:
the processors of the methods subclass it at import, and diffusers is imported only when one is made."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import UnsupportedModelError
from ..patching import Patcher


@dataclass
class StockLayer:
    """An attention layer as a :class:`LayerProcessor` found it: its index in :func:`attention_layers`, its name,
    the processor it had, the names of that processor's arguments after ``hidden_states`` in order
    (``positional``), and whether it takes any keyword (``**kwargs``)."""

    index: int
    name: str
    stock: Any
    positional: tuple[str, ...]
    any_keyword: bool

    @classmethod
    def of(cls, index: int, name: str, stock: Any) -> StockLayer:
        params = list(inspect.signature(stock.__call__).parameters.values())[2:]  # after attn, hidden_states
        named = tuple(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        return cls(index, name, stock, named, any(p.kind is p.VAR_KEYWORD for p in params))

    def keywords(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's arguments after ``hidden_states`` as keywords of this processor (those it does not take left
        out, as diffusers leaves them out)."""
        kwargs = {**dict(zip(self.positional, args)), **kwargs}
        return kwargs if self.any_keyword else {k: v for k, v in kwargs.items() if k in self.positional}


class LayerProcessor:
    """The base of visattn's diffusers attention processors, each made for one model.

    ``model.set_attn_processor(P(model, **options))`` installs one; ``model.set_attn_processor(p.stock_processors)``
    puts the stock processors back and ``p.detach()`` removes the hooks the processor installed on the model
    (until then the model refuses to be copied). Construction records each attention layer's current processor;
    a call runs :meth:`run` for the layer it serves, which by default calls that stock processor.
    The processor's ``__call__`` signature names every argument of :data:`KEYWORDS` (diffusers passes a processor
    only the keywords its signature names), and each call hands each stock processor its own arguments, positional
    ones by the stock processor's names. ``visattn.apply`` installs the same
    processors through its own ``patcher`` (then ``visattn.remove`` undoes everything).
    """

    method = ""  # the visattn method, for errors
    other_ways = ""  # other ways to run the method where a layer's processor never reaches SDPA (errors)

    def __init__(self, model: nn.Module, patcher: Patcher | None = None) -> None:
        self._model = model
        self._patcher = patcher or Patcher()
        self._layers: dict[int, StockLayer] = {}
        from .diffusers import attention_layers

        for index, (name, module) in enumerate(attention_layers(model)):
            stock = module.processor
            if isinstance(stock, LayerProcessor):  # made over one of ours: the processor that one replaced
                stock = stock._layers[id(module)].stock
            self._layers[id(module)] = StockLayer.of(index, name, stock)
        try:
            self.setup()
            if patcher is None:  # made by the user (visattn.apply guards the model itself): no copies until detach()
                self._patcher.refuse_copies(model, self.method)
        except BaseException:
            if patcher is None:
                self._patcher.undo()
            raise

    def setup(self) -> None:
        """Check the model and install what the method needs on it, through ``self._patcher``."""

    @property
    def stock_processors(self) -> dict[str, Any]:
        """``{"<layer>.processor": stock processor}``, for ``model.set_attn_processor`` to restore stock."""
        return {f"{layer.name}.processor": layer.stock for layer in self._layers.values()}

    def detach(self) -> None:
        """Remove the hooks this processor installed on its model."""
        self._patcher.undo()

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, *args: Any,
                 encoder_hidden_states: Any = None, attention_mask: Any = None, image_rotary_emb: Any = None,
                 rotary_emb: Any = None, temb: Any = None, encoder_hidden_states_mask: Any = None,
                 base_sequence_length: Any = None) -> Any:
        """The call diffusers makes. Its keywords (:data:`KEYWORDS`) are every one the stock processors of the
        supported families take after ``hidden_states``, since diffusers passes a processor only the keywords its
        signature names; those left at None are not passed on (every stock processor defaults them to None). A
        plain signature, not a ``__signature__`` attribute: dynamo breaks the graph where ``Attention.forward``
        reads a prebuilt signature after a hook has changed a dict in the same frame."""
        layer = self._layers.get(id(attn))
        if layer is None:
            raise UnsupportedModelError(f"{type(self).__name__}: {type(attn).__name__} is not an attention layer of "
                                        f"the {type(self._model).__name__} this processor was made for")
        given = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                     image_rotary_emb=image_rotary_emb, rotary_emb=rotary_emb, temb=temb,
                     encoder_hidden_states_mask=encoder_hidden_states_mask, base_sequence_length=base_sequence_length)
        kwargs = {k: v for k, v in given.items() if v is not None}
        return self.run(layer, attn, hidden_states, layer.keywords(args, kwargs))

    def run(self, layer: StockLayer, attn: nn.Module, hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        """The layer's call; the stock processor here."""
        return layer.stock(attn, hidden_states, **kwargs)

    def run_answered(self, layer: StockLayer, attn: nn.Module, hidden_states: torch.Tensor, kwargs: dict[str, Any],
                     mode: Any) -> Any:
        """The layer's stock processor run inside ``mode`` (a :class:`~visattn.frameworks.base.SDPAIntercept` that
        answers its attention call); :class:`UnsupportedModelError` if ``mode`` answered no SDPA call (the processor
        never reached SDPA: a non-native attention backend)."""
        with mode:
            out = layer.stock(attn, hidden_states, **kwargs)
        if mode.answered == 0:
            backend = getattr(layer.stock, "_attention_backend", None)
            raise UnsupportedModelError(
                f"{self.method}: attention layer {layer.index} ({layer.name}) ran without a "
                f"torch.nn.functional.scaled_dot_product_attention call over its own sequence "
                f"(processor {type(layer.stock).__name__}, attention backend {backend or 'default'}); use the stock "
                f"processor with a native attention backend{self.other_ways}")
        return out


#: the arguments after ``hidden_states`` that the stock processors of the supported families take, as
#: :meth:`LayerProcessor.__call__` names them (``tests/test_diffusers_families.py`` checks this list against every
#: family's processors)
KEYWORDS = tuple(p.name for p in inspect.signature(LayerProcessor.__call__).parameters.values()
                 if p.kind is p.KEYWORD_ONLY)
