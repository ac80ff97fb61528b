"""One logger for visattn, and fallbacks that are logged once or, under ``strict``, raised."""

from __future__ import annotations

import logging

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
    log_once(key, f"{message}; falling back (logged once; pass strict=True to make this an error)")
