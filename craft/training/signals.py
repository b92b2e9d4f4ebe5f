"""Graceful stop on SIGTERM / SIGINT / SIGHUP: finish the step, checkpoint, exit; a second Ctrl-C
aborts at once.

Python runs a signal handler only between bytecodes, and runs it once however often the signal
arrived meanwhile: two Ctrl-C pressed during a long checkpoint write (one C call) would reach the
handler as one. So every delivery is also counted through `signal.set_wakeup_fd`, to which the C
level writes one byte per signal: the handler sees how many arrived.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any


class StopSignals:
    """Records the first SIGTERM/SIGINT/SIGHUP instead of dying; the Trainer polls `received`.

    A SIGINT after the first signal (also one merged with it) raises KeyboardInterrupt, so the
    documented "second Ctrl-C aborts at once" holds.
    """

    SIGNALS = tuple(
        s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None
    )

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1

    def install(self) -> None:
        """Install the handlers (only possible in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._pipe = (r, w)
        except (OSError, ValueError):  # no pipes here: count handler calls only
            self._pipe = None
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self._pipe is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._old_wakeup)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _delivered(self, signum: int) -> list[int]:
        """The signals delivered since the last call (at least `signum`, the one being handled)."""
        if self._pipe is None:
            return [signum]
        got = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self._pipe[0], 512):
                got += chunk
        return list(got) or [signum]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        delivered = self._delivered(signum)
        if self.received is None:
            self.received = signal.Signals(signum).name
            if delivered.count(int(signal.SIGINT)) >= 2:  # a second Ctrl-C merged with the first
                self.restore()
                raise KeyboardInterrupt
            return
        if int(signal.SIGINT) in delivered or signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt


def any_process(flag: Any, device: Any, multi: bool) -> bool:
    """Whether `flag` is set on this or (when `multi`) any process: a collective then, so every
    process calls it at the same point and they all take the same decision."""
    if not multi:
        return bool(flag)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
