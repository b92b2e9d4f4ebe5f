"""Triton fused cross-entropy against a float64 reference: loss and d logits, in-place semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from craft import ops
from craft.errors import KernelError
from craft.ops.triton import cross_entropy as tri
from tests.kernels._triton import DEVICE, assert_close, gpu_grid, needs_triton

pytestmark = needs_triton


def reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """F.cross_entropy in float64 plus z_loss * lse^2; an all-ignored mean is 0."""
    x = logits.double()
    valid = targets != ignore_index
    loss = F.cross_entropy(
        x,
        targets.long(),
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )  # (N,)
    loss = loss + z_loss * torch.logsumexp(x, -1).square() * valid
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    return loss.sum() if reduction == "sum" else loss


def make(n: int, v: int, dtype: torch.dtype, ignored: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 4).to(DEVICE, dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = -100
    return logits, targets.to(DEVICE)


def check(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
) -> None:
    """Loss and gradient for an intermediate (in-place) logits tensor vs float64."""
    dtype = logits.dtype
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1  # a non-leaf, as the output of the model's last layer is
    loss = tri.cross_entropy(x, targets, ignore_index, reduction, label_smoothing, z_loss)
    assert loss.dtype == torch.float32
    g = torch.Generator().manual_seed(5)
    go = (
        torch.randn(loss.shape, generator=g).to(loss)
        if reduction == "none"
        else torch.tensor(0.75, device=loss.device)
    )
    (grad,) = torch.autograd.grad(loss, leaf, go)
    x64 = logits.detach().double().requires_grad_()
    ref = reference(x64, targets, ignore_index, reduction, label_smoothing, z_loss)
    (rgrad,) = torch.autograd.grad(ref, x64, go.double())
    assert_close(loss, ref, torch.float32 if dtype == torch.float32 else torch.float16, "loss")
    assert_close(grad, rgrad, dtype, "d logits")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "n,v", [(1, 7), (19, 1000), (16, 256)], ids=["tiny", "multi-chunk", "one-chunk"]
)
def test_float32(n: int, v: int, reduction: str) -> None:
    check(*make(n, v, torch.float32, ignored=0.25), reduction=reduction)


@pytest.mark.parametrize(
    "label_smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)], ids=["ls", "z", "ls+z"]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_and_z_loss(label_smoothing: float, z_loss: float, reduction: str) -> None:
    check(*make(29, 700, torch.float32, ignored=0.2), reduction, label_smoothing, z_loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_logits(dtype: torch.dtype) -> None:
    check(*make(24, 600, dtype, ignored=0.2), "mean", 0.1, 1e-3)


def test_every_target_ignored_gives_zero_loss_and_gradient() -> None:
    logits, targets = make(8, 50, torch.float32)
    targets[:] = -100
    x = logits.clone().requires_grad_()
    loss = tri.cross_entropy(x * 1, targets)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def test_custom_ignore_index_int32_targets_and_strided_logits() -> None:
    """Logits as a column slice of a wider buffer (row stride > V), targets int32."""
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(13, 300, generator=g).to(DEVICE)
    logits = wide[:, :257]
    targets = torch.randint(0, 257, (13,), generator=g, dtype=torch.int32)
    targets[::4] = 3  # class 3 is the ignored one here
    targets = targets.to(DEVICE)
    assert logits.stride(0) == 300
    check(logits, targets, reduction="mean", ignore_index=3)


def test_gradient_overwrites_intermediate_logits_in_place() -> None:
    logits, targets = make(6, 90, torch.float32)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    loss = tri.cross_entropy(x, targets)
    loss.backward()
    # the storage of x now holds d loss / d x and feeds the backward directly
    torch.testing.assert_close(x.detach(), leaf.grad)
    # a leaf tensor (a user's own logits) is never modified
    y = logits.clone().requires_grad_()
    before = y.detach().clone()
    tri.cross_entropy(y, targets).backward()
    assert torch.equal(y.detach(), before) and y.grad is not None


def test_forward_leaves_the_logits_intact_until_the_backward() -> None:
    """The gradient is written by the backward (where grad_output is known), not the forward."""
    logits, targets = make(6, 90, torch.float32, ignored=0.2)
    x = logits.clone().requires_grad_() * 1
    before = x.detach().clone()
    loss = tri.cross_entropy(x, targets)
    assert torch.equal(x.detach(), before)  # e.g. an argmax for accuracy is still right here
    loss.backward()
    assert not torch.equal(x.detach(), before)


def test_view_of_a_leaf_is_never_overwritten() -> None:
    """`leaf.view(-1, V)` is not a leaf but shares the leaf's memory: it must stay intact."""
    logits, targets = make(6, 90, torch.float32, ignored=0.2)
    leaf = logits.reshape(2, 3, 90).clone().requires_grad_()  # (B, T, V)
    before = leaf.detach().clone()
    tri.cross_entropy(leaf.view(6, 90), targets, label_smoothing=0.1).backward()
    assert torch.equal(leaf.detach(), before)
    x64 = logits.double().requires_grad_()
    reference(x64, targets, -100, "mean", 0.1, 0.0).backward()
    assert_close(leaf.grad.view(6, 90), x64.grad, torch.float32, "d logits")


def test_overwritten_logits_saved_elsewhere_fail_loudly() -> None:
    """An op that saved the logits for its backward must not silently use the gradient."""
    logits, targets = make(4, 20, torch.float32)
    leaf = logits.clone().requires_grad_()
    x = torch.tanh(leaf)  # tanh saves its output, which the kernel then overwrites
    loss = tri.cross_entropy(x, targets)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_leaves_logits_untouched() -> None:
    logits, targets = make(5, 40, torch.float32)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    before = x.detach().clone()
    with torch.no_grad():
        loss = tri.cross_entropy(x, targets)
    assert torch.equal(x.detach(), before)
    ref = reference(logits, targets, -100, "mean", 0.0, 0.0)
    assert_close(loss, ref, torch.float32, "loss")


def test_second_backward_is_refused() -> None:
    logits, targets = make(4, 30, torch.float32)
    x = logits.clone().requires_grad_() * 1
    loss = tri.cross_entropy(x, targets) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_bad_inputs_raise_kernel_error() -> None:
    logits, targets = make(4, 30, torch.float32)
    with pytest.raises(KernelError, match="reduction"):
        tri.cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(KernelError, match="dtype"):
        tri.cross_entropy(logits.double(), targets)
    assert "expected logits" in (tri.check_inputs(logits[None], targets) or "")
    with ops.use_backends(cross_entropy="triton"), pytest.raises(KernelError, match="dtype"):
        ops.cross_entropy(logits.double(), targets)


def test_matches_torch_backend_through_ops() -> None:
    logits, targets = make(20, 130, torch.float32, ignored=0.3)
    results = {}
    for name in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        with ops.use_backends(cross_entropy=name):
            loss = ops.cross_entropy(x * 1, targets, label_smoothing=0.1, z_loss=1e-3)
        loss.backward()
        results[name] = (loss.detach(), x.grad)
    torch.testing.assert_close(results["triton"], results["torch"], atol=1e-5, rtol=1e-5)


@gpu_grid
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("v", [50257, 128256])
def test_gpu_grid(v: int, dtype: torch.dtype) -> None:
    check(*make(2048, v, dtype, ignored=0.1), "mean", 0.1, 1e-4)
