"""One logger for visattn, and fallbacks that are logged once or, under ``strict``, raised.

A fallback may be met inside a forward that ``torch.compile`` traces: there it is logged through the
custom op ``visattn::log_once``, an ordered side effect of the graph (:func:`effect_op`), so the graph does
not break and the message is logged when the compiled code first runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .errors import KernelUnavailableError

logger = logging.getLogger("visattn")
_seen: set[str] = set()


def log_once(key: str, message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key not in _seen:
        _seen.add(key)
        logger.log(level, message)


def fallback(key: str, message: str, strict: bool) -> None:
    """Report a fallback (e.g. Triton kernel -> PyTorch reference): raise if ``strict``, else log once."""
    if strict:
        raise KernelUnavailableError(f"{message} (strict=True forbids the fallback)")
    report = _log_once_op if torch.compiler.is_compiling() else log_once
    report(key, f"{message}; falling back (logged once; pass strict=True to make this an error)")


def effect_op(name: str, fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` (which returns nothing) as the custom op ``visattn::<name>``, registered as an ordered side effect:
    a compiled graph keeps the call, in its place, and makes it when the graph runs (no graph break)."""
    op = torch.library.custom_op(f"visattn::{name}", fn, mutates_args=())
    op.register_fake(lambda *args: None)
    try:  # torch's registry of effectful ops is private (torch 2.11 to 2.14 have it as used here)
        from torch._higher_order_ops import effects

        effects._register_effectful_op(f"visattn::{name}", effects._EffectType.ORDERED)
    except (ImportError, AttributeError) as exc:
        logger.warning("visattn: this torch %s cannot mark visattn::%s as a side effect (%s): compiled graphs may "
                       "drop it (inspect's maps, fallback messages); eager forwards are unaffected",
                       torch.__version__, name, exc)
    return op


def _log_warning_once(key: str, message: str) -> None:
    log_once(key, message)


_log_once_op = effect_op("log_once", _log_warning_once)  # registered at import: never inside a traced forward
