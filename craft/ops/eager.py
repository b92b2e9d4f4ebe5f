"""The `eager` backend: every op as plain tensor math. It is the readable reference the tests use.

Conventions shared by every backend (the other backends are tested against these functions):

- attention: q (B, H, Tq, D), k/v (B, Hkv, Tk, D), H % Hkv == 0; query head h reads key/value head
  h // (H // Hkv). The causal mask is bottom-right aligned: query i sits at position Tk - Tq + i
  and sees keys 0 .. Tk - Tq + i, so a decode step with a KV cache (Tq < Tk) is causal too.
  Causal attention needs Tq <= Tk (otherwise some queries would see no key at all). `dropout_p`
  zeroes attention probabilities with that probability and scales the rest by 1 / (1 - p), as
  SDPA does; callers pass 0 outside training.
- cross_entropy / linear_cross_entropy: computed in float32 (float64 inputs stay float64) and the
  result has that dtype. Per token: lse - x[target], label smoothing eps mixes in the mean over the
  vocabulary, (1 - eps) * nll + eps * (lse - mean(x)) (PyTorch's definition), and z_loss adds
  z_loss * lse**2. Tokens whose target is `ignore_index` contribute 0 and are left out of the mean;
  when every token is ignored the mean is 0 (not NaN) and so are the gradients.
- norm: computed in float32 (float64 stays float64). LayerNorm uses the biased variance; RMSNorm
  is x / sqrt(mean(x**2) + eps) and never has a bias. Dtypes, the mixed-precision contract: with
  a residual, s = x + residual has the promoted dtype of the two (a bf16 branch added to an fp32
  residual stream gives an fp32 sum, as `x + residual` does) and the gradient of each input comes
  back in its own dtype; the normalised output has the autocast dtype when autocast is on for the
  device (it feeds a matmul that would cast it anyway), else the dtype of s (of x without a
  residual). float64 is never narrowed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from craft.ops.registry import register_backend

REDUCTIONS = ("mean", "sum", "none")
NORM_KINDS = ("layernorm", "rmsnorm")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses and norms are computed in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_AUTOCAST_DEVICES = ("cpu", "cuda")
_NARROWABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on `device_type` when autocast is enabled there, else None."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def norm_dtypes(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of s = x [+ residual], dtype of the normalised output) under the current autocast."""
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    cast = autocast_dtype(x.device.type)
    return s_dtype, (cast if cast is not None and s_dtype in _NARROWABLE else s_dtype)


# ------------------------------------------------------------------------------------- attention


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype an output layer's matmul runs in: autocast's when on (as nn.Linear), else the inputs'."""
    dev = hidden.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def check_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float = 0.0
) -> None:
    """Raise ValueError when q, k, v do not form a valid (grouped-query) attention call."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention dropout_p must be in [0, 1); got {dropout_p}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-d q, k, v (B, H, T, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    (b, h, tq, d), (bk, hkv, tk, dk) = q.shape, k.shape
    if k.shape != v.shape or bk != b or dk != d:
        raise ValueError(
            f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be equal and match "
            f"q {tuple(q.shape)} in batch and head size"
        )
    if h % hkv:
        raise ValueError(f"attention: {h} query heads are not a multiple of {hkv} key/value heads")
    if causal and tq > tk:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={tq}, Tk={tk}")


def causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j: j <= Tk - Tq + i (bottom-right aligned)."""
    i = torch.arange(tq, device=device).unsqueeze(1)  # (Tq, 1)
    j = torch.arange(tk, device=device).unsqueeze(0)  # (1, Tk)
    return j <= i + (tk - tq)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """dropout(softmax(q k^T * scale + mask)) v with grouped-query heads mapped by index."""
    check_attention(q, k, v, causal, dropout_p)
    h, hkv = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kv_head = torch.arange(h, device=q.device) // (h // hkv)  # (H,) kv head read by each q head
    k = k.index_select(1, kv_head)  # (B, H, Tk, D)
    v = v.index_select(1, kv_head)  # (B, H, Tk, D)
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        att = att.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    att = torch.softmax(att.to(compute_dtype(att.dtype)), dim=-1).to(q.dtype)  # (B, H, Tq, Tk)
    if dropout_p > 0.0:
        att = F.dropout(att, dropout_p)  # kept probabilities scaled by 1 / (1 - p)
    return att @ v  # (B, H, Tq, D)


# --------------------------------------------------------------------------------- cross-entropy


def check_loss_args(reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0; got {z_loss}")


def reduce_loss(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-token losses (zero at ignored tokens); the mean is over valid tokens, 0 if none."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of logits (N, V) against targets (N,), written out term by term."""
    check_loss_args(reduction, label_smoothing, z_loss)
    x = logits.to(compute_dtype(logits.dtype))  # (N, V)
    valid = targets != ignore_index  # (N,)
    safe = torch.where(valid, targets, torch.zeros_like(targets))  # (N,) ignored -> class 0
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    nll = lse - x.gather(1, safe.unsqueeze(1)).squeeze(1)  # (N,)
    loss = nll
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss > 0.0:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))  # (N,)
    return reduce_loss(loss, valid, reduction)


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
    """The reference: materialise logits (N, V) = hidden (N, C) @ weight (V, C)^T + bias."""
    logits = hidden @ weight.t()  # (N, V)
    if bias is not None:
        logits = logits + bias
    return cross_entropy(logits, targets, ignore_index, reduction, label_smoothing, z_loss)


# ---------------------------------------------------------------------------------------- norm


def check_norm(kind: str, bias: torch.Tensor | None) -> None:
    if kind not in NORM_KINDS:
        raise ValueError(f"norm kind must be one of {', '.join(NORM_KINDS)}; got {kind!r}")
    if kind == "rmsnorm" and bias is not None:
        raise ValueError("rmsnorm takes no bias")


def _normalise(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    kind: str,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    xf = x.to(compute_dtype(x.dtype))  # (..., C)
    if kind == "layernorm":
        mean = xf.mean(dim=-1, keepdim=True)
        var = (xf - mean).square().mean(dim=-1, keepdim=True)  # biased, as LayerNorm
        y = (xf - mean) * torch.rsqrt(var + eps)
    else:
        y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    kind: str = "layernorm",
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm/RMSNorm over the last dim; with `residual`, (norm(x + residual), x + residual)."""
    check_norm(kind, bias)
    _, out_dtype = norm_dtypes(x, residual)
    if residual is None:
        return _normalise(x, weight, bias, kind, eps, out_dtype)
    s = x + residual  # the promoted dtype: an fp32 residual stream stays fp32
    return _normalise(s, weight, bias, kind, eps, out_dtype), s


ANY_DEVICE = ("cpu", "cuda", "mps")
register_backend("attention", "eager", attention, priority=0, devices=ANY_DEVICE)
register_backend("cross_entropy", "eager", cross_entropy, priority=0, devices=ANY_DEVICE)
register_backend(
    "linear_cross_entropy", "eager", linear_cross_entropy, priority=0, devices=ANY_DEVICE
)
register_backend("norm", "eager", norm, priority=0, devices=ANY_DEVICE)
