"""Finding checkpoints: the directory a run, checkpoints, checkpoint or export path names, and the
run and checkpoint `--resume auto|PATH` continues (never one whose run holds later state it would
overwrite).
"""

from __future__ import annotations

import logging
from pathlib import Path

from craft.errors import CheckpointError
from craft.safety import inside
from craft.training.checkpoint_dirs import (
    CHECKPOINTS,
    EXPORT,
    LATEST,
    MARKER,
    STEP_RE,
    checkpoint_problem,
    checkpoint_step,
    latest_checkpoint,
    newest_checkpoint,
    read_marker,
    scan_checkpoints,
    unsafe_marker_path,
    warn_skipped,
)

log = logging.getLogger("craft.training")


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
