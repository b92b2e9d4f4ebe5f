"""Fused linear + cross-entropy benchmark: mean loss of hidden (N, C) @ weight (V, C)^T.

Compute-bound: forward 2 * N * C * V FLOPs (the logits matmul), backward 4 * N * C * V (the
gradients of hidden and weight), forward+backward 6 * N * C * V. The point of a fused kernel is
memory (it never holds all N x V logits), so read the peak-memory column next to TFLOP/s.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from craft.bench.core import Case, Family, Impl, Inputs, Settings, register_impl
from craft.bench.impls import compile_impl, liger_available, register_craft_backends

NAME = "linear_cross_entropy"
# (batch, seq_lens, hidden, vocab) defaults
_DEFAULTS = {
    "cuda": ([4], [2048], [4096], [32768, 128256]),
    "cpu": ([2], [256], [256], [2048, 8192, 32768]),
    "quick": ([1], [32], [32], [128, 512]),
}
MODE_FLOPS = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}
_REF_ELEMENTS = 1 << 25  # logits elements per block of the reference


def cases(s: Settings) -> list[dict[str, Any]]:
    key = "quick" if s.quick else ("cuda" if s.device.type == "cuda" else "cpu")
    d_batch, d_seq, d_hidden, d_vocab = _DEFAULTS[key]
    return [
        {"batch": b, "seq_len": t, "tokens": b * t, "hidden": c, "vocab": v}
        for b, t, c, v in itertools.product(
            s.pick("batch", d_batch),
            s.pick("seq_lens", d_seq),
            s.pick("hidden", d_hidden),
            s.pick("vocab", d_vocab),
        )
    ]


def make_inputs(case: Case, gen: torch.Generator) -> Inputs:
    n, c, vocab = case.dims["tokens"], case.dims["hidden"], case.dims["vocab"]
    hidden = torch.randn(n, c, generator=gen, device=case.device).to(case.dtype)  # (N, C)
    weight = (torch.randn(vocab, c, generator=gen, device=case.device) * c**-0.5).to(
        case.dtype
    )  # (V, C)
    targets = torch.randint(0, vocab, (n,), generator=gen, device=case.device)  # (N,)
    return Inputs(
        (hidden, weight, targets), ("hidden", "weight", "targets"), (0, 1), (None,), ("loss",)
    )


def reference(case: Case, inputs: Inputs, dtype: torch.dtype) -> list[torch.Tensor]:
    """Loss and gradients of hidden and weight, a block of rows at a time."""
    hidden, weight, targets = inputs.args
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = max(1, _REF_ELEMENTS // vocab)
    w = weight.detach().to(dtype).requires_grad_(case.needs_grad)  # (V, C)
    loss = torch.zeros((), dtype=dtype, device=hidden.device)
    dh = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if case.needs_grad else None
    for start in range(0, n, rows):
        h = hidden[start : start + rows].detach().to(dtype).requires_grad_(case.needs_grad)
        with torch.set_grad_enabled(case.needs_grad):
            logits = h @ w.t()  # (rows, V)
            part = F.cross_entropy(logits, targets[start : start + rows], reduction="sum") / n
            if case.needs_grad:
                part.backward()  # accumulates into w.grad across blocks
                dh[start : start + rows] = h.grad  # type: ignore[index]
        loss += part.detach()
    return [loss, dh, w.grad] if case.needs_grad else [loss]  # type: ignore[list-item]


def work(case: Case) -> float:
    d = case.dims
    return float(MODE_FLOPS[case.mode] * d["tokens"] * d["hidden"] * d["vocab"])


def ref_flops(case: Case) -> float:
    d = case.dims
    return float(6 * d["tokens"] * d["hidden"] * d["vocab"])


def memory(case: Case) -> int:
    """hidden and weight (drawn in float32, then cast) and their float64 reference gradients."""
    n, c, vocab = case.dims["tokens"], case.dims["hidden"], case.dims["vocab"]
    elem = torch.finfo(case.dtype).bits // 8
    return (n + vocab) * c * (4 + elem + (8 if case.needs_grad else 0))


FAMILY = Family(
    name=NAME,
    title="Linear + cross-entropy",
    x_key="vocab",
    metric="TFLOP/s",
    cases=cases,
    make_inputs=make_inputs,
    reference=reference,
    work=work,
    baselines=("eager",),
    label_keys=("tokens", "hidden", "vocab"),
    work_note="FLOPs: fwd 2*N*C*V; bwd 4*N*C*V; fwd+bwd 6*N*C*V",
    ref_flops=ref_flops,
    memory=memory,
)


# ---------------------------------------------------------------------------- implementations


def _eager(case: Case) -> Callable[..., torch.Tensor]:
    """Materialise the (N, V) logits, then F.cross_entropy in float32."""

    def fn(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.t()  # (N, V)
        return F.cross_entropy(logits.float(), targets)

    return fn


def _liger(case: Case) -> Callable[..., torch.Tensor]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="mean")
    return lambda hidden, weight, targets: loss(weight, hidden, targets)


def _craft_call(fn: Callable[..., torch.Tensor], case: Case) -> Callable[..., torch.Tensor]:
    return lambda hidden, weight, targets: fn(hidden, weight, targets, None, -100, "mean", 0.0, 0.0)


def _register() -> None:
    register_impl(NAME, Impl("eager", _eager, description="full logits + F.cross_entropy"))
    compile_impl(NAME, _eager)
    register_impl(
        NAME,
        Impl(
            "liger",
            _liger,
            lambda case, args: liger_available(case),
            "Liger-Kernel LigerFusedLinearCrossEntropyLoss",
        ),
    )
    register_craft_backends(
        NAME, "linear_cross_entropy", _craft_call, lambda case, a: (a[0], a[1], a[2])
    )


_register()
