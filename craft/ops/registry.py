"""Kernel backends of the ops layer: registration, availability and the `auto` order.

A backend is registered per op with one call to `register_backend`. `auto` takes, for the device of
the inputs, the first backend in order of preference (highest `priority` first) that is available
and whose `supports` accepts the inputs. The order is a preference, not a measurement: see
`docs/architecture.md` for the evidence behind it. `resolve` makes that choice; `craft.ops.Kernels`
calls it once per input signature and then calls the chosen function directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from craft.errors import KernelError

OPS = ("attention", "cross_entropy", "linear_cross_entropy", "norm")
log = logging.getLogger("craft.ops")


@dataclass
class Backend:
    op: str
    name: str
    fn: Callable[..., Any]
    priority: int = 0
    devices: tuple[str, ...] = ("cpu", "cuda")
    auto_devices: tuple[str, ...] | None = None  # where `auto` may pick it; default: devices
    available: Callable[[], str | None] = lambda: None
    supports: Callable[..., str | None] | None = None
    _reason: str | None = field(default=None, init=False, repr=False)
    _checked: bool = field(default=False, init=False, repr=False)

    def unavailable_reason(self) -> str | None:
        """None when the backend can run on this machine, else why not (computed once)."""
        if not self._checked:
            try:
                self._reason = self.available()
            except Exception as e:  # an import failing in an optional backend
                self._reason = f"{type(e).__name__}: {e}"
            self._checked = True
        return self._reason

    def auto_ok(self, device_type: str) -> bool:
        """Whether `auto` may choose this backend on `device_type`."""
        return device_type in (self.devices if self.auto_devices is None else self.auto_devices)

    def rejects(self, *args: Any, **kwargs: Any) -> str | None:
        """None when the backend accepts these inputs, else why not."""
        return None if self.supports is None else self.supports(*args, **kwargs)


_BACKENDS: dict[str, dict[str, Backend]] = {op: {} for op in OPS}


def register_backend(
    op: str,
    name: str,
    fn: Callable[..., Any],
    *,
    priority: int = 0,
    devices: tuple[str, ...] = ("cpu", "cuda"),
    auto_devices: tuple[str, ...] | None = None,
    available: Callable[[], str | None] | None = None,
    supports: Callable[..., str | None] | None = None,
) -> Backend:
    """Register `fn` as backend `name` of `op`. Registering the same (op, name) twice raises."""
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if name in _BACKENDS[op]:
        raise ValueError(f"backend {name!r} of op {op!r} is already registered")
    b = Backend(
        op, name, fn, priority, devices, auto_devices, available or (lambda: None), supports
    )
    _BACKENDS[op][name] = b
    return b


def backends(op: str) -> dict[str, Backend]:
    from craft.ops import _load_backends

    _load_backends()
    return _BACKENDS[op]


def check_name(op: str, name: str) -> None:
    """Raise when `name` is neither "auto" nor a registered backend of `op`."""
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if name != "auto" and name not in backends(op):
        raise KernelError(
            f"kernels.{op} = {name!r}: no such backend; registered: {', '.join(sorted(backends(op)))}"
        )


def availability(op: str) -> dict[str, str | None]:
    """Backend name -> None if available here, else the reason it is not."""
    return {n: b.unavailable_reason() for n, b in sorted(backends(op).items())}


def preference(op: str) -> list[Backend]:
    """The backends of `op` in `auto`'s order of preference (highest priority first)."""
    return sorted(backends(op).values(), key=lambda b: -b.priority)


def resolve(op: str, name: str, device_type: str, *args: Any) -> Backend:
    """The backend that runs `op` on these inputs when `name` ("auto" or a backend) is selected.

    The slow path: it looks at every candidate. `craft.ops.Kernels` calls it once per input
    signature and keeps the answer.
    """
    table = backends(op)
    if name != "auto":
        b = table[name]
        reason = b.unavailable_reason()
        if reason is None and device_type not in b.devices:
            reason = f"does not run on {device_type}"
        reason = reason or b.rejects(*args)
        if reason:
            raise KernelError(f"kernels.{op} = {name!r} cannot run these inputs: {reason}")
        return b
    for b in preference(op):
        if b.auto_ok(device_type) and b.unavailable_reason() is None and b.rejects(*args) is None:
            return b
    reasons = "; ".join(f"{b.name}: {_why_not(b, device_type, args)}" for b in table.values())
    raise KernelError(f"no backend of {op} can run these inputs on {device_type} ({reasons})")


def _why_not(b: Backend, device_type: str, args: tuple[Any, ...]) -> str:
    """Why backend `b` cannot run these inputs on `device_type` (for error messages)."""
    if not b.auto_ok(device_type):
        return (
            f"not chosen automatically on {device_type}"
            if device_type in b.devices
            else f"does not run on {device_type}"
        )
    return b.unavailable_reason() or b.rejects(*args) or "?"


def choose(op: str, device_type: str, name: str = "auto") -> str:
    """The backend `name` stands for on `device_type` for typical inputs (for logs and reports)."""
    if name != "auto":
        return name
    for b in preference(op):
        if b.auto_ok(device_type) and b.unavailable_reason() is None:
            return b.name
    return "none"


def describe_auto() -> str:
    """One line on what `auto` means, for `craft model info` and the docs (never "fastest")."""
    prio: dict[str, int] = {}
    for op in OPS:
        for b in backends(op).values():
            prio[b.name] = max(prio.get(b.name, b.priority), b.priority)
    names = sorted(prio, key=lambda n: -prio[n])
    return (
        f"auto takes, per op and input signature, the first of {' > '.join(names)} that runs on "
        "the device and accepts the inputs: an order of preference, not a timing (Triton only "
        "on CUDA; `craft bench` and bench/results/ hold the measured speeds)."
    )
