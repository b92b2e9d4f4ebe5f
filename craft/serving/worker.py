"""The batching worker: one thread owns the model and decodes every request in flight together.

Requests (`Job`s) wait in a bounded queue. Each turn of the worker's loop:

1. admit as many queued jobs as the batch has free rows for (a job's rows are admitted together);
2. run one forward pass (`DecodeEngine.advance`) that gives every row its next logits: the
   newest token of every decoding row, and the whole prompt of every newly admitted row, packed
   into one sequence (`DecodeEngine.add_many(defer=True)`, a GPT's packed steps); a row whose
   window is full recomputes it in the same forward;
3. sample one token for every row (`DecodeEngine.sample`);
4. turn the tokens into text (the tokenizer's incremental decoder, stop sequences) and hand every
   job's new text to the event loop in one call for the whole batch.

So a request's first token waits for the forward in flight when it arrived (the one thing a
single model thread cannot interrupt) and for one more forward, the one that prefills it along
with the other rows' next token; no row ever waits for a forward of another request's prompt
alone. Every token reaches its client before the next forward starts. A model without packed
steps (an RNN) prefills new prompts in a forward of their own before the step's sample. A job
whose client went away is cancelled before the next forward. Greedy or seeded rows decode
exactly as `craft generate` would (see craft/sampling.py): the batch does not change a row's
draws.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from craft.engine import DecodeEngine, Request, Row
from craft.sampling import SamplingParams, row_generator
from craft.serving.trace import Marks

log = logging.getLogger("craft.serving")


@dataclass(frozen=True)
class Event:
    """New text of choice `index`; `finish` is set on its last event ("stop" or "length")."""

    index: int
    text: str
    finish: str | None = None
    completion_tokens: int = 0


@dataclass(eq=False)
class Job:
    """One request: `prompts` (token ids) each sampled `n` times; choice i*n + j is sample j of
    prompt i, seeded with `row_generator(seed, j)`."""

    prompts: list[list[int]]
    n: int
    sampling: SamplingParams
    max_tokens: int
    seed: int | None
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[list[Event] | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    rows: list[Row] = field(default_factory=list)
    marks: Marks | None = None  # timestamps when the server traces requests (see trace.py)

    def mark(self, name: str, **info: Any) -> None:
        if self.marks is not None:
            self.marks.mark(name)
            for k, v in info.items():
                self.marks.setdefault(k, v)

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n

    def send(self, item: list[Event] | BaseException) -> None:
        self.loop.call_soon_threadsafe(_deliver, [(self, item)])


def _deliver(batch: list[tuple[Job, list[Event] | BaseException]]) -> None:
    """On the event loop: every job's events of one step (one wake-up for the whole batch), or
    the error that ended a job."""
    for job, events in batch:
        job.queue.put_nowait(events)


class _Text:
    """The text of one row: incremental decoding, stop sequences, text held back for them."""

    def __init__(self, decoder: Any, stops: list[str]) -> None:
        self.decoder, self.stops = decoder, stops
        self.text = ""  # decoded so far (held-back text included)
        self.sent = 0  # characters handed on

    def push(self, piece: str, final: bool) -> tuple[str, bool]:
        """Add decoded text; returns (text that may be sent now, whether a stop sequence hit)."""
        self.text += piece
        # Text up to `sent` holds no stop sequence nor the start of one (that is held back).
        hit = [p for p in (self.text.find(s, self.sent) for s in self.stops) if p >= 0]
        if hit:
            end = min(hit)
            out, self.sent = self.text[self.sent : end], end
            return out, True
        end = len(self.text)
        if not final:  # hold back a tail that may be the start of a stop sequence
            for s in self.stops:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out, self.sent = self.text[self.sent : end], end
        return out, False


class BatchWorker:
    """Owns the model in a background thread; `submit` jobs from the event loop."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int,
        max_queue: int,
        threads: int | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.threads = threads  # torch threads of the model's forward (None: torch's default)
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.engine = DecodeEngine(model, max_batch_size)
        self.device = self.engine.device
        self.pending: collections.deque[Job] = collections.deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.work = 0  # tokens through the model so far (prefill and decode): traces use it
        self.texts: dict[Row, tuple[Job, int, _Text]] = {}
        self.prefilling: list[Job] = []  # admitted, their prompts in the next forward (packed)
        self.thread = threading.Thread(target=self._run, name="craft-decode", daemon=True)
        self.ready = threading.Event()  # set once the warm-up forward has run
        # called (worker thread) when the number of active rows changed without a step's events
        # (rows cancelled, the batch drained): an engine process reports its load with it
        self.on_load: Callable[[], None] | None = None
        self._reported = 0

    def start(self) -> None:
        """Start the worker; returns once its warm-up forward has run."""
        self.thread.start()
        self.ready.wait()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------------ event-loop side

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers 503)."""
        with self.lock:
            if self.stopping or len(self.pending) >= self.max_queue:
                return False
            self.pending.append(job)
        self.wake.set()
        return True

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job before its next step."""
        job.cancelled = True
        self.wake.set()

    @property
    def load(self) -> dict[str, int]:
        return {"active_rows": self.engine.active, "queued_requests": len(self.pending)}

    # ---------------------------------------------------------------------------- worker side

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads is not None:  # per thread: OpenMP's setting is the calling thread's
            torch.set_num_threads(self.threads)
        try:
            self._warm_up()
        except Exception:  # a model that cannot run fails each request with its error
            log.exception("the warm-up forward failed")
        finally:
            self.ready.set()
        while not self.stopping:
            try:
                self._admit()
                self._drop_cancelled()
                if self.on_load is not None and self.engine.active != self._reported:
                    self._reported = self.engine.active
                    self.on_load()
                if not self.engine.active:
                    self.wake.wait(timeout=0.5)
                    self.wake.clear()
                    continue
                if self.engine.packed:  # new prompts ride along with the others' next token
                    self.work += self.engine.active
                    # requests arriving meanwhile join this forward between its blocks
                    self.engine.advance(admit=self._admit)
                    for job in self.prefilling:
                        job.mark("prefill")
                    self.prefilling.clear()
                    self._emit(self.engine.sample())
                else:
                    self._emit(self.engine.sample())
                    self.work += self.engine.active
                    self.engine.advance()
            except Exception as e:  # a fault fails the requests in flight, not the server
                log.exception("decoding failed")
                self._fail_all(e)

    def _warm_up(self) -> None:
        """One forward of a one-token prompt, so that the first request does not pay for what
        the first forward loads (kernel backends, thread pool: seconds on a CPU)."""
        rows = self.engine.add_many(
            [Request([0], SamplingParams(temperature=0.0), [None], 1)], defer=self.engine.packed
        )
        self.engine.advance()
        for row in rows[0]:
            self.engine.cancel(row)

    def _admit(self) -> None:
        """Start every queued job the batch has room for, prefilling their prompts together."""
        jobs: list[Job] = []
        free = self.engine.free
        with self.lock:
            while self.pending:
                job = self.pending[0]
                if job.cancelled:
                    self.pending.popleft()
                elif job.size <= free:
                    jobs.append(self.pending.popleft())
                    free -= job.size
                else:
                    break
        if not jobs:
            return
        for job in jobs:
            job.mark("admit", rows_before=self.engine.active, jobs_admitted=len(jobs))
        try:
            self._start(jobs)
        except Exception as e:
            log.exception("starting requests failed")
            for row in [r for r, (j, _, _) in self.texts.items() if j in jobs]:
                self.engine.cancel(row)
                del self.texts[row]
            for job in jobs:
                job.send(e)

    def _start(self, jobs: list[Job]) -> None:
        requests, owners = [], []
        for job in jobs:
            seed = job.seed if job.seed is not None else random.SystemRandom().randrange(2**62)
            for p, prompt in enumerate(job.prompts):
                gens = [row_generator(seed, j, self.device) for j in range(job.n)]
                requests.append(
                    Request(prompt, job.sampling, gens, job.max_tokens, self.eos_id, p * job.n)
                )
                owners.append((job, prompt))
        self.work += sum(len(r.prompt) for r in requests)
        defer = self.engine.packed
        added = self.engine.add_many(requests, defer=defer)
        for (job, prompt), rows in zip(owners, added, strict=True):
            for row in rows:
                decoder = self.tokenizer.decoder()
                decoder.push(prompt)  # the prompt is context: word boundaries of the first piece
                self.texts[row] = (job, row.index, _Text(decoder, job.stops))
            job.rows.extend(rows)
            if defer:
                self.prefilling.append(job)
            else:
                job.mark("prefill")

    def _drop_cancelled(self) -> None:
        for row in [r for r, (job, _, _) in self.texts.items() if job.cancelled]:
            self.engine.cancel(row)
            del self.texts[row]

    def _emit(self, tokens: list[tuple[Row, int]]) -> None:
        """Text of the sampled tokens to each job; stop sequences end rows."""
        events: dict[Job, list[Event]] = {}
        for row, tok in tokens:
            job, index, text = self.texts[row]
            job.mark("sampled", step_rows=len(tokens), work_sampled=self.work)
            piece = "" if tok == self.eos_id else text.decoder.push([tok])
            final = row.done
            if final:
                piece += text.decoder.flush()
            out, hit = text.push(piece, final)
            finish = "stop" if hit else row.finish_reason
            if hit and not row.done:
                self.engine.cancel(row)
            done = hit or final
            if out or done:
                events.setdefault(job, []).append(
                    Event(index, out, finish if done else None, len(row.tokens))
                )
            if done:
                del self.texts[row]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, list[Event]]]] = {}
        for job, evs in events.items():
            if any(ev.text for ev in evs):
                job.mark("handoff")
            by_loop.setdefault(job.loop, []).append((job, evs))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_deliver, batch)

    def _fail_all(self, error: Exception) -> None:
        jobs = {job for job, _, _ in self.texts.values()}
        for row in list(self.texts):
            self.engine.cancel(row)
        self.texts.clear()
        self.prefilling.clear()
        for job in jobs:
            job.send(error)
