"""Progress of a benchmark run on stderr: a live line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

PLAIN_INTERVAL_S = 10.0


class Progress:
    """`with Progress() as p: p.update("attention seq_len=128 eager")`, then `p.done(title)`."""

    def __init__(self) -> None:
        self._live: Any = None
        self._status: Any = None
        self._start = self._family_start = self._last = time.monotonic()
        self._count = 0

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            from rich.console import Console

            self._status = Console(stderr=True).status("benchmarking")
            self._status.start()
        return self

    def update(self, what: str) -> None:
        """A new (case, implementation) starts."""
        self._count += 1
        now = time.monotonic()
        elapsed = now - self._family_start
        if self._status is not None:
            self._status.update(f"[{self._count}] {what} ({elapsed:.0f}s)")
        elif now - self._last >= PLAIN_INTERVAL_S:
            self._last = now
            sys.stderr.write(f"bench: {what} ({self._count} runs, {elapsed:.0f}s)\n")
            sys.stderr.flush()

    def done(self, title: str) -> None:
        """A family finished."""
        now = time.monotonic()
        line = f"bench: {title} done: {self._count} runs in {now - self._family_start:.1f}s"
        if self._status is not None:
            self._status.console.log(line)
        else:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        self._family_start = self._last = now
        self._count = 0

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._status is not None:
            self._status.stop()
