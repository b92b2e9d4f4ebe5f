"""Shared pieces of the security tests: in-process CLI runs, canary files, doctored checkpoints."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from craft.training.checkpoint import MARKER


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_craft(
    args: list[str], capsys: pytest.CaptureFixture[str], cwd: Path | None = None
) -> Result:
    """`craft ARGS` in this process (main() with its one-line errors and exit codes)."""
    from craft.cli.main import main

    capsys.readouterr()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["craft", *args]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    cap = capsys.readouterr()
    return Result(code, cap.out, cap.err)


class Canary:
    """A file outside the directory under test; `untouched()` says nobody read or changed it.

    Its access time is set well before its modification time, so any read moves it (relatime
    updates atime when it is older than mtime); `atime_works` says whether this filesystem does.
    """

    def __init__(self, path: Path, text: str = "secret canary line\n" * 40) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self._age()
        probe = path.with_name(path.name + ".probe")
        probe.write_text("x")
        old = time.time() - 3 * 86400
        os.utime(probe, (old, old + 86400))
        before = probe.stat().st_atime_ns
        probe.read_text()
        self.atime_works = probe.stat().st_atime_ns != before
        probe.unlink()
        self.stat = path.stat()

    def _age(self) -> None:
        old = time.time() - 3 * 86400
        os.utime(self.path, (old, old + 86400))

    def untouched(self) -> bool:
        st = self.path.stat()
        same = st.st_mtime_ns == self.stat.st_mtime_ns and st.st_size == self.stat.st_size
        if self.atime_works:
            same = same and st.st_atime_ns == self.stat.st_atime_ns
        return same


def tree(root: Path) -> dict[str, int]:
    """Every entry below `root` (relative path -> size, -1 for directories)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = -1 if p.is_dir() and not p.is_symlink() else p.lstat().st_size
    return out


def fix_complete(directory: Path, files: Iterable[str] | None = None) -> None:
    """Rewrite the COMPLETE marker's file sizes after editing a checkpoint, as a forger would."""
    marker = json.loads((directory / MARKER).read_text())
    names = (
        list(files)
        if files is not None
        else [
            str(p.relative_to(directory))
            for p in sorted(directory.rglob("*"))
            if (p.is_file() or p.is_symlink()) and p.name != MARKER
        ]
    )
    sizes = {}
    for rel in names:
        try:
            sizes[rel] = (directory / rel).stat().st_size
        except OSError:
            sizes[rel] = 0
    marker["files"] = sizes
    (directory / MARKER).write_text(json.dumps(marker))
