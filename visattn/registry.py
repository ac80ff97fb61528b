"""The method registry: every method is a :class:`Method` subclass that joins with ``@register``.

A method declares its name, paper, options (with their identity values), the frameworks (and
optionally model families) it supports and the methods it composes with, and implements
``install``, which patches one detected model through a :class:`~visattn.patching.Patcher` and
returns the :class:`~visattn.patching.Handle` the user gets back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .errors import UnknownMethodError, UnsupportedModelError
from .frameworks import FRAMEWORKS
from .options import Option

if TYPE_CHECKING:
    from .frameworks import Target
    from .patching import Handle, Patcher

_REGISTRY: dict[str, type[Method]] = {}


class Method:
    """Base class of every method. Subclasses set the class attributes and implement ``install``."""

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    frameworks: ClassVar[tuple[str, ...]] = ()
    #: per framework, the model families (class names) supported; a framework absent here means
    #: every family of that framework that the adapter can read.
    families: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: names of methods that may already be applied to the same model when this one is applied.
    composes_with: ClassVar[frozenset[str]] = frozenset()

    def check_target(self, target: Target, options: dict[str, Any]) -> None:
        """Raise :class:`UnsupportedModelError` if this method cannot patch ``target``.

        Called before anything is touched. The default checks the framework and family lists;
        methods add their own checks (for example that the model has a class token).
        """
        if target.framework not in self.frameworks:
            raise UnsupportedModelError(
                f"{self.name} does not support {target.framework} models ({target.family}); "
                f"it supports: {', '.join(self.frameworks)}")
        allowed = self.families.get(target.framework)
        if allowed is not None and target.family not in allowed:
            raise UnsupportedModelError(
                f"{self.name} does not support the {target.framework} model {target.family}; "
                f"supported {target.framework} models: {', '.join(allowed)}")

    def install(self, target: Target, patcher: Patcher, options: dict[str, Any]) -> Handle:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "summary": cls.summary,
            "paper": cls.paper,
            "frameworks": list(cls.frameworks),
            "families": {k: list(v) for k, v in cls.families.items()},
            "composes_with": sorted(cls.composes_with),
            "options": {o.name: {"default": o.default, "accepted": o.accepted, "identity": o.identity,
                                 "doc": o.doc, "frameworks": list(o.frameworks or cls.frameworks),
                                 **({"strategies": list(o.strategies)} if o.strategies else {})}
                        for o in cls.options},
        }


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to :func:`visattn.apply` under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    unknown = set(cls.frameworks) - set(FRAMEWORKS)
    if unknown:
        raise ValueError(f"{cls.name}: unknown frameworks {sorted(unknown)}; known: {', '.join(FRAMEWORKS)}")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_methods() -> dict[str, type[Method]]:
    return dict(sorted(_REGISTRY.items()))
