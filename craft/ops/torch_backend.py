"""The `torch` backend: PyTorch's own kernels (SDPA, F.cross_entropy, F.layer_norm/F.rms_norm).

It runs on every device PyTorch does and follows the conventions written down in
`craft.ops.eager`. `linear_cross_entropy` walks over the tokens in chunks inside one
`autograd.Function`, so the (N, V) logits never exist at once: only one chunk of them does. Its
forward keeps the gradients unscaled and accumulates d weight in fp32; the backward applies
grad_output / N in fp32 (`craft.ops.lowp`), so a GradScaler scale cannot overflow fp16 on the way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from craft.ops.eager import (
    ANY_DEVICE,
    causal_mask,
    check_attention,
    check_loss_args,
    check_norm,
    compute_dtype,
    matmul_dtype,
    norm_dtypes,
    reduce_loss,
)
from craft.ops.lowp import addmm_fp32_, scaled
from craft.ops.registry import register_backend


def _version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


# SDPA maps grouped key/value heads itself from torch 2.5 on; before, the heads are repeated.
SDPA_GQA = _version() >= (2, 5)
# Logits elements per chunk of linear_cross_entropy (16 MiB in float32).
CHUNK_LOGITS = 1 << 22


# ------------------------------------------------------------------------------------- attention


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """F.scaled_dot_product_attention with a bottom-right aligned causal mask (and dropout)."""
    check_attention(q, k, v, causal, dropout_p)
    (_, h, tq, _), hkv, tk = q.shape, k.shape[1], k.shape[2]
    mask, is_causal = None, False
    if causal and tq == tk:
        is_causal = True  # SDPA's own mask is top-left aligned, which equals ours when Tq == Tk
    elif causal and tq > 1:
        mask = causal_mask(tq, tk, q.device)  # (Tq, Tk); one query (Tq == 1) sees every key
    extra = {}
    if hkv != h:
        if SDPA_GQA:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(h // hkv, dim=1)  # (B, H, Tk, D)
            v = v.repeat_interleave(h // hkv, dim=1)  # (B, H, Tk, D)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra
    )  # (B, H, Tq, D)


# --------------------------------------------------------------------------------- cross-entropy


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """F.cross_entropy in float32, with z-loss and a mean that is 0 when every token is ignored."""
    check_loss_args(reduction, label_smoothing, z_loss)
    x = logits.to(compute_dtype(logits.dtype))  # (N, V)
    valid = targets != ignore_index  # (N,)
    loss = F.cross_entropy(
        x, targets, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )  # (N,) zero at ignored tokens
    if z_loss > 0.0:
        lse = torch.logsumexp(x, dim=-1)  # (N,)
        loss = loss + z_loss * torch.where(valid, lse.square(), torch.zeros_like(lse))
    return reduce_loss(loss, valid, reduction)


def _fused_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    valid: torch.Tensor,
    label_smoothing: float,
    z_loss: float,
    mm_dtype: torch.dtype,
    row_scale: torch.Tensor | None,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-token losses and, when `row_scale` (N,) is given, the gradients of sum(scale * loss).

    One chunk of rows at a time: logits (n, V) -> loss and dloss/dlogits -> grads of hidden,
    weight and bias. `need` says which of those three gradients to compute. d hidden has
    hidden's dtype; d weight and d bias are accumulated in the compute dtype (fp32).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
    rows = max(1, CHUNK_LOGITS // vocab)
    w = weight.to(mm_dtype)  # (V, C)
    b = None if bias is None else bias.to(acc)  # (V,)
    safe = torch.where(valid, targets, torch.zeros_like(targets))  # (N,)
    losses = torch.empty(n, dtype=acc, device=hidden.device)  # (N,)
    grads = row_scale is not None
    g_h = torch.empty_like(hidden) if grads and need[0] else None  # (N, C)
    g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grads and need[1] else None
    g_b = torch.zeros(vocab, dtype=acc, device=weight.device) if grads and need[2] else None
    for start in range(0, n, rows):
        end = min(n, start + rows)
        h = hidden[start:end].to(mm_dtype)  # (n, C)
        x = (h @ w.t()).to(acc)  # (n, V)
        if b is not None:
            x = x + b
        t, ok = safe[start:end], valid[start:end]  # (n,)
        lse = torch.logsumexp(x, dim=-1)  # (n,)
        x_t = x.gather(1, t.unsqueeze(1)).squeeze(1)  # (n,)
        loss = lse - (1.0 - label_smoothing) * x_t
        if label_smoothing > 0.0:
            loss = loss - label_smoothing * x.mean(dim=-1)
        if z_loss > 0.0:
            loss = loss + z_loss * lse.square()
        losses[start:end] = torch.where(ok, loss, torch.zeros_like(loss))
        if not grads:
            continue
        # d loss / d x = softmax(x) * (1 + 2 z lse) - (1 - eps) onehot(t) - eps / V
        x.sub_(lse.unsqueeze(1)).exp_()  # (n, V) softmax, in place: x is not needed any more
        if z_loss > 0.0:
            x.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(1))
        x.scatter_add_(
            1, t.unsqueeze(1), torch.full_like(x_t, -(1.0 - label_smoothing)).unsqueeze(1)
        )
        if label_smoothing > 0.0:
            x.sub_(label_smoothing / vocab)
        scale = torch.where(ok, row_scale[start:end].to(acc), torch.zeros_like(lse))  # (n,)
        dx = x.mul_(scale.unsqueeze(1))  # (n, V)
        if g_h is not None:
            g_h[start:end] = (dx.to(mm_dtype) @ w).to(hidden.dtype)  # (n, C)
        if g_w is not None:
            addmm_fp32_(g_w, dx.to(mm_dtype).t(), h)  # (V, C): low-precision operands, fp32 sum
        if g_b is not None:
            g_b += dx.sum(dim=0)  # (V,)
    return losses, g_h, g_w, g_b


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss of hidden @ weight.T + bias, chunked over tokens.

    For `mean`/`sum` the gradients are computed during the forward pass (the chunk's logits are
    at hand then) and scaled by the incoming gradient in backward. For `none` the incoming
    gradient differs per token, so backward makes a second chunked pass.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        z_loss: float,
        mm_dtype: torch.dtype,
        grad_enabled: bool,
    ) -> torch.Tensor:
        need = tuple(bool(grad_enabled and n) for n in ctx.needs_input_grad[:3])
        valid = targets != ignore_index  # (N,)
        unit = None
        if any(need) and reduction != "none":  # unscaled now; grad_output / N in backward
            unit = valid.to(compute_dtype(hidden.dtype))  # (N,)
        losses, g_h, g_w, g_b = _fused_pass(
            hidden, weight, bias, targets, valid, label_smoothing, z_loss, mm_dtype, unit, need
        )
        ctx.reduction = reduction
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            ctx.args = (label_smoothing, z_loss, mm_dtype, need)
            ctx.save_for_backward(hidden, weight, bias, targets, valid)
        else:
            ctx.grads = (g_h, g_w, g_b)
            ctx.denom = valid.sum().clamp(min=1) if reduction == "mean" else None
            ctx.acc = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        return reduce_loss(losses, valid, reduction)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        if ctx.reduction == "none":
            hidden, weight, bias, targets, valid = ctx.saved_tensors
            label_smoothing, z_loss, mm_dtype, need = ctx.args
            _, g_h, g_w, g_b = _fused_pass(
                hidden,
                weight,
                bias,
                targets,
                valid,
                label_smoothing,
                z_loss,
                mm_dtype,
                grad_out,
                need,
            )
        else:
            g_h, g_w, g_b = ctx.grads
            s = grad_out.to(ctx.acc)  # grad_output / N in the compute dtype, on the device
            s = s if ctx.denom is None else s / ctx.denom
            g_h, g_w, g_b = (None if g is None else scaled(g, s) for g in (g_h, g_w, g_b))
        dt_h, dt_w, dt_b = ctx.dtypes
        return (
            None if g_h is None else g_h.to(dt_h),
            None if g_w is None else g_w.to(dt_w),
            None if g_b is None else g_b.to(dt_b),
            None, None, None, None, None, None, None,
        )  # fmt: skip


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
    """Loss of hidden (N, C) @ weight (V, C)^T + bias against targets (N,), one chunk at a time."""
    check_loss_args(reduction, label_smoothing, z_loss)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy expects hidden (N, C) and weight (V, C); got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: targets {tuple(targets.shape)} must be ({hidden.shape[0]},)"
        )
    mm_dtype = matmul_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss,
            mm_dtype, torch.is_grad_enabled(),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------- norm


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.to(compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return (y if weight is None else y * weight).to(x.dtype)


def norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    kind: str = "layernorm",
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """F.layer_norm / F.rms_norm; with `residual`, (norm(x + residual), x + residual).

    The output dtype follows the contract of `craft.ops.eager` (autocast's own rule would return
    layer_norm in float32).
    """
    check_norm(kind, bias)
    _, out_dtype = norm_dtypes(x, residual)
    s = x if residual is None else x + residual
    if kind == "layernorm":
        y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    else:
        y = _rms_norm(s, weight, eps)
    y = y.to(out_dtype)
    return y if residual is None else (y, s)


register_backend("attention", "torch", attention, priority=10, devices=ANY_DEVICE)
register_backend("cross_entropy", "torch", cross_entropy, priority=10, devices=ANY_DEVICE)
register_backend(
    "linear_cross_entropy", "torch", linear_cross_entropy, priority=10, devices=ANY_DEVICE
)
register_backend("norm", "torch", norm, priority=10, devices=ANY_DEVICE)
