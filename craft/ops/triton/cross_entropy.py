"""Fused cross-entropy in Triton: the loss in one pass over each row of logits, the gradient in one.

One program per row streams the vocabulary in chunks. The forward keeps an online max / sum-exp
(and the row sum for label smoothing) and stores the loss and the log-sum-exp of the row; the
backward reads the row once more and writes d loss / d logits, in place over the logits when they
are an intermediate result of the graph, so no (N, V) softmax or gradient buffer ever exists
besides the logits themselves. Math is fp32 whatever the logits dtype; the loss is fp32.

The incoming gradient (grad_output: a GradScaler scale of 65536, a 1/k accumulation weight, per-row
weights for `none`) and 1/N of the mean are applied in fp32 inside the backward kernel, before the
one rounding to the logits' dtype: nothing overflows or underflows that the exact gradient would
not. The backward needs no host sync (N is read from device memory).

Per valid row (target != ignore_index), with eps = label_smoothing and lse = logsumexp(x):
    loss = lse - (1 - eps) * x_t - eps / V * sum_j x_j + z_loss * lse^2
    dloss/dx_j = softmax_j * (1 + 2 * z_loss * lse) - (1 - eps) * [j == t] - eps / V
Ignored rows give 0 loss and 0 gradient; `mean` divides by the number of valid rows (a batch
whose targets are all ignored has loss 0 and zero gradients, not NaN).

In-place caveat: when the logits require grad and are not a leaf, their storage holds the
gradient once the backward has run and their autograd version is bumped, so any other op that
saved them for its backward fails loudly instead of silently using overwritten values. The
forward leaves them intact.
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
    LSE,
    SCALE,
    stride_s,
    N_VALID,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    FORWARD: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    MEAN: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """FORWARD: loss and lse of the row (pass 1), else lse is read. HAS_GRAD: write the gradient
    (pass 2) times SCALE[row * stride_s] (HAS_SCALE) and / max(N_VALID, 1) (MEAN), in fp32."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xn
    g_row = G + row * stride_gn
    t = tl.load(TGT + row * stride_t).to(tl.int64)
    offs0 = tl.arange(0, BLOCK_V)
    if t == ignore_index:
        if FORWARD:
            tl.store(LOSS + row, 0.0)
            tl.store(LSE + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + offs0
                zeros = tl.zeros([BLOCK_V], dtype=G.dtype.element_ty)
                tl.store(g_row + offs * stride_gv, zeros, mask=offs < V)
        return
    tl.device_assert((t >= 0) & (t < V), "cross_entropy: target out of range")

    if FORWARD:
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
        tl.store(LSE + row, lse)
    else:
        lse = tl.load(LSE + row)

    # pass 2: the gradient, scaled in fp32 and rounded once to G's dtype
    if HAS_GRAD:
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(SCALE + row * stride_s).to(tl.float32)
        if MEAN:
            scale = scale / tl.maximum(tl.load(N_VALID).to(tl.float32), 1.0)
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
    *,
    lse: torch.Tensor,
    loss: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    n_valid: torch.Tensor | None = None,
) -> None:
    """Launch the row kernel over logits (N, V).

    With `loss` (N,) fp32: compute per-row losses and write them and the row log-sum-exp into
    `lse` (N,) fp32; without it, read `lse` from an earlier call. With `grad` (N, V) (it may be
    `logits` itself, for the in-place update): write d loss / d logits times `scale` (a 0-d
    tensor, or (N,) per row) and divided by max(`n_valid`, 1) when given, all in fp32 and
    device-side (no host sync).
    """
    N, V = logits.shape
    if N == 0:
        return
    block, warps = _launch_params(V)
    g = grad if grad is not None else logits  # never written when HAS_GRAD is False
    sc = scale if scale is not None else lse  # never read when HAS_SCALE is False
    stride_s = 0 if scale is None or scale.dim() == 0 else scale.stride(0)
    _ce_kernel[(N,)](
        logits, logits.stride(0), logits.stride(1),
        g, g.stride(0), g.stride(1),
        targets, targets.stride(0),
        loss if loss is not None else lse, lse, sc, stride_s,
        n_valid if n_valid is not None else lse,
        V, ignore_index, float(label_smoothing), float(z_loss),
        FORWARD=loss is not None, HAS_GRAD=grad is not None, HAS_SCALE=scale is not None,
        MEAN=n_valid is not None, HAS_SMOOTHING=label_smoothing > 0.0, HAS_Z=z_loss != 0.0,
        BLOCK_V=block, num_warps=warps,
    )  # fmt: skip


def reduce_loss(loss: torch.Tensor, reduction: str, n_valid: torch.Tensor) -> torch.Tensor:
    """Reduce per-row losses (N,) like F.cross_entropy, except an all-ignored mean is 0."""
    if reduction == "mean":
        return loss.sum() / n_valid.clamp(min=1).to(loss.dtype)
    if reduction == "sum":
        return loss.sum()
    return loss


def _is_intermediate(t: torch.Tensor) -> bool:
    """Whether t's memory belongs to the autograd graph, so the kernel may overwrite it.

    A view of a leaf (a user's `logits.view(-1, V)`) is not a leaf itself but shares the leaf's
    memory: writing the gradient there would silently change the user's tensor.
    """
    base = t._base if t._base is not None else t
    return not t.is_leaf and not base.is_leaf


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy: the forward kernel computes the loss, the backward kernel the gradient."""

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
        N = logits.shape[0]
        n_valid = (targets != ignore_index).sum()
        loss = torch.empty(N, device=logits.device, dtype=torch.float32)
        lse = torch.empty(N, device=logits.device, dtype=torch.float32)
        cross_entropy_rows(
            logits, targets, ignore_index, label_smoothing, z_loss, lse=lse, loss=loss
        )
        # needs_input_grad alone is True under torch.no_grad() too; keep nothing then
        if grad_enabled and ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, targets, lse, n_valid)
            # an intermediate result takes its gradient in place; a leaf (a user's tensor) never
            ctx.in_place = _is_intermediate(logits)
        ctx.options = (ignore_index, reduction, label_smoothing, z_loss)
        ctx.done = False
        return reduce_loss(loss, reduction, n_valid)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        if ctx.done:  # the logits were overwritten by the gradient already
            raise RuntimeError("triton cross_entropy supports a single backward pass per forward")
        ctx.done = True
        logits, targets, lse, n_valid = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, z_loss = ctx.options
        grad = logits if ctx.in_place else torch.empty_like(logits)
        cross_entropy_rows(
            logits, targets, ignore_index, label_smoothing, z_loss, lse=lse, grad=grad,
            scale=grad_output, n_valid=n_valid if reduction == "mean" else None,
        )  # fmt: skip
        if grad is logits:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None


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
