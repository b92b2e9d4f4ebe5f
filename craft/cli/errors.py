"""Turn Craft's own errors into one-line messages and exit code 2 (tracebacks with CRAFT_DEBUG=1)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from craft.errors import CraftError


def debug() -> bool:
    return os.environ.get("CRAFT_DEBUG", "") not in ("", "0", "false", "False")


def fail(message: str, code: int = 2) -> NoReturn:
    from craft.safety import printable

    # Messages quote paths and values from files: escape control characters before printing.
    sys.stderr.write(f"error: {printable(message)}\n")
    sys.stderr.flush()
    raise SystemExit(code)


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that every `finally` runs (temporary
    output removed, the terminal's cursor restored) before the process exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _exit_cleanly_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into `Terminated` inside the block (the Trainer installs its own
    graceful handlers while it trains and restores these afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Call `fn`, reporting CraftError (and Ctrl-C) without a traceback unless CRAFT_DEBUG is set.

    SIGTERM and SIGHUP end the command like Ctrl-C does: cleanly, exit code 128 + signal. A write
    the machine refused (disk full, permission denied, read-only: `craft.fileio.storage_error`)
    is one line too, wherever it happened.
    """
    from craft.fileio import storage_error

    try:
        with _exit_cleanly_on_signals():
            return fn()
    except CraftError as e:
        if debug():
            raise
        fail(e.message, e.exit_code)
    except Exception as e:
        err = storage_error(e)
        if err is None or debug():
            raise
        fail(err.message, err.exit_code)
    except KeyboardInterrupt:
        if debug():
            raise
        fail("interrupted", 130)
    except Terminated as e:
        if debug():
            raise
        fail(f"terminated by {signal.Signals(e.signum).name}", 128 + e.signum)
