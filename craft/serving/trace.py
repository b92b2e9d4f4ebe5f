"""Per-request timestamps, for finding where a request's time to first token goes.

Off unless the server starts with `CRAFT_SERVE_TRACE=FILE` in its environment (an operator's
setting, never a request's). Then every streamed request appends one JSON line to FILE: its
response id, batch rows at admission, and `time.perf_counter()` marks (system-wide
CLOCK_MONOTONIC on Linux, so a load generator on the same machine can line its own up):

    enter     the route starts (headers parsed by uvicorn)
    submit    body read, validated and tokenized; the job is queued for the worker
    admit     the worker takes the job (after the step it was running, if any)
    prefill   the job's prompts are in the KV cache
    sampled   the job's first token is sampled
    handoff   the worker hands the first text to the event loop (`call_soon_threadsafe`)
    received  the event loop has it (the stream generator resumed)
    written   the first text chunk was written to the socket
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

TRACE_ENV = "CRAFT_SERVE_TRACE"


class Marks(dict):
    """First time each named point was reached."""

    def mark(self, name: str) -> None:
        if name not in self:
            self[name] = time.perf_counter()


class Tracer:
    """Appends one JSON line per request to a file; shared by the event loop and the worker."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open while serving)
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()


def from_env() -> Tracer | None:
    path = os.environ.get(TRACE_ENV)
    return Tracer(path) if path else None
