"""visattn: attention processors for vision and multimodal models.

    import visattn
    handle = visattn.apply(model, "inspect", layers=[3])   # timm, open_clip, diffusers, transformers
    visattn.remove(model)                                  # stock behaviour again, bit for bit
    visattn.methods()                                      # name -> frameworks, paper, options

``import visattn`` imports neither torch nor any framework: ``apply``, ``remove``, ``methods``,
``applied``, ``Handle`` and the entry-point modules ``visattn.timm``, ``visattn.diffusers`` and
``visattn.transformers`` load on first use. The names visattn registers in timm (``attn_layer="visattn_bra"``)
and transformers (``set_attn_implementation("visattn_sdpa")``...) are registered when the entry-point module
is first used, or at ``import visattn`` if that framework is imported already.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from .errors import (
    CopyError,
    KernelUnavailableError,
    MethodConflictError,
    NotAppliedError,
    OptionError,
    ShapeError,
    UnknownMethodError,
    UnsupportedModelError,
    UnsupportedTargetError,
    VisattnError,
)

__version__ = "0.1.0"

#: Public names loaded on first use, and the module each lives in.
_LAZY = {"apply": "api", "remove": "api", "methods": "api", "applied": "api", "Handle": "patching",
         "timm": "timm", "diffusers": "diffusers", "transformers": "transformers"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'visattn' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    value = module if _LAZY[name] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


# a framework's user may name visattn's layers right away: timm's attn_layer="visattn_bra", transformers'
# set_attn_implementation("visattn_sdpa")
if sys.modules.get("timm") is not None:
    from . import timm  # noqa: F401
if sys.modules.get("transformers") is not None:
    from . import transformers  # noqa: F401

__all__ = [
    "CopyError",
    "Handle",
    "KernelUnavailableError",
    "MethodConflictError",
    "NotAppliedError",
    "OptionError",
    "ShapeError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "UnsupportedTargetError",
    "VisattnError",
    "applied",
    "apply",
    "methods",
    "remove",
]
