"""File helpers every layer shares: durable, atomic writes (never a half-written file), hashing,
and the lock that gives a directory one owner at a time."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from craft.errors import BusyError, CraftError, StorageError

HASH_BLOCK = 1 << 20


def fsync_file(path: Path) -> None:
    """Flush a file that was written by another library (e.g. safetensors) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside `path` durable (no-op where directories can't sync)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exclusive_temp_file(path: Path, tag: str = "tmp") -> tuple[int, Path]:
    """(fd, path) of a new file next to `path` with an unpredictable name, created exclusively
    (O_EXCL: a file or symlink planted under a guessable name is never followed or reused)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{tag}-", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # the mode a plain open() would give
    return fd, Path(name)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file, fsync and rename: never a half-written file."""
    path = Path(path)
    try:
        fd, tmp = exclusive_temp_file(path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:  # name the file being written, not the temporary one (or none)
        raise _naming(e, path) from None
    fsync_dir(path.parent)


def _naming(e: OSError, path: Path) -> OSError:
    """`e` as raised for `path` (a write error carries no file name, a temporary file's is gone)."""
    return OSError(e.errno, e.strerror, str(path)) if e.errno is not None else e


def write_text_durable(path: Path, text: str) -> None:
    """Write a file inside a directory that is not yet visible (no rename needed), then fsync it."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _naming(e, Path(path)) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` atomically: readers see the old content or the new, never a part."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON (sorted keys, indented, UTF-8) written atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


# Errors of the machine rather than of Craft or its input: reported in one line, never a traceback.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large",
}
_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) report errno


def storage_errno(e: BaseException) -> int | None:
    """The errno of a write the machine refused (`STORAGE_ERRNOS`), for an OSError or a
    safetensors error that wraps one; None for anything else."""
    if isinstance(e, OSError):
        return e.errno if e.errno in STORAGE_ERRNOS else None
    if type(e).__name__ == "SafetensorError":
        m = _OS_ERROR_RE.search(str(e))
        if m and int(m.group(1)) in STORAGE_ERRNOS:
            return int(m.group(1))
    return None


def storage_error(
    e: BaseException, doing: str | None = None, *, name_file: bool = True
) -> StorageError | None:
    """`StorageError("no space left on device while <doing> (<file>)")` for a write the machine
    refused (see `storage_errno`), None for any other error (which stays what it is).
    `name_file=False` leaves out the file (e.g. a temporary one that is gone)."""
    code = storage_errno(e)
    if code is None:
        return None
    where = getattr(e, "filename", None) if name_file else None
    message = STORAGE_ERRNOS[code] + (f" while {doing}" if doing else "")
    return StorageError(message + (f" ({where})" if where else ""))


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks so memory stays bounded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def short_hash(obj: Any, n: int = 10) -> str:
    """A short stable hash of a JSON-serialisable object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


# ------------------------------------------------------------------------------------ locking

_HELD: dict[tuple[int, str], int] = {}  # (thread, lock file) held -> nesting depth
_HELD_GUARD = threading.Lock()


def _holder(fd: int) -> str:
    """'pid N on HOST' as recorded by the process holding the lock (it writes it just after
    taking the lock, so wait briefly for a holder that is that far)."""
    for _ in range(20):
        try:
            text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        pid, _, host = text.partition(" ")
        if pid.isdigit():
            return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
        time.sleep(0.01)
    return "pid unknown"


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path,
    what: str,
    *,
    wait: bool = False,
    remove: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Own `what` (e.g. "output directory X") while the block runs: an exclusive `flock` on `path`.

    The lock file records the holder's pid and host. The kernel drops the lock when the holder
    exits however it exits (kill -9 included), so a crashed process never leaves it stuck; a file
    left behind is simply locked again. A second process gets `BusyError` naming the holder's pid,
    or with `wait=True` blocks until the holder is done (`on_wait(holder)` is called first).
    Re-entrant within one thread. `remove=True` deletes the file on release, for a lock file
    kept next to what it guards. Works on local file systems (and NFS where the kernel maps flock
    to POSIX locks); not on Windows.
    """
    import fcntl

    path = Path(path)
    key = (threading.get_ident(), str(path.absolute()))
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise CraftError(
                f"{what}: cannot create the lock file {path} ({e.strerror or e})"
            ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise BusyError(
                        f"{what} is in use by another process ({holder}, lock file {path}); "
                        "wait for it to finish or stop it"
                    ) from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            # A holder that removes its file on release may have done so after we opened it: our
            # lock is then on a deleted file that nobody else sees. Start again on the new one.
            st = os.fstat(fd)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # e.g. a full disk: the lock holds, the pid is unknown
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        with _HELD_GUARD:
            _HELD[key] = 1
        try:
            yield path
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            if remove:
                with contextlib.suppress(OSError):
                    path.unlink()  # still locked: a waiting process sees the inode change
    finally:
        os.close(fd)  # releases the lock
