"""The only layer that touches a model: framework detection here, one adapter module per framework beside it.

Detection looks at class names and modules only; it never imports a framework the user has not
imported already. Where to hook in:

- a new method: a :class:`visattn.registry.Method` in ``visattn/processors/`` (a package with one module
  per framework when it spans several), whose ``install`` calls the adapters' services, never
  ``register_forward_hook``, ``set_attn_processor`` or a class swap itself (``tests/test_layers.py``
  checks), and keeps what a call carries between hooks in a :class:`visattn.frameworks.base.PerThread`;
- a new model family: the adapter of its framework (``timm.py``, ``open_clip.py``, ``diffusers.py``,
  ``transformers.py``): its attention layers, token layout, block step or call reader;
- what every adapter offers: :mod:`visattn.frameworks.base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import UnsupportedTargetError

#: The frameworks visattn patches, each with an adapter module of that name in this package.
FRAMEWORKS = ("timm", "open_clip", "diffusers", "transformers")


@dataclass(frozen=True)
class Target:
    """A detected model.

    Attributes:
        framework: one of :data:`FRAMEWORKS`.
        family: the class name of the patched model (``VisionTransformer``, ``FluxTransformer2DModel``,
            ``LlavaForConditionalGeneration``...).
        model: the ``nn.Module`` that gets patched (a pipeline's denoiser, an open_clip model's
            visual tower).
        owner: what the user passed (a pipeline, a CLIP model, or the model itself).
    """

    framework: str
    family: str
    model: nn.Module
    owner: Any


def _module_root(obj: Any) -> str:
    return type(obj).__module__.split(".")[0]


def _mro_roots(obj: Any) -> set[str]:
    return {c.__module__.split(".")[0] for c in type(obj).__mro__}


def detect(obj: Any) -> Target:
    """Return the :class:`Target` for ``obj`` or raise :class:`UnsupportedTargetError`."""
    roots = _mro_roots(obj)
    if "diffusers" in roots:
        model = obj
        if not isinstance(obj, nn.Module):  # a pipeline: patch its denoiser
            model = getattr(obj, "transformer", None) or getattr(obj, "unet", None)
            if not isinstance(model, nn.Module):
                raise UnsupportedTargetError(
                    f"the diffusers pipeline {type(obj).__name__} has neither a .transformer nor a .unet")
        return Target("diffusers", type(model).__name__, model, obj)
    if "open_clip" in roots:
        model = getattr(obj, "visual", obj)
        if _module_root(model) == "timm" or "timm" in _mro_roots(model):
            return Target("timm", type(model).__name__, model, obj)
        if _module_root(model) == "open_clip" and hasattr(model, "trunk"):  # TimmModel wrapper
            return Target("timm", type(model.trunk).__name__, model.trunk, obj)
        return Target("open_clip", type(model).__name__, model, obj)
    if "transformers" in roots and isinstance(obj, nn.Module):
        return Target("transformers", type(obj).__name__, obj, obj)
    if "timm" in roots and isinstance(obj, nn.Module):
        return Target("timm", type(obj).__name__, obj, obj)
    raise UnsupportedTargetError(
        f"visattn cannot patch a {type(obj).__module__}.{type(obj).__qualname__}; supported targets: "
        f"models of {', '.join(FRAMEWORKS)} and diffusers pipelines")
