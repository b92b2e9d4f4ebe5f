"""Checkpoint directories: atomic commit, completion marker, `latest` pointer, export, loading.

Layout of a run directory::

    <run>/checkpoints/step_00000500/   model.safetensors, optimizer.safetensors + optimizer.json,
                                       rng.safetensors, trainer_state.json, config.toml,
                                       tokenizer/, COMPLETE
    <run>/checkpoints/latest           name of the newest complete checkpoint
    <run>/model/                       export: model.safetensors, config.toml, tokenizer/, COMPLETE

A checkpoint is written into `.step_XXXXXXXX.tmp-<pid>/`, every file fsynced, then `COMPLETE`
(listing the files and their sizes) is written last and the directory renamed into place. A
directory without a valid `COMPLETE` is never loaded. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from craft.errors import CheckpointError, ConfigError, CraftError
from craft.fileio import atomic_write_text, fsync_dir, write_text_durable
from craft.safety import (
    MAX_JSON_BYTES,
    MAX_TOML_BYTES,
    check_relative,
    inside,
    printable,
    read_json_bounded,
    read_text_bounded,
    staging_dir,
    unique_sibling,
)
from craft.training.state_io import dedupe_shared, save_state, save_tensors, write_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("craft.training")

FORMAT = "craft-checkpoint"
FORMAT_VERSION = 1
MARKER = "COMPLETE"
LATEST = "latest"
BEST = "best"
CHECKPOINTS = "checkpoints"
EXPORT = "model"
STEP_RE = re.compile(r"^step_(\d{8,})$")
ALIASES_KEY = "craft.aliases"


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


def commit_directory(
    target: Path,
    write: Callable[[Path], None],
    *,
    kind: str,
    step: int | None,
    write_marker: bool = True,
) -> Path:
    """Run `write(tmp)`, mark `tmp` complete and rename it to `target` atomically.

    `write_marker=False` leaves out the `COMPLETE` marker (a directory for other tools, e.g. a Hugging
    Face export; the rename alone makes it appear complete or not at all).
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
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
        if write_marker:
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


def save_model_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """`model.safetensors` with tied weights stored once (their other names in the metadata)."""
    tensors, aliases = dedupe_shared(state)
    tensors = {k: v.detach().to("cpu") for k, v in tensors.items()}
    save_tensors(path, tensors, {"format": "pt", ALIASES_KEY: json.dumps(aliases)})


def retie_state(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Point every name of a tied parameter of `module` at one tensor of `state` (in place).

    `get_model_state_dict(cpu_offload=True)` copies each entry to the CPU separately, so tied
    weights of a GPU model arrive as distinct copies; re-tied, they are stored once.
    """
    first: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(p), name)
        if kept != name and kept in state and name in state:
            state[name] = state[kept]
    return state


def _aliases(path: Path, meta: dict[str, str], stored: set[str]) -> dict[str, str]:
    """The `craft.aliases` metadata: {tied name: stored name}, checked before it is used."""
    text = meta.get(ALIASES_KEY)
    if text is None:
        return {}
    try:
        aliases = json.loads(text)
    except (ValueError, RecursionError):
        aliases = None
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointError(
            f"{path}: metadata {ALIASES_KEY!r} is not a JSON object of tensor names "
            f"({printable(text[:60], newlines=False)!r})"
        )
    for alias, name in aliases.items():
        if name not in stored:
            raise CheckpointError(
                f"{path}: metadata {ALIASES_KEY!r} ties {printable(alias, newlines=False)!r} to "
                f"{printable(name, newlines=False)!r}, which the file does not hold"
            )
    return aliases


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """Inverse of `save_model_weights`: every name of the model, tied ones included."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read model weights: {e}") from None
    for alias, name in _aliases(path, meta, set(state)).items():
        state[alias] = state[name]
    return state


def stored_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(shapes of the tensors stored in a `model.safetensors`, aliases), from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read model weights: {e}") from None
    return shapes, _aliases(path, meta, set(shapes))


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes stored in a `model.safetensors` (tied names included), header only."""
    shapes, aliases = stored_shapes(path)
    for alias, name in aliases.items():
        shapes[alias] = shapes[name]
    return shapes


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    rng_states: list[dict[str, torch.Tensor]],
    trainer_state: dict[str, Any],
    config_toml: str,
    tokenizer: Any,
    keep_last: int,
    protect: set[str] | None = None,
    trainer_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `root/step_XXXXXXXX/` atomically, point `latest` at it, then prune old ones.

    `trainer_tensors` (tensors referenced from `trainer_state`, e.g. a data sampler's generator
    state) go to `trainer_state.safetensors` when there are any.
    """

    def write(tmp: Path) -> None:
        save_model_weights(tmp / "model.safetensors", model_state)
        save_state(tmp, "optimizer", optimizer_state, {"format": "craft-optimizer"})
        rng: dict[str, torch.Tensor] = {}
        for rank, states in enumerate(rng_states):
            rng.update({f"rank{rank}.{k}": v.contiguous() for k, v in states.items()})
        save_tensors(tmp / "rng.safetensors", rng, {"world_size": str(len(rng_states))})
        write_json(tmp / "trainer_state.json", trainer_state)
        if trainer_tensors:
            save_tensors(tmp / "trainer_state.safetensors", trainer_tensors, {})
        write_text_durable(tmp / "config.toml", config_toml)
        if tokenizer is not None:  # None: random-token data (benchmarks) has no tokenizer
            (tmp / "tokenizer").mkdir()
            tokenizer.save(tmp / "tokenizer")

    target = commit_directory(root / checkpoint_name(step), write, kind="checkpoint", step=step)
    atomic_write_text(root / LATEST, target.name + "\n")
    prune(root, keep_last, protect or set())
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


def read_rng(checkpoint: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """The RNG states saved for `rank`, or None when that rank did not exist."""
    states = read_tensors(checkpoint / "rng.safetensors", "RNG states")
    prefix = f"rank{rank}."
    mine = {k[len(prefix) :]: v for k, v in states.items() if k.startswith(prefix)}
    return mine or None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = inside(checkpoint, "trainer_state.json", what="trainer state", error=CheckpointError)
    state = read_json_bounded(path, what=str(path), error=CheckpointError)
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(
            f"{checkpoint}/trainer_state.json: expected a JSON object with an integer 'step' >= 0"
        )
    return state


# ------------------------------------------------------------------------------ config


def config_dict(cfg: Any) -> dict[str, Any]:
    from craft.config import to_dict

    return to_dict(cfg)


def config_hash(cfg: Any) -> str:
    """sha256 of the resolved config (canonical JSON), stored with every checkpoint."""
    text = json.dumps(config_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` lines for every dotted key whose value differs."""
    a, b = _flat(old), _flat(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            lines.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return lines


TRUST_HINT = (
    "pass --trust-imports to import them (this runs their code: only for a checkpoint you trust)"
)


def read_config(
    directory: Path,
    *,
    trust_imports: bool = False,
    trusted: Collection[str] = (),
    hint: str = TRUST_HINT,
) -> Any:
    """The validated config stored in a checkpoint or export directory.

    Its `imports` are modules whose code would run: they are imported only with `trust_imports`,
    or when each is in `trusted` (already imported by the recipe being run); otherwise this is a
    CheckpointError naming them and `hint` (how to opt in).
    """
    from craft.config import from_dict

    path = inside(directory, "config.toml", what="stored config", error=CheckpointError)
    text = read_text_bounded(path, MAX_TOML_BYTES, what=str(path), error=CheckpointError)
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: cannot read the stored config: {printable(e, newlines=False)}"
        ) from None
    imports = data.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
        raise CheckpointError(
            f"{path}: imports = {printable(repr(imports))[:80]}: expected a list of module names"
        )
    asked = [m for m in imports if m not in trusted]
    if asked and not trust_imports:
        names = ", ".join(printable(repr(m), newlines=False) for m in asked)
        raise CheckpointError(
            f"{path}: the checkpoint names Python modules to import ({names}); Craft never runs "
            f"code from a checkpoint on its own; {hint}"
        )
    try:
        return from_dict(data, label=str(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored config is not valid here: {e.message}") from None


# ------------------------------------------------------------------------------ resolving


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint or export directory from a run, checkpoints, checkpoint or export path."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"{p}: not found (expected a run, checkpoint or exported model directory)"
        )
    if p.is_file() and p.name == LATEST:
        p = _follow_latest(p)
    if not p.is_dir():
        raise CheckpointError(
            f"{p}: is a file; expected a run, checkpoint or exported model directory "
            f"(or a checkpoints/{LATEST} pointer)"
        )
    if (p / MARKER).exists() or (p / "model.safetensors").exists():
        unsafe = unsafe_marker_path(p)
        if unsafe is not None:
            raise CheckpointError(unsafe)
        problem = checkpoint_problem(p)
        if problem is not None:
            raise CheckpointError(
                f"{p}: incomplete checkpoint ({problem}; it was interrupted while being "
                "written, or changed since)"
            )
        return p
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    found, skipped = newest_checkpoint(root)
    if found is not None:  # a step directory symlinked from elsewhere is not this run's
        warn_skipped(skipped)
        return inside(p, str(found.relative_to(p)), what="checkpoint", error=CheckpointError)
    if skipped:
        damaged = "; ".join(f"{c.name}: {why}" for c, why in skipped[-3:])
        raise CheckpointError(f"{p}: no complete checkpoint in {root} ({damaged})")
    if root is not p or any(checkpoint_step(c) is not None for c in p.iterdir()):
        raise CheckpointError(f"{p}: no complete checkpoint in {root}")
    raise CheckpointError(
        f"{p}: not a run, checkpoint or exported model directory (no {CHECKPOINTS}/ or {MARKER})"
    )


def resolve_source(path: str | Path) -> Path | str:
    """What `load_model(path)` will read: a Hugging Face directory or Hub id as given, else the
    complete checkpoint or export directory `resolve_checkpoint` picks (naming skipped ones)."""
    from craft.interop.hf import is_hf_source

    return path if is_hf_source(path) else resolve_checkpoint(path)


def _follow_latest(pointer: Path) -> Path:
    """The checkpoint a `latest` pointer file names: a sibling `step_XXXXXXXX` directory only."""
    try:
        with open(pointer, "rb") as f:
            name = f.read(256).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: cannot read the {LATEST} pointer ({e})") from None
    if not STEP_RE.match(name):
        raise CheckpointError(
            f"{pointer}: not a {LATEST} pointer (expected the name of a step_XXXXXXXX checkpoint "
            f"next to it, found {name[:40]!r})"
        )
    target = pointer.parent / name
    if target.is_symlink() or not target.is_dir():
        raise CheckpointError(
            f"{pointer}: points to {name}, which is not a checkpoint directory next to it; pass "
            f"{pointer.parent} to use the newest complete checkpoint"
        )
    return target


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory that holds `checkpoint`, when it sits in the standard layout."""
    if checkpoint.parent.name == CHECKPOINTS and checkpoint_step(checkpoint) is not None:
        return checkpoint.parent.parent
    return None


def _run_order(run: Path) -> tuple[str, int]:
    """Sort key of a run directory `<YYYYmmdd-HHMMSS>[-N]`: the stamp, then N as a number."""
    stamp, sep, n = run.name.rpartition("-")
    if sep and n.isdigit() and len(n) < 6:  # `-N`, not the `-HHMMSS` of a bare stamp
        return stamp, int(n)
    return run.name, 0


def find_resume(runs_root: Path) -> tuple[Path, Path, list[tuple[Path, str]]] | None:
    """(run dir, checkpoint, skipped) of the newest run under `runs_root` that has a complete
    checkpoint; `skipped` lists the newer checkpoint directories passed over (with the reason)."""
    if not runs_root.is_dir():
        return None
    skipped: list[tuple[Path, str]] = []
    for run in sorted((p for p in runs_root.iterdir() if p.is_dir()), key=_run_order, reverse=True):
        ck, passed = newest_checkpoint(run / CHECKPOINTS)
        skipped += passed
        if ck is not None:
            return run, ck, skipped
    return None


def newest_run_with_checkpoint(runs_root: Path) -> tuple[Path, Path] | None:
    """(run dir, checkpoint) of the newest run under `runs_root` that has a complete checkpoint."""
    found = find_resume(runs_root)
    return (found[0], found[1]) if found else None


def later_state(run_dir: Path, checkpoint: Path) -> list[str]:
    """What `run_dir` holds that is newer than `checkpoint`: step directories that fail
    validation and an export of a later step. Resuming there would overwrite or delete them."""
    step = checkpoint_step(checkpoint)
    if step is None:
        return []
    out = [
        f"{p.name} ({why})" for s, p, why in scan_checkpoints(run_dir / CHECKPOINTS)[1] if s > step
    ]
    exported = (read_marker(run_dir / EXPORT) or {}).get("step")
    if isinstance(exported, int) and exported > step:
        out.append(f"{EXPORT}/ (exported at step {exported})")
    return out


def choose_resume(runs_root: Path, resume: str) -> tuple[Path | None, Path | None]:
    """(run directory to continue in, checkpoint to resume from) for `--resume auto|PATH`.

    The run directory is None when the run must continue in a new one: the checkpoint is not its
    run's newest, or the run holds later state that resuming in place would overwrite (see
    `later_state`). `auto` with no complete checkpoint under `runs_root` gives (None, None).
    Skipped damaged checkpoints are warned about by name.
    """
    if resume == "auto":
        found = find_resume(runs_root)
        if found is None:
            log.warning(
                "--resume auto: no complete checkpoint under %s; starting a new run", runs_root
            )
            return None, None
        run_dir, ck, skipped = found
        warn_skipped(skipped)
    else:
        ck = resolve_checkpoint(resume)
        if (read_marker(ck) or {}).get("kind") != "checkpoint":
            raise CheckpointError(
                f"--resume {resume}: {ck} is an exported model (weights only), not a training "
                "checkpoint"
            )
        run_dir = run_dir_of(ck)
        if run_dir is None or latest_checkpoint(run_dir / CHECKPOINTS) != ck:
            return None, ck  # an older checkpoint: its run's later ones stay as they are
    later = later_state(run_dir, ck)
    if later:
        log.warning(
            "resuming from %s in a new run directory: continuing in %s would overwrite its later %s",
            ck,
            run_dir,
            ", ".join(later),
        )
        return None, ck
    return run_dir, ck


# ------------------------------------------------------------------------------ export / load


def export_model(source: str | Path, out_dir: str | Path) -> Path:
    """Write the model weights, config and tokenizer of a checkpoint to `out_dir` (atomic)."""
    src = resolve_checkpoint(source)
    out = Path(out_dir)
    marker = read_marker(src) or {}
    # Only what the marker lists (each checked to lie inside the checkpoint) is copied.
    wanted = [
        rel
        for rel in marker.get("files", {})
        if rel in ("model.safetensors", "config.toml") or Path(rel).parts[0] == "tokenizer"
    ]

    def write(tmp: Path) -> None:
        for rel in wanted:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(inside(src, rel, what=MARKER, error=CheckpointError), dest)

    step = marker.get("step")
    return commit_directory(out, write, kind="export", step=step)


def write_export(
    out_dir: Path,
    *,
    model_state: dict[str, torch.Tensor],
    config_toml: str,
    tokenizer: Any,
    step: int,
) -> Path:
    """An exported model directory from live weights (atomic, with its completion marker)."""

    def write(tmp: Path) -> None:
        save_model_weights(tmp / "model.safetensors", model_state)
        write_text_durable(tmp / "config.toml", config_toml)
        if tokenizer is not None:  # None: random-token data (benchmarks) has no tokenizer
            (tmp / "tokenizer").mkdir()
            tokenizer.save(tmp / "tokenizer")

    return commit_directory(out_dir, write, kind="export", step=step)


def read_trainer_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    path = checkpoint / "trainer_state.safetensors"
    return read_tensors(path, "trainer state tensors") if path.exists() else {}


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """`load_file` that reports a missing or corrupt file as a CheckpointError naming it."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from None


def check_weights_fit(cfg: Any, vocab_size: int, weights: Path) -> None:
    """Compare the model `cfg` describes with the tensors in `weights` before building it.

    The header of the safetensors file says how many parameters it holds; a config that claims a
    different model (e.g. a huge one next to small weights) is an error before anything is
    allocated. Built-in models are counted arithmetically; others are built on the meta device.
    """
    from craft.config import registry
    from craft.models import flops

    shapes, _ = stored_shapes(weights)
    stored = sum(math.prod(s) for s in shapes.values())
    counts = flops.param_counts(cfg.model, vocab_size)
    if counts is None:  # a plugin model: exact shapes from a model built on the meta device
        model = flops.meta_model(registry.build, "model", cfg.model, vocab_size)
        counts = flops.count_params(model)
    if counts.total != stored:
        raise CheckpointError(
            f"{weights}: holds {stored:,} parameters, but its config.toml describes a "
            f"{cfg.model.type} model of {counts.total:,} (vocab {vocab_size}); the config and "
            "the weights do not belong together"
        )


def load_weights_into(model: torch.nn.Module, weights: Path) -> None:
    """Load `model.safetensors` into `model`, naming the first mismatch on failure."""
    state = load_model_weights(weights)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: parameter names do not match the model "
            f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    for name, t in expected.items():
        if tuple(t.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"{weights}: {name} has shape {tuple(state[name].shape)}, the model expects "
                f"{tuple(t.shape)}"
            )
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{weights}: {name} holds {bad} non-finite value(s) (NaN or inf); these weights "
                "cannot be used, take an earlier checkpoint"
            )
    model.load_state_dict(state, strict=True)


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_imports: bool = False,
) -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, tokenizer, config) from a run, checkpoint or exported model directory,
    or a Hugging Face model directory or Hub id (converted by `craft.interop.hf`).

    The directory is treated as untrusted: nothing outside it is read, modules its config names
    are imported only with `trust_imports`, and the config is checked against the weights file
    before the model is built.
    """
    from craft.data.tokenizers import load_tokenizer
    from craft.interop.hf import is_hf_source, load_for_inference
    from craft.training.builders import build_model

    if is_hf_source(path):
        model, tokenizer, cfg = load_for_inference(path)
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        return model, tokenizer, cfg
    ck = resolve_checkpoint(path)
    cfg = read_config(ck, trust_imports=trust_imports)
    tok_dir = inside(ck, "tokenizer", what="checkpoint tokenizer", error=CheckpointError)
    if not tok_dir.is_dir():
        raise CheckpointError(f"{ck}: has no tokenizer/ (trained on random tokens); cannot load it")
    tokenizer = load_tokenizer(tok_dir)
    weights = inside(ck, "model.safetensors", what="model weights", error=CheckpointError)
    vocab = getattr(cfg.model, "vocab_size", None) or tokenizer.vocab_size
    check_weights_fit(cfg, vocab, weights)
    model = build_model(cfg, tokenizer.vocab_size, fused_loss=False)
    load_weights_into(model, weights)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return model, tokenizer, cfg
