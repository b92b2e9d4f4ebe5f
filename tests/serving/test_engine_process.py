"""The engine process: decoding in a process of its own, and what happens when either side dies."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from craft.errors import CheckpointError
from craft.generation import generate
from craft.sampling import SamplingParams
from craft.serving.engine_process import EngineError, EngineProcess
from craft.serving.worker import Job
from craft.training.checkpoint import load_model
from tests.security._helpers import fix_complete
from tests.serving.test_server import Server, write_tiny_export


class Loop:
    """Stands in for a job's event loop: keeps what the engine hands over."""

    def __init__(self) -> None:
        self.items: list[tuple[Job, Any]] = []
        self.lock = threading.Lock()

    def call_soon_threadsafe(self, fn: Any, batch: list[tuple[Job, Any]]) -> None:
        with self.lock:
            self.items.extend(batch)

    def of(self, job: Job) -> list[Any]:
        with self.lock:
            return [item for j, item in self.items if j is job]

    def wait(self, job: Job, done: Any, timeout: float = 120.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while not done(self.of(job)):
            assert time.monotonic() < deadline, f"no progress: {self.of(job)[-3:]}"
            time.sleep(0.01)
        return self.of(job)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_export(tmp_path_factory.mktemp("engine") / "export")


def _job(tok: Any, prompt: str, max_tokens: int, seed: int, loop: Loop) -> Job:
    return Job([tok.encode(prompt)], 1, SamplingParams(1.0), max_tokens, seed, [], loop)  # type: ignore[arg-type]


def _finished(items: list[Any]) -> bool:
    return any(isinstance(i, BaseException) or any(e.finish for e in i) for i in items)


def test_engine_process_decodes_as_craft_generate_and_fails_jobs_when_it_dies(export: Path) -> None:
    model, tok, _ = load_model(export)
    engine = EngineProcess(
        str(export), device="cpu", dtype="float32", threads=1, max_batch_size=4, max_queue=2
    )
    engine.start()
    loop = Loop()
    try:
        job = _job(tok, "the ", 12, 3, loop)
        assert engine.submit(job)
        items = loop.wait(job, _finished)
        text = "".join(e.text for i in items for e in i)
        assert text == generate(model, tok, "the ", max_new_tokens=12, temperature=1.0, seed=3)[0]
        assert engine.load == {"active_rows": 0, "queued_requests": 0}
        busy = _job(tok, "fox ", 1_000_000, 1, loop)  # runs until the engine dies
        assert engine.submit(busy)
        loop.wait(busy, lambda items: len(items) >= 2)
        os.kill(engine.proc.pid, signal.SIGKILL)
        items = loop.wait(busy, _finished)
        assert isinstance(items[-1], EngineError) and "exited (code -9)" in str(items[-1])
        assert engine.dead is not None
        assert not engine.submit(_job(tok, "the ", 2, 1, loop))  # the server answers 503
    finally:
        engine.stop()


def _fresh(path: Path) -> Path:
    path.mkdir()
    return path


def _children(pid: int) -> list[int]:
    """The engine processes started by process `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            with contextlib.suppress(OSError):  # the engine, not multiprocessing's tracker
                if b"spawn_main" in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
    return out


def _gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc for the engine process")
def test_engine_process_ends_with_the_server_and_a_dead_engine_is_a_503(tmp_path: Path) -> None:
    server = Server(_fresh(tmp_path / "a"))
    try:
        (child,) = _children(server.proc.pid)
        os.kill(child, signal.SIGKILL)
        assert _gone(child)
        time.sleep(0.5)
        status, err = server.http("POST", "/v1/completions", {"model": "tiny", "prompt": "a"})
        assert status == 503 and err["error"]["code"] == "engine_unavailable"
        assert "exited" in err["error"]["message"]
    finally:
        server.close()
    # the server killed outright: its engine process notices the closed pipe and exits
    server = Server(_fresh(tmp_path / "b"))
    (child,) = _children(server.proc.pid)
    server.proc.kill()
    server.proc.wait()
    assert _gone(child)
    # Ctrl-C reaches the whole process group: the server stops its engine, no traceback
    server = Server(_fresh(tmp_path / "c"))
    (child,) = _children(server.proc.pid)
    os.kill(server.proc.pid, signal.SIGINT)
    os.kill(child, signal.SIGINT)
    try:
        assert server.proc.wait(timeout=30) == 130  # interrupted, as without an engine process
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise
    assert _gone(child)
    assert "Traceback" not in server.proc.stderr.read()
    # so does a SIGTERM to the group (a service manager): an orderly stop, no failure reported
    server = Server(_fresh(tmp_path / "d"))
    (child,) = _children(server.proc.pid)
    os.kill(child, signal.SIGTERM)
    os.kill(server.proc.pid, signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise
    assert _gone(child)
    err = server.proc.stderr.read()
    assert code == 143 and "engine process exited" not in err and "Traceback" not in err, err


def _serve_once(checkpoint: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`craft serve` of `checkpoint` on a free port, expected to stop on its own."""
    env = {**os.environ, "CRAFT_DEBUG": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "craft", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.parametrize("fault", ["nan", "renamed", "truncated"])
def test_a_bad_checkpoint_stops_serve_with_one_line(export: Path, tmp_path: Path, fault) -> None:
    """The server process checks the checkpoint from its headers; what only loading sees (NaN
    weights, a tensor under another name) comes back from the engine process as the same
    one-line error `load_model` gives."""
    bad = Path(shutil.copytree(export, tmp_path / "bad"))
    weights = bad / "model.safetensors"
    if fault != "truncated":
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata()
        state = load_file(str(weights))
        if fault == "nan":
            state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        else:
            state = {k.replace("ln_f", "ln_x"): v for k, v in state.items()}
        save_file(state, str(weights), meta)
    else:
        weights.write_bytes(weights.read_bytes()[:-64])
    fix_complete(bad)
    with pytest.raises(CheckpointError) as expected:
        load_model(bad)
    res = _serve_once(bad)
    assert res.returncode == 2 and res.stdout == "", (res.stdout, res.stderr)
    assert res.stderr.strip().splitlines() == [f"error: {expected.value}"]


def test_an_absent_cuda_stops_serve_with_one_line(export: Path) -> None:
    """The device is resolved in the engine process; its error still comes back as one line,
    exit code 2."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = _serve_once(export, "--device", "cuda")
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: device = 'cuda': CUDA is not available on this machine"
    ]
