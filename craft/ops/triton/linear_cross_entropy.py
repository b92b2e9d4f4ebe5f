"""Fused output layer + cross-entropy: the loss from hidden states without all logits at once.

Tokens are processed in chunks: for each chunk the logits (chunk, V) are one cuBLAS matmul, the
Triton cross-entropy kernel turns them into per-row losses and, in the same pass, into their
gradient (in place), and two more matmuls fold that gradient into d hidden and d weight. Peak
extra memory is O(chunk x V) plus the weight gradient, instead of O(N x V) logits, their softmax
and their gradient. For `mean`/`sum` the gradients are ready after the forward and the backward is
a scale; for `none` the backward recomputes chunk by chunk with the per-row incoming gradients.

Under autocast the matmuls run in the autocast dtype (as nn.Linear would); gradients come back in
the dtype of each input, and the weight gradient accumulates over chunks in the weight's dtype
(fp32 master weights under AMP accumulate in fp32).
"""

from __future__ import annotations

from typing import Any

import torch
import triton

from craft.errors import KernelError
from craft.ops.eager import matmul_dtype
from craft.ops.triton._common import FLOAT_DTYPES
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
    n_valid: torch.Tensor | None,
    want: tuple[bool, bool, bool],
    row_scale: torch.Tensor | None,
    loss_out: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run all chunks. Writes per-row losses into `loss_out` when given; returns the gradients
    (hidden, weight, bias) asked for by `want`, each scaled for `mean` when `n_valid` is given and
    per row by `row_scale` (N,) when given."""
    N, C = hidden.shape
    V = weight.shape[0]
    w = weight.to(dtype)  # (V, C); no copy unless autocast or mixed dtypes demand one
    b = bias.to(dtype) if bias is not None else None
    want_h, want_w, want_b = want
    any_grad = want_h or want_w or want_b
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros_like(weight) if want_w else None  # (V, C), accumulated over chunks
    grad_b = torch.zeros(V, device=weight.device, dtype=torch.float32) if want_b else None
    step = chunk_size(N, C, V)
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, N, step):
            e = min(s + step, N)
            h = hidden[s:e].to(dtype)  # (n, C)
            logits = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()  # (n, V)
            rows = cross_entropy_rows(
                logits,
                targets[s:e],
                ignore_index,
                label_smoothing,
                z_loss,
                logits if any_grad else None,  # the gradient replaces the logits in place
                n_valid,
            )
            if loss_out is not None:
                loss_out[s:e] = rows
            if not any_grad:
                continue
            if row_scale is not None:
                logits.mul_(row_scale[s:e, None].to(logits.dtype))
            if grad_h is not None:
                if grad_h.dtype == dtype:
                    torch.mm(logits, w, out=grad_h[s:e])  # (n, C)
                else:
                    grad_h[s:e] = logits @ w
            if grad_w is not None:
                grad_w.addmm_(logits.t().to(grad_w.dtype), h.to(grad_w.dtype))  # (V, C)
            if grad_b is not None:
                grad_b += logits.sum(0, dtype=torch.float32)
    return (
        grad_h,
        grad_w,
        (grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None),
    )


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
        eager = reduction != "none"  # gradients now, the backward only scales them
        grads = _chunks(
            hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, dtype,
            n_valid if reduction == "mean" else None,
            want if eager else (False, False, False), None, rows,
        )  # fmt: skip
        ctx.reduction = reduction
        ctx.options = (ignore_index, label_smoothing, z_loss, dtype)
        ctx.want = want
        ctx.done = False
        if eager:
            ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
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
            grads = _chunks(
                hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, dtype,
                None, ctx.want, grad_output, None,
            )  # fmt: skip
        else:
            scale_needed = not torch.equal(grad_output, torch.ones_like(grad_output))
            grads = tuple(
                (g.mul_(grad_output.to(g.dtype)) if scale_needed else g) if w else None
                for g, w in zip(ctx.saved_tensors, ctx.want, strict=True)
            )
        return (*grads, None, None, None, None, None, None, None)


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
