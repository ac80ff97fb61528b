"""The tested range of each framework: one set of floors in pyproject.toml, .ci/floor-constraints.txt and
visattn.versions, and ``visattn info`` saying where the installed releases stand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from visattn.cli import info
from visattn.versions import TESTED, release, status

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_floors() -> dict[str, set[str]]:
    """Every ``"name>=version"`` requirement of pyproject.toml (dependencies and extras), per name."""
    floors: dict[str, set[str]] = {}
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()):
        floors.setdefault(name, set()).add(version)
    return floors


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "floor-constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+)", line.strip())
        if match:
            pins[match[1]] = match[2]
    return pins


def test_pyproject_constraints_and_versions_name_the_same_floors() -> None:
    floors, pins = _pyproject_floors(), _constraints()
    for name, (oldest, newest) in TESTED.items():
        assert release(oldest) <= release(newest), name
        assert pins[name] == oldest, f"{name}: .ci/floor-constraints.txt pins {pins[name]}, versions.py says {oldest}"
        declared = floors.get(name)
        assert declared, f"pyproject.toml declares no floor for {name}"
        assert {release(v) for v in declared} == {release(oldest)}, f"{name}: pyproject {declared}, tested {oldest}"
    assert {"transformers", "diffusers", "timm", "open_clip_torch", "torch"} <= set(TESTED)


def test_status_places_a_release_against_the_tested_range() -> None:
    oldest, newest = TESTED["transformers"]
    assert "inside the tested range" in status("transformers", oldest)
    assert "inside the tested range" in status("transformers", newest + "+local")
    assert "OLDER than the tested range" in status("transformers", "4.57.6")
    assert "newer than the tested range" in status("transformers", "99.0")
    assert status("torch", "2.11.0+cu130").startswith("2.11.0+cu130 (inside")
    assert release("5.0.0rc1") == (5, 0, 0) and release("2.11") == (2, 11, 0)
    with pytest.raises(ValueError, match="not a version"):
        release("main")


def test_info_reports_each_framework_against_its_range() -> None:
    report = info()
    for key in ("torch", "timm", "open_clip", "diffusers", "transformers"):
        assert "tested range" in report[key] or report[key] == "not installed", report[key]
