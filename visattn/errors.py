"""The errors visattn raises. Every one is a :class:`VisattnError`, and also a ``ValueError`` or
``TypeError`` as fits, so callers can catch either. Bad options, models and targets are refused before a
model is touched; what only a forward shows (inputs a method cannot take, a calling convention visattn
does not know) raises from that forward, as a :class:`ShapeError` or :class:`UnsupportedModelError`."""

from __future__ import annotations


class VisattnError(Exception):
    """Base class of every error visattn raises on purpose."""


class UnknownMethodError(VisattnError, ValueError):
    """The method name is not registered."""


class UnsupportedTargetError(VisattnError, TypeError):
    """The target is not a model of a framework visattn knows."""


class UnsupportedModelError(VisattnError, TypeError):
    """The method does not support this framework or model family."""


class OptionError(VisattnError, ValueError):
    """An option is unknown, out of range, or of the wrong type."""


class MethodConflictError(VisattnError, ValueError):
    """A method is already applied and the new one does not compose with it."""


class NotAppliedError(VisattnError, ValueError):
    """``remove`` was called on a target that carries no visattn method."""


class KernelUnavailableError(VisattnError, RuntimeError):
    """``strict=True`` asked for a kernel that cannot run here (no CUDA, no Triton)."""


class ShapeError(VisattnError, ValueError):
    """A tensor or index list has a shape, dtype or value the operation cannot take."""


class CopyError(VisattnError, TypeError):
    """A model carrying a visattn method was deep-copied, pickled or saved whole (``torch.save(model)``)."""

