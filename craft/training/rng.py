"""Capture and restore the python, numpy, torch and CUDA random states of one process as tensors."""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def capture_rng() -> dict[str, torch.Tensor]:
    """This process's RNG states, each as a CPU tensor (so they can live in safetensors)."""
    version, words, gauss = random.getstate()
    np_state = np.random.get_state()
    assert np_state[0] == "MT19937"
    out = {
        "python.version": torch.tensor([version], dtype=torch.int64),
        "python.state": torch.tensor(words, dtype=torch.int64),
        "python.gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy.keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy.pos": torch.tensor([np_state[2]], dtype=torch.int64),
        "numpy.has_gauss": torch.tensor([np_state[3]], dtype=torch.int64),
        "numpy.cached_gaussian": torch.tensor([np_state[4]], dtype=torch.float64),
        "torch.cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch.cuda.{i}"] = state
    return out


def check_rng(states: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first RNG state whose size differs from this process's own
    (a damaged or foreign checkpoint), before any generator is touched."""
    expected = {k: v.numel() for k, v in capture_rng().items() if not k.startswith("torch.cuda.")}
    for key, n in expected.items():
        t = states.get(key)
        if t is None:
            raise ValueError(f"RNG state {key!r} is missing")
        if t.numel() != n:
            raise ValueError(f"RNG state {key!r} holds {t.numel()} values, expected {n}")
    cuda = [k for k in states if k.startswith("torch.cuda.")]
    present = torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() else []
    if present:
        n = present[0].numel()
        for key in cuda:
            if states[key].numel() != n:
                raise ValueError(
                    f"RNG state {key!r} holds {states[key].numel()} values, expected {n}"
                )


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Inverse of `capture_rng` (CUDA states are restored for the devices present in both)."""
    check_rng(states)
    gauss = float(states["python.gauss"][0])
    random.setstate(
        (
            int(states["python.version"][0]),
            tuple(int(x) for x in states["python.state"].tolist()),
            None if math.isnan(gauss) else gauss,
        )
    )
    np.random.set_state(
        (
            "MT19937",
            states["numpy.keys"].numpy().astype(np.uint32),
            int(states["numpy.pos"][0]),
            int(states["numpy.has_gauss"][0]),
            float(states["numpy.cached_gaussian"][0]),
        )
    )
    torch.set_rng_state(states["torch.cpu"].to(torch.uint8))
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        for key, state in states.items():
            if key.startswith("torch.cuda."):
                idx = int(key.rsplit(".", 1)[1])
                if idx < n:
                    torch.cuda.set_rng_state(state.to(torch.uint8), idx)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
