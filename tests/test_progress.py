"""The one progress helper: plain lines off a terminal, a rich bar on one, silence when off."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from craft.progress import Progress


def test_plain_lines_say_how_far_how_fast_and_when_done(capsys: pytest.CaptureFixture) -> None:
    with Progress("encoding", 4_000_000, unit="B", mode="plain", interval=0) as p:
        p.advance(1_000_000)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("encoding: 1.0 MB / 4.0 MB (25%), ") and " MB/s, eta " in lines[0]
    assert lines[-1].startswith("encoding: 1.0 MB / 4.0 MB (25%), ") and "done in" in lines[-1]


def test_fields_counts_and_a_quiet_interval(capsys: pytest.CaptureFixture) -> None:
    with Progress("eval val", 3, unit="batches", fields=("now",), mode="plain") as p:
        for i in range(3):
            p.advance(now=f"batch {i}")
    lines = capsys.readouterr().err.splitlines()  # the 10 s interval has not passed: one line
    assert len(lines) == 1 and lines[0].startswith("eval val: 3 / 3 (100%), ")
    assert " batches/s, now batch 2, done in " in lines[0]


def test_off_or_failed_work_prints_no_final_line(capsys: pytest.CaptureFixture) -> None:
    with Progress("quiet", 2, mode="none") as p:
        p.advance(2)
    with pytest.raises(RuntimeError), Progress("broken", 2, mode="plain") as p:
        raise RuntimeError("boom")
    assert capsys.readouterr().err == ""


def test_rich_bar_on_a_terminal_console_and_the_line_a_transient_bar_leaves() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with Progress("train", 10, unit="steps", fields=("loss",), console=console) as p:
        assert p.mode == "rich"
        p.update(completed=4, loss="2.5000")
    assert "train" in out.getvalue() and "loss 2.5000" in out.getvalue()
    out.truncate(0)
    with Progress("bench norm", 2, unit="runs", console=console, transient=True) as p:
        p.advance(2)
    assert "bench norm: 2 / 2 (100%)" in out.getvalue() and "done in" in out.getvalue()


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="progress mode 'fancy'"):
        Progress("x", mode="fancy")
