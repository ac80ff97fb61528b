"""visattn: attention processors for vision and multimodal models.

    import visattn
    handle = visattn.apply(model, "inspect", layers=[3])   # timm, open_clip, diffusers, transformers
    visattn.remove(model)                                  # stock behaviour again, bit for bit
    visattn.methods()                                      # name -> frameworks, paper, options
"""

import importlib.util

from . import diffusers  # noqa: F401  (visattn.diffusers: processors; imports diffusers only when used)
from . import processors as _processors  # noqa: F401  (registers the methods)
from .api import applied, apply, methods, remove
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
from .patching import Handle

if importlib.util.find_spec("timm") is not None:
    from . import timm  # noqa: F401  (registers visattn's layers in timm's factory flags)

__version__ = "0.1.0"

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
