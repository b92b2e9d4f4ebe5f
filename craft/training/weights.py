"""`model.safetensors`: tied weights stored once (their other names in the metadata), shapes read
from the header and checked against a config before a model is built, loading into a model by
name. Nothing here unpickles.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from craft.errors import CheckpointError
from craft.safety import printable
from craft.training.state_io import dedupe_shared, save_tensors

ALIASES_KEY = "craft.aliases"


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
