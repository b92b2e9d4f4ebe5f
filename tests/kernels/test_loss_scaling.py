"""Loss gradients under fp16 + GradScaler and gradient accumulation, against float64.

GradScaler multiplies the loss by 2**16 (and grows it); accumulation multiplies it by 1/k. The
cross-entropy gradient is (softmax - onehot) * grad_output / N: both factors must be applied in
fp32 before the one rounding to fp16, or 65536 becomes inf and small probabilities underflow to 0
before they are scaled up. The best any fp16 kernel can return is the float64 gradient rounded
once to fp16; the Triton kernel must be within one rounding of that.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from craft.ops import lowp
from craft.ops import torch_backend as tb
from craft.ops.triton import cross_entropy as tri_ce
from craft.ops.triton import linear_cross_entropy as tri_lce
from tests.kernels._triton import DEVICE, needs_triton

pytestmark = needs_triton

SCALES = [65536.0, 2.0**20, 2.0**15, 1 / 65536]
IDS = ["2^16", "2^20", "2^15", "2^-16"]


def _logits(n: int, v: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 4).to(DEVICE, torch.float16)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = -100
    return logits, targets.to(DEVICE)


def _ref_grad(logits: torch.Tensor, targets: torch.Tensor, reduction: str, go: torch.Tensor):
    x = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(x, targets, reduction=reduction)
    (g,) = torch.autograd.grad(loss, x, go.double())
    return g


@pytest.mark.parametrize("scale", SCALES, ids=IDS)
def test_triton_cross_entropy_fp16_with_gradscaler_scale(scale: float) -> None:
    logits, targets = _logits(128, 128)  # N = 128: softmax / N underflows fp16 for p < 8e-6
    x = logits.clone().requires_grad_()
    loss = tri_ce.cross_entropy(x * 1, targets)  # an intermediate, as a model's logits are
    go = torch.tensor(scale, device=DEVICE)
    (loss * go).backward()
    best = _ref_grad(logits, targets, "mean", go).to(torch.float16)  # rounded once
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), best.double(), rtol=2**-10, atol=2**-23)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triton_cross_entropy_fp16_sum_and_per_row_scales(reduction: str) -> None:
    logits, targets = _logits(64, 300, seed=1)
    x = logits.clone().requires_grad_()
    loss = tri_ce.cross_entropy(x * 1, targets, reduction=reduction)
    g = torch.Generator().manual_seed(2)
    go = (
        torch.tensor(1 / 4096.0)  # a sum over 64 rows scaled down: nothing may underflow early
        if reduction == "sum"
        else torch.rand(64, generator=g) * 2.0**14  # per-row weights up to 2**14
    ).to(DEVICE)
    loss.backward(go)
    best = _ref_grad(logits, targets, reduction, go).to(torch.float16)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), best.double(), rtol=2**-10, atol=2**-23)


def _hidden_weight(n: int = 48, c: int = 32, v: int = 300, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).to(DEVICE, torch.float16)
    w = (torch.randn(v, c, generator=g) * c**-0.5).to(DEVICE, torch.float16)
    t = torch.randint(0, v, (n,), generator=g)
    t[::7] = -100
    return h, w, t.to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scale", [65536.0, 2.0**20], ids=["2^16", "2^20"])
def test_linear_cross_entropy_fp16_autocast_with_gradscaler_scale(backend: str, scale: float):
    """AMP's case: fp32 master weight, fp16 hidden states and matmuls, a scaled loss."""
    fn = tri_lce.linear_cross_entropy if backend == "triton" else tb.linear_cross_entropy
    h, w, t = _hidden_weight()
    hl, wl = h.clone().requires_grad_(), w.float().requires_grad_()
    go = torch.tensor(scale, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = fn(hl, wl, t)
    (loss * go).backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), t)
    rh, rw = torch.autograd.grad(ref, (h64, w64), go.double())
    assert rh.abs().max() < 65504  # the exact d hidden fits fp16: so must ours
    for name, got, want, dtype in (
        ("d hidden", hl.grad, rh, torch.float16),
        ("d weight", wl.grad, rw, torch.float32),
    ):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        top = want.abs().max()
        torch.testing.assert_close(got.double() / top, want / top, atol=1e-2, rtol=1e-2, msg=name)


def test_backward_needs_no_host_sync_for_the_unit_gradient(monkeypatch) -> None:
    """The old backward compared grad_output with ones (torch.equal: a device-to-host sync)."""
    calls: list[int] = []
    real = torch.equal
    monkeypatch.setattr(torch, "equal", lambda *a: calls.append(1) or real(*a))
    logits, targets = _logits(8, 40)
    x = logits.float().requires_grad_()
    tri_ce.cross_entropy(x * 1, targets).backward()
    h, w, t = _hidden_weight(n=8, v=40)
    hl = h.float().requires_grad_()
    tri_lce.linear_cross_entropy(hl, w.float(), t).backward()
    assert calls == []


def test_accumulation_weight_one_over_k_is_exact() -> None:
    """k micro-batches each scaled by 1/k sum to the gradient of the big batch's mean."""
    logits, targets = _logits(32, 64, seed=5)
    x = logits.float().requires_grad_()
    for part in range(4):
        sl = slice(8 * part, 8 * part + 8)
        y = x[sl] * 1
        (tri_ce.cross_entropy(y, targets[sl], reduction="sum") / 32.0).backward()
    ref = _ref_grad(logits.float(), targets, "sum", torch.tensor(1 / 32.0))
    torch.testing.assert_close(x.grad.double(), ref, atol=1e-6, rtol=1e-5)


def test_lowp_scale_multiplies_in_fp32() -> None:
    t = torch.full((5,), 2.0**-10, dtype=torch.float16)
    bad = t.clone().mul_(torch.tensor(65536.0).to(t.dtype))  # the old backward: 65536 -> inf
    assert torch.isinf(bad).all()
    assert torch.equal(lowp.scale_(t.clone(), torch.tensor(65536.0)), torch.full_like(t, 64.0))
    from craft.ops.triton._common import scale_ as triton_scale_

    t = t.to(DEVICE)
    got = triton_scale_(t.clone(), torch.tensor(65536.0, device=DEVICE))
    assert torch.equal(got, torch.full_like(t, 64.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_gradient_gemm_accumulates_low_precision_operands_in_fp32(dtype, monkeypatch):
    """d weight: the chunk GEMMs read the low-precision dlogits and hidden, sum in fp32."""
    seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []
    real = lowp.addmm_fp32_

    def spy(acc, a, b):  # type: ignore[no-untyped-def]
        seen.append((acc.dtype, a.dtype, b.dtype))
        return real(acc, a, b)

    monkeypatch.setattr(tri_lce, "addmm_fp32_", spy)
    h, w, t = _hidden_weight(n=40, c=16, v=200)
    wl = w.float().requires_grad_()  # fp32 master weight, matmuls in `dtype` under autocast
    with torch.autocast(DEVICE, dtype=dtype):
        tri_lce.linear_cross_entropy(h.to(dtype), wl, t).backward()
    assert seen and all(s == (torch.float32, dtype, dtype) for s in seen)
    assert wl.grad.dtype == torch.float32
    # fp32 accumulation of exact products: the sum of many chunks is not rounded to `dtype`
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 512, generator=g).to(dtype)
    b = torch.randn(512, 32, generator=g).to(dtype)
    acc = torch.zeros(64, 32)
    for k in range(0, 512, 64):
        lowp.addmm_fp32_(acc, a[:, k : k + 64], b[k : k + 64])
    torch.testing.assert_close(acc.double(), a.double() @ b.double(), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.cuda
def test_no_host_sync_in_the_loss_kernels_on_cuda() -> None:
    logits, targets = _logits(256, 1000)
    h, w, t = _hidden_weight(n=256, c=64, v=1000)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = logits.float().requires_grad_()
        (tri_ce.cross_entropy(x * 1, targets) * 0.5).backward()
        hl, wl = h.float().requires_grad_(), w.float().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = tri_lce.linear_cross_entropy(hl, wl, t)
        (loss * 0.5).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
