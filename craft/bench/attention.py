"""Attention benchmark: q (B, H, T, D), k/v (B, Hkv, T, D), self-attention (Tq == Tk == T).

Work follows FlashAttention's benchmark: forward 4 * B * H * T^2 * D FLOPs (two matmuls of
2 * T^2 * D each per head), halved when causal; backward 2.5x forward; forward+backward 3.5x.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from craft.bench.core import Case, Family, Impl, Inputs, Settings, register_impl
from craft.bench.impls import compile_impl, register_craft_backends

NAME = "attention"
# On CUDA without --batch the batch shrinks as T grows: B * T = TOKENS (FlashAttention's setup).
TOKENS = 16384
# (batch, heads, head_dim, seq_lens) defaults: (cuda, cpu, quick)
_DEFAULTS = {
    "cuda": ([None], [16], [128], [512, 1024, 2048, 4096, 8192]),
    "cpu": ([2], [4], [64], [128, 256, 512, 1024]),
    "quick": ([1], [2], [16], [32, 64]),
}
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
SDPA_BACKENDS = {
    "sdpa.flash": "FLASH_ATTENTION",
    "sdpa.efficient": "EFFICIENT_ATTENTION",
    "sdpa.cudnn": "CUDNN_ATTENTION",
    "sdpa.math": "MATH",
}
_CUDA_ONLY = ("sdpa.efficient", "sdpa.cudnn")


def cases(s: Settings) -> list[dict[str, Any]]:
    key = "quick" if s.quick else ("cuda" if s.device.type == "cuda" else "cpu")
    d_batch, d_heads, d_dim, d_seq = _DEFAULTS[key]
    out = []
    for batch, heads, kv, dim, seq in itertools.product(
        s.pick("batch", d_batch),
        s.pick("heads", d_heads),
        s.kv_heads or [None],
        s.pick("head_dim", d_dim),
        s.pick("seq_lens", d_seq),
    ):
        dims: dict[str, Any] = {}
        if batch is None:
            dims["tokens"] = TOKENS
            batch = max(1, TOKENS // seq)
        dims.update(batch=batch, heads=heads, kv_heads=kv or heads, seq_len=seq, head_dim=dim)
        dims["causal"] = s.causal
        out.append(dims)
    return out


def make_inputs(case: Case, gen: torch.Generator) -> Inputs:
    d = case.dims
    b, h, hkv, t, hd = d["batch"], d["heads"], d["kv_heads"], d["seq_len"], d["head_dim"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=case.device).to(case.dtype)

    q = randn(b, h, t, hd)  # (B, H, T, D)
    k = randn(b, hkv, t, hd)  # (B, Hkv, T, D)
    v = randn(b, hkv, t, hd)  # (B, Hkv, T, D)
    dout = randn(b, h, t, hd)  # (B, H, T, D)
    return Inputs((q, k, v), ("q", "k", "v"), (0, 1, 2), (dout,), ("out",))


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for q (..., T, D), k/v (..., T, D)."""
    t = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (..., T, T)
    if causal:
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~mask, float("-inf"))
    return torch.softmax(att, dim=-1) @ v  # (..., T, D)


def reference(case: Case, inputs: Inputs, dtype: torch.dtype) -> list[torch.Tensor]:
    """Output and gradients in `dtype` (float64), one (batch, kv head) group at a time."""
    q, k, v = (x.detach() for x in inputs.args)
    (dout,) = inputs.grad_out
    b, h, hkv = q.shape[0], q.shape[1], k.shape[1]
    rep = h // hkv
    causal = case.dims["causal"]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    grads = [torch.empty(x.shape, dtype=dtype, device=q.device) for x in (q, k, v)]
    for i in range(b):
        for g in range(hkv):
            heads = slice(g * rep, (g + 1) * rep)
            qs = q[i, heads].to(dtype).requires_grad_(case.needs_grad)  # (rep, T, D)
            ks = k[i, g].to(dtype).requires_grad_(case.needs_grad)  # (T, D)
            vs = v[i, g].to(dtype).requires_grad_(case.needs_grad)  # (T, D)
            with torch.set_grad_enabled(case.needs_grad):
                o = _math(qs, ks, vs, causal)  # (rep, T, D)
                if case.needs_grad:
                    o.backward(dout[i, heads].to(dtype))
            out[i, heads] = o.detach()
            if case.needs_grad:
                grads[0][i, heads] = qs.grad
                grads[1][i, g] = ks.grad
                grads[2][i, g] = vs.grad
    return [out, *grads] if case.needs_grad else [out]


def ref_flops(case: Case) -> float:
    """The reference computes the full (T, T) scores even when causal."""
    d = case.dims
    return 4.0 * d["batch"] * d["heads"] * d["seq_len"] ** 2 * d["head_dim"] * 3.5


def work(case: Case) -> float:
    d = case.dims
    fwd = 4.0 * d["batch"] * d["heads"] * d["seq_len"] ** 2 * d["head_dim"]
    if d["causal"]:
        fwd /= 2
    return fwd * MODE_FACTOR[case.mode]


def _group(dims: dict[str, Any]) -> str:
    size = f"tokens={dims['tokens']}" if "tokens" in dims else f"batch={dims['batch']}"
    kv = f"/{dims['kv_heads']}" if dims["kv_heads"] != dims["heads"] else ""
    return f"{size} heads={dims['heads']}{kv} head_dim={dims['head_dim']}"


def memory(case: Case) -> int:
    """q, k, v, dout (drawn in float32, then cast), the float64 reference outputs and the
    reference's (heads per kv group, T, T) float64 scores."""
    d = case.dims
    b, h, hkv, t, hd = d["batch"], d["heads"], d["kv_heads"], d["seq_len"], d["head_dim"]
    elem = torch.finfo(case.dtype).bits // 8
    n = b * (2 * h + 2 * hkv) * t * hd
    ref = 8 * b * (2 * h + 2 * hkv) * t * hd if case.needs_grad else 8 * b * h * t * hd
    return n * (4 + elem) + ref + 3 * 8 * (h // hkv) * t * t


FAMILY = Family(
    name=NAME,
    title="Attention",
    x_key="seq_len",
    metric="TFLOP/s",
    cases=cases,
    make_inputs=make_inputs,
    reference=reference,
    work=work,
    baselines=("sdpa.flash", "sdpa.math", "eager"),
    label_keys=("batch", "heads", "kv_heads", "seq_len", "head_dim", "causal"),
    group=_group,
    work_note="fwd 4*B*H*T^2*D (halved when causal); bwd 2.5x fwd; fwd+bwd 3.5x fwd",
    ref_flops=ref_flops,
    memory=memory,
)


# ---------------------------------------------------------------------------- implementations


def _eager(case: Case) -> Callable[..., torch.Tensor]:
    """Attention as most model code writes it: full (T, T) scores in the input dtype."""
    causal = case.dims["causal"]

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)  # (B, H, T, D)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, T, D)
        return _math(q, k, v, causal)

    return fn


def _sdpa(backend_name: str) -> Callable[[Case], Callable[..., torch.Tensor]]:
    def make(case: Case) -> Callable[..., torch.Tensor]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        causal = case.dims["causal"]
        gqa = case.dims["kv_heads"] != case.dims["heads"]

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # The backward kernel follows the forward's choice, so the context covers the forward.
            with sdpa_kernel(backend):
                if gqa:
                    return F.scaled_dot_product_attention(
                        q, k, v, is_causal=causal, enable_gqa=True
                    )
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return fn

    return make


def _sdpa_available(name: str) -> Callable[[Case, tuple[Any, ...]], str | None]:
    def available(case: Case, args: tuple[Any, ...]) -> str | None:
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, SDPA_BACKENDS[name]):
            return f"this torch has no SDPA backend {SDPA_BACKENDS[name]}"
        if name in _CUDA_ONLY and case.device.type != "cuda":
            return f"SDPA's {SDPA_BACKENDS[name].lower()} backend needs CUDA"
        return None

    return available


def _craft_call(fn: Callable[..., torch.Tensor], case: Case) -> Callable[..., torch.Tensor]:
    causal = case.dims["causal"]
    return lambda q, k, v: fn(q, k, v, causal, None)


def _register() -> None:
    register_impl(NAME, Impl("eager", _eager, description="plain math, (T, T) scores"))
    compile_impl(NAME, _eager)
    for name, member in SDPA_BACKENDS.items():
        register_impl(
            NAME,
            Impl(name, _sdpa(member), _sdpa_available(name), f"SDPA forced to {member}"),
        )
    register_craft_backends(
        NAME,
        "attention",
        _craft_call,
        lambda case, a: (a[0], a[1], a[2], case.dims["causal"], None),
    )


_register()
