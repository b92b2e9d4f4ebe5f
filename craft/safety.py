"""Guards for what Craft reads from files it did not write and for what it may delete.

Checkpoints, exports, datasets and tokenizers are often downloaded; their files are data, never
instructions. Every layer that opens one goes through these functions:

- `inside(base, rel)`: a path named inside such a directory is relative, has no `..`, and still
  lies inside the directory once symlinks are resolved;
- `read_bytes_bounded` / `read_text_bounded` / `read_json_bounded`: read a regular file of at most
  a given size (a FIFO, a device such as /dev/zero or an 8 GB sparse file is an error, not a hang
  or a MemoryError);
- `printable(text)`: terminal control characters from files are shown escaped, never executed;
- `private_dir(path)`: a cache directory (CRAFT_HOME and below) that another user could write is
  refused, so nobody can plant a dataset or a compiled extension in it;
- `check_replaceable(...)`: what `--force` may replace: a directory Craft wrote (its own marker)
  holding only the files Craft lists, never `.`, a parent of an input, or a symlink.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from craft.errors import CraftError

# Size limits of files read into memory whole. Generous for what Craft writes; small enough that
# a hostile file cannot exhaust memory.
MAX_JSON_BYTES = 64 << 20  # meta.json, tokenizer.json (a char vocabulary), trainer state, markers
MAX_TOML_BYTES = 16 << 20  # recipes, fragments, a checkpoint's config.toml
MAX_MODEL_FILE_BYTES = 1 << 30  # a SentencePiece .model
MAX_PROMPT_BYTES = 16 << 20  # --prompt-file

# C0 controls except tab and newline, DEL, C1 controls, and the Unicode bidirectional overrides
# that can make printed text read differently from what it is.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_NL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: Any, *, newlines: bool = True) -> str:
    """`text` with control characters shown as escapes (`\\x1b`), safe to print on a terminal.

    Tabs are kept, newlines too unless `newlines=False` (single-line fields such as names).
    """
    pattern = _CONTROL_RE if newlines else _CONTROL_NL_RE
    return pattern.sub(_escape, str(text))


def check_relative(rel: Any, *, what: str, error: type[CraftError] = CraftError) -> str:
    """`rel` when it is a non-empty relative path without `..` components or NUL bytes."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise error(f"{what}: {printable(repr(rel))} is not a file name")
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or rel.startswith("~"):
        raise error(f"{what}: {printable(repr(rel))} is an absolute path; expected a name "
                    "relative to its directory")  # fmt: skip
    if ".." in posix.parts or ".." in windows.parts:
        raise error(f"{what}: {printable(repr(rel))} leaves its directory ('..')")
    return rel


def inside(base: Path, rel: Any, *, what: str, error: type[CraftError] = CraftError) -> Path:
    """`base / rel`, after checking that it names something inside `base`.

    `rel` must be relative, without `..`, and `base / rel` must still lie inside `base` once every
    symlink on the way is resolved (a symlink pointing out of the directory is refused).
    """
    check_relative(rel, what=what, error=error)
    path = Path(base) / rel
    root = Path(base).resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise error(f"{what}: {path}: cannot resolve it ({e})") from None
    if real != root and root not in real.parents:
        raise error(
            f"{what}: {path} points outside {base} (to {real}); Craft reads only files inside "
            "the directory it was given",
        )
    return path


def check_tree_inside(base: Path, *, what: str, error: type[CraftError] = CraftError) -> None:
    """Refuse a directory tree holding a symlink that leads out of `base` (checked recursively)."""
    root = Path(base).resolve()
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                real = p.resolve()
                if real != root and root not in real.parents:
                    raise error(
                        f"{what}: {p} is a symlink pointing outside {base} (to {real}); Craft "
                        "reads only files inside the directory it was given",
                    )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


def read_bytes_bounded(
    path: Path, limit: int, *, what: str, error: type[CraftError] = CraftError
) -> bytes:
    """The content of the regular file `path`, refusing anything else or more than `limit` bytes.

    Errors are `error(f"{what}: <reason>")`: `what` names the file (its path, or an option and it).

    A FIFO is opened without blocking and refused, a device (/dev/zero) is refused, and a file
    larger than `limit` (sparse or not) is refused before it is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what}: file not found") from None
    except IsADirectoryError:
        raise error(f"{what}: is a directory, expected a file") from None
    except OSError as e:
        raise error(f"{what}: cannot read it ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what}: is {_kind(st.st_mode)}, expected a regular file")
        if st.st_size > limit:
            raise error(
                f"{what}: is {_mib(st.st_size)}, more than the {_mib(limit)} Craft reads "
                "for such a file",
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        chunks, total = [], 0
        while True:
            block = os.read(fd, min(1 << 20, limit + 1 - total))
            if not block:
                break
            chunks.append(block)
            total += len(block)
            if total > limit:  # grew while being read, or a size the kernel does not report
                raise error(f"{what}: holds more than {_mib(limit)}")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{what}: cannot read it ({e.strerror or e})") from None
    finally:
        os.close(fd)


def read_text_bounded(
    path: Path, limit: int, *, what: str, error: type[CraftError] = CraftError
) -> str:
    """`read_bytes_bounded` decoded as UTF-8 (an undecodable file is an error naming the offset)."""
    data = read_bytes_bounded(path, limit, what=what, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what}: not UTF-8 text (byte {e.start})") from None


def read_json_bounded(
    path: Path, limit: int = MAX_JSON_BYTES, *, what: str, error: type[CraftError] = CraftError
) -> Any:
    """A JSON document of at most `limit` bytes (deep nesting is an error, not a RecursionError)."""
    text = read_text_bounded(path, limit, what=what, error=error)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise error(f"{what}: not valid JSON ({printable(e)})") from None


# ------------------------------------------------------------------------- cache directories


def _private_group(gid: int) -> bool:
    """Whether `gid` is this user's own group (a user-private group: the primary group, with no
    other listed members), so that group write access is nobody else's."""
    if gid != os.getgid():
        return False
    try:
        import grp
        import pwd

        me = pwd.getpwuid(os.getuid())
        if set(grp.getgrgid(gid).gr_mem) - {me.pw_name}:
            return False
        return not any(u.pw_gid == gid and u.pw_uid != me.pw_uid for u in pwd.getpwall())
    except (ImportError, KeyError):
        return False


def _writable_by_others(st: os.stat_result) -> bool:
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and not _private_group(st.st_gid)


def check_private(path: Path, *, what: str, error: type[CraftError] = CraftError) -> None:
    """Refuse a directory that another user owns or could write (so could plant files in).

    Owned by this user (or root) and not writable by others passes; group write access passes
    only for the user's own private group (the default with umask 002 on many systems).
    """
    if not hasattr(os, "getuid"):  # pragma: no cover - not POSIX
        return
    try:
        st = path.stat()
    except OSError as e:
        raise error(f"{what}: {path}: cannot inspect it ({e.strerror or e})") from None
    if st.st_uid not in (os.getuid(), 0):
        raise error(
            f"{what}: {path} belongs to another user (uid {st.st_uid}); Craft trusts only a cache "
            "that you own; set CRAFT_HOME to a directory of your own",
        )
    if _writable_by_others(st):
        raise error(
            f"{what}: {path} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"they could plant files that Craft would use; run `chmod go-w {path}` or set "
            "CRAFT_HOME to a private directory",
        )


def private_dir(path: Path, *, what: str, error: type[CraftError] = CraftError) -> Path:
    """Create `path` (and missing parents, mode 0700) and check it and its cache parents.

    Every directory from the first one created here, or the existing `path`, is checked with
    `check_private`.
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise error(f"{what}: cannot create {path} ({e.strerror or e})") from None
    check_private(path, what=what, error=error)
    return path


# ------------------------------------------------------------------------- staging and --force


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new directory with an unpredictable name in `parent`, created exclusively.

    Never follows or reuses something planted there (mkdtemp semantics); the mode follows the
    umask as a plain `mkdir` would, so the finished output is not more private than expected.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def unique_sibling(path: Path, tag: str) -> Path:
    """A name next to `path` that does not exist (for moving an old output aside)."""
    for _ in range(100):
        cand = path.parent / f".{path.name}.{tag}-{os.getpid()}-{os.urandom(4).hex()}"
        if not os.path.lexists(cand):
            return cand
    raise OSError(f"cannot find a free name next to {path}")  # pragma: no cover


def check_output_location(
    out: Path,
    *,
    option: str,
    inputs: Iterable[Path] = (),
    error: type[CraftError] = CraftError,
) -> None:
    """Refuse an output directory Craft must never replace: a symlink, the working directory or
    one of its parents, or a directory that holds (or is a parent of) an input."""
    if os.path.islink(out):
        raise error(
            f"{option} {out}: is a symbolic link; give the directory itself (Craft never writes "
            "through or replaces a symlink)",
        )
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise error(
            f"{option} {out}: is the working directory or one of its parents; choose a new "
            "directory for the output",
        )
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home directory known
        home = None
    if home is not None and (real == home or real in home.parents):
        raise error(f"{option} {out}: is your home directory or one of its parents")
    for inp in inputs:
        rin = Path(inp).resolve()
        if rin == real or real in rin.parents:
            raise error(
                f"{option} {out}: holds the input {inp}; choose a directory apart from the input",
            )


def owned_entries(
    directory: Path,
    listed: Iterable[str],
    *,
    option: str,
    what: str,
    error: type[CraftError] = CraftError,
) -> list[str]:
    """The entries of `directory` Craft wrote (`listed`), refusing any other entry.

    Each listed entry must be a regular file (not a symlink or a directory) when it exists. What
    `--force` may delete is exactly what this returns.
    """
    allowed = set(listed)
    entries = sorted(os.listdir(directory))
    extra = [e for e in entries if e not in allowed]
    if extra:
        shown = ", ".join(printable(e, newlines=False) for e in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise error(
            f"{option} {directory}: holds files Craft did not write ({shown}{more}); "
            f"--force replaces only {what} Craft wrote; move them away or choose another directory",
        )
    for e in entries:
        st = os.lstat(directory / e)
        if not stat.S_ISREG(st.st_mode):
            raise error(
                f"{option} {directory}: {printable(e, newlines=False)} is {_kind(st.st_mode)}"
                f"{' (a symlink)' if stat.S_ISLNK(st.st_mode) else ''}; Craft writes plain files "
                "there, so it does not replace this directory",
            )
    return entries


def remove_owned(directory: Path, entries: Iterable[str]) -> bool:
    """Delete `entries` (plain files) of `directory`, then the directory if it is empty.

    Returns False when something else appeared in it meanwhile (it is then left in place).
    """
    for e in entries:
        (directory / e).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        return False
    return True
