"""Logging for a run: console (rich or plain) and `train.log` on the main process.

Per-step lines go to the `craft.training.steps` logger: always into train.log, on the console only
in plain mode (the rich progress bar shows them instead).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

STEPS_LOGGER = "craft.training.steps"


class _NotSteps(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(STEPS_LOGGER)


def resolve_progress_mode(mode: str, console: Console) -> str:
    """`auto` -> `rich` on a terminal, `plain` otherwise."""
    if mode == "auto":
        return "rich" if console.is_terminal else "plain"
    return mode


class _FileHandler(logging.FileHandler):
    """A FileHandler that keeps the first failed write (`error`: an OSError) instead of printing a
    traceback for every record (a full disk would print one per log line)."""

    error: BaseException | None = None

    def handleError(self, record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):  # e.g. a record whose arguments do not format
            super().handleError(record)
        elif self.error is None:
            self.error = e


class DeferredFileHandler(logging.Handler):
    """Keeps records in memory until `open(path)`, then writes them and every later one there.

    A new run's directory is created only once its data and model are built (a run that fails
    before leaves nothing behind), yet its train.log still starts with everything it printed.
    A write that fails is kept as `error` (the trainer checks it: `check()`), not printed.
    """

    def __init__(self, formatter: logging.Formatter, level: int) -> None:
        super().__init__(level)
        self.setFormatter(formatter)
        self._pending: list[logging.LogRecord] = []
        self._file: _FileHandler | None = None

    @property
    def error(self) -> BaseException | None:
        return self._file.error if self._file is not None else None

    def check(self) -> None:
        """Raise the first failed write to the file as a one-line error (a full disk, a file
        made read-only), so that a run never goes on without its log."""
        from craft.errors import CraftError
        from craft.fileio import storage_error

        e = self.error
        if e is None:
            return
        assert self._file is not None
        err = storage_error(e, f"writing {self._file.baseFilename}", name_file=False)
        raise err or CraftError(f"cannot write {self._file.baseFilename}: {e}")

    def open(self, path: Path) -> None:
        """Start writing to `path` (appending), buffered records first."""
        fh = _FileHandler(path, encoding="utf-8")
        fh.setFormatter(self.formatter)
        fh.setLevel(self.level)
        with self.lock:  # type: ignore[union-attr]  (created by Handler.__init__)
            for record in self._pending:
                fh.emit(record)
            self._pending = []
            self._file = fh

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.emit(record)
        else:
            self._pending.append(record)

    def close(self) -> None:
        if self._file is not None:
            # The last buffered write may fail again here: check() has reported it already.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self._pending = []
        super().close()


def setup_logging(
    log_file: Path | None, *, is_main: bool, rank: int, mode: str
) -> tuple[Console, str, Callable[[], None], DeferredFileHandler | None]:
    """Attach handlers to the `craft` logger.

    Returns (console, progress mode, teardown, file handler): on the main process the file handler
    writes to `log_file`, or holds the records until its `open(path)` when `log_file` is None.
    """
    logger = logging.getLogger("craft")
    console = Console(file=sys.stdout)
    mode = resolve_progress_mode(mode, console)
    handlers: list[logging.Handler] = []
    if is_main:
        if mode == "rich":
            from rich.logging import RichHandler

            con: logging.Handler = RichHandler(
                console=console, show_path=False, markup=False, rich_tracebacks=False
            )
            con.setFormatter(logging.Formatter("%(message)s"))
        else:
            con = logging.StreamHandler(sys.stdout)
            con.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        if mode != "plain":
            con.addFilter(_NotSteps())
        con.setLevel(logging.INFO)
        handlers.append(con)
        file_handler = DeferredFileHandler(
            logging.Formatter("%(asctime)s %(levelname)s %(message)s"), logging.INFO
        )
        if log_file is not None:
            file_handler.open(log_file)
        handlers.append(file_handler)
    else:
        file_handler = None
        con = logging.StreamHandler(sys.stderr)
        con.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        con.setLevel(logging.WARNING)
        handlers.append(con)
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in handlers:
        logger.addHandler(h)

    def teardown() -> None:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate

    return console, mode, teardown, file_handler


class ThroughputWindow:
    """Steps and busy time since the last log line (evaluation and checkpoints not counted)."""

    def __init__(self) -> None:
        self.t0, self.steps, self.paused = time.perf_counter(), 0, 0.0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Time inside the block is not training time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t

    def busy_s(self) -> float:
        return max(1e-9, time.perf_counter() - self.t0 - self.paused)


def describe_run(cfg: Any, step: int, world_size: int, device: Any) -> str:
    """`100 steps from step 0 | 2 process(es) on cuda:0 | batch 8 x 2 accum x 256 tokens = ...`."""
    t = cfg.training
    block = getattr(cfg.model, "block_size", 0)
    tokens = t.batch_size * t.grad_accum_steps * world_size * block
    return (
        f"{t.max_steps} steps from step {step} | {world_size} process(es) on {device} | batch "
        f"{t.batch_size} x {t.grad_accum_steps} accum x {block} tokens = {tokens} tokens/step | "
        f"precision {t.precision}{' | compiled' if t.compile else ''}"
    )
