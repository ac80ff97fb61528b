"""The benchmark scripts' comma-separated options name their accepted values on a bad one (before any GPU work)."""

import argparse

import pytest

from benchmarks.modes import MODES, SDXL_VARIANTS, listed


def test_listed_splits_and_refuses_unknown_values(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="modes")
    assert listed(parser, "--sdxl-modes", "eager,graph", MODES) == ("eager", "graph")
    for bad in ("eager,compile", ",", ""):
        with pytest.raises(SystemExit):
            listed(parser, "--sdxl-variants", bad, SDXL_VARIANTS)
        assert "accepted: tome_block, bound" in capsys.readouterr().err
