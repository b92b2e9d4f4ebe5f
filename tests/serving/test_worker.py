"""The batching worker's order of work, observed through what it calls, not through timings.

A token is handed to the event loop before the forward pass that prepares the next one, so a
request that joins a busy batch gets its first token straight from its prefill, never after a
further decode step; the hand-off is one call per step for the whole batch.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from craft.data.tokenizers import CharTokenizer
from craft.generation import generate
from craft.sampling import SamplingParams
from craft.serving.worker import BatchWorker, Event, Job
from tests.generation._fakes import tiny_gpt

TEXT = "the quick brown fox jumps over the lazy dog\n"
SAMPLE = SamplingParams(temperature=1.0)


class Recorder:
    """Stands in for the event loop: records every hand-off, in order, with the engine's work."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, kind: str, what: Any = None) -> None:
        with self.lock:
            self.log.append((kind, what))

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        self.add("handoff", args[0])

    def events(self, job: Job) -> list[Event]:
        with self.lock:
            batches = [b for kind, b in self.log if kind == "handoff" and isinstance(b, list)]
        return [ev for batch in batches for j, evs in batch if j is job for ev in evs]

    def wait(self, job: Job, done: Any) -> None:
        deadline = time.monotonic() + 120
        while not done(self.events(job)):
            assert time.monotonic() < deadline, f"no progress: {self.log[-5:]}"
            time.sleep(0.01)


def test_first_token_goes_out_before_the_next_forward() -> None:
    tok = CharTokenizer(sorted(set(TEXT)))
    model = tiny_gpt(tok.vocab_size, block_size=64).eval()
    worker = BatchWorker(model, tok, max_batch_size=4, max_queue=4)
    rec = Recorder()
    engine = worker.engine
    add_many, advance = engine.add_many, engine.advance

    def traced_add(requests):
        rows = add_many(requests)
        rec.add("prefill", len(requests))
        return rows

    def traced_advance() -> None:
        rec.add("advance", engine.active)
        advance()

    engine.add_many, engine.advance = traced_add, traced_advance

    def job(prompt: str, max_tokens: int, seed: int) -> Job:
        ids = tok.encode(prompt)
        return Job([ids], 1, SAMPLE, max_tokens, seed, [], rec)  # type: ignore[arg-type]

    busy, late = job("the ", 10_000, 1), job("fox ", 6, 2)
    worker.start()
    try:
        assert worker.submit(busy)
        rec.wait(busy, lambda evs: len(evs) >= 3)  # a batch in mid-decode...
        assert worker.submit(late)  # ...that a second request joins
        rec.wait(late, lambda evs: any(ev.finish for ev in evs))
    finally:
        worker.cancel(busy)
        worker.stop()
    with rec.lock:
        log = list(rec.log)
    joined = log.index(("prefill", 1), 1)  # the second prefill: `late`'s
    kinds = [kind for kind, _ in log[joined:]]
    # Its first token is handed off before any forward runs; from then on every step hands its
    # tokens on (one call for the whole batch) before the forward that follows it.
    assert kinds[:4] == ["prefill", "handoff", "advance", "handoff"], kinds[:6]
    assert "advance" not in [k for k, _ in log[: log.index(("prefill", 1))]]
    first = log[joined + 1][1]
    assert {j for j, _ in first} == {busy, late}
    steps = [k for k in kinds[1:] if k in ("handoff", "advance")]
    assert all(a != b for a, b in itertools.pairwise(steps)), steps
    # The seed contract holds for the row that joined a busy batch.
    text = "".join(ev.text for ev in rec.events(late))
    assert text == generate(model, tok, "fox ", max_new_tokens=6, temperature=1.0, seed=2)[0]
