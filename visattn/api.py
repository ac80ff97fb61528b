"""``apply``, ``remove`` and ``methods``: the public surface, re-exported by ``visattn``."""

from __future__ import annotations

from typing import Any

from . import processors  # noqa: F401  (registers the methods)
from .errors import MethodConflictError, NotAppliedError
from .frameworks import detect
from .options import check_scope, validate_options
from .patching import HANDLES_ATTR, Handle, Patcher
from .registry import all_methods, get_method


def apply(target: Any, method: str, **options: Any) -> Handle:
    """Apply ``method`` to ``target`` and return a :class:`~visattn.patching.Handle`.

    ``target`` is a timm model, an open_clip model or visual tower, a diffusers pipeline or model
    (UNet or transformer), or a transformers model. Every check — method name, target, model family,
    options, conflicts with methods already applied — runs before the model is touched.
    """
    method_cls = get_method(method)
    tgt = detect(target)
    values = validate_options(method, method_cls.options, options)
    check_scope(method, method_cls.options, options, tgt.framework)
    # conflicts first: a method already applied may have changed the classes check_target looks at
    for h in tgt.model.__dict__.get(HANDLES_ATTR, []):
        if h.method not in method_cls.composes_with or method not in get_method(h.method).composes_with:
            raise MethodConflictError(
                f"{method} cannot be applied on top of {h.method}, which is already applied to this "
                f"{tgt.family}; call visattn.remove(model) first"
                + (f" ({method} composes with: {', '.join(sorted(method_cls.composes_with))})"
                   if method_cls.composes_with else ""))
    impl = method_cls()
    impl.check_target(tgt, values)
    patcher = Patcher()
    try:
        patcher.refuse_copies(tgt.model, method)
        handle = impl.install(tgt, patcher, values)
    except BaseException:
        patcher.undo()
        raise
    tgt.model.__dict__.setdefault(HANDLES_ATTR, []).append(handle)
    return handle


def remove(target: Any) -> None:
    """Undo every visattn method applied to ``target``, newest first, restoring it exactly."""
    model = detect(target).model
    handles = model.__dict__.get(HANDLES_ATTR)
    if not handles:
        raise NotAppliedError(f"no visattn method is applied to this {type(model).__name__}")
    while model.__dict__.get(HANDLES_ATTR):
        model.__dict__[HANDLES_ATTR][-1].remove()


def applied(target: Any) -> list[Handle]:
    """The handles of the methods currently applied to ``target``, oldest first."""
    return list(detect(target).model.__dict__.get(HANDLES_ATTR, []))


def methods() -> dict[str, dict[str, Any]]:
    """Every registered method: name -> frameworks, families, paper, options (default, accepted, identity)."""
    return {name: cls.describe() for name, cls in all_methods().items()}
