"""Logging for a run: console (rich or plain) and `train.log` on the main process.

Per-step lines go to the `craft.training.steps` logger: always into train.log, on the console only
in plain mode (the rich progress bar shows them instead).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

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


def setup_logging(
    log_file: Path | None, *, is_main: bool, rank: int, mode: str
) -> tuple[Console, str, Callable[[], None]]:
    """Attach handlers to the `craft` logger; returns (console, progress mode, teardown)."""
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
        if log_file is not None:
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            fh.setLevel(logging.INFO)
            handlers.append(fh)
    else:
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

    return console, mode, teardown
