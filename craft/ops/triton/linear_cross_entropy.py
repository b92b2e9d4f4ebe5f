"""Fused output layer + cross-entropy: the loss from hidden states without all logits at once.

Tokens are processed in chunks: for each chunk the logits (chunk, V) are one cuBLAS matmul, the
Triton cross-entropy kernel turns them into per-row losses and, in the same pass, into their
gradient (in place), and two more matmuls fold that gradient into d hidden and d weight. Peak
extra memory is O(chunk x V) plus the weight gradient, instead of O(N x V) logits, their softmax
and their gradient. For `mean`/`sum` the gradients are ready after the forward and the backward is
a scale; for `none` the backward recomputes chunk by chunk with the per-row incoming gradients.

Mixed precision: under autocast the matmuls run in the autocast dtype (as nn.Linear would). The
forward keeps the gradients unscaled (d loss_i / d logits = softmax - onehot, in [-1, 1]): the
GEMMs see values that neither overflow nor underflow in fp16, the d weight GEMM reads the
low-precision operands and accumulates in fp32 (`craft.ops.lowp.addmm_fp32_`), and the backward
applies grad_output / N in fp32 before the one rounding to each input's dtype. A GradScaler scale
of 2**16 or more in fp16 is therefore safe.
"""

from __future__ import annotations

from typing import Any

import torch
import triton

from craft.errors import KernelError
from craft.ops.eager import matmul_dtype
from craft.ops.lowp import addmm_fp32_
from craft.ops.triton._common import FLOAT_DTYPES, scale_
from craft.ops.triton.cross_entropy import (
    check_options,
    cross_entropy_rows,
    reduce_loss,
)


def chunk_size(n: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so that a chunk of logits is about as large as the hidden states (N, C)."""
    per = triton.cdiv(vocab, max(hidden, 1))
    return max(1, min(triton.next_power_of_2(triton.cdiv(max(n, 1), per)), max(n, 1)))


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    dtype: torch.dtype,
    want: tuple[bool, bool, bool],
    row_scale: torch.Tensor | None,
    loss_out: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run all chunks, writing per-row losses into `loss_out` (N,) fp32.

    Returns the gradients asked for by `want` (hidden, weight, bias) of sum_i r_i * loss_i, with
    r_i = `row_scale` (N,) applied in fp32 inside the loss kernel, or r_i = 1 when it is None.
    d hidden has hidden's dtype; d weight and d bias are fp32 accumulators.
    """
    N, C = hidden.shape
    V = weight.shape[0]
    w = weight.to(dtype)  # (V, C); no copy unless autocast or mixed dtypes demand one
    b = bias.to(dtype) if bias is not None else None
    want_h, want_w, want_b = want
    any_grad = want_h or want_w or want_b
    grad_h = torch.empty_like(hidden) if want_h else None  # (N, C)
    grad_w = torch.zeros(V, C, device=weight.device, dtype=torch.float32) if want_w else None
    grad_b = torch.zeros(V, device=weight.device, dtype=torch.float32) if want_b else None
    lse = torch.empty(N, device=hidden.device, dtype=torch.float32)
    step = chunk_size(N, C, V)
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, N, step):
            e = min(s + step, N)
            h = hidden[s:e].to(dtype)  # (n, C)
            logits = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()  # (n, V)
            cross_entropy_rows(
                logits, targets[s:e], ignore_index, label_smoothing, z_loss,
                lse=lse[s:e], loss=loss_out[s:e],
                grad=logits if any_grad else None,  # the gradient replaces the logits in place
                scale=None if row_scale is None else row_scale[s:e],
            )  # fmt: skip
            if not any_grad:
                continue
            if grad_h is not None:
                if grad_h.dtype == dtype:
                    torch.mm(logits, w, out=grad_h[s:e])  # (n, C)
                else:
                    grad_h[s:e] = logits @ w
            if grad_w is not None:
                addmm_fp32_(grad_w, logits.t(), h)  # (V, C), fp32 accumulation
            if grad_b is not None:
                grad_b += logits.sum(0, dtype=torch.float32)
    return grad_h, grad_w, grad_b


class LinearCrossEntropyFunction(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T + bias, targets), chunked over tokens."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        dtype: torch.dtype,
        grad_enabled: bool,
    ) -> torch.Tensor:
        # needs_input_grad alone is True under torch.no_grad() too
        want = (
            grad_enabled and ctx.needs_input_grad[0],
            grad_enabled and ctx.needs_input_grad[1],
            grad_enabled and bias is not None and ctx.needs_input_grad[2],
        )
        n_valid = (targets != ignore_index).sum()
        rows = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        eager = reduction != "none"  # unscaled gradients now, the backward only scales them
        grads = _chunks(
            hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, dtype,
            want if eager else (False, False, False), None, rows,
        )  # fmt: skip
        ctx.reduction = reduction
        ctx.options = (ignore_index, label_smoothing, z_loss, dtype)
        ctx.want = want
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.done = False
        if eager:
            saved = [g if g is not None else torch.empty(0) for g in grads]
            ctx.save_for_backward(*saved, n_valid)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets)
        return reduce_loss(rows, reduction, n_valid)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        if ctx.done:
            raise RuntimeError(
                "triton linear_cross_entropy supports a single backward pass per forward"
            )
        ctx.done = True
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            ignore_index, label_smoothing, z_loss, dtype = ctx.options
            rows = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
            grads = _chunks(
                hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, dtype,
                ctx.want, grad_output, rows,
            )  # fmt: skip
        else:
            *grads, n_valid = ctx.saved_tensors
            # grad_output (a GradScaler scale, an accumulation weight) and 1/N, in fp32
            s = grad_output.float()
            if ctx.reduction == "mean":
                s = s / n_valid.clamp(min=1).float()
            grads = [scale_(g, s) if w else None for g, w in zip(grads, ctx.want, strict=True)]
        out = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)]
        return (*out, None, None, None, None, None, None, None)


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> str | None:
    """None when the fused path accepts these inputs, else why not."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        return (
            f"expected hidden (N, C), weight (V, C), targets (N,), got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or targets.shape[0] != hidden.shape[0]:
        return (
            f"shapes disagree: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        return f"dtypes hidden={hidden.dtype}, weight={weight.dtype}: need fp16/bf16/fp32"
    if targets.dtype not in (torch.int64, torch.int32):
        return f"targets dtype {targets.dtype} not supported (int64/int32)"
    if weight.shape[0] == 0:
        return "empty vocabulary"
    if not (hidden.device == weight.device == targets.device):
        return f"inputs on different devices ({hidden.device}, {weight.device}, {targets.device})"
    return None


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
    """The `triton` backend of craft.ops.linear_cross_entropy. hidden (N, C), weight (V, C)."""
    reason = check_inputs(hidden, weight, targets) or check_options(
        reduction, label_smoothing, z_loss
    )
    if reason is None and bias is not None and bias.shape != (weight.shape[0],):
        reason = f"bias {tuple(bias.shape)} does not match vocabulary {weight.shape[0]}"
    if reason:
        raise KernelError(f"triton linear_cross_entropy: {reason}")
    return LinearCrossEntropyFunction.apply(
        hidden, weight, bias, targets, int(ignore_index), reduction,
        float(label_smoothing), float(z_loss), matmul_dtype(hidden, weight),
        torch.is_grad_enabled(),
    )  # fmt: skip
