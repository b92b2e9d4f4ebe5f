"""The ops the models call, each run by the backend a `Kernels` table chose for it.

Backends: `eager` (plain math, the readable reference), `torch` (SDPA, F.cross_entropy, ...),
`triton` (fused kernels, CUDA) and `cuda` (the compiled extension from `kernels/`). Models never
call a backend directly: a model holds a `Kernels` table built from its `kernels` config section,
which picks the backend of each op once per input signature (device, dtypes, head size) and then
calls it directly. The module-level functions (`craft.ops.attention`, ...) use the process-wide
default table, which `use_backends` changes for a block (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from craft.ops import registry
from craft.ops.registry import (
    OPS,
    availability,
    check_name,
    choose,
    describe_auto,
    register_backend,
    resolve,
)

_BACKEND_MODULES = (
    "craft.ops.eager",
    "craft.ops.torch_backend",
    "craft.ops.triton",
    "craft.ops.cuda",
)
_loaded = False
_UNLOADED: dict[str, str] = {}  # backend module -> why it could not be imported
_ANNOUNCED: set[tuple[Any, ...]] = set()  # choices already logged in this process
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


def _short(v: Any) -> str:
    return str(v).removeprefix("torch.")


class Kernels:
    """The backend of every op for one model, chosen once per input signature.

    `kernels` is a `kernels` config section (or a mapping op -> name); keyword names override it.
    Each op keeps a small table from the signature of its inputs (device type, dtypes, head size)
    to the backend function: the first call with a new signature resolves it (`auto` walks the
    order of preference and asks each backend whether it `supports` the inputs) and logs the
    choice once; every later call is a dictionary lookup and the call itself (~1 us of Python on
    a CPU; bench/dispatch_overhead.py). Tables are
    independent, so two models in one process may use different backends.
    """

    def __init__(self, kernels: Any = None, **names: str) -> None:
        self.names: dict[str, str] = {}
        for op in OPS:
            name = names.get(op)
            if name is None and isinstance(kernels, Mapping):
                name = kernels.get(op)
            elif name is None and kernels is not None:
                name = getattr(kernels, op, None)
            name = name or "auto"
            check_name(op, name)
            self.names[op] = name
        self._reset()

    def _reset(self) -> None:
        self._attention: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._cross_entropy: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._linear_cross_entropy: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._norm: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def select(self, op: str, name: str) -> None:
        """Select the backend of `op` ("auto" or a registered name); forgets earlier choices."""
        check_name(op, name)
        self.names[op] = name
        self._reset()

    def plan(self, device_type: str) -> dict[str, str]:
        """The backend each op would take on `device_type` for typical inputs (for logs)."""
        return {op: choose(op, device_type, self.names[op]) for op in OPS}

    def __repr__(self) -> str:
        return "Kernels(" + ", ".join(f"{op}={n!r}" for op, n in self.names.items()) + ")"

    # A table is configuration plus a cache: copies of a model share it, pickles rebuild it.
    def __deepcopy__(self, memo: dict[int, Any]) -> Kernels:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"names": dict(self.names)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.names = dict(state["names"])
        self._reset()

    def _choose(
        self,
        op: str,
        cache: dict[tuple[Any, ...], Callable[..., Any]],
        key: tuple[Any, ...],
        args: tuple[Any, ...],
    ) -> Callable[..., Any]:
        """Resolve the backend of `op` for inputs with signature `key` (key[0] is the device)."""
        name = self.names[op]
        device_type = key[0].type
        b = resolve(op, name, device_type, *args)
        cache[key] = b.fn
        announce = (op, name, key, b.name)
        if announce not in _ANNOUNCED and not torch.compiler.is_compiling():
            _ANNOUNCED.add(announce)
            how = "auto chose" if name == "auto" else "selected"
            log.info(
                "ops.%s: %s backend %r on %s for %s",
                op,
                how,
                b.name,
                device_type,
                ", ".join(_short(k) for k in key[1:]),
            )
        return b.fn

    # -------------------------------------------------------------------------------- the ops

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = True,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        """Scaled dot-product attention. q (B, H, Tq, D), k/v (B, Hkv, Tk, D) with H % Hkv == 0.

        `causal` masks bottom-right aligned: query i sits at position Tk - Tq + i (so decoding
        with a KV cache is causal too). `dropout_p` drops attention probabilities (pass 0 when
        not training).
        """
        key = (q.device, q.dtype, k.dtype, q.shape[-1])  # (torch.device: cheaper than .type)
        fn = self._attention.get(key)
        if fn is None:
            fn = self._choose(
                "attention", self._attention, key, (q, k, v, causal, scale, dropout_p)
            )
        return fn(q, k, v, causal, scale, dropout_p)

    def cross_entropy(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
    ) -> torch.Tensor:
        """Cross-entropy of logits (N, V) against targets (N,); `z_loss` adds z_loss * lse^2."""
        key = (logits.device, logits.dtype, targets.dtype)
        fn = self._cross_entropy.get(key)
        if fn is None:
            fn = self._choose("cross_entropy", self._cross_entropy, key, (logits, targets))
        return fn(logits, targets, ignore_index, reduction, label_smoothing, z_loss)

    def linear_cross_entropy(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
    ) -> torch.Tensor:
        """cross_entropy(hidden @ weight.T + bias, targets) without all logits at once where
        possible. hidden (N, C), weight (V, C), targets (N,).
        """
        key = (hidden.device, hidden.dtype, weight.dtype, targets.dtype)
        fn = self._linear_cross_entropy.get(key)
        if fn is None:
            fn = self._choose(
                "linear_cross_entropy",
                self._linear_cross_entropy,
                key,
                (hidden, weight, targets),
            )
        return fn(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss)

    def norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        kind: str = "layernorm",
        eps: float = 1e-5,
        residual: torch.Tensor | None = None,
    ) -> Any:
        """LayerNorm or RMSNorm over the last dim.

        Without `residual`: returns norm(x). With it: s = x + residual, returns (norm(s), s),
        which fused backends compute in one pass. Dtypes (every backend): s has the promoted
        dtype of x and residual (an fp32 residual stream stays fp32 when x is a bf16 branch);
        the normalised output has the autocast dtype when autocast is on for the device, else
        s's dtype.
        """
        key = (
            x.device,
            x.dtype,
            None if residual is None else residual.dtype,
            None if weight is None else weight.dtype,
            kind,
        )
        fn = self._norm.get(key)
        if fn is None:
            fn = self._choose("norm", self._norm, key, (x, weight, bias, kind, residual))
        return fn(x, weight, bias, kind, eps, residual)


DEFAULT = Kernels()  # the process-wide table of the module-level op functions


def kernels_for(kernels: Any = None) -> Kernels:
    """A model's table: its own one from a `kernels` section, or the process default for None."""
    return DEFAULT if kernels is None else Kernels(kernels)


def set_backend(op: str, name: str) -> None:
    """Select the backend of `op` in the process default table."""
    DEFAULT.select(op, name)


def selected(op: str) -> str:
    """The backend name ("auto" or a backend) `op` has in the process default table."""
    return DEFAULT.names[op]


def configure(kernels: Any = None, device_type: str | None = None, **names: str) -> dict[str, str]:
    """Set the process default table from a `kernels` section; log the planned choice once.

    For models that take no table of their own; a model built with `kernels=` ignores it.
    """
    table = Kernels(kernels, **names)
    for op, name in table.names.items():
        if DEFAULT.names[op] != name:
            DEFAULT.select(op, name)
    if not device_type:
        return {}
    chosen = DEFAULT.plan(device_type)
    log_plan(chosen, device_type)
    return chosen


def log_plan(chosen: Mapping[str, str], device_type: str) -> None:
    """Log the backend each op will take on `device_type` (`auto` resolves per input later)."""
    log.info("kernels on %s: %s", device_type, ", ".join(f"{k}={v}" for k, v in chosen.items()))


@contextlib.contextmanager
def use_backends(**names: str) -> Iterator[None]:
    """Select backends of the default table by op name (e.g. `attention="eager"`) inside a block.

    For tests and benchmarks that compare backends on the module-level functions or on models
    built without a table of their own.
    """
    previous = dict(DEFAULT.names)
    try:
        for op, name in names.items():
            DEFAULT.select(op, name)
        yield
    finally:
        for op, name in previous.items():
            if DEFAULT.names[op] != name:
                DEFAULT.select(op, name)


# The module-level ops: the process default table's (models hold their own table).
attention = DEFAULT.attention
cross_entropy = DEFAULT.cross_entropy
linear_cross_entropy = DEFAULT.linear_cross_entropy
norm = DEFAULT.norm


__all__ = [
    "DEFAULT",
    "OPS",
    "Kernels",
    "attention",
    "availability",
    "choose",
    "configure",
    "cross_entropy",
    "describe_auto",
    "kernels_for",
    "linear_cross_entropy",
    "log_plan",
    "norm",
    "register_backend",
    "registry",
    "resolve",
    "selected",
    "set_backend",
    "unloaded_backends",
    "use_backends",
]
