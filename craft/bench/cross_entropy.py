"""Cross-entropy benchmark: mean loss of logits (N, V) against targets (N,), N = batch * seq_len.

Memory-bound, so the metric is GB/s over the nominal bytes of the unfused op: the forward reads
the logits once (N * V * s, s = bytes per element); the backward reads them (or the saved
probabilities) and writes their gradient (2 * N * V * s); forward+backward 3 * N * V * s. Every
implementation is divided by the same bytes, so GB/s ranks them like time does; a fused kernel
that never re-reads the logits can show more than the card's bandwidth in fwd+bwd mode.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from craft.bench.core import Case, Family, Impl, Inputs, Settings, register_impl
from craft.bench.impls import compile_impl, liger_available, register_craft_backends

NAME = "cross_entropy"
# (batch, seq_lens, vocab) defaults
_DEFAULTS = {
    "cuda": ([4], [4096], [32768, 50257, 128256]),
    "cpu": ([2], [256], [2048, 8192, 32768]),
    "quick": ([1], [32], [128, 512]),
}
MODE_BYTES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}
# Rows of the float64 reference computed at once: about 256 MiB of logits.
_REF_ELEMENTS = 1 << 25


def cases(s: Settings) -> list[dict[str, Any]]:
    key = "quick" if s.quick else ("cuda" if s.device.type == "cuda" else "cpu")
    d_batch, d_seq, d_vocab = _DEFAULTS[key]
    return [
        {"batch": b, "seq_len": t, "tokens": b * t, "vocab": v}
        for b, t, v in itertools.product(
            s.pick("batch", d_batch), s.pick("seq_lens", d_seq), s.pick("vocab", d_vocab)
        )
    ]


def make_inputs(case: Case, gen: torch.Generator) -> Inputs:
    n, vocab = case.dims["tokens"], case.dims["vocab"]
    logits = torch.randn(n, vocab, generator=gen, device=case.device).to(case.dtype)  # (N, V)
    targets = torch.randint(0, vocab, (n,), generator=gen, device=case.device)  # (N,)
    return Inputs((logits, targets), ("logits", "targets"), (0,), (None,), ("loss",))


def reference(case: Case, inputs: Inputs, dtype: torch.dtype) -> list[torch.Tensor]:
    """Mean loss and its gradient, a block of rows at a time."""
    logits, targets = inputs.args
    n, vocab = logits.shape
    rows = max(1, _REF_ELEMENTS // vocab)
    loss = torch.zeros((), dtype=dtype, device=logits.device)
    grad = torch.empty(logits.shape, dtype=dtype, device=logits.device) if case.needs_grad else None
    for start in range(0, n, rows):
        x = logits[start : start + rows].detach().to(dtype).requires_grad_(case.needs_grad)
        with torch.set_grad_enabled(case.needs_grad):
            part = F.cross_entropy(x, targets[start : start + rows], reduction="sum") / n
            if case.needs_grad:
                part.backward()
                grad[start : start + rows] = x.grad  # type: ignore[index]
        loss += part.detach()
    return [loss, grad] if case.needs_grad else [loss]  # type: ignore[list-item]


def work(case: Case) -> float:
    n, vocab = case.dims["tokens"], case.dims["vocab"]
    elem = torch.finfo(case.dtype).bits // 8
    return float(MODE_BYTES[case.mode] * n * vocab * elem)


def memory(case: Case) -> int:
    """Logits (drawn in float32, then cast) and the float64 reference gradient."""
    n, vocab = case.dims["tokens"], case.dims["vocab"]
    elem = torch.finfo(case.dtype).bits // 8
    return n * vocab * (4 + elem + (8 if case.needs_grad else 0))


FAMILY = Family(
    name=NAME,
    title="Cross-entropy",
    x_key="vocab",
    metric="GB/s",
    cases=cases,
    make_inputs=make_inputs,
    reference=reference,
    work=work,
    baselines=("torch", "eager"),
    label_keys=("tokens", "vocab"),
    work_note="bytes: fwd N*V*s (read logits); bwd 2*N*V*s (read, write grad); fwd+bwd 3*N*V*s",
    memory=memory,
)


# ---------------------------------------------------------------------------- implementations


def _eager(case: Case) -> Callable[..., torch.Tensor]:
    """log-softmax in float32, gather, mean: the loss written out."""

    def fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        return -logp.gather(1, targets.unsqueeze(1)).mean()

    return fn


def _torch(case: Case) -> Callable[..., torch.Tensor]:
    """F.cross_entropy on the logits as they are (nanoGPT's loss)."""
    return lambda logits, targets: F.cross_entropy(logits, targets)


def _liger(case: Case) -> Callable[..., torch.Tensor]:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(reduction="mean")


def _craft_call(fn: Callable[..., torch.Tensor], case: Case) -> Callable[..., torch.Tensor]:
    return lambda logits, targets: fn(logits, targets, -100, "mean", 0.0, 0.0)


def _register() -> None:
    register_impl(NAME, Impl("eager", _eager, description="log_softmax in float32 + gather"))
    register_impl(NAME, Impl("torch", _torch, description="F.cross_entropy"))
    compile_impl(NAME, _eager)
    register_impl(
        NAME,
        Impl(
            "liger",
            _liger,
            lambda case, args: liger_available(case),
            "Liger-Kernel LigerCrossEntropyLoss",
        ),
    )
    register_craft_backends(NAME, "cross_entropy", _craft_call, lambda case, a: (a[0], a[1]))


_register()
