"""Progress display for long data work: a rich bar on a terminal, plain log lines otherwise.

Both show bytes done, MB/s and the remaining time, on stderr so that stdout stays clean.
"""

from __future__ import annotations

import contextvars
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

PLAIN_INTERVAL_S = 10.0
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("craft_data_progress", default=True)


@contextmanager
def quiet(disable: bool = True) -> Iterator[None]:
    """Silence every progress display inside the block (when `disable`)."""
    token = _ENABLED.set(_ENABLED.get() and not disable)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    return _ENABLED.get()


def _is_tty() -> bool:
    return sys.stderr.isatty()


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class ByteProgress:
    """Count bytes processed; `with ByteProgress("encoding", total) as p: p.advance(n)`."""

    def __init__(self, description: str, total: int | None) -> None:
        self.description = description
        self.total = total
        self.enabled = enabled()
        self.done = 0
        self._rich = None
        self._task = None
        self._start = time.monotonic()
        self._last_line = self._start

    def __enter__(self) -> ByteProgress:
        self._start = self._last_line = time.monotonic()
        if self.enabled and _is_tty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=n)
            return
        now = time.monotonic()
        if now - self._last_line >= PLAIN_INTERVAL_S:
            self._last_line = now
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.description}: {_mb(self.done)}"]
        if self.total:
            parts[0] += f" / {_mb(self.total)} ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate / 1e6:.1f} MB/s")
        if final:
            parts.append(f"done in {elapsed:.1f}s")
        elif self.total and rate > 0:
            parts.append(f"eta {max(self.total - self.done, 0) / rate:.0f}s")
        sys.stderr.write(", ".join(parts) + "\n")
        sys.stderr.flush()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled and exc_type is None:
            self._line(time.monotonic(), final=True)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A start and a finish line around work of unknown length (no live display, so a progress
    bar may run inside it)."""
    start = time.monotonic()
    if not enabled():
        yield
        return
    sys.stderr.write(f"{message} ...\n")
    sys.stderr.flush()
    yield
    sys.stderr.write(f"{message} done in {time.monotonic() - start:.1f}s\n")
    sys.stderr.flush()
