"""The releases of torch and of each framework that visattn's test suite has passed on.

``TESTED[name] = (oldest, newest)``: the oldest is the floor that ``pyproject.toml`` declares and that CI
installs from ``.ci/floor-constraints.txt`` (the second test run of ``.ci/run``); the newest is the release
pip installed for the README's test command when the range was last checked (the date in ``CHECKED``).
``tests/test_versions.py`` holds the three places to the same numbers. ``visattn info`` reports, per
package, whether the installed release is inside its range.
"""

from __future__ import annotations

import importlib.metadata
import re

#: the day the newest ends were read off a fresh install
CHECKED = "2026-12-03"
#: distribution name -> (oldest, newest) release on which the whole suite passed
TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.11.0", "2.14.1"),
    "timm": ("1.0.28", "1.0.31"),
    "open_clip_torch": ("3.0.0", "3.3.0"),
    "diffusers": ("0.37.0", "0.42.1"),
    "transformers": ("5.6.0", "5.25.0"),
}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: ``"2.11.0+cu130"`` -> ``(2, 11, 0)``, ``"5.0.0rc1"`` -> ``(5, 0, 0)``."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    parts = tuple(int(p) for p in match.group().split("."))
    return parts + (0,) * (3 - len(parts))


def installed(name: str) -> str | None:
    """The installed release of distribution ``name``, or ``None``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def status(name: str, version: str | None = None) -> str:
    """``version`` (default: the installed one) of ``name`` and where it stands against the tested range."""
    version = installed(name) if version is None else version
    if version is None:
        return "not installed"
    oldest, newest = TESTED[name]
    if release(version) < release(oldest):
        where = f"OLDER than the tested range {oldest} - {newest}"
    elif release(version) > release(newest):
        where = f"newer than the tested range {oldest} - {newest} (checked {CHECKED})"
    else:
        where = f"inside the tested range {oldest} - {newest}"
    return f"{version} ({where})"
