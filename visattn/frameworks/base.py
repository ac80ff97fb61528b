"""What every framework adapter provides, and the per-call context they carry.

A framework module (``visattn.frameworks.timm``, ``.open_clip``, ``.diffusers``, ``.transformers``)
exposes two functions used by methods:

``attention_layers(model) -> list[tuple[str, nn.Module]]``
    The model's attention modules in execution order, with their qualified names. Layer indices
    in every method's ``layers=`` option index this list.

``observe_attention(model, patcher, layers, observer) -> None``
    Arrange, through ``patcher`` so it can be undone exactly, that each call of each selected
    attention layer calls ``observer(layer_index, q, k, scale, mask)`` with the exact query and key
    the stock attention uses (after norms and rotary embeddings, ``[B, H, N, D]``; k may have fewer
    heads), its softmax scale, and its mask (boolean, True = attend, or an additive float bias, or
    ``None``), while the layer's output stays bit-identical to stock.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from torch import Tensor

Observer = Callable[[int, Tensor, Tensor, float, "Tensor | None"], None]


@dataclass
class CallContext:
    """Per-call state a method may need inside an attention layer.

    Attributes:
        layer: index of the attention layer being run (its position in ``attention_layers``).
        timestep: the diffusion timestep of the current denoiser call, if the model takes one.
        step: how many denoiser calls have started since the method was applied (0-based).
        extra: anything else a framework adapter reads from the call (e.g. ``input_ids``).
    """

    layer: int | None = None
    timestep: Any = None
    step: int = -1
    extra: dict[str, Any] | None = None


def adapter(framework: str) -> ModuleType:
    """The adapter module of ``framework`` (``visattn.frameworks.<framework>``)."""
    return importlib.import_module(f"visattn.frameworks.{framework}")


class LazyAdapter:
    """A framework adapter module, imported on first attribute access, so that the methods using it
    import (and register) without that framework installed: ``tfa = LazyAdapter("transformers")``."""

    def __init__(self, framework: str) -> None:
        self._framework = framework

    def __getattr__(self, name: str) -> Any:
        return getattr(adapter(self._framework), name)


def select_layers(names: Sequence[str], layers: Sequence[int] | None, method: str) -> list[int]:
    """Indices of the chosen layers, checked against the model's attention layers."""
    from ..errors import OptionError

    if layers is None:
        return list(range(len(names)))
    bad = [i for i in layers if i >= len(names)]
    if bad:
        raise OptionError(f"{method}: layers {bad} out of range; this model has {len(names)} attention layers "
                          f"(0..{len(names) - 1})")
    return sorted(layers)


def vit_blocks(target: Any) -> list[Any]:
    """The transformer blocks of a timm ViT or an open_clip visual tower (a detected ``Target``), in order."""
    return [m for _, m in adapter(target.framework).vit_blocks(target.model)]


class BlockStep(Protocol):
    """What a method does between a ViT block's attention and its MLP (ToMe's merge, EViT's pruning).

    The timm and open_clip adapters own the block (:func:`step_blocks`): they run each block's attention
    with :meth:`mask`, hand its output with the block's q and k to :meth:`step`, and feed the result to the
    MLP; blocks for which :meth:`stock` says so run their stock forward. Parameter names do not change.

    Attributes:
        method: the method's name, for errors.
        verb: what the step does to tokens ("merge", "prune"), for errors.
        token_counts: the adapter appends the tokens entering each block.
    """

    method: str
    verb: str
    token_counts: list[int]

    def start(self, attn_mask: Tensor | None) -> None:
        """A forward begins (its first block), with the caller's attention mask."""

    def captures(self, layer: int) -> bool:
        """Whether :meth:`step` at block ``layer`` reads the attention's q and k (fixed when installed)."""

    def stock(self, layer: int, num_tokens: int) -> bool:
        """Whether block ``layer``, entered by ``num_tokens`` tokens, runs its stock forward in this call."""

    def mask(self, dtype: Any) -> Tensor | None:
        """The attention mask or additive bias of the current tokens (the caller's until tokens change)."""

    def step(self, layer: int, x: Tensor, q: Tensor | None, k: Tensor | None, scale: float) -> Tensor:
        """``x`` ``[B, N, C]`` after attention and its residual; returns the tokens the MLP gets."""


@functools.cache
def stepped_class(base: type, forward: Callable[..., Tensor]) -> type:
    """``base`` (a block class) with ``forward`` running a :class:`BlockStep`; ``_visattn_base`` is ``base``."""
    return type(f"Stepped{base.__name__}", (base,), {"forward": forward, "_visattn_base": base})


def step_blocks(target: Any, patcher: Any, step: BlockStep) -> None:
    """Run ``step`` in every block of a timm ViT or open_clip visual tower (see :class:`BlockStep`),
    through ``patcher``, so ``remove()`` undoes it."""
    adapter(target.framework).step_blocks(target.model, patcher, step)
