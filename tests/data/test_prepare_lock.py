"""One process at a time prepares an output directory; a crashed holder never leaves it stuck."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from craft.config.components import BytesTokenizerConfig
from craft.data.prepare import lock_path, prepare
from craft.errors import BusyError
from craft.fileio import exclusive_lock
from tests.data.test_cli import assert_user_error, craft

# A real `prepare` that holds its lock for a while: reading the first chunk waits 60 s.
_SLOW_PREPARE = """
import sys, time
import craft.data.prepare as P
from craft.config.components import BytesTokenizerConfig
real = P.iter_file_chunks
def slow(*args, **kwargs):
    print("preparing", flush=True)
    time.sleep(60)
    yield from real(*args, **kwargs)
P.iter_file_chunks = slow
P.prepare([sys.argv[1]], sys.argv[2], BytesTokenizerConfig(), workers=1, progress=False)
"""


def _start_slow_prepare(src: Path, out: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PREPARE, str(src), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the lock is held from before the input is read
    assert line.strip() == "preparing", proc.stderr.read() if proc.stderr else line
    return proc


def test_second_prepare_is_refused_naming_the_holder_and_a_killed_holder_frees_it(
    text_files: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    holder = _start_slow_prepare(text_files[0], out)
    try:
        second = craft(
            "data", "prepare", "-i", str(text_files[1]), "-o", str(out), "-t", "char", "-q"
        )
        assert_user_error(second, f"output directory {out}", f"pid {holder.pid}", "in use")
        assert not out.exists()  # the second process wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The kernel released the killed holder's lock: the next prepare owns the directory.
    third = craft("data", "prepare", "-i", str(text_files[1]), "-o", str(out), "-t", "char", "-q")
    assert third.returncode == 0, third.stderr
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["type"] == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in"]  # no lock file, no temp


def test_waiting_prepare_uses_what_the_holder_prepared(
    text_files: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "a" / "ds"
    out.parent.mkdir()
    started, results = threading.Event(), {}

    def holder() -> None:
        with exclusive_lock(lock_path(out), "test holder", remove=True):
            started.set()
            time.sleep(0.3)  # the waiting prepare blocks meanwhile
            results["holder"] = prepare(
                [text_files[0]], out, BytesTokenizerConfig(), workers=1, progress=False
            )

    t = threading.Thread(target=holder)
    t.start()
    started.wait(10)
    with pytest.raises(BusyError, match="in use by another process"):
        prepare([text_files[1]], out, BytesTokenizerConfig(), workers=1, progress=False)
    waited = prepare(
        [text_files[1]], out, BytesTokenizerConfig(), workers=1, progress=False, wait=True
    )
    t.join(10)
    assert waited == results["holder"]  # not prepared a second time
    assert waited["sources"][0]["name"] == str(text_files[0])
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]


def test_lock_is_reentrant_per_thread_and_records_the_pid(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with exclusive_lock(path, "thing"):
        assert path.read_text().split()[0] == str(os.getpid())
        with exclusive_lock(path, "thing"):  # the same thread again: no deadlock
            pass
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                with exclusive_lock(path, "thing"):
                    pass
            except BaseException as e:  # collected for the assertion below
                errors.append(e)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(10)
        assert len(errors) == 1 and isinstance(errors[0], BusyError)
        assert f"pid {os.getpid()}" in str(errors[0])
    assert path.exists()  # kept without remove=True, and free again
    with exclusive_lock(path, "thing", remove=True):
        pass
    assert not path.exists()


def test_failed_prepare_removes_the_parents_it_created(
    text_files: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "new" / "deeper" / "ds"
    with pytest.raises(Exception, match="no such file"):
        prepare([tmp_path / "missing.txt"], out, BytesTokenizerConfig(), progress=False)
    assert not (tmp_path / "new").exists()
