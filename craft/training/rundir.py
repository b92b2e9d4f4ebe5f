"""Where a run lives and what it resumes from.

A new run gets `<output_dir>/<run.name>/<YYYYmmdd-HHMMSS>[-N]/`. `--resume auto` continues the
newest complete checkpoint of the newest run with one; `--resume PATH` continues a run or
checkpoint directory, in its own run directory when it is that run's newest checkpoint, else in a
new run (so a run's later checkpoints are never overwritten).
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import torch

from craft.config import to_toml
from craft.errors import CheckpointError, ConfigError
from craft.fileio import atomic_write_text
from craft.training import checkpoint as ckpt

log = logging.getLogger("craft.training")


def runs_root(cfg: Any) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def new_run_dir(root: Path) -> Path:
    """`<root>/<YYYYmmdd-HHMMSS>[-N]/`, created (never reusing an existing directory)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            path = root / (stamp if i == 0 else f"{stamp}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:  # read-only or missing location, a file in the way
        raise ConfigError(
            f"run.output_dir: cannot create a run directory under {root} ({e.strerror or e})"
        ) from None
    raise ConfigError(f"run.output_dir: cannot create a new run directory under {root}")


def open_run_dir(run_dir: Path, cfg: Any, log_file: Any) -> None:
    """Start using `run_dir` (main process): `train.log` (`log_file.open`), `config.toml`, and
    no leftovers of an interrupted checkpoint write."""
    log_file.open(run_dir / "train.log")
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
    for p in ckpt.clean_stale(run_dir / ckpt.CHECKPOINTS):
        log.info("removed leftover of an interrupted checkpoint write: %s", p.name)


def resolve_resume(cfg: Any, resume: str | None) -> tuple[Path | None, Path | None]:
    """(run directory, checkpoint to resume from); the run directory is None for a new run."""
    if resume is None:
        return None, None
    root = runs_root(cfg)
    if resume == "auto":
        found = ckpt.newest_run_with_checkpoint(root)
        if found is None:
            logging.getLogger("craft").warning(
                "--resume auto: no complete checkpoint under %s; starting a new run", root
            )
            return None, None
        return found
    found_ckpt = ckpt.resolve_checkpoint(resume)
    marker = ckpt.read_marker(found_ckpt) or {}
    if marker.get("kind") != "checkpoint":
        raise CheckpointError(
            f"--resume {resume}: {found_ckpt} is an exported model (weights only), not a "
            "training checkpoint"
        )
    run_dir = ckpt.run_dir_of(found_ckpt)
    if run_dir is not None and ckpt.latest_checkpoint(run_dir / ckpt.CHECKPOINTS) == found_ckpt:
        return run_dir, found_ckpt
    # Resuming from an older checkpoint must not overwrite that run's later ones.
    return None, found_ckpt


def check_resume(path: Path, cfg: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Trainer state of `path` after checking that it fits the model; reports config changes."""
    state = ckpt.read_trainer_state(path)
    saved_cfg = ckpt.read_config(path)
    changes = ckpt.config_changes(ckpt.config_dict(saved_cfg), ckpt.config_dict(cfg))
    model_changes = [c for c in changes if c.startswith(("model.", "tokenizer."))]
    shapes = ckpt.weight_shapes(path / "model.safetensors")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch = sorted(set(shapes) ^ set(expected)) or [
        k for k in expected if shapes[k] != expected[k]
    ]
    if mismatch:
        name = mismatch[0]
        what = f"{name}: checkpoint {shapes.get(name, 'absent')}, config {expected.get(name, 'absent')}"
        because = f"; changed: {'; '.join(model_changes)}" if model_changes else ""
        raise CheckpointError(
            f"--resume {path}: the config changes the model shape ({what}){because}"
        )
    if changes:
        log.warning("resuming with config changes: %s", "; ".join(changes))
    if state.get("config_hash") != ckpt.config_hash(cfg) and not changes:
        log.info("config hash differs from the checkpoint's (defaults changed)")
    log.info("resuming from %s (step %d)", path, state["step"])
    return state
