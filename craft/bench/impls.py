"""Implementations every family shares: Craft's backends, torch.compile, Liger-Kernel."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from craft.bench.core import Case, Impl, register_impl

TRITON_ON_CPU = (
    "Triton kernels need CUDA (the CPU interpreter, TRITON_INTERPRET=1, checks correctness in "
    "tests but is not meaningful to time)"
)
COMPILE_NAME = "torch.compile"


def register_craft_backends(
    family: str,
    op: str,
    call: Callable[[Any, Case], Callable[..., Any]],
    rejects_args: Callable[[Case, tuple[Any, ...]], tuple[Any, ...]],
) -> None:
    """Register one `craft.<backend>` implementation per backend of `craft.ops.<op>`.

    `call(backend_fn, case)` adapts the backend's function to the family's argument order;
    `rejects_args(case, args)` gives the arguments the backend's `supports` check takes.
    """
    from craft.ops.registry import backends

    for name, backend in sorted(backends(op).items(), key=lambda kv: kv[1].priority):

        def available(case: Case, args: tuple[Any, ...], b: Any = backend) -> str | None:
            if b.name == "triton" and case.device.type != "cuda":
                return TRITON_ON_CPU
            why = b.unavailable_reason()
            if why:
                return why
            if case.device.type not in b.devices:
                return f"craft.ops backend {b.name!r} does not run on {case.device.type}"
            return b.rejects(*rejects_args(case, args))

        def make(case: Case, b: Any = backend) -> Callable[..., Any]:
            return call(b.fn, case)

        register_impl(
            family,
            Impl(f"craft.{name}", make, available, f"craft.ops.{op} with backend {name!r}"),
        )


def compile_impl(family: str, eager: Callable[[Case], Callable[..., Any]]) -> None:
    """Register `torch.compile` of the family's plain eager implementation."""

    def make(case: Case) -> Callable[..., Any]:
        import torch._dynamo

        torch._dynamo.reset()  # a fresh cache per case: shapes never hit the recompile limit
        return torch.compile(eager(case), dynamic=False)

    def context(case: Case) -> AbstractContextManager[Any]:
        """bwd mode replays the backward (retain_graph), which donated buffers forbid."""
        if case.mode != "bwd":
            return contextlib.nullcontext()
        from torch._functorch import config as functorch_config

        return functorch_config.patch(donated_buffer=False)

    register_impl(
        family,
        Impl(
            COMPILE_NAME,
            make,
            description="torch.compile (inductor) of the eager implementation",
            compiles=True,
            context=context,
        ),
    )


def liger_available(case: Case) -> str | None:
    """None when Liger-Kernel can run `case`, else why not."""
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if case.device.type != "cuda":
        return "Liger-Kernel runs on CUDA only"
    return None
