"""The ops the models call. Each dispatches to the backend chosen by the `kernels` config section.

Backends: `eager` (plain math, the readable reference), `torch` (SDPA, F.cross_entropy, ...),
`triton` (fused kernels, CUDA) and `cuda` (the compiled extension from `kernels/`). Models never
call a backend directly.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from craft.ops import registry
from craft.ops.registry import (
    OPS,
    availability,
    choose,
    register_backend,
    resolve,
    selected,
    set_backend,
)

_BACKEND_MODULES = (
    "craft.ops.eager",
    "craft.ops.torch_backend",
    "craft.ops.triton",
    "craft.ops.cuda",
)
_loaded = False
_UNLOADED: dict[str, str] = {}  # backend module -> why it could not be imported
log = logging.getLogger("craft.ops")


def _load_backends() -> None:
    """Import the backend modules once; each registers itself. Missing optional ones are skipped."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BACKEND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            _UNLOADED[mod] = "not installed" if e.name == mod else f"{type(e).__name__}: {e}"
            if e.name != mod:
                log.debug("backend module %s not importable: %s", mod, e)


def unloaded_backends() -> dict[str, str]:
    """Backend modules that could not be imported here, with the reason (for `craft model info`)."""
    _load_backends()
    return dict(_UNLOADED)


def configure(kernels: Any = None, device_type: str | None = None, **names: str) -> dict[str, str]:
    """Select backends from a `kernels` config section (or keyword names); log the choice once."""
    _load_backends()
    for op in OPS:
        name = names.get(op) or (getattr(kernels, op) if kernels is not None else None)
        if name:
            set_backend(op, name)
    chosen = {op: choose(op, device_type) for op in OPS} if device_type else {}
    if chosen:
        log.info("kernels on %s: %s", device_type, ", ".join(f"{k}={v}" for k, v in chosen.items()))
        for op, name in chosen.items():
            registry.mark_logged(op, device_type, name)  # resolve() logs only a different choice
    return chosen


@contextlib.contextmanager
def use_backends(**names: str) -> Iterator[None]:
    """Select backends by op name (e.g. `attention="eager"`) inside a block, then restore them.

    For tests and benchmarks that compare backends; a run selects them once with `configure`.
    """
    _load_backends()
    previous = {op: selected(op) for op in names}
    try:
        for op, name in names.items():
            set_backend(op, name)
        yield
    finally:
        for op, name in previous.items():
            set_backend(op, name)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention. q (B, H, Tq, D), k/v (B, Hkv, Tk, D) with H % Hkv == 0.

    `causal` masks bottom-right aligned: query i sits at position Tk - Tq + i (so decoding with a
    KV cache is causal too).
    """
    return resolve("attention", q.device.type, q, k, v, causal, scale).fn(q, k, v, causal, scale)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of logits (N, V) against targets (N,). `z_loss` adds z_loss * logsumexp^2."""
    b = resolve("cross_entropy", logits.device.type, logits, targets)
    return b.fn(logits, targets, ignore_index, reduction, label_smoothing, z_loss)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets) without all logits at once where possible.

    hidden (N, C), weight (V, C), targets (N,).
    """
    b = resolve("linear_cross_entropy", hidden.device.type, hidden, weight, targets)
    return b.fn(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss)


def norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    kind: str = "layernorm",
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> Any:
    """LayerNorm or RMSNorm over the last dim.

    Without `residual`: returns norm(x). With it: s = x + residual, returns (norm(s), s), which
    fused backends compute in one pass.
    """
    b = resolve("norm", x.device.type, x, weight, bias, kind, residual)
    return b.fn(x, weight, bias, kind, eps, residual)


__all__ = [
    "OPS",
    "attention",
    "availability",
    "configure",
    "cross_entropy",
    "linear_cross_entropy",
    "norm",
    "register_backend",
    "selected",
    "set_backend",
    "unloaded_backends",
    "use_backends",
]
