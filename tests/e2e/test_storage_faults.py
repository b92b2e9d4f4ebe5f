"""Writes the machine refuses, at every place Craft writes: checkpoints, exports (Craft and Hugging
Face), metrics.jsonl, train.log, the start of a run, dataset preparation and tokenizer files.

Each fault is injected where the bytes are written (the write function or the library call raises
the OSError or safetensors error a full disk / a permission gives), in the real command run
in-process. Every case ends with one `error:` line naming the errno's meaning and what was being
written, exit code 2, no traceback, no temporary leftovers, and the previous good state intact.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors import SafetensorError

from craft.fileio import STORAGE_ERRNOS
from craft.training import checkpoint as ckpt
from craft.training.run import train
from tests.training._helpers import MICRO, TINY, tiny_config

pytestmark = pytest.mark.slow

CODES = [errno.ENOSPC, errno.EACCES]


def _refusal(code: int, *, rust: bool = False, filename: str = "x") -> Exception:
    """What a write raises when the machine refuses it: an OSError, or safetensors' own error
    (it writes from Rust and reports the errno in its message)."""
    if rust:
        return SafetensorError(
            f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})"
        )
    return OSError(code, os.strerror(code), filename)


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_line_error(capsys: pytest.CaptureFixture[str], exc: pytest.ExceptionInfo) -> str:
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and "Logging error" not in err, err
    return lines[0].removeprefix("error: ")


def _craft(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """`craft ARGS` in this process (so the fault injected here applies)."""
    from craft.cli.main import main

    monkeypatch.delenv("CRAFT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["craft", *map(str, args)])
    main()


def _train_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *overrides: str) -> None:
    from craft.train import main

    monkeypatch.delenv("CRAFT_DEBUG", raising=False)
    main([str(MICRO), *TINY, f"run.output_dir={tmp_path / 'outputs'}", *overrides])


def _fail_on_call(n: int, real: Callable[..., Any], exc: Exception) -> Callable[..., Any]:
    """`real`, except that call number `n` (1-based) and later ones raise `exc`."""
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] >= n:
            raise exc
        return real(*args, **kwargs)

    return wrapper


def _run_dir(tmp_path: Path) -> Path:
    (run_dir,) = (tmp_path / "outputs" / "micro").iterdir()
    return run_dir


STEPS = ["training.max_steps=6", "checkpoint.interval=2", "eval.interval=2"]


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("code", CODES, ids=errno.errorcode.get)
def test_checkpoint_write_refused_names_the_newest_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: int
) -> None:
    # A full disk fails inside safetensors (the weights, first file); a permission fails on a later
    # file (the RNG states), so the staging directory holds partial files when it happens.
    if code == errno.ENOSPC:
        target, rust = "save_model_weights", True
    else:
        target, rust = "save_tensors", False
    real = getattr(ckpt, target)
    monkeypatch.setattr(ckpt, target, _fail_on_call(2, real, _refusal(code, rust=rust)))
    # The loss curve, drawn as the run stops, fails on the same full disk: the checkpoint's error
    # is still the one reported.
    from craft.training import builtin_callbacks

    monkeypatch.setattr(
        builtin_callbacks, "atomic_write_bytes", _fail_on_call(1, None, _refusal(code))
    )
    with pytest.raises(SystemExit) as exc:
        _train_cli(monkeypatch, tmp_path, *STEPS, "logging.plot=true")
    line = _one_line_error(capsys, exc)
    run_dir = _run_dir(tmp_path)
    root = run_dir / "checkpoints"
    assert line == (
        f"{STORAGE_ERRNOS[code]} while writing checkpoint 4 in {root}; "
        "step_00000002 is the newest complete checkpoint"
    )
    # The staging directory is gone; the earlier checkpoint and its pointer are intact.
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert ckpt.checkpoint_problem(root / "step_00000002") is None
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert not (run_dir / "model").exists() and not (run_dir / ".lock").exists()
    # The run continues from it.
    monkeypatch.undo()
    more = train(tiny_config(tmp_path, *STEPS), resume="auto")
    assert more.run_dir == run_dir and more.step == 6


# ------------------------------------------------------------------------------ the start of a run


def _flush_refused(code: int) -> Callable[[Any], None]:
    def flush(self: Any) -> None:
        raise _refusal(code, filename=self.baseFilename)

    return flush


@pytest.mark.parametrize("site", ["train.log full", "train.log denied", "config.toml read-only"])
def test_a_run_that_cannot_write_its_directory_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], site: str
) -> None:
    from craft.training import logs, rundir

    if site == "train.log full":  # disk already full: every log record fails to reach the file
        monkeypatch.setattr(logs._FileHandler, "flush", _flush_refused(errno.ENOSPC))
        expected = ["no space left on device while writing", "train.log"]
    elif site == "train.log denied":  # a directory this user may not write
        monkeypatch.setattr(
            logs._FileHandler, "_open", lambda self: (_ for _ in ()).throw(
                _refusal(errno.EACCES, filename=self.baseFilename)
            )
        )  # fmt: skip
        expected = ["permission denied while starting the run in", "train.log"]
    else:
        monkeypatch.setattr(
            rundir, "atomic_write_text",
            _fail_on_call(1, rundir.atomic_write_text, _refusal(errno.EROFS, filename="cfg")),
        )  # fmt: skip
        expected = ["read-only file system while starting the run in"]
    with pytest.raises(SystemExit) as exc:
        _train_cli(monkeypatch, tmp_path, "training.max_steps=2")
    line = _one_line_error(capsys, exc)
    assert all(part in line for part in expected), line
    assert not (tmp_path / "outputs").exists()  # the failed start left nothing behind


def test_resume_in_a_run_directory_that_is_not_writable_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from craft import fileio

    run_dir = train(tiny_config(tmp_path, "training.max_steps=2", "checkpoint.interval=2")).run_dir
    before = _snapshot(run_dir)
    real_open = fileio.os.open

    def denied(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path).parent == run_dir:  # the directory (not what is already in it) is read-only
            raise OSError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "open", denied)
    with pytest.raises(SystemExit) as exc:
        _train_cli(monkeypatch, tmp_path, "training.max_steps=4", "--resume", "auto")
    line = _one_line_error(capsys, exc)
    assert line.startswith(f"run directory {run_dir}: cannot create the lock file"), line
    assert line.endswith("(Permission denied)")
    assert _snapshot(run_dir) == before


# ------------------------------------------------------------------------------ during training


@pytest.mark.parametrize("code", CODES, ids=errno.errorcode.get)
@pytest.mark.parametrize("site", ["metrics.jsonl", "train.log"])
def test_a_log_or_metrics_write_refused_during_training_stops_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    site: str,
    code: int,
) -> None:
    from craft.training import builtin_callbacks, logs

    failing = [False]
    if site == "metrics.jsonl":

        class Full:
            """A file on a disk that fills up at step 3: the record stays in the buffer, and
            every flush from then on fails (closing too)."""

            def __init__(self, f: Any) -> None:
                self.f, self.name, self.full = f, f.name, False

            def write(self, text: str) -> int:
                self.full = self.full or '"step": 3,' in text
                return 0 if self.full else self.f.write(text)

            def flush(self) -> None:
                if self.full:
                    raise _refusal(code)
                self.f.flush()

            def close(self) -> None:
                self.f.close()
                self.flush()

        monkeypatch.setattr(
            builtin_callbacks,
            "open",
            lambda *a, **k: Full(open(*a, **k)),  # noqa: SIM115
            raising=False,
        )
    else:
        real_emit, real_flush = logs._FileHandler.emit, logs._FileHandler.flush

        def emit(self: Any, record: Any) -> None:
            failing[0] = failing[0] or record.getMessage().startswith("step 3/")
            real_emit(self, record)

        def flush(self: Any) -> None:
            if failing[0]:
                raise _refusal(code)
            real_flush(self)

        monkeypatch.setattr(logs._FileHandler, "emit", emit)
        monkeypatch.setattr(logs._FileHandler, "flush", flush)
    with pytest.raises(SystemExit) as exc:
        _train_cli(monkeypatch, tmp_path, *STEPS)
    line = _one_line_error(capsys, exc)
    run_dir = _run_dir(tmp_path)
    assert line == f"{STORAGE_ERRNOS[code]} while writing {run_dir / site}"
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert ckpt.checkpoint_problem(root / "step_00000002") is None
    steps = [ln for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in ln]
    assert len(steps) == (2 if site == "metrics.jsonl" else 3)  # every record before the fault


# ------------------------------------------------------------------------------ exports


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("storage_faults")
    return train(tiny_config(base, "training.max_steps=2", "checkpoint.interval=2")).run_dir


@pytest.mark.parametrize("code", CODES, ids=errno.errorcode.get)
@pytest.mark.parametrize("fmt", ["craft", "hf"])
def test_export_refused_keeps_the_previous_export(
    trained_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
    code: int,
) -> None:
    import safetensors.torch

    out = tmp_path / "export"
    _craft_ok(monkeypatch, "export", trained_run, "--output", out, "--format", fmt)
    capsys.readouterr()
    before = _snapshot(out)
    if fmt == "craft":  # copies the checkpoint's files: fail on the second one
        monkeypatch.setattr(
            ckpt.shutil, "copyfile", _fail_on_call(2, ckpt.shutil.copyfile, _refusal(code))
        )
    else:  # converts, then writes the weights through safetensors
        monkeypatch.setattr(
            safetensors.torch, "save_file", _fail_on_call(1, None, _refusal(code, rust=True))
        )
    with pytest.raises(SystemExit) as exc:
        _craft(monkeypatch, "export", trained_run, "--output", out, "--format", fmt, "--force")
    line = _one_line_error(capsys, exc)
    assert line == f"{STORAGE_ERRNOS[code]} while exporting to {out}"
    assert _snapshot(out) == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging leftovers


def _craft_ok(monkeypatch: pytest.MonkeyPatch, *args: Any) -> None:
    try:
        _craft(monkeypatch, *args)
    except SystemExit as e:
        assert e.code in (0, None)


# ------------------------------------------------------------------------------ data and tokenizers


@pytest.mark.parametrize("code", CODES, ids=errno.errorcode.get)
@pytest.mark.parametrize("command", ["data prepare", "tokenizer train"])
def test_dataset_and_tokenizer_writes_refused_keep_the_previous_output(
    shakespeare: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    code: int,
) -> None:
    import craft.data.prepare as prepare
    from craft.data.tokenizers import base

    text = tmp_path / "in" / "text.txt"
    text.parent.mkdir()
    text.write_bytes(shakespeare.read_bytes()[:50_000])
    out = tmp_path / "out"
    if command == "data prepare":  # the token files are split last, after the tokenizer's
        args = ["data", "prepare", "-i", text, "-o", out, "-t", "char", "--workers", "1", "-q"]
        module, name, doing = prepare, "_split_file", f"preparing {out}"
    else:  # the tokenizer's own files
        args = ["tokenizer", "train", "-i", text, "-o", out, "--vocab-size", "400", "-q"]
        module, name, doing = base, "atomic_write_json", f"writing the tokenizer to {out}"
    _craft_ok(monkeypatch, *args)
    before = _snapshot(out)
    monkeypatch.setattr(module, name, _fail_on_call(1, None, _refusal(code)))
    with pytest.raises(SystemExit) as exc:
        _craft(monkeypatch, *args, "--force")
    assert _one_line_error(capsys, exc) == f"{STORAGE_ERRNOS[code]} while {doing}"
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temp dir, no lock


# ------------------------------------------------------------------------------ error reporting


def test_storage_errors_are_recognised_and_nothing_else() -> None:
    from craft.fileio import storage_error

    err = storage_error(_refusal(errno.ENOSPC, filename="/d/f"), "writing f")
    assert err is not None and err.message == "no space left on device while writing f (/d/f)"
    err = storage_error(_refusal(errno.EDQUOT, rust=True), "writing w", name_file=False)
    assert err is not None and err.message == "disk quota exceeded while writing w"
    assert storage_error(_refusal(errno.EROFS)).message == "read-only file system (x)"
    assert storage_error(FileNotFoundError(errno.ENOENT, "gone", "f")) is None  # not the machine
    assert storage_error(SafetensorError("invalid header")) is None
    assert storage_error(ValueError("No space left on device (os error 28)")) is None


def test_atomic_write_refused_names_the_target_and_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from craft import fileio

    target = tmp_path / "f.json"
    target.write_text("old")
    monkeypatch.setattr(fileio.os, "fsync", _fail_on_call(1, None, OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError) as exc:
        fileio.atomic_write_text(target, "new")
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_refused_write_anywhere_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from craft.cli.errors import run_guarded

    monkeypatch.delenv("CRAFT_DEBUG", raising=False)

    def deep() -> None:
        raise _refusal(errno.EACCES, filename="/somewhere/file")

    with pytest.raises(SystemExit) as exc:
        run_guarded(deep)
    assert _one_line_error(capsys, exc) == "permission denied (/somewhere/file)"
