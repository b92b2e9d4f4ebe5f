"""Triton flash attention against a float64 reference: outputs and dq, dk, dv."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from craft import ops
from craft.errors import KernelError
from craft.ops.registry import resolve
from craft.ops.triton import attention as tri
from craft.ops.triton._common import dot_precision
from tests.kernels._triton import DEVICE, assert_close, gpu_grid, needs_triton

pytestmark = needs_triton


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    """softmax(q k^T scale + bottom-right causal mask) v in float64; K/V heads repeated for GQA."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        tq, tk = q.shape[2], k.shape[2]
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (tk - tq), float("-inf"))
    return torch.softmax(s, dim=-1) @ v  # (B, H, Tq, D)


def make_qkv(
    b: int, h: int, hkv: int, tq: int, tk: int, d: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, d, generator=g)
    return tuple(t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v))  # type: ignore[return-value]


def check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    seed: int = 1,
) -> None:
    """Forward and all three gradients of the kernel against the float64 reference."""
    dtype = q.dtype
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = tri.attention(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, causal, sm_scale)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert_close(out, ref, dtype, "out")
    assert_close(dq, rq, dtype, "dq")
    assert_close(dk, rk, dtype, "dk")
    assert_close(dv, rv, dtype, "dv")


SHAPES = [
    # (B, H, Hkv, Tq, Tk, D)
    (1, 1, 1, 1, 1, 16),
    (1, 2, 2, 17, 17, 32),
    (2, 2, 1, 17, 17, 16),  # GQA
    (1, 2, 1, 100, 100, 64),  # GQA, several tiles and a ragged last one
    (1, 2, 2, 48, 48, 16),  # T a multiple of every interpreter block
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}Tq{}Tk{}D{}".format(*s))
def test_float32(shape: tuple[int, ...], causal: bool) -> None:
    check(*make_qkv(*shape, dtype=torch.float32), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_half_precision(dtype: torch.dtype, causal: bool) -> None:
    check(*make_qkv(1, 4, 2, 33, 33, 32, dtype=dtype), causal=causal)


@pytest.mark.parametrize(
    "tq,tk,causal",
    [(1, 33, True), (5, 40, True), (20, 45, False), (45, 20, False)],
    ids=["decode1", "decode5", "cross-long-k", "cross-short-k"],
)
def test_query_and_key_lengths_differ(tq: int, tk: int, causal: bool) -> None:
    """KV-cache decoding (bottom-right causal mask) and cross-attention shapes."""
    check(*make_qkv(1, 2, 1, tq, tk, 16, dtype=torch.float32), causal=causal)


def test_custom_scale_and_strided_inputs() -> None:
    """q/k/v as (B, H, T, D) views of (B, T, H, D) buffers: strides are used, nothing is copied."""
    g = torch.Generator().manual_seed(3)
    b, t, h, d = 2, 21, 2, 32
    qkv = torch.randn(b, t, 3, h, d, generator=g).to(DEVICE)  # one fused projection output
    q, k, v = (qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
    assert not q.is_contiguous()
    check(q, k, v, causal=True, scale=0.3)


def test_bfloat16_long_head_dim() -> None:
    check(*make_qkv(1, 2, 2, 40, 40, 128, dtype=torch.bfloat16), causal=True)


def test_query_without_keys_gets_zeros() -> None:
    """The kernels define Tq > Tk causal rows (no visible key) as zero, with zero gradients."""
    q, k, v = make_qkv(1, 1, 1, 6, 3, 16, dtype=torch.float32)
    out = tri.FlashAttentionFunction.apply(q, k, v, True, 0.25)  # (1, 1, 6, 16)
    assert torch.all(out[:, :, :3] == 0)
    assert torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.all(dq[:, :, :3] == 0) and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    ref = reference(q[:, :, 3:], k, v, True, 0.25)  # the last three rows see keys 0..0, 0..1, 0..2
    assert_close(out[:, :, 3:], ref, torch.float32, "out")


def test_fp32_dot_precision_follows_either_torch_tf32_api() -> None:
    """torch >= 2.9 raises on reading `matmul.allow_tf32` once `fp32_precision` set TF32."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision setting")
    before = matmul.fp32_precision
    try:
        matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        matmul.fp32_precision = "tf32"
        assert dot_precision(torch.float32) == "tf32"
        q, k, v = make_qkv(1, 2, 1, 5, 5, 16, dtype=torch.float32)
        with torch.no_grad():
            out = tri.attention(q, k, v, causal=True)
        ref = reference(q.detach(), k.detach(), v.detach(), True, 0.25)
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)  # TF32 on a GPU
        matmul.fp32_precision = "ieee"
        assert dot_precision(torch.float32) == "ieee"
    finally:
        matmul.fp32_precision = before
    assert dot_precision(torch.bfloat16) == "tf32"


# ------------------------------------------------------------------------- dispatch contract
def test_unsupported_inputs_are_rejected_with_a_reason() -> None:
    x48 = torch.randn(1, 2, 4, 48, device=DEVICE)
    assert "head dim 48" in (tri.check_inputs(x48, x48, x48) or "")
    x64 = torch.randn(1, 2, 4, 16, device=DEVICE, dtype=torch.float64)
    assert "dtypes" in (tri.check_inputs(x64, x64, x64) or "")
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16)
    assert "multiple" in (tri.check_inputs(q, k, k) or "")
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 4, 16)
    assert "Tq <= Tk" in (tri.check_inputs(q, k, k, causal=True) or "")
    with pytest.raises(KernelError, match="head dim 48"):
        tri.attention(x48, x48, x48)


def test_explicit_selection_raises_kernel_error_and_auto_falls_back() -> None:
    x48 = torch.randn(1, 2, 4, 48, device=DEVICE)
    with ops.use_backends(attention="triton"), pytest.raises(KernelError, match="head dim 48"):
        ops.attention(x48, x48, x48)
    assert resolve("attention", "auto", DEVICE, x48, x48, x48, True, None).name != "triton"
    x16 = torch.randn(1, 2, 4, 16, device=DEVICE)
    chosen = resolve("attention", "auto", DEVICE, x16, x16, x16, True, None).name
    # auto takes Triton on CUDA, never the (slow) interpreter on CPU
    assert chosen == ("triton" if DEVICE == "cuda" else "torch")


def test_dispatch_through_ops_matches_direct_call() -> None:
    q, k, v = make_qkv(1, 2, 1, 9, 9, 16, dtype=torch.float32)
    with ops.use_backends(attention="triton"), torch.no_grad():
        torch.testing.assert_close(ops.attention(q, k, v), tri.attention(q, k, v))


# ------------------------------------------------------------------------- large CUDA grid
def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@gpu_grid
@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t", [1, 127, 1000, 4096, 8192])
def test_gpu_grid(t: int, d: int, dtype: torch.dtype, causal: bool) -> None:
    """Compiled kernels on long sequences: no worse than twice SDPA's error (plus a floor)."""
    b, h, hkv = (1, 4, 2) if t >= 4096 else (2, 4, 2)
    q, k, v = make_qkv(b, h, hkv, t, t, d, dtype=dtype, seed=t + d)
    do = torch.randn(q.shape, device=q.device, dtype=dtype)
    out = tri.attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    kr, vr = (x.detach().repeat_interleave(h // hkv, 1).requires_grad_() for x in (k, v))
    qs = q.detach().requires_grad_()
    sdpa = F.scaled_dot_product_attention(qs, kr, vr, is_causal=causal)
    sq, sk, sv = torch.autograd.grad(sdpa, (qs, kr, vr), do)
    sk = sk.unflatten(1, (hkv, h // hkv)).sum(2)
    sv = sv.unflatten(1, (hkv, h // hkv)).sum(2)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, causal, 1.0 / math.sqrt(d))
    refs = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for name, got, base, exp in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (sdpa, sq, sk, sv), (ref, *refs), strict=True
    ):
        err, base_err = _max_err(got, exp), _max_err(base, exp)
        assert err <= 2 * base_err + 1e-3, f"{name}: error {err:.3g} vs SDPA {base_err:.3g}"
