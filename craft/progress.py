"""Progress of long work, one helper for every layer: a rich bar on a terminal, plain lines else.

`with Progress("encoding", total, unit="B") as p: p.advance(n)`. On a terminal: the label, a bar
with done/total, the rate, named fields, elapsed time and ETA. Elsewhere (CI, a pipe, `nohup`):
one line every `interval` seconds and one at the end, so logs stay short. Output goes to stderr
unless a console is given (the training bar shares the run's console).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

PLAIN_INTERVAL_S = 10.0
MODES = ("auto", "rich", "plain", "none")


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        return f"{n / 1e6:.1f} MB"
    return f"{n:g}"


def _rate(per_s: float, unit: str) -> str:
    if unit == "B":
        return f"{per_s / 1e6:.1f} MB/s"
    return f"{per_s:.1f} {unit or 'items'}/s"


class Progress:
    """Work of `total` units (None: unknown), starting at `completed`.

    `unit`: "B" shows megabytes and MB/s; any other word is a count ("steps" -> steps/s).
    `fields`: names of text fields shown after the rate, set through `update(name=...)`.
    `mode`: "auto" (rich on a terminal, else plain), "rich", "plain" or "none".
    `transient`: the rich bar disappears at the end, leaving the final line instead.
    """

    def __init__(
        self,
        label: str,
        total: float | None = None,
        *,
        unit: str = "",
        completed: float = 0,
        fields: Sequence[str] = (),
        mode: str = "auto",
        console: Any = None,
        transient: bool = False,
        interval: float = PLAIN_INTERVAL_S,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
        self.label, self.total, self.unit = label, total, unit
        self.done = self._start_done = completed
        self.fields = {name: "-" for name in fields}
        self.mode, self.transient, self.interval = mode, transient, interval
        self._console = console
        self._bar: Any = None
        self._task: Any = None
        self._t0 = self._last = time.monotonic()

    # ------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Progress:
        return self.start()

    def start(self) -> Progress:
        """Begin showing progress (`with` does this); returns self."""
        self._t0 = self._last = time.monotonic()
        if self.mode == "none":
            return self
        if self.mode == "auto":
            tty = self._console.is_terminal if self._console is not None else sys.stderr.isatty()
            self.mode = "rich" if tty else "plain"
        if self.mode == "rich":
            self._start_rich()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(ok=exc_type is None)

    def close(self, ok: bool = True) -> None:
        """Stop the display; the final line in plain mode (and after a transient bar)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            if self.transient and ok:
                self._write(self._line(final=True))
        elif self.mode == "plain" and ok:
            self._write(self._line(final=True))
        self.mode = "none"

    # ------------------------------------------------------------------------------ updates

    def advance(self, n: float = 1, **fields: str) -> None:
        self.update(completed=self.done + n, **fields)

    def update(self, completed: float | None = None, **fields: str) -> None:
        """Set the amount done and/or fields; a plain line when `interval` has passed."""
        if completed is not None:
            self.done = completed
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, **self.fields)
        elif self.mode == "plain":
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._write(self._line(final=False))

    # ------------------------------------------------------------------------------ output

    def _line(self, final: bool) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        head = f"{self.label}: {_amount(self.done, self.unit)}"
        if self.total:
            head += f" / {_amount(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)"
        parts = [head, _rate(rate, self.unit)]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        if final:
            parts.append(f"done in {elapsed:.1f}s")
        elif self.total and rate > 0:
            parts.append(f"eta {max(self.total - self.done, 0) / rate:.0f}s")
        return ", ".join(parts)

    def _write(self, line: str) -> None:
        if self._console is not None:
            self._console.print(line, markup=False, highlight=False)
        else:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            ProgressColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        unit = self.unit

        class Rate(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(_rate(task.speed, unit) if task.speed else f"? {unit or 'items'}/s")

        columns: list[Any] = [TextColumn("[bold]{task.description}")]
        if self.total:
            columns.append(BarColumn())
            columns.append(DownloadColumn() if unit == "B" else MofNCompleteColumn())
        else:
            columns.insert(0, SpinnerColumn())
        columns.append(Rate())
        columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in self.fields]
        columns.append(TimeElapsedColumn())
        if self.total:
            columns += [TextColumn("ETA"), TimeRemainingColumn()]
        console = self._console or Console(stderr=True)
        self._bar = RichProgress(*columns, console=console, transient=self.transient)
        self._bar.start()
        self._task = self._bar.add_task(
            self.label, total=self.total, completed=self.done, **self.fields
        )
