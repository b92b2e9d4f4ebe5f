"""Checkpoint directories on disk: names, the completion marker, atomic commit, scanning, pruning.

Layout of a run directory::

    <run>/checkpoints/step_00000500/   model.safetensors, optimizer.safetensors + optimizer.json,
                                       rng.safetensors, trainer_state.json, config.toml,
                                       tokenizer/, COMPLETE
    <run>/checkpoints/latest           name of the newest complete checkpoint
    <run>/model/                       export: model.safetensors, config.toml, tokenizer/, COMPLETE

A checkpoint is written into a staging directory, every file fsynced, then `COMPLETE` (listing
the files and their sizes) is written last and the directory renamed into place. A directory
without a valid `COMPLETE` is never loaded, and a damaged one is skipped, never deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from craft.errors import CheckpointError, CraftError
from craft.fileio import fsync_dir, write_text_durable
from craft.safety import (
    MAX_JSON_BYTES,
    check_relative,
    inside,
    read_json_bounded,
    staging_dir,
    unique_sibling,
)

log = logging.getLogger("craft.training")


FORMAT = "craft-checkpoint"
FORMAT_VERSION = 1
MARKER = "COMPLETE"
LATEST = "latest"
BEST = "best"
CHECKPOINTS = "checkpoints"
EXPORT = "model"
STEP_RE = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------ completeness


def _parse_marker(directory: Path) -> dict[str, Any] | None:
    """The marker's JSON when it is Craft's and every file it lists is named safely, else None."""
    try:
        marker = read_json_bounded(directory / MARKER, MAX_JSON_BYTES, what=MARKER)  # no message
    except CraftError:
        return None
    if not isinstance(marker, dict) or marker.get("format", FORMAT) != FORMAT:
        return None
    files = marker.get("files")
    if not isinstance(files, dict):
        return None
    try:
        for rel in files:
            check_relative(rel, what=MARKER)
    except CraftError:
        return None
    return marker


def unsafe_marker_path(directory: Path) -> str | None:
    """Why the marker of `directory` lists a file outside it (a doctored checkpoint), else None."""
    try:
        marker = read_json_bounded(directory / MARKER, MAX_JSON_BYTES, what=MARKER)
        files = marker.get("files") if isinstance(marker, dict) else None
        for rel in files if isinstance(files, dict) else {}:
            inside(directory, rel, what=f"{directory / MARKER} lists a file that")
    except CraftError as e:
        return None if e.message.startswith(MARKER) else e.message
    return None


def _check_marker(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None) for a complete directory, else (None, what is wrong with it).

    Every file the marker lists must lie inside `directory` (no absolute paths, `..` or symlinks
    leading out) and have the recorded size.
    """
    if not (directory / MARKER).is_file():
        return None, f"no {MARKER} marker"
    marker = _parse_marker(directory)
    if marker is None:
        return None, (
            f"its {MARKER} marker is not one Craft wrote (unreadable, not valid JSON, listing no "
            "files or names outside the directory)"
        )
    for rel, size in marker["files"].items():
        try:
            actual = inside(directory, rel, what=MARKER).stat().st_size
        except CraftError:
            return None, f"its {MARKER} marker lists {rel!r}, which leads outside the directory"
        except OSError:
            return None, f"{rel} is missing"
        if actual != size:
            return None, f"{rel} holds {actual} bytes, {MARKER} records {size}"
    return marker, None


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The parsed completion marker, or None when it is missing, unreadable or does not match."""
    return _check_marker(directory)[0]


def checkpoint_problem(directory: Path) -> str | None:
    """What keeps `directory` from loading as a complete checkpoint, or None when nothing does."""
    if not directory.is_dir():
        return "not a directory"
    return _check_marker(directory)[1]


def is_complete(directory: Path) -> bool:
    return directory.is_dir() and read_marker(directory) is not None


def scan_checkpoints(root: Path) -> tuple[list[tuple[int, Path]], list[tuple[int, Path, str]]]:
    """The `step_*` directories under `root`, oldest first: (step, dir) of the complete ones and
    (step, dir, what is wrong) of those that fail validation."""
    complete: list[tuple[int, Path]] = []
    damaged: list[tuple[int, Path, str]] = []
    if not root.is_dir():
        return complete, damaged
    for p in root.iterdir():
        step = checkpoint_step(p)
        if step is None:
            continue
        problem = checkpoint_problem(p)
        if problem is None:
            complete.append((step, p))
        else:
            damaged.append((step, p, problem))
    return sorted(complete), sorted(damaged)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints under `root`, oldest first."""
    return scan_checkpoints(root)[0]


def newest_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under `root` (the highest step; `latest` is a hint only),
    and the newer step directories passed over because they fail validation (with the reason)."""
    complete, damaged = scan_checkpoints(root)
    newest = complete[-1] if complete else None
    skipped = [(p, why) for step, p, why in damaged if newest is None or step > newest[0]]
    return (newest[1] if newest else None), skipped


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (the highest step; `latest` is a hint only)."""
    return newest_checkpoint(root)[0]


def warn_skipped(skipped: list[tuple[Path, str]]) -> None:
    """One warning per checkpoint passed over, naming it and what is wrong with it."""
    for path, why in skipped:
        log.warning("skipped checkpoint %s: %s (left on disk untouched)", path, why)


# `.<name>.<kind>-<pid>-<random>` (older versions wrote `.<name>.<kind>-<pid>`).
_LEFTOVER_RE = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|trash|replaced)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$"
)


def clean_stale(root: Path) -> list[Path]:
    """Tidy what interrupted writes and deletions of dead processes left under `root`.

    Only Craft's own temporary names are touched: `.<name>.tmp-<pid>` (a write that never
    completed) and `.<name>.trash-<pid>` (a deletion in progress) are removed;
    `.<name>.replaced-<pid>` (a complete directory moved aside to be replaced) is renamed back when
    its replacement never arrived, else removed. A checkpoint directory that fails validation is
    never removed: it is skipped with a warning wherever checkpoints are looked up.
    """
    from craft.fileio import pid_alive

    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in sorted(root.iterdir()):
        m = _LEFTOVER_RE.match(p.name)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and pid_alive(pid):
            continue  # another live process is writing it
        target = root / m.group("name")
        if m.group("kind") == "replaced" and not target.exists() and is_complete(p):
            os.replace(p, target)
            fsync_dir(root)
            log.warning("restored %s, whose replacement was interrupted", target.name)
            continue
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        elif m.group("kind") == "tmp":  # a directory this process's predecessor made exclusively
            shutil.rmtree(p, ignore_errors=True)
        else:  # a checkpoint moved aside: only what its marker lists (what is left stays)
            listed = _parse_marker(p)
            if listed is not None:
                _delete_listed(p, listed)
            with contextlib.suppress(OSError):
                p.rmdir()
            if p.exists():
                log.warning("left %s in place: it holds files Craft did not write", p)
                continue
        removed.append(p)
    return removed


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint Craft wrote so that no half-deleted directory ever looks complete or
    damaged: it is first renamed to a temporary name, then only what its marker lists is deleted
    (a file someone else put there stays, in that renamed directory)."""
    marker = _parse_marker(path)
    if marker is None:
        return
    trash = unique_sibling(path, "trash")
    os.replace(path, trash)
    fsync_dir(path.parent)
    _delete_listed(trash, marker)


def _delete_listed(path: Path, marker: dict[str, Any]) -> None:
    """Delete the files `marker` lists under `path`, then the marker and the directories left
    empty; anything else (and the directories holding it) stays."""
    root = path.resolve()
    dirs = {path}
    for rel in marker["files"]:
        f = path / rel
        where = f.parent.resolve()
        if where != root and root not in where.parents:
            continue  # a directory symlinked out of the checkpoint: not Craft's to touch
        if f.is_symlink() or f.is_file():
            f.unlink(missing_ok=True)
        dirs.update(p for p in f.parents if path in p.parents)
    (path / MARKER).unlink(missing_ok=True)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()


def check_replaceable(target: Path) -> None:
    """Refuse to replace `target` unless it is a checkpoint or export Craft wrote.

    That is: not a symlink, a `COMPLETE` marker of Craft's format, and no entry besides the files
    it lists (so replacing it deletes nothing Craft did not write).
    """
    if target.is_symlink() or not target.is_dir():
        raise CheckpointError(
            f"{target}: exists and is not a directory Craft wrote (a file or a symlink); "
            "Craft does not replace it"
        )
    marker = _parse_marker(target)
    if marker is None or marker.get("format") != FORMAT:
        raise CheckpointError(
            f"{target}: exists and has no {MARKER} marker of Craft's; Craft replaces only a "
            "checkpoint or exported model it wrote; move it away or choose another directory"
        )
    listed = {MARKER} | {Path(rel).parts[0] for rel in marker["files"]}
    extra = sorted(p.name for p in target.iterdir() if p.name not in listed)
    if extra:
        raise CheckpointError(
            f"{target}: holds files Craft did not write ({', '.join(extra[:5])}); Craft "
            "replaces only a checkpoint or exported model it wrote; move them away first"
        )


# ------------------------------------------------------------------------------ writing


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _fsync_tree(directory: Path) -> None:
    for p in sorted(directory.rglob("*"), reverse=True):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            fsync_dir(p)
    fsync_dir(directory)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def commit_directory(
    target: Path,
    write: Callable[[Path], None],
    *,
    kind: str,
    step: int | None,
) -> Path:
    """Run `write(tmp)`, mark `tmp` complete and rename it to `target` atomically.

    An existing `target` is replaced only when it is an empty directory or a checkpoint or export
    Craft wrote (`check_replaceable`); of the old one only the files its marker lists are deleted.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if _is_empty_dir(target):
        target.rmdir()
    elif target.exists() or target.is_symlink():
        check_replaceable(target)
    tmp = staging_dir(parent, f".{target.name}.tmp-{os.getpid()}-")
    try:
        write(tmp)
        _fsync_tree(tmp)
        marker = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": kind,
            "step": step,
            "files": _file_sizes(tmp),
        }
        write_text_durable(tmp / MARKER, json.dumps(marker, indent=2) + "\n")
        fsync_dir(tmp)
        if target.exists():
            check_replaceable(target)  # again: it may have changed while `write` ran
            old = unique_sibling(target, "replaced")
            os.replace(target, old)
            os.replace(tmp, target)
            fsync_dir(parent)
            listed = _parse_marker(old)
            if listed is not None:
                _delete_listed(old, listed)
        else:
            os.replace(tmp, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def prune(root: Path, keep_last: int, protect: set[str]) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last`, except `protect`ed names."""
    found = complete_checkpoints(root)
    doomed = [p for _, p in found[:-keep_last] if p.name not in protect] if keep_last else []
    for p in doomed:
        _remove_checkpoint(p)
    if doomed:
        fsync_dir(root)
    return doomed
