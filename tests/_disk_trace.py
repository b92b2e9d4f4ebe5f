"""Record the calls that make files durable (fsync, rename) in the order a process makes them.

Crash safety is a matter of order: a file's data must reach the disk before the rename that makes
it visible, and the directory entry after it. These calls leave no trace in the files themselves,
so the tests watch them: `DiskTrace` wraps `os.fsync`, `os.replace`, `os.rename`, `os.unlink` and
`os.rmdir` (which the file APIs of the standard library go through: pathlib, shutil) and records
each call with resolved paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def _real(path: Any) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


class DiskTrace:
    """events: ("fsync", path), ("rename", src, dst) and ("remove", path), in call order
    (successful calls only)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[Any, ...]] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename
        real_unlink, real_rmdir = os.unlink, os.rmdir

        def fsync(fd: Any) -> None:
            fd = fd if isinstance(fd, int) else fd.fileno()
            path = _real(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)
            self.events.append(("fsync", path))

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            real_replace(src, dst, **kw)
            self.events.append(("rename", _real(src), _real(dst)))

        def rename(src: Any, dst: Any, **kw: Any) -> None:
            real_rename(src, dst, **kw)
            self.events.append(("rename", _real(src), _real(dst)))

        def removal(real: Any) -> Any:
            def remove(path: Any, *, dir_fd: int | None = None) -> None:
                where = path if dir_fd is None else f"/proc/self/fd/{dir_fd}/{os.fsdecode(path)}"
                resolved = _real(where)
                real(path, dir_fd=dir_fd)
                self.events.append(("remove", resolved))

            return remove

        monkeypatch.setattr(os, "unlink", removal(real_unlink))
        monkeypatch.setattr(os, "remove", removal(real_unlink))
        monkeypatch.setattr(os, "rmdir", removal(real_rmdir))
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    def renames_to(self, dst: Path) -> list[int]:
        """Indices of the renames whose destination is `dst`."""
        dst = _real(dst)
        return [i for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == dst]

    def rename_to(self, dst: Path) -> tuple[int, Path]:
        """(index, source) of the one rename onto `dst`; fails when there is none or several."""
        found = self.renames_to(dst)
        assert len(found) == 1, f"expected one rename onto {dst}, got {len(found)}: {self.events}"
        return found[0], self.events[found[0]][1]

    def removals(self) -> list[int]:
        return [i for i, e in enumerate(self.events) if e[0] == "remove"]

    def fsyncs_of(self, path: Path) -> list[int]:
        path = _real(path)
        return [i for i, e in enumerate(self.events) if e[0] == "fsync" and e[1] == path]

    def fsynced_between(self, path: Path, start: int, end: int) -> bool:
        """Whether `path` was fsynced after event `start` (exclusive; -1: from the beginning)
        and before event `end` (exclusive; None: until now)."""
        stop = len(self.events) if end is None else end
        return any(start < i < stop for i in self.fsyncs_of(path))
