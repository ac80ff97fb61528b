"""Exact, reversible patching.

A :class:`Patcher` records every change a method makes to a model — an attribute set, a class
swapped, a hook added, a processor replaced — and undoes them in reverse order, so that after
``remove()`` the model has the same classes, attributes, hooks, ``state_dict()`` and outputs as
before. A :class:`Handle` is what :func:`visattn.apply` returns: the applied method, its options,
and ``remove()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import CopyError, MethodConflictError

_MISSING = object()
HANDLES_ATTR = "_visattn_handles"


class Patcher:
    """Collects undo actions; :meth:`undo` runs them newest first."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value``; undo restores the old value, or deletes it if there was none.

        Plain (non-module, non-parameter) attributes only: they live in the instance ``__dict__``.
        """
        old = obj.__dict__.get(name, _MISSING)
        object.__setattr__(obj, name, value)

        def undo() -> None:
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                object.__setattr__(obj, name, old)

        self._undo.append(undo)

    def add_module(self, parent: Any, name: str, module: Any) -> None:
        """Register a new submodule (e.g. a method's own parameters); undo deletes it again."""
        if name in parent._modules or name in parent.__dict__ or name in parent._parameters:
            raise ValueError(f"{type(parent).__name__} already has an attribute {name!r}")
        parent.add_module(name, module)
        self._undo.append(lambda: delattr(parent, name))

    def swap_class(self, obj: Any, new_cls: type) -> None:
        """Change ``obj``'s class to ``new_cls`` (a subclass adding behaviour, never state)."""
        old = obj.__class__
        obj.__class__ = new_cls
        self._undo.append(lambda: setattr(obj, "__class__", old))

    def add_hook(self, removable: Any) -> None:
        """Keep a torch ``RemovableHandle`` (or anything with ``remove()``) to remove on undo."""
        self._undo.append(removable.remove)

    def refuse_copies(self, model: Any, method: str) -> None:
        """Until undo, ``copy.deepcopy(model)`` (or of anything holding it), pickling and ``torch.save(model)``
        raise :class:`CopyError`: a copy would share the method's hooks and state with ``model``, and its
        ``remove()`` would undo the original's patches."""
        family = type(model).__name__

        def deepcopy(memo: Any = None) -> Any:
            raise CopyError(f"this {family} carries visattn's {method}, whose hooks a copy would share with the "
                            f"original; copy it before visattn.apply, or visattn.remove(model), copy, and apply "
                            f"to each")

        def reduce_ex(protocol: Any = None) -> Any:
            raise CopyError(f"this {family} carries visattn's {method}, which cannot be pickled or saved with it; "
                            f"save model.state_dict() instead, or visattn.remove(model) first")

        self.set_attr(model, "__deepcopy__", deepcopy)
        self.set_attr(model, "__reduce_ex__", reduce_ex)

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


class Handle:
    """The result of :func:`visattn.apply`: which method is applied to which model, and how to undo it.

    Methods may return a subclass that exposes what they record (for example ``inspect``'s maps).
    """

    def __init__(self, method: str, model: Any, options: dict[str, Any], patcher: Patcher) -> None:
        self.method = method
        self.model = model
        self.options = dict(options)
        self._patcher = patcher
        self.active = True

    def remove(self) -> None:
        """Undo this method only. Prefer :func:`visattn.remove`, which undoes every method applied."""
        if not self.active:
            return
        handles = self.model.__dict__.get(HANDLES_ATTR, [])
        if handles and handles[-1] is not self:
            raise MethodConflictError(f"{self.method}: remove the methods applied after it first "
                               f"({', '.join(h.method for h in handles[handles.index(self) + 1:])})")
        self._patcher.undo()
        if handles:
            handles.pop()
            if not handles:
                del self.model.__dict__[HANDLES_ATTR]
        self.active = False

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        state = "active" if self.active else "removed"
        return f"<visattn.Handle {self.method}({opts}) on {type(self.model).__name__}, {state}>"
