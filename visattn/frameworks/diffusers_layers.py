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
    the processor it had and the keywords that processor takes."""

    index: int
    name: str
    stock: Any
    params: frozenset[str]


class LayerProcessor:
    """The base of visattn's diffusers attention processors, each made for one model.

    ``model.set_attn_processor(P(model, **options))`` installs one; ``model.set_attn_processor(p.stock_processors)``
    puts the stock processors back and ``p.detach()`` removes the hooks the processor installed on the model
    (until then the model refuses to be copied). Construction records each attention layer's current processor;
    a call runs :meth:`run` for the layer it serves, which by default calls that stock processor.
    ``__call__`` names every keyword a stock processor of the supported families takes
    (``image_rotary_emb``, ``rotary_emb``, ``temb``), because diffusers drops the keywords a processor's signature
    does not name, and hands each stock processor the ones it takes. ``visattn.apply`` installs the same
    processors through its own ``patcher`` (then ``visattn.remove`` undoes everything).
    """

    method = ""  # the visattn method, for errors

    def __init__(self, model: nn.Module, patcher: Patcher | None = None) -> None:
        self._model = model
        self._patcher = patcher or Patcher()
        self._layers: dict[int, StockLayer] = {}
        from .diffusers import attention_layers

        for index, (name, module) in enumerate(attention_layers(model)):
            stock = module.processor
            if isinstance(stock, LayerProcessor):  # made over one of ours: the processor that one replaced
                stock = stock._layers[id(module)].stock
            self._layers[id(module)] = StockLayer(index, name, stock,
                                                  frozenset(inspect.signature(stock.__call__).parameters))
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

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, rotary_emb: Any = None,
                 temb: torch.Tensor | None = None) -> Any:
        layer = self._layers.get(id(attn))
        if layer is None:
            raise UnsupportedModelError(f"{type(self).__name__}: {type(attn).__name__} is not an attention layer of "
                                        f"the {type(self._model).__name__} this processor was made for")
        kwargs: dict[str, Any] = {"encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask}
        rotary = image_rotary_emb if image_rotary_emb is not None else rotary_emb
        for name, value in (("image_rotary_emb", rotary), ("rotary_emb", rotary), ("temb", temb)):
            if value is not None and name in layer.params:
                kwargs[name] = value
        return self.run(layer, attn, hidden_states, kwargs)

    def run(self, layer: StockLayer, attn: nn.Module, hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        """The layer's call; the stock processor here."""
        return layer.stock(attn, hidden_states, **kwargs)
