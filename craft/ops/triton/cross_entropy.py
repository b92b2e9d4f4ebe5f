"""Fused cross-entropy in Triton: loss and gradient in one pass over each row of logits.

One program per row streams the vocabulary in chunks: pass 1 keeps an online max / sum-exp (and
the row sum for label smoothing), pass 2 writes d loss / d logits. The gradient is written during
the forward, in place over the logits when they are an intermediate result of the graph
(Liger-Kernel's approach), so the backward is only a scale and no (N, V) softmax is ever stored.
Math is fp32 whatever the logits dtype; the loss is returned in fp32.

Per valid row (target != ignore_index), with eps = label_smoothing and lse = logsumexp(x):
    loss = lse - (1 - eps) * x_t - eps / V * sum_j x_j + z_loss * lse^2
    dloss/dx_j = softmax_j * (1 + 2 * z_loss * lse) - (1 - eps) * [j == t] - eps / V
Ignored rows give 0 loss and 0 gradient; `mean` divides by the number of valid rows (a batch
whose targets are all ignored has loss 0 and zero gradients, not NaN).

In-place caveat: when the logits require grad and are not a leaf, their storage holds the
gradient after this op and their autograd version is bumped, so any other op that saved them for
its backward fails loudly instead of silently using overwritten values.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from craft.errors import KernelError
from craft.ops.triton._common import FLOAT_DTYPES, INTERPRET

REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _ce_kernel(
    X,
    stride_xn,
    stride_xv,
    G,
    stride_gn,
    stride_gv,
    TGT,
    stride_t,
    LOSS,
    N_VALID,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    HAS_GRAD: tl.constexpr,
    MEAN: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xn
    g_row = G + row * stride_gn
    t = tl.load(TGT + row * stride_t).to(tl.int64)
    offs0 = tl.arange(0, BLOCK_V)
    if t == ignore_index:
        tl.store(LOSS + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + offs0
                zeros = tl.zeros([BLOCK_V], dtype=G.dtype.element_ty)
                tl.store(g_row + offs * stride_gv, zeros, mask=offs < V)
        return
    tl.device_assert((t >= 0) & (t < V), "cross_entropy: target out of range")

    # pass 1: online logsumexp over vocabulary chunks
    m = float("-inf")
    s = 0.0
    sum_x = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        ok = offs < V
        x = tl.load(x_row + offs * stride_xv, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(ok, x, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    x_t = tl.load(x_row + t * stride_xv).to(tl.float32)
    if HAS_SMOOTHING:
        loss = lse - (1.0 - label_smoothing) * x_t - label_smoothing / V * sum_x
    else:
        loss = lse - x_t
    if HAS_Z:
        loss += z_loss * lse * lse
    tl.store(LOSS + row, loss)

    # pass 2: the gradient, scaled for `mean` by 1 / (number of valid rows)
    if HAS_GRAD:
        if MEAN:
            scale = 1.0 / tl.maximum(tl.load(N_VALID).to(tl.float32), 1.0)
        else:
            scale = 1.0
        p_scale = scale
        if HAS_Z:
            p_scale = scale * (1.0 + 2.0 * z_loss * lse)
        hit = (1.0 - label_smoothing) * scale
        smooth = label_smoothing / V * scale
        for start in range(0, V, BLOCK_V):
            offs = start + offs0
            ok = offs < V
            x = tl.load(x_row + offs * stride_xv, mask=ok, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * p_scale
            if HAS_SMOOTHING:
                g -= smooth
            g = tl.where(offs == t, g - hit, g)
            tl.store(g_row + offs * stride_gv, g.to(G.dtype.element_ty), mask=ok)


def _launch_params(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): a chunk of the row per iteration, sized for streaming bandwidth."""
    if INTERPRET:  # several chunks even for small test vocabularies; numpy is fast per chunk
        return min(triton.next_power_of_2(V), 256), 1
    block = min(triton.next_power_of_2(V), 8192)
    return block, (4 if block <= 1024 else (8 if block <= 4096 else 16))


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad: torch.Tensor | None,
    n_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row losses (N,) fp32; when `grad` (N, V) is given, also write d(reduced loss)/d logits.

    `n_valid` (a 0-d device tensor) selects `mean` scaling of the gradient (no host sync); None
    means unscaled (`sum` / per-row). `grad` may be `logits` itself for the in-place update.
    """
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N == 0:
        return loss
    block, warps = _launch_params(V)
    g = grad if grad is not None else logits  # never written when HAS_GRAD is False
    _ce_kernel[(N,)](
        logits, logits.stride(0), logits.stride(1),
        g, g.stride(0), g.stride(1),
        targets, targets.stride(0),
        loss, n_valid if n_valid is not None else loss,
        V, ignore_index, float(label_smoothing), float(z_loss),
        HAS_GRAD=grad is not None, MEAN=n_valid is not None,
        HAS_SMOOTHING=label_smoothing > 0.0, HAS_Z=z_loss != 0.0,
        BLOCK_V=block, num_warps=warps,
    )  # fmt: skip
    return loss


def reduce_loss(loss: torch.Tensor, reduction: str, n_valid: torch.Tensor) -> torch.Tensor:
    """Reduce per-row losses (N,) like F.cross_entropy, except an all-ignored mean is 0."""
    if reduction == "mean":
        return loss.sum() / n_valid.clamp(min=1).to(loss.dtype)
    if reduction == "sum":
        return loss.sum()
    return loss


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply the incoming gradient to a precomputed d loss / d x, skipping the common 1.0 case."""
    if reduction == "none":
        return grad.mul_(grad_output.unsqueeze(1).to(grad.dtype))
    if not torch.equal(grad_output, torch.ones_like(grad_output)):
        grad.mul_(grad_output.to(grad.dtype))
    return grad


def _is_intermediate(t: torch.Tensor) -> bool:
    """Whether t's memory belongs to the autograd graph, so the kernel may overwrite it.

    A view of a leaf (a user's `logits.view(-1, V)`) is not a leaf itself but shares the leaf's
    memory: writing the gradient there would silently change the user's tensor.
    """
    base = t._base if t._base is not None else t
    return not t.is_leaf and not base.is_leaf


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy whose gradient is produced by the forward kernel."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        grad_enabled: bool,
    ) -> torch.Tensor:
        # needs_input_grad alone is True under torch.no_grad() too; never write a gradient then
        needs_grad = grad_enabled and ctx.needs_input_grad[0]
        n_valid = (targets != ignore_index).sum()
        grad = None
        if needs_grad:
            # an intermediate result is overwritten; a leaf (a user's tensor) is left intact
            grad = logits if _is_intermediate(logits) else torch.empty_like(logits)
        loss = cross_entropy_rows(
            logits,
            targets,
            ignore_index,
            label_smoothing,
            z_loss,
            grad,
            n_valid if reduction == "mean" else None,
        )
        if grad is not None:
            if grad is logits:
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(grad)
        ctx.reduction = reduction
        ctx.done = False
        return reduce_loss(loss, reduction, n_valid)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        if ctx.done:  # the saved gradient has been scaled in place already
            raise RuntimeError("triton cross_entropy supports a single backward pass per forward")
        ctx.done = True
        (grad,) = ctx.saved_tensors
        return scale_grad_(grad, grad_output, ctx.reduction), None, None, None, None, None, None


def check_inputs(logits: torch.Tensor, targets: torch.Tensor) -> str | None:
    """None when the kernel accepts these inputs, else why not."""
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        return f"expected logits (N, V) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
    if logits.dtype not in FLOAT_DTYPES:
        return f"logits dtype {logits.dtype} not supported (fp16/bf16/fp32)"
    if targets.dtype not in (torch.int64, torch.int32):
        return f"targets dtype {targets.dtype} not supported (int64/int32)"
    if logits.shape[1] == 0:
        return "empty vocabulary"
    if logits.device != targets.device:
        return f"logits on {logits.device} but targets on {targets.device}"
    return None


def check_options(reduction: str, label_smoothing: float, z_loss: float) -> str | None:
    if reduction not in REDUCTIONS:
        return f"reduction {reduction!r} not one of {', '.join(REDUCTIONS)}"
    if not 0.0 <= label_smoothing <= 1.0:
        return f"label_smoothing {label_smoothing} not in [0, 1]"
    if z_loss < 0.0:
        return f"z_loss {z_loss} must be >= 0"
    return None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """The `triton` backend of craft.ops.cross_entropy. logits (N, V), targets (N,); fp32 loss."""
    reason = check_inputs(logits, targets) or check_options(reduction, label_smoothing, z_loss)
    if reason:
        raise KernelError(f"triton cross_entropy: {reason}")
    return CrossEntropyFunction.apply(
        logits, targets, int(ignore_index), reduction, float(label_smoothing), float(z_loss),
        torch.is_grad_enabled(),
    )  # fmt: skip
