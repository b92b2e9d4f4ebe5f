"""The norm op under autocast: one dtype contract for every backend, checked against float64.

In a GPT block under bf16 autocast, `ln_2(a, residual=x)` receives the attention output `a` in
bf16 while the residual stream `x` is fp32. Every backend must return the sum in fp32 (the
residual stream is not rounded to bf16), the normalised output in the autocast dtype, and each
gradient in its input's dtype. The cuda backend's kernels are checked on a GPU and in the CPU
emulator (tests/kernels/emulator); here its Python side runs against a torch model of its binding.
"""

from __future__ import annotations

import pytest
import torch

from craft.ops import cuda as cuda_backend
from craft.ops import eager
from craft.ops import torch_backend as tb
from tests.ops._norm_binding import BindingModel

BACKENDS = {"eager": eager.norm, "torch": tb.norm}
HALF = [torch.bfloat16, torch.float16]


def _inputs(dtype: torch.dtype, rows: int = 6, cols: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(rows, cols, generator=g) * 2 + 0.3).to(dtype)  # the branch (attention out)
    x = torch.randn(rows, cols, generator=g) * 3  # the fp32 residual stream
    w = torch.rand(cols, generator=g) + 0.5
    b = torch.randn(cols, generator=g) * 0.1
    return a, x, w, b


def _reference(a, x, w, b, kind):  # float64 of the same (rounded) inputs
    s = a.double() + x.double()
    if kind == "layernorm":
        y = (s - s.mean(-1, keepdim=True)) * torch.rsqrt(
            s.var(-1, unbiased=False, keepdim=True) + 1e-5
        )
        return y * w.double() + b.double(), s
    return s * torch.rsqrt(s.square().mean(-1, keepdim=True) + 1e-5) * w.double(), s


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("half", HALF, ids=str)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_low_precision_branch_on_fp32_residual_under_autocast(backend, half, kind):
    fn = BACKENDS[backend]
    a, x, w, b = _inputs(half)
    bias = b if kind == "layernorm" else None
    leaves = [t.clone().requires_grad_() for t in (a, x, w)]
    bl = bias.clone().requires_grad_() if bias is not None else None
    with torch.autocast("cpu", dtype=half):
        y, s = fn(leaves[0], leaves[2], bl, kind, 1e-5, leaves[1])
    assert s.dtype == torch.float32, "the residual stream must stay fp32"
    assert y.dtype == half, "the normalised output is in the autocast dtype"
    ref_y, ref_s = _reference(a, x, w, b, kind)
    torch.testing.assert_close(s.double(), ref_s, atol=1e-6, rtol=1e-6)  # exact fp32 add
    torch.testing.assert_close(y.double(), ref_y, atol=2e-2, rtol=2e-2)
    # gradients come back in each input's dtype
    g = torch.Generator().manual_seed(3)
    dy, ds = torch.randn(y.shape, generator=g).to(half), torch.randn(s.shape, generator=g)
    torch.autograd.backward([y, s], [dy, ds])
    assert leaves[0].grad.dtype == half and leaves[1].grad.dtype == torch.float32
    assert leaves[2].grad.dtype == torch.float32
    a64, x64, w64 = (t.double().requires_grad_() for t in (a, x, w))
    b64 = b.double().requires_grad_() if bias is not None else None
    ry, rs = eager.norm(a64, w64, b64, kind, 1e-5, x64)
    torch.autograd.backward([ry, rs], [dy.double(), ds.double()])
    torch.testing.assert_close(leaves[1].grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(leaves[0].grad.double(), a64.grad, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(leaves[2].grad.double(), w64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_dtypes_without_autocast_and_without_residual(backend):
    fn = BACKENDS[backend]
    a, x, w, b = _inputs(torch.bfloat16)
    y, s = fn(a, w, b, "layernorm", 1e-5, x)  # no autocast: output in the sum's dtype
    assert (y.dtype, s.dtype) == (torch.float32, torch.float32)
    assert fn(x, w, b).dtype == torch.float32  # fp32 in, fp32 out
    assert fn(a, w, b).dtype == torch.bfloat16  # a bf16 model without autocast stays bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(x, w, b).dtype == torch.bfloat16  # ln_1 / ln_f feed a bf16 matmul
        assert fn(x.double(), w.double(), b.double()).dtype == torch.float64  # never narrowed


def test_backends_agree_bit_for_bit_on_the_sum_and_closely_on_the_output():
    a, x, w, b = _inputs(torch.bfloat16, rows=9, cols=64, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ye, se = eager.norm(a, w, b, "layernorm", 1e-5, x)
        yt, st = tb.norm(a, w, b, "layernorm", 1e-5, x)
    assert torch.equal(se, st)
    torch.testing.assert_close(ye.float(), yt.float(), atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------ the cuda backend (CPU)


@pytest.mark.parametrize(
    ("x", "res", "cast", "ok"),
    [
        (torch.bfloat16, torch.float32, torch.bfloat16, True),  # ln_2 under bf16 autocast
        (torch.float16, torch.float32, torch.float16, True),
        (torch.bfloat16, torch.float32, None, True),  # the same without autocast: y in fp32
        (torch.float32, None, torch.bfloat16, True),  # ln_1 / ln_f under autocast
        (torch.float32, torch.float32, torch.float16, True),
        (torch.float32, torch.bfloat16, None, True),  # a bf16 residual under an fp32 branch
        (torch.bfloat16, torch.float32, torch.float16, False),  # bf16 branch, fp16 autocast
        (torch.bfloat16, None, torch.float16, False),
    ],
)
def test_cuda_input_problem_follows_the_contract(x, res, cast, ok):
    t = torch.zeros(3, 8, dtype=x)
    r = None if res is None else torch.zeros(3, 8, dtype=res)
    if cast is None:
        reason = cuda_backend.input_problem(t, torch.ones(8), None, r)
    else:
        with torch.autocast("cpu", dtype=cast):
            reason = cuda_backend.input_problem(t, torch.ones(8), None, r)
    assert (reason is None) == ok, reason
    if not ok:
        assert "no kernel for" in reason


@pytest.mark.parametrize("half", HALF, ids=str)
def test_cuda_autograd_function_returns_each_gradient_in_its_dtype(monkeypatch, half):
    monkeypatch.setattr(cuda_backend, "extension", lambda: BindingModel)
    a, x, w, b = _inputs(half, rows=4, cols=16)
    leaves = [t.clone().requires_grad_() for t in (a, x, w, b)]
    with torch.autocast("cpu", dtype=half):
        _, y_dtype = eager.norm_dtypes(leaves[0], leaves[1])
        y, s = cuda_backend.FusedNorm.apply(
            leaves[0], leaves[2], leaves[3], leaves[1], False, 1e-5, y_dtype
        )
    assert (y.dtype, s.dtype) == (half, torch.float32)
    g = torch.Generator().manual_seed(7)
    dy, ds = torch.randn(y.shape, generator=g).to(half), torch.randn(s.shape, generator=g)
    torch.autograd.backward([y, s], [dy, ds])
    ref = [t.clone().requires_grad_() for t in (a, x, w, b)]
    with torch.autocast("cpu", dtype=half):
        ry, rs = eager.norm(ref[0], ref[2], ref[3], "layernorm", 1e-5, ref[1])
    torch.autograd.backward([ry, rs], [dy, ds])
    for got, want in zip(leaves, ref, strict=True):
        assert got.grad.dtype == want.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.float(), want.grad.float(), atol=2e-2, rtol=2e-2)
    # only the sum used: its gradient reaches the branch in the branch's dtype
    leaves2 = [t.clone().requires_grad_() for t in (a, x)]
    _, s2 = cuda_backend.FusedNorm.apply(leaves2[0], w, None, leaves2[1], True, 1e-5, torch.float32)
    s2.backward(ds)
    assert leaves2[0].grad.dtype == half and torch.equal(leaves2[1].grad, ds)


def test_cuda_norm_casts_a_narrow_residual_to_the_sum_dtype(monkeypatch):
    monkeypatch.setattr(cuda_backend, "extension", lambda: BindingModel)
    monkeypatch.setattr(cuda_backend, "supports", lambda *a: None)
    x = torch.randn(3, 8, requires_grad=True)
    r = torch.randn(3, 8).to(torch.bfloat16).requires_grad_()
    y, s = cuda_backend.norm(x, torch.ones(8), None, "layernorm", 1e-5, r)
    assert s.dtype == torch.float32 and y.dtype == torch.float32
    (y.sum() + s.sum()).backward()
    assert r.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.float32


def test_binding_model_agrees_with_the_eager_reference():
    """The model above must itself be right, or the two tests above prove nothing."""
    a, x, w, b = _inputs(torch.float32, rows=5, cols=12)
    y, s, mean, rstd = BindingModel.norm_fwd(a, x, w, b, False, 1e-5)
    ry, rs = eager.norm(a, w, b, "layernorm", 1e-5, x)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(s, rs)
    dy = torch.randn_like(y)
    dx, dw, db, _ = BindingModel.norm_bwd(dy, None, s, mean, rstd, w, True, True, False)
    ref = [t.clone().requires_grad_() for t in (s, w, b)]
    eager.norm(ref[0], ref[1], ref[2]).backward(dy)
    torch.testing.assert_close(dx, ref[0].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, ref[1].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, ref[2].grad, atol=1e-5, rtol=1e-5)
