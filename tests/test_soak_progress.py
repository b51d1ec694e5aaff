"""make soak's progress lines and its report (loadtests/soak.py), without a soak."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loadtests import soak


def _books() -> soak.Books:
    books = soak.Books()
    books.acknowledged = 412
    books.answers.update({"POST /orders 201": 412, "POST /orders 409": 7, "POST /orders 0": 3})
    books.faults.update({"redis": 2, "smtp": 1})
    return books


def test_a_progress_line_has_the_elapsed_time_the_orders_and_the_faults() -> None:
    progress = soak.Progress(_books(), seconds=300, phase="traffic + faults (300 s)")
    line = progress.line()
    assert re.match(r"^\s*\d+ s  traffic \+ faults \(300 s\)\s+orders\s+412 ", line), line
    assert "(other answers to POST /orders 10)" in line
    assert line.endswith("faults 3 (redis 2, smtp 1)")


def test_lines_follow_the_phases(capsys: pytest.CaptureFixture[str]) -> None:
    books = _books()
    progress = soak.Progress(books, seconds=300, phase="checking every order")
    progress.tick()
    progress.phase = "waiting for the mail"
    books.acknowledged = 500
    progress.tick()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"soak: {line}" for line in progress.timeline]
    assert "checking every order" in printed[0] and "orders    412" in printed[0]
    assert "waiting for the mail" in printed[1] and "orders    500" in printed[1]
    # What make soak uses: a line at least every 10 s, in every phase.
    assert soak.PROGRESS_SECONDS <= 10


def test_the_report_is_written_beside_bench_md(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where make bench writes BENCH.md before publishing it.
    assert soak.REPORTS == soak.ROOT / "loadtests" / "reports"
    monkeypatch.setattr(soak, "REPORTS", tmp_path)
    path = soak.write_report(
        ["soak summary (seed 7, 20 s)", "  verdict OK"], ["5 s  a", "10 s  b"], 7
    )
    assert path == tmp_path / "SOAK.md"
    text = path.read_text()
    assert "`SOAK_SEED=7 make soak`" in text
    assert "soak summary (seed 7, 20 s)" in text and "10 s  b" in text
