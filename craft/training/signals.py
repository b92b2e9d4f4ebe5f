"""Graceful stop on SIGTERM / SIGINT: finish the step, checkpoint, exit; a second Ctrl-C aborts."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopSignals:
    """Records the first SIGTERM/SIGINT instead of dying; the Trainer polls `received`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        """Install the handlers (only possible in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum).name
