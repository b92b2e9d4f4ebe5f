"""Fused linear + cross-entropy (Triton loss kernel, chunked over tokens) against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from craft import ops
from craft.errors import KernelError
from craft.ops.triton import linear_cross_entropy as tri
from tests.kernels._triton import DEVICE, assert_close, gpu_grid, needs_triton

pytestmark = needs_triton


def reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    x = hidden.double() @ weight.double().t()  # (N, V)
    if bias is not None:
        x = x + bias.double()
    valid = targets != -100
    loss = F.cross_entropy(x, targets, reduction="none", label_smoothing=label_smoothing)
    loss = loss + z_loss * torch.logsumexp(x, -1).square() * valid
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    return loss.sum() if reduction == "sum" else loss


def make(n: int, c: int, v: int, dtype: torch.dtype, bias: bool, ignored: float = 0.2):
    g = torch.Generator().manual_seed(n + c + v)
    hidden = torch.randn(n, c, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(v, c, generator=g) * c**-0.5).to(DEVICE, dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = -100
    return hidden, weight, b, targets.to(DEVICE)


def check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> None:
    dtype = hidden.dtype
    loss = tri.linear_cross_entropy(
        hidden, weight, targets, bias, -100, reduction, label_smoothing, z_loss
    )
    g = torch.Generator().manual_seed(9)
    go = (
        torch.randn(loss.shape, generator=g).to(loss)
        if reduction == "none"
        else torch.tensor(1.5, device=loss.device)
    )
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, inputs, go)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    h64, w64 = inputs64[:2]
    b64 = inputs64[2] if bias is not None else None
    ref = reference(h64, w64, b64, targets, reduction, label_smoothing, z_loss)
    refs = torch.autograd.grad(ref, inputs64, go.double())
    assert_close(loss, ref, dtype, "loss")
    for name, got, exp in zip(("d hidden", "d weight", "d bias"), grads, refs, strict=False):
        assert got.dtype == dtype
        assert_close(got, exp, dtype, name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_float32(bias: bool, reduction: str) -> None:
    # 70 tokens, vocab 300 over width 32: chunks of 8 tokens, the last one ragged
    check(*make(70, 32, 300, torch.float32, bias), reduction, 0.1, 1e-3)


def test_chunking_covers_all_tokens() -> None:
    assert tri.chunk_size(70, 32, 300) == 8
    assert tri.chunk_size(1, 32, 300) == 1
    assert tri.chunk_size(4096, 4096, 128256) == 128
    check(*make(1, 16, 50, torch.float32, False))


def test_bfloat16() -> None:
    check(*make(40, 32, 200, torch.bfloat16, True))


def test_every_target_ignored() -> None:
    hidden, weight, _, targets = make(10, 16, 40, torch.float32, False)
    targets[:] = -100
    loss = tri.linear_cross_entropy(hidden, weight, targets)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and torch.all(dh == 0) and torch.all(dw == 0)


def test_only_requested_gradients_and_no_grad() -> None:
    hidden, weight, _, targets = make(12, 16, 40, torch.float32, False)
    frozen = weight.detach()
    loss = tri.linear_cross_entropy(hidden, frozen, targets)
    (dh,) = torch.autograd.grad(loss, (hidden,))
    assert dh.shape == hidden.shape
    with torch.no_grad():
        loss2 = tri.linear_cross_entropy(hidden, weight, targets)
    assert not loss2.requires_grad
    torch.testing.assert_close(loss2, loss.detach())


def test_autocast_matches_eager_under_autocast() -> None:
    """Under autocast the matmuls run in bfloat16; gradients come back in the fp32 input dtype."""
    hidden, weight, _, targets = make(24, 32, 120, torch.float32, False)
    results = {}
    for name in ("eager", "triton"):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        with ops.use_backends(linear_cross_entropy=name), torch.autocast(DEVICE, torch.bfloat16):
            loss = ops.linear_cross_entropy(h, w, targets)
        loss.backward()
        assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
        results[name] = (loss.float(), h.grad, w.grad)
    torch.testing.assert_close(results["triton"], results["eager"], atol=2e-2, rtol=2e-2)


def test_bad_inputs_raise_kernel_error() -> None:
    hidden, weight, _, targets = make(6, 16, 40, torch.float32, False)
    with pytest.raises(KernelError, match="shapes disagree"):
        tri.linear_cross_entropy(hidden, weight[:, :8], targets)
    with pytest.raises(KernelError, match="bias"):
        tri.linear_cross_entropy(hidden, weight, targets, bias=torch.zeros(3))
    with pytest.raises(KernelError, match="reduction"):
        tri.linear_cross_entropy(hidden, weight, targets, reduction="avg")


@gpu_grid
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_grid(dtype: torch.dtype) -> None:
    check(*make(1024, 512, 128256, dtype, False), "mean", 0.0, 1e-4)
