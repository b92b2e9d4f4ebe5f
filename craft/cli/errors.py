"""Turn Craft's own errors into one-line messages and exit code 2 (tracebacks with CRAFT_DEBUG=1)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from craft.errors import CraftError


def debug() -> bool:
    return os.environ.get("CRAFT_DEBUG", "") not in ("", "0", "false", "False")


def fail(message: str, code: int = 2) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Call `fn`, reporting CraftError (and Ctrl-C) without a traceback unless CRAFT_DEBUG is set."""
    try:
        return fn()
    except CraftError as e:
        if debug():
            raise
        fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        if debug():
            raise
        fail("interrupted", 130)
