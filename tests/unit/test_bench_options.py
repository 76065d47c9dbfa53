"""``dvmm bench``'s shared options: ``--plot`` fails before any benchmark runs
(matplotlib missing, no such directory), progress is one line per run on
stderr unless ``-q``."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
from dvmm_bench import cli as bench_cli
from dvmm_bench import report
from dvmm_shared.cli import UsageError


def without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))


def test_plot_without_matplotlib_fails_before_the_benchmark(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    without_matplotlib(monkeypatch)
    ran: list[bool] = []
    wrapped = bench_cli.bench_errors(lambda args: ran.append(True) or 0)
    args = argparse.Namespace(bench="core", plot=tmp_path / "x.png")
    with pytest.raises(UsageError, match="bench core: --plot needs matplotlib"):
        wrapped(args)
    assert not ran


def test_plot_into_a_missing_directory_fails_at_once(tmp_path: Path) -> None:
    why = report.plot_problem(tmp_path / "nope" / "x.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert why is not None and "matplotlib" in why
    else:
        assert why is not None and "does not exist" in why


def test_without_plot_the_benchmark_runs() -> None:
    wrapped = bench_cli.bench_errors(lambda args: 7)
    assert wrapped(argparse.Namespace(bench="core", plot=None)) == 7


def test_progress_goes_to_stderr_unless_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    report.progress_printer(argparse.Namespace(quiet=False))("run 1 done")
    report.progress_printer(argparse.Namespace(quiet=True))("run 2 done")
    out = capsys.readouterr()
    assert out.err == "run 1 done\n" and out.out == ""
