"""Durable, atomic file writes: the order of fsync and rename, and what a failed write leaves."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from craft import fileio
from tests._disk_trace import DiskTrace

WRITERS: dict[str, tuple[Callable[[Path], None], bytes]] = {
    "bytes": (lambda p: fileio.atomic_write_bytes(p, b"new \x00 bytes"), b"new \x00 bytes"),
    "text": (lambda p: fileio.atomic_write_text(p, "new ☃ text\n"), "new ☃ text\n".encode()),
    "json": (
        lambda p: fileio.atomic_write_json(p, {"b": [1, 2], "a": "☃"}),
        '{\n  "a": "☃",\n  "b": [\n    1,\n    2\n  ]\n}\n'.encode(),
    ),
}


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> DiskTrace:
    return DiskTrace(monkeypatch)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_atomic_write_syncs_the_data_before_the_rename_and_the_directory_after(
    tmp_path: Path, trace: DiskTrace, kind: str
) -> None:
    write, expected = WRITERS[kind]
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write(target)
    assert target.read_bytes() == expected  # JSON: sorted keys, indented, UTF-8, final newline
    i, source = trace.rename_to(target)
    assert source != target.resolve() and source.parent == target.parent.resolve()
    assert trace.fsynced_between(source, -1, i), "the new content is not on disk before the rename"
    assert trace.fsynced_between(tmp_path, i, None), "the rename is not made durable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary left


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_write_that_fails_leaves_the_old_file_whole_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    write, _ = WRITERS[kind]
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def no_space(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    monkeypatch.setattr(os, "rename", no_space)
    with pytest.raises(OSError, match="No space left"):
        write(target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_new_file_appears_only_complete(tmp_path: Path, trace: DiskTrace) -> None:
    target = tmp_path / "new.txt"
    fileio.atomic_write_text(target, "x" * 100_000)
    i, source = trace.rename_to(target)
    assert trace.fsynced_between(source, -1, i) and trace.fsynced_between(tmp_path, i, None)
    assert target.read_text() == "x" * 100_000


def test_write_text_durable_syncs_the_file(tmp_path: Path, trace: DiskTrace) -> None:
    path = tmp_path / "config.toml"
    fileio.write_text_durable(path, "a = 'é'\n")
    assert path.read_bytes() == "a = 'é'\n".encode()
    assert trace.fsyncs_of(path)


def test_fsync_helpers_sync_what_they_name(tmp_path: Path, trace: DiskTrace) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"123")
    fileio.fsync_file(f)
    fileio.fsync_dir(tmp_path)
    assert trace.fsyncs_of(f) == [0] and trace.fsyncs_of(tmp_path) == [1]
    fileio.fsync_dir(tmp_path / "missing")  # nothing to sync: no error
    assert len(trace.events) == 2


def test_sha256_file_reads_every_block(tmp_path: Path) -> None:
    data = os.urandom(2 * fileio.HASH_BLOCK + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert fileio.sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert fileio.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_short_hash_is_a_prefix_of_the_canonical_json_hash() -> None:
    a = {"tokenizer": {"type": "char", "unk": False}, "val_fraction": 0.1, "name": "é"}
    b = {"name": "é", "val_fraction": 0.1, "tokenizer": {"unk": False, "type": "char"}}
    assert fileio.short_hash(a) == fileio.short_hash(b)  # key order does not matter
    canonical = json.dumps(a, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    full = hashlib.sha256(canonical.encode()).hexdigest()
    assert fileio.short_hash(a) == full[:10] and fileio.short_hash(a, 16) == full[:16]
    assert fileio.short_hash({**a, "val_fraction": 0.2}) != fileio.short_hash(a)


def test_text_is_written_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """A machine whose locale is plain ASCII (C locale without UTF-8 mode) still gets UTF-8."""
    script = (
        "import locale, sys\n"
        "from pathlib import Path\n"
        "from craft import fileio\n"
        "assert locale.getpreferredencoding(False).lower() not in ('utf-8', 'utf8')\n"
        "d = Path(sys.argv[1])\n"
        "t = '\\u00e9\\u2603'\n"  # the script itself stays ASCII
        "fileio.write_text_durable(d / 'a.txt', t)\n"
        "fileio.atomic_write_text(d / 'b.txt', t)\n"
        "fileio.atomic_write_json(d / 'c.json', [t])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONIOENCODING="utf-8")
    ascii_dir, here = tmp_path / "ascii", tmp_path / "here"
    ascii_dir.mkdir(), here.mkdir()
    subprocess.run([sys.executable, "-c", script, str(ascii_dir)], env=env, check=True)
    fileio.write_text_durable(here / "a.txt", "é☃")  # the same files from this process
    fileio.atomic_write_text(here / "b.txt", "é☃")
    fileio.atomic_write_json(here / "c.json", ["é☃"])
    for name in ("a.txt", "b.txt", "c.json"):
        assert (ascii_dir / name).read_bytes() == (here / name).read_bytes(), name
    assert (ascii_dir / "a.txt").read_bytes() == (ascii_dir / "b.txt").read_bytes() == "é☃".encode()
    assert json.loads((ascii_dir / "c.json").read_bytes().decode("utf-8")) == ["é☃"]
