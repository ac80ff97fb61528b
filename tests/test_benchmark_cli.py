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


def test_side_by_side_times_each_variant_interleaved_and_compiles_each_once() -> None:
    import torch

    from benchmarks import modes

    order: list[str] = []

    class Probe(torch.nn.Linear):
        def __init__(self, name: str) -> None:
            super().__init__(8, 8)
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not torch.compiler.is_compiling():
                order.append(self.name)
            y = super().forward(x)
            return y.relu() if self.name == "b" else y  # two graphs (one model's graph serves its copies)

    x = torch.randn(2, 8)
    run = lambda m: m(x)  # noqa: E731
    times = modes.side_by_side({"a": (Probe("a"), run), "b": (Probe("b"), run)}, iters=4, modes=("eager", "compiled"))
    assert set(times) == {"a", "b"}
    for t in times.values():
        assert t["eager"] > 0 and t["compiled"] > 0
        assert t["compile"]["graphs"] == 1 and t["compile"]["recompiles"] == 0
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]  # 3 warm-up rounds, 4 timed
