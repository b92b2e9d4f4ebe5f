"""The model in a process of its own, so the event loop and the decoding never share a GIL.

In one process, the event loop (reading requests, writing stream chunks) and the decoding thread
take turns on Python's global interpreter lock. Every op of a forward pass gives the lock up and
must win it back, so while the event loop is busy, each forward runs much longer. Measured on a
2-core CPU, a char_small decode step took 6.0 ms alone, 9.1 ms next to a thread running Python
30 % of the time, and 6.5 ms next to a process doing the same.

So `craft serve` runs the `BatchWorker` in an engine process (`multiprocessing`, spawned). The
server process keeps HTTP, validation and tokenization. The two exchange JSON messages over a
pipe (nothing is pickled after the start):

    server -> engine   {"op": "submit", "id", "prompts", "n", "sampling", "max_tokens", "seed",
                        "stops", "trace"} | {"op": "cancel", "id"} | {"op": "stop"}
    engine -> server   {"op": "ready", "device", "threads", "block"}
                       | {"op": "failed", "message", "error"?}
                       | {"op": "events", "jobs": [[id, events | null, error, marks?], ...],
                          "active", "work"} | {"op": "load", "active", "work"}

An engine message carries the events of every job of one decoding step. The server's reader
thread turns them into `Event`s and hands them to each job's event loop in one call. The engine
process exits when the server stops it, or when the pipe closes because the server died; it
ignores SIGINT and SIGTERM, which reach the server too when sent to the process group.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import signal
import threading
from typing import Any

from craft import errors
from craft.errors import ConfigError, CraftError
from craft.serving.worker import Event, Job, _deliver

log = logging.getLogger("craft.serving")


class EngineError(RuntimeError):
    """Decoding failed in the engine process (or the process is gone)."""


# ---------------------------------------------------------------------------- engine process


class _Link:
    """The engine side of the pipe; stands in for the jobs' event loop (`call_soon_threadsafe`)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.jobs: dict[int, Job] = {}  # the jobs in flight, by the server's id
        self.ids: dict[Job, int] = {}
        self.left: dict[int, int] = {}  # choices of each job not finished yet
        self.marked: set[int] = set()
        self.worker: Any = None

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode()
        with self.lock:
            self.conn.send_bytes(data)

    def load(self) -> None:
        w = self.worker
        self.send({"op": "load", "active": w.engine.active, "work": w.work})

    def call_soon_threadsafe(self, fn: Any, batch: list[tuple[Job, Any]]) -> None:
        """A step's events (`worker._deliver`): sent as one message."""
        if fn is not _deliver:
            raise TypeError(f"the engine link carries job events only, not {fn!r}")
        entries = []
        for job, item in batch:
            jid = self.ids.get(job)
            if jid is None:
                continue
            if isinstance(item, BaseException):
                entry: list[Any] = [jid, None, f"{type(item).__name__}: {item}"]
                self.left[jid] = 0
            else:
                evs = [[e.index, e.text, e.finish, e.completion_tokens] for e in item]
                entry = [jid, evs, None]
                self.left[jid] -= sum(e.finish is not None for e in item)
            if job.marks is not None and jid not in self.marked:
                entry.append(dict(job.marks))
                self.marked.add(jid)
            if self.left[jid] <= 0:
                self.forget(job)
            entries.append(entry)
        w = self.worker
        self.send({"op": "events", "jobs": entries, "active": w.engine.active, "work": w.work})

    def track(self, jid: int, job: Job) -> None:
        self.jobs[jid], self.ids[job], self.left[jid] = job, jid, job.size

    def forget(self, job: Job) -> None:
        jid = self.ids.pop(job, None)
        if jid is not None:
            self.jobs.pop(jid, None)
            self.left.pop(jid, None)
            self.marked.discard(jid)


def engine_main(conn: Any, spec: dict[str, Any]) -> None:
    """The engine process: load the model, run a `BatchWorker`, serve the pipe until told to stop."""
    # Ctrl-C, or a SIGTERM sent to the whole process group (a service manager, `timeout`),
    # reaches the server too, which stops us; were we to die first, the server would report
    # requests failing during an orderly shutdown
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    link = _Link(conn)
    try:
        from craft.generation import resolve_device, resolve_dtype
        from craft.sampling import SamplingParams
        from craft.serving.server import model_threads
        from craft.serving.trace import Marks
        from craft.serving.worker import BatchWorker
        from craft.training.checkpoint import load_model

        device = resolve_device(spec["device"])
        dtype = resolve_dtype(spec["dtype"])
        model, tokenizer, _ = load_model(spec["checkpoint"], device=device, dtype=dtype)
        worker = BatchWorker(
            model,
            tokenizer,
            max_batch_size=spec["max_batch_size"],
            max_queue=spec["max_queue"],
            threads=model_threads(device.type, spec["threads"]),
        )
    except CraftError as e:  # e.g. weights the server's header check could not see (NaN)
        link.send({"op": "failed", "message": str(e), "error": type(e).__name__})
        return
    except Exception as e:
        link.send({"op": "failed", "message": f"{type(e).__name__}: {e}"})
        return
    link.worker = worker
    worker.on_load = link.load
    worker.start()
    block = getattr(model, "block_size", None)
    link.send(
        {"op": "ready", "device": worker.device.type, "threads": worker.threads, "block": block}
    )
    try:
        while True:
            try:
                msg = json.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the server is gone
                break
            op = msg["op"]
            if op == "submit":
                s = msg["sampling"]
                job = Job(
                    prompts=msg["prompts"],
                    n=msg["n"],
                    sampling=SamplingParams(s["temperature"], s["top_k"], s["top_p"]),
                    max_tokens=msg["max_tokens"],
                    seed=msg["seed"],
                    stops=msg["stops"],
                    loop=link,  # type: ignore[arg-type]
                )
                if msg["trace"]:
                    job.marks = Marks()
                link.track(msg["id"], job)
                if not worker.submit(job):
                    link.call_soon_threadsafe(_deliver, [(job, EngineError("request queue full"))])
            elif op == "cancel":
                job = link.jobs.get(msg["id"])
                if job is not None:
                    worker.cancel(job)
                    link.forget(job)
            elif op == "stop":
                break
    finally:
        worker.stop()


# ----------------------------------------------------------------------------- server process


class EngineProcess:
    """The server's handle on the engine process: `submit`/`cancel` jobs as with a `BatchWorker`.

    The queue bound is kept here: a job counts as queued from its submission until its first
    events arrive.
    """

    def __init__(
        self,
        checkpoint: str,
        *,
        device: str,
        dtype: str,
        threads: int | None,  # as asked for (None: `model_threads` decides in the engine)
        max_batch_size: int,
        max_queue: int,
    ) -> None:
        self.spec = {
            "checkpoint": checkpoint,
            "device": device,
            "dtype": dtype,
            "threads": threads,
            "max_batch_size": max_batch_size,
            "max_queue": max_queue,
        }
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.threads = threads
        self.device_type = device
        self.work = 0  # tokens through the model so far, as last reported (traces use it)
        self.active = 0
        self.jobs: dict[int, Job] = {}
        self.ids: dict[Job, int] = {}
        self.left: dict[int, int] = {}
        self.queued: set[int] = set()
        self.lock = threading.Lock()
        self.next_id = itertools.count()
        self.dead: str | None = None  # why the engine process is gone
        self.ready = False  # the model is loaded and the reader runs
        self.block_size: int | None = None  # the model's window (None: any length), once ready
        self.stopping = False
        self.proc: Any = None
        self.conn: Any = None
        self.reader: threading.Thread | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 600.0) -> None:
        """Spawn the engine process; returns once its model is loaded and warmed up."""
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the engine process, which imports torch and loads the model meanwhile."""
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=engine_main, args=(child, self.spec), name="craft-engine", daemon=True
        )
        self.proc.start()
        child.close()

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Wait for the spawned engine process's model; its load error is raised here."""
        msg = self._first_message(timeout)
        if msg["op"] != "ready":
            self.proc.join(10)
            kind = getattr(errors, str(msg.get("error")), None)
            if isinstance(kind, type) and issubclass(kind, CraftError):
                raise kind(msg["message"])  # as the same load would fail in one process
            raise ConfigError(f"the engine process failed to start: {msg['message']}")
        self.device_type, self.threads = msg["device"], msg["threads"]
        self.block_size = msg["block"]
        self.reader = threading.Thread(target=self._read, name="craft-engine-reader", daemon=True)
        self.reader.start()
        self.ready = True

    def _first_message(self, timeout: float) -> dict[str, Any]:
        waited = 0.0
        while not self.conn.poll(0.5):
            waited += 0.5
            if not self.proc.is_alive():
                return {"op": "failed", "message": f"it exited (code {self.proc.exitcode})"}
            if waited >= timeout:
                self.proc.terminate()
                return {"op": "failed", "message": f"no answer within {timeout:.0f} s"}
        try:
            return json.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            self.proc.join(10)
            return {"op": "failed", "message": f"it exited (code {self.proc.exitcode})"}

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and not self.ready:  # still loading: it reads no messages
            self.proc.terminate()
        with contextlib.suppress(OSError, ValueError):  # the engine process is gone already
            self._send({"op": "stop"})
        if self.proc is not None:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
        if self.reader is not None:
            self.reader.join(5)

    # ---------------------------------------------------------------------- event-loop side

    def _send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode()
        with self.lock:
            self.conn.send_bytes(data)

    def submit(self, job: Job) -> bool:
        """Send a job to the engine; False when the queue is full or the engine is gone (503)."""
        with self.lock:
            if self.dead or self.stopping or len(self.queued) >= self.max_queue:
                return False
            jid = next(self.next_id)
            self.jobs[jid], self.ids[job], self.left[jid] = job, jid, job.size
            self.queued.add(jid)
        s = job.sampling
        msg = {
            "op": "submit",
            "id": jid,
            "prompts": job.prompts,
            "n": job.n,
            "sampling": {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p},
            "max_tokens": job.max_tokens,
            "seed": job.seed,
            "stops": job.stops,
            "trace": job.marks is not None,
        }
        try:
            self._send(msg)
        except (OSError, ValueError):
            self._forget(jid)
            return False
        return True

    def cancel(self, job: Job) -> None:
        """The client went away: the engine drops the job before its next step."""
        job.cancelled = True
        jid = self.ids.get(job)
        if jid is None:
            return
        self._forget(jid)
        with contextlib.suppress(OSError, ValueError):  # gone: nothing left to cancel
            self._send({"op": "cancel", "id": jid})

    def _forget(self, jid: int) -> None:
        with self.lock:
            job = self.jobs.pop(jid, None)
            if job is not None:
                self.ids.pop(job, None)
            self.left.pop(jid, None)
            self.queued.discard(jid)

    @property
    def load(self) -> dict[str, int]:
        return {"active_rows": self.active, "queued_requests": len(self.queued)}

    # ---------------------------------------------------------------------------- reader side

    def _read(self) -> None:
        while True:
            try:
                msg = json.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            self.active, self.work = msg.get("active", self.active), msg.get("work", self.work)
            if msg["op"] == "events":
                self._dispatch(msg["jobs"])
        code = None
        if self.proc is not None:
            self.proc.join(10)  # the pipe closed as it exited: reap it for its exit code
            code = self.proc.exitcode
        self.dead = "stopped" if self.stopping else f"the engine process exited (code {code})"
        if not self.stopping:
            log.error("%s; requests in flight fail", self.dead)
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.loop.call_soon_threadsafe(_deliver, [(job, EngineError(self.dead))])
        self.active = 0
        for jid in list(self.jobs):
            self._forget(jid)

    def _dispatch(self, entries: list[list[Any]]) -> None:
        by_loop: dict[Any, list[tuple[Job, Any]]] = {}
        for entry in entries:
            jid, evs, error = entry[0], entry[1], entry[2]
            job = self.jobs.get(jid)
            if job is None:  # cancelled meanwhile
                continue
            self.queued.discard(jid)
            if len(entry) > 3 and job.marks is not None:
                for k, v in entry[3].items():
                    job.marks.setdefault(k, v)
            if evs is None:
                item: Any = EngineError(error)
                self._forget(jid)
            else:
                item = [Event(*e) for e in evs]
                self.left[jid] -= sum(e[2] is not None for e in evs)
                if self.left[jid] <= 0:
                    self._forget(jid)
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_deliver, batch)


__all__ = ["EngineError", "EngineProcess", "engine_main"]
