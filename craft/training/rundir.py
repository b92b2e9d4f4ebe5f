"""Where a run lives and what it resumes from.

A new run gets `<output_dir>/<run.name>/<YYYYmmdd-HHMMSS>[-N]/` (removed again, with the parents
made for it, when the run fails to start). `--resume auto` continues the newest complete
checkpoint of the newest run with one; `--resume PATH` continues a run or checkpoint directory,
in its own run directory when it is that run's newest checkpoint and nothing later would be
overwritten, else in a new run. One process owns a run directory while it trains (`own_run_dir`):
a second one is refused before it writes anything there.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from craft.config import to_toml
from craft.errors import BusyError, CheckpointError, ConfigError
from craft.fileio import atomic_write_text, exclusive_lock, storage_error
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


def create_run_dir(cfg: Any) -> tuple[Path, list[Path]]:
    """A new run directory and what was made for it (missing parents first, the run last), so a
    run that fails to start can remove exactly that (`remove_made_dirs`)."""
    root = runs_root(cfg)
    missing = [p for p in (root, *root.parents) if not p.exists()][::-1]
    path = new_run_dir(root)
    return path, [*missing, path]


def remove_made_dirs(made: list[Path]) -> None:
    """Remove the run directory a failed start created (it holds only that start's files), then
    the parents made for it while they are empty."""
    if not made:
        return
    shutil.rmtree(made[-1], ignore_errors=True)
    for d in reversed(made[:-1]):
        try:
            d.rmdir()
        except OSError:
            break


def open_run_dir(run_dir: Path, cfg: Any, log_file: Any) -> None:
    """Start using `run_dir` (main process): `train.log` (`log_file.open`), `config.toml`, and
    no leftovers of an interrupted checkpoint write. A directory the machine does not let us
    write (full disk, permission denied, read-only) is a one-line `StorageError`."""
    try:
        log_file.open(run_dir / "train.log")
        log_file.check()
        atomic_write_text(run_dir / "config.toml", to_toml(cfg))
        for p in ckpt.clean_stale(run_dir / ckpt.CHECKPOINTS):
            log.info("removed leftover of an interrupted checkpoint write: %s", p.name)
    except Exception as e:
        err = storage_error(e, f"starting the run in {run_dir}")
        if err is None:
            raise
        raise err from None


LOCK = ".lock"  # in the run directory, while a process owns it (removed when it is done)


def own_run_dir(run_dir: Path, stack: contextlib.ExitStack) -> None:
    """Make this process the one owner of `run_dir` until `stack` closes: an exclusive lock on
    `<run_dir>/.lock` (`craft.fileio.exclusive_lock`; a crashed owner leaves nothing stuck).
    Another owner is a `BusyError` naming its pid."""
    stack.enter_context(exclusive_lock(run_dir / LOCK, f"run directory {run_dir}", remove=True))


def resolve_resume(
    cfg: Any, resume: str | None, stack: contextlib.ExitStack | None = None
) -> tuple[Path | None, Path | None]:
    """(run directory, checkpoint to resume from); the run directory is None for a new run
    (`craft.training.checkpoint.choose_resume`).

    With `stack`, the run directory continued in is owned (`own_run_dir`) until `stack` closes,
    and the choice is checked again once owned: a previous owner may have moved the run on.
    """
    if resume is None:
        return None, None
    run_dir, ck = ckpt.choose_resume(runs_root(cfg), resume)
    if run_dir is None or ck is None or stack is None:
        return run_dir, ck
    own_run_dir(run_dir, stack)
    if ckpt.latest_checkpoint(run_dir / ckpt.CHECKPOINTS) != ck or ckpt.later_state(run_dir, ck):
        raise BusyError(
            f"run directory {run_dir}: another process continued it while this one started "
            "(its newest checkpoint changed); run the command again"
        )
    return run_dir, ck


def check_resume(path: Path, cfg: Any, model: torch.nn.Module, *, own_run: bool) -> dict[str, Any]:
    """Trainer state of `path` after checking that it fits the model; reports config changes.

    `own_run` (--resume auto: found under this recipe's run.output_dir) imports what the
    checkpoint's config names, as the recipe that started the run did; another path imports only
    what the recipe being run imports.
    """
    state = ckpt.read_trainer_state(path)
    saved_cfg = ckpt.read_config(
        path,
        trust_imports=own_run,
        trusted=cfg.imports,
        hint="add them to the recipe's imports if you trust them",
    )
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
        if not model_changes:
            raise CheckpointError(
                f"--resume {path}: model.safetensors does not match the checkpoint's own "
                f"config ({what}); the weights file is damaged or was replaced"
            )
        raise CheckpointError(
            f"--resume {path}: the config changes the model shape ({what}); changed: "
            f"{'; '.join(model_changes)}"
        )
    if changes:
        log.warning("resuming with config changes: %s", "; ".join(changes))
    if state.get("config_hash") != ckpt.config_hash(cfg) and not changes:
        log.info("config hash differs from the checkpoint's (defaults changed)")
    log.info("resuming from %s (step %d)", path, state["step"])
    return state
