"""The batching worker's order of work, observed through what it calls, not through timings.

A token is handed to the event loop before the forward pass that prepares the next one; a
request that joins a busy batch is prefilled in the forward running when it arrives (a GPT: it
joins between blocks) or in one of its own (an RNN), and gets its first token right after it;
the hand-off is one call per step for the whole batch.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import torch

from craft.data.tokenizers import CharTokenizer
from craft.generation import generate
from craft.sampling import SamplingParams
from craft.serving.worker import BatchWorker, Event, Job
from tests.generation._fakes import tiny_gpt, tiny_rnn

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


def _traced_worker(model, tok) -> tuple[BatchWorker, Recorder]:
    """A worker whose engine records each add, each advance (rows, rows awaiting their prefill)
    and each forward of the model, in the order they run."""
    worker = BatchWorker(model, tok, max_batch_size=4, max_queue=4)
    rec = Recorder()
    engine = worker.engine
    add_many, advance, forward = engine.add_many, engine.advance, model.forward

    def traced_add(requests, **kw):
        rows = add_many(requests, **kw)
        rec.add("add", len(requests))
        return rows

    def traced_advance(**kw) -> None:
        rec.add("advance", (engine.active, engine._deferred))
        advance(**kw)

    def traced_forward(*a, **kw):
        rec.add("forward")
        return forward(*a, **kw)

    engine.add_many, engine.advance, model.forward = traced_add, traced_advance, traced_forward
    return worker, rec


def _join_busy_batch(
    model, tok, *, mid_forward: bool = False
) -> tuple[list[tuple[str, Any]], Job, Job]:
    """A request (`late`) joins a batch in mid-decode; returns the log from its admission on.
    `mid_forward` (a GPT): it arrives while the batch's forward runs its first block."""
    worker, rec = _traced_worker(model, tok)

    def job(prompt: str, max_tokens: int, seed: int) -> Job:
        ids = tok.encode(prompt)
        return Job([ids], 1, SAMPLE, max_tokens, seed, [], rec)  # type: ignore[arg-type]

    busy, late = job("the ", 10_000, 1), job("fox ", 6, 2)
    armed = threading.Event()
    if mid_forward:
        block = model.blocks[0]
        first_block = block.forward

        def arriving(*a, **kw):
            if armed.is_set():
                armed.clear()
                rec.add("arrives")
                assert worker.submit(late)
            return first_block(*a, **kw)

        block.forward = arriving
    worker.start()
    try:
        assert worker.submit(busy)
        rec.wait(busy, lambda evs: len(evs) >= 3)  # a batch in mid-decode...
        if mid_forward:  # ...that a second request joins
            armed.set()
        else:
            assert worker.submit(late)
        rec.wait(late, lambda evs: any(ev.finish for ev in evs))
    finally:
        worker.cancel(busy)
        worker.stop()
    with rec.lock:
        log = list(rec.log)
    # The seed contract holds for the row that joined a busy batch.
    text = "".join(ev.text for ev in rec.events(late))
    assert text == generate(model, tok, "fox ", max_new_tokens=6, temperature=1.0, seed=2)[0]
    return log, busy, late


def test_a_request_arriving_during_a_forward_joins_it() -> None:
    """A GPT: a request that arrives while the batch's forward runs is admitted before the next
    block, its prompt runs the blocks before on its own and then joins the batch, and its first
    token goes out with that forward's hand-off, never a forward later."""
    tok = CharTokenizer(sorted(set(TEXT)))
    model = tiny_gpt(tok.vocab_size, block_size=64).eval()
    log, busy, late = _join_busy_batch(model, tok, mid_forward=True)
    arrived = log.index(("arrives", None))
    kinds = [kind for kind, _ in log[arrived - 2 :]]
    # the forward of `busy` alone is in flight when `late` arrives; `late` is added within it,
    # and the forward's hand-off carries both rows' tokens
    assert kinds[:5] == ["advance", "forward", "arrives", "add", "handoff"], kinds[:7]
    assert log[arrived - 2][1] == (1, 0)
    assert {j for j, _ in log[arrived + 2][1]} == {busy, late}
    steps = [k for k in kinds[1:] if k in ("handoff", "forward")]
    assert all(a != b for a, b in itertools.pairwise(steps)), steps


def test_first_token_goes_out_before_the_next_forward_without_packed_steps() -> None:
    """A model without packed steps (an RNN): a joining request is prefilled in a forward of its
    own and gets its first token straight from it, never after a further decode step."""
    tok = CharTokenizer(sorted(set(TEXT)))
    log, busy, late = _join_busy_batch(tiny_rnn(tok.vocab_size).eval(), tok)
    joined = max(i for i, e in enumerate(log) if e == ("add", 1))
    kinds = [kind for kind, _ in log[joined:]]
    assert kinds[:3] == ["add", "handoff", "advance"], kinds[:6]
    assert {j for j, _ in log[joined + 1][1]} == {busy, late}
    steps = [k for k in kinds[1:] if k in ("handoff", "advance")]
    assert all(a != b for a, b in itertools.pairwise(steps)), steps


def test_the_model_runs_with_the_workers_thread_count() -> None:
    """The forward runs in the worker thread with the thread count the server chose for it."""
    tok = CharTokenizer(sorted(set(TEXT)))
    model = tiny_gpt(tok.vocab_size, block_size=64).eval()
    want = torch.get_num_threads() + 1  # differs from the default whatever the machine
    worker = BatchWorker(model, tok, max_batch_size=2, max_queue=2, threads=want)
    seen: list[int] = []
    add_many = worker.engine.add_many

    def traced_add(requests, **kw):
        seen.append(torch.get_num_threads())
        return add_many(requests, **kw)

    worker.engine.add_many = traced_add
    rec = Recorder()
    job = Job([tok.encode("the ")], 1, SAMPLE, 2, 1, [], rec)  # type: ignore[arg-type]
    worker.start()
    try:
        assert worker.submit(job)
        rec.wait(job, lambda evs: any(ev.finish for ev in evs))
    finally:
        worker.stop()
    assert len(seen) == 2 and set(seen) == {want}  # the warm-up and the job


def test_server_leaves_one_core_to_the_event_loop(monkeypatch) -> None:
    from craft.serving import server

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(server.os, "sched_getaffinity", lambda pid: set(range(6)))
    assert server.model_threads("cpu") == 5
    assert server.model_threads("cpu", requested=6) == 6  # --threads
    assert server.model_threads("cuda") is None  # the GPU computes: torch's default
    monkeypatch.setattr(server.os, "sched_getaffinity", lambda pid: {0})
    assert server.model_threads("cpu") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert server.model_threads("cpu") is None  # the operator's setting stands


def test_start_returns_after_a_warm_up_forward_that_leaves_no_trace() -> None:
    """The first forward loads kernel backends (seconds): the worker runs one before serving."""
    tok = CharTokenizer(sorted(set(TEXT)))
    model = tiny_gpt(tok.vocab_size, block_size=64).eval()
    worker = BatchWorker(model, tok, max_batch_size=2, max_queue=2)
    calls: list[int] = []
    forward = model.forward

    def traced_forward(*args, **kwargs):
        calls.append(args[0].shape[1])  # tokens per row
        return forward(*args, **kwargs)

    model.forward = traced_forward
    rec = Recorder()
    job = Job([tok.encode("fox ")], 1, SAMPLE, 5, 3, [], rec)  # type: ignore[arg-type]
    worker.start()
    try:
        assert calls == [1] and worker.engine.active == 0  # warmed up, no row left behind
        assert worker.submit(job)
        rec.wait(job, lambda evs: any(ev.finish for ev in evs))
    finally:
        worker.stop()
    text = "".join(ev.text for ev in rec.events(job))
    assert text == generate(model, tok, "fox ", max_new_tokens=5, temperature=1.0, seed=3)[0]
