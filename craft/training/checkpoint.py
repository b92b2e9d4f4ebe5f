"""Checkpoints of a run: writing one, reading its parts, the config it was written with, export,
and loading a model from a run, checkpoint or exported model directory.

This module is the checkpoint API of the package: the directory format
(`craft.training.checkpoint_dirs`: names, completion marker, atomic commit, pruning), the weights
file (`craft.training.weights`) and finding checkpoints (`craft.training.checkpoint_search`) live
in their own modules, and their public names are available here too. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from craft.errors import CheckpointError, ConfigError
from craft.fileio import atomic_write_text, write_text_durable
from craft.safety import (
    MAX_TOML_BYTES,
    inside,
    printable,
    read_json_bounded,
    read_text_bounded,
)
from craft.training.checkpoint_dirs import (
    BEST,
    CHECKPOINTS,
    EXPORT,
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    MARKER,
    STEP_RE,
    check_replaceable,
    checkpoint_name,
    checkpoint_problem,
    checkpoint_step,
    clean_stale,
    commit_directory,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    newest_checkpoint,
    prune,
    read_marker,
    scan_checkpoints,
    unsafe_marker_path,
    warn_skipped,
)
from craft.training.checkpoint_search import (
    choose_resume,
    find_resume,
    later_state,
    newest_run_with_checkpoint,
    resolve_checkpoint,
    resolve_source,
    run_dir_of,
)
from craft.training.state_io import save_state, save_tensors, write_json
from craft.training.weights import (
    ALIASES_KEY,
    check_weights_fit,
    load_model_weights,
    load_weights_into,
    read_tensors,
    retie_state,
    save_model_weights,
    stored_shapes,
    weight_shapes,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ALIASES_KEY",
    "BEST",
    "CHECKPOINTS",
    "EXPORT",
    "FORMAT",
    "FORMAT_VERSION",
    "LATEST",
    "MARKER",
    "STEP_RE",
    "TRUST_HINT",
    "check_replaceable",
    "check_weights_fit",
    "checkpoint_name",
    "checkpoint_problem",
    "checkpoint_step",
    "choose_resume",
    "clean_stale",
    "commit_directory",
    "complete_checkpoints",
    "config_changes",
    "config_dict",
    "config_hash",
    "export_model",
    "find_resume",
    "inspect_model",
    "is_complete",
    "later_state",
    "latest_checkpoint",
    "load_model",
    "load_model_weights",
    "load_weights_into",
    "newest_checkpoint",
    "newest_run_with_checkpoint",
    "prune",
    "read_config",
    "read_marker",
    "read_rng",
    "read_tensors",
    "read_trainer_state",
    "read_trainer_tensors",
    "resolve_checkpoint",
    "resolve_source",
    "retie_state",
    "run_dir_of",
    "save_checkpoint",
    "save_model_weights",
    "scan_checkpoints",
    "stored_shapes",
    "unsafe_marker_path",
    "warn_skipped",
    "weight_shapes",
    "write_export",
]


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


def inspect_model(path: str | Path, *, trust_imports: bool = False) -> tuple[Any, Any]:
    """(tokenizer, config) of what `load_model(path)` loads, with the weights file's header
    read and its parameter count checked against the config; no weight read, no model built.

    A server checks a checkpoint with it in milliseconds and leaves the weights to the process
    that decodes, whose `load_model` checks every name, shape and value.
    """
    from craft.interop.hf import inspect_pretrained, is_hf_source

    if is_hf_source(path):
        return inspect_pretrained(path)
    cfg, tokenizer, _ = _open_model_dir(path, trust_imports)
    return tokenizer, cfg


def _open_model_dir(path: str | Path, trust_imports: bool) -> tuple[Any, Any, Path]:
    """(config, tokenizer, weights file) of a Craft model directory, the config checked against
    the weights file's header."""
    from craft.data.tokenizers import load_tokenizer

    ck = resolve_checkpoint(path)
    cfg = read_config(ck, trust_imports=trust_imports)
    tok_dir = inside(ck, "tokenizer", what="checkpoint tokenizer", error=CheckpointError)
    if not tok_dir.is_dir():
        raise CheckpointError(f"{ck}: has no tokenizer/ (trained on random tokens); cannot load it")
    tokenizer = load_tokenizer(tok_dir)
    weights = inside(ck, "model.safetensors", what="model weights", error=CheckpointError)
    vocab = getattr(cfg.model, "vocab_size", None) or tokenizer.vocab_size
    check_weights_fit(cfg, vocab, weights)
    return cfg, tokenizer, weights


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
    from craft.interop.hf import is_hf_source, load_for_inference
    from craft.training.builders import build_model

    if is_hf_source(path):
        model, tokenizer, cfg = load_for_inference(path)
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        return model, tokenizer, cfg
    cfg, tokenizer, weights = _open_model_dir(path, trust_imports)
    model = build_model(cfg, tokenizer.vocab_size, fused_loss=False)
    load_weights_into(model, weights)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return model, tokenizer, cfg
