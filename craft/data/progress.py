"""Progress of long data work (bytes done, MB/s, time left on stderr), and `quiet()` to silence it.

The display is `craft.progress.Progress`; this module adds the switch the data commands share.
"""

from __future__ import annotations

import contextvars
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from craft.progress import Progress

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


class ByteProgress(Progress):
    """Bytes processed: `with ByteProgress("encoding", total) as p: p.advance(n)`; silent inside
    `quiet()`."""

    def __init__(self, description: str, total: int | None) -> None:
        super().__init__(description, total, unit="B", mode="auto" if enabled() else "none")


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
