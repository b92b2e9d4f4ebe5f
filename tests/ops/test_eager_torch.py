"""The `eager` reference against plain PyTorch definitions, and the `torch` backend against `eager`.

Gradient comparisons run in float64 with a random upstream gradient (a vector-Jacobian product),
on odd shapes, grouped-query heads, causal and non-causal attention and Tq < Tk (decode steps).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import craft.ops as ops
from craft.errors import KernelError
from craft.ops import eager
from craft.ops import torch_backend as tb

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one CPU thread is fastest and keeps parallel test workers from contending."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _vjp(fn, inputs: tuple[torch.Tensor, ...], seed: int = 0):
    """fn(*inputs) and its vector-Jacobian product with a fixed random upstream gradient."""
    inputs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs)
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    up = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    wrt = [x for x in inputs if x.requires_grad]
    return out.detach(), torch.autograd.grad(out, wrt, up, allow_unused=True)


def _assert_same(a, b, atol: float = 1e-10) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=1e-8)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert (ga is None) == (gb is None)  # an input unused by one is unused by the other
        if ga is not None:
            torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-8)


# ------------------------------------------------------------------------------------- attention

ATTN_SHAPES = [
    # B, H, Hkv, Tq, Tk, D
    (2, 4, 4, 7, 7, 5),  # multi-head, odd sizes
    (1, 6, 2, 9, 9, 8),  # grouped-query
    (2, 4, 1, 1, 11, 6),  # multi-query decode step
    (1, 4, 2, 3, 10, 4),  # chunk of queries against a longer cache
]


def _qkv(b, h, hkv, tq, tk, d, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, generator=g, dtype=dtype)
    return q, k, v


def _naive_attention(q, k, v, causal):
    """Loop over heads and queries, spelling out the bottom-right causal rule."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)
            for i in range(tq):
                last = tk - tq + i if causal else tk - 1
                s = (k[bi, kh, : last + 1] @ q[bi, hi, i]) / math.sqrt(d)
                out[bi, hi, i] = torch.softmax(s, 0) @ v[bi, kh, : last + 1]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_eager_attention_matches_naive_loop(shape, causal):
    q, k, v = _qkv(*shape)
    torch.testing.assert_close(eager.attention(q, k, v, causal), _naive_attention(q, k, v, causal))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_torch_attention_forward_and_grads_equal_eager(shape, causal):
    qkv = _qkv(*shape)
    _assert_same(
        _vjp(lambda q, k, v: tb.attention(q, k, v, causal), qkv),
        _vjp(lambda q, k, v: eager.attention(q, k, v, causal), qkv),
    )


def test_attention_custom_scale_and_gqa_equals_repeated_heads():
    q, k, v = _qkv(2, 6, 3, 5, 5, 4)
    rep = (k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    for fn in (eager.attention, tb.attention):
        torch.testing.assert_close(fn(q, k, v, True, 0.3), eager.attention(q, *rep, True, 0.3))


def test_causal_decode_step_sees_every_key():
    q, k, v = _qkv(1, 2, 2, 1, 6, 4)
    for fn in (eager.attention, tb.attention):
        torch.testing.assert_close(fn(q, k, v, True), fn(q, k, v, False))


def test_attention_rejects_bad_shapes():
    q, k, v = _qkv(1, 3, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="multiple"):
        eager.attention(q, k, v)
    q, k, v = _qkv(1, 2, 2, 5, 3, 4)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        tb.attention(q, k, v, causal=True)


# --------------------------------------------------------------------------------- cross-entropy

LOSS_SETTINGS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 0.05)]


def _logits_targets(n=13, v=11, seed=0, ignore=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=F64) * 3
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignore)] = -100
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_eager_cross_entropy_matches_pytorch_definition(reduction, label_smoothing):
    x, t = _logits_targets()
    ref = F.cross_entropy(x, t, reduction=reduction, label_smoothing=label_smoothing)
    torch.testing.assert_close(eager.cross_entropy(x, t, -100, reduction, label_smoothing), ref)


def test_eager_z_loss_adds_squared_logsumexp():
    x, t = _logits_targets(ignore=())
    base = eager.cross_entropy(x, t, reduction="none")
    with_z = eager.cross_entropy(x, t, reduction="none", z_loss=0.01)
    torch.testing.assert_close(with_z - base, 0.01 * torch.logsumexp(x, -1) ** 2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("label_smoothing", "z_loss"), LOSS_SETTINGS)
def test_torch_cross_entropy_equals_eager(reduction, label_smoothing, z_loss):
    x, t = _logits_targets()
    args = (-100, reduction, label_smoothing, z_loss)
    _assert_same(
        _vjp(lambda x: tb.cross_entropy(x, t, *args), (x,)),
        _vjp(lambda x: eager.cross_entropy(x, t, *args), (x,)),
    )


@pytest.mark.parametrize("fn", [eager.cross_entropy, tb.cross_entropy])
def test_all_ignored_mean_is_zero_with_zero_grads(fn):
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    t = torch.full((4,), -1, dtype=torch.long)
    loss = fn(x, t, ignore_index=-1, label_smoothing=0.1, z_loss=0.01)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_loss_of_low_precision_logits_is_float32():
    x, t = _logits_targets()
    ref = eager.cross_entropy(x, t)
    for fn in (eager.cross_entropy, tb.cross_entropy):
        out = fn(x.to(torch.bfloat16), t)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.02)


def test_bad_loss_arguments_raise():
    x, t = _logits_targets()
    with pytest.raises(ValueError, match="reduction"):
        tb.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        eager.cross_entropy(x, t, label_smoothing=1.5)


# -------------------------------------------------------------------------- linear cross-entropy


def _hidden_weight(n=23, c=6, v=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=F64)
    w = torch.randn(v, c, generator=g, dtype=F64) * 0.5
    b = torch.randn(v, generator=g, dtype=F64)
    t = torch.randint(0, v, (n,), generator=g)
    t[[0, n // 2, n - 2]] = -100
    return h, w, b, t


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows for a 17-word vocabulary, so every test crosses chunk boundaries."""
    monkeypatch.setattr(tb, "CHUNK_LOGITS", 3 * 17)
    calls = []
    real = tb._fused_pass

    def spy(hidden, weight, *a, **kw):
        calls.append(hidden.shape[0])
        return real(hidden, weight, *a, **kw)

    monkeypatch.setattr(tb, "_fused_pass", spy)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("label_smoothing", "z_loss"), LOSS_SETTINGS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_torch_linear_cross_entropy_equals_eager(
    small_chunks, reduction, label_smoothing, z_loss, with_bias
):
    h, w, b, t = _hidden_weight()
    args = (-100, reduction, label_smoothing, z_loss)
    if with_bias:
        got = _vjp(lambda h, w, b: tb.linear_cross_entropy(h, w, t, b, *args), (h, w, b))
        ref = _vjp(lambda h, w, b: eager.linear_cross_entropy(h, w, t, b, *args), (h, w, b))
    else:
        got = _vjp(lambda h, w: tb.linear_cross_entropy(h, w, t, None, *args), (h, w))
        ref = _vjp(lambda h, w: eager.linear_cross_entropy(h, w, t, None, *args), (h, w))
    _assert_same(got, ref)
    assert small_chunks  # the chunked path ran


def test_linear_cross_entropy_gradcheck(small_chunks):
    h, w, b, t = _hidden_weight(n=7, c=3, v=17)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b, r=reduction: tb.linear_cross_entropy(h, w, t, b, -100, r, 0.1, 0.01),
            (h.requires_grad_(), w.requires_grad_(), b.requires_grad_()),
        )


def test_linear_cross_entropy_only_needed_grads_and_no_grad_mode(small_chunks):
    h, w, _, t = _hidden_weight()
    w.requires_grad_()
    loss = tb.linear_cross_entropy(h, w, t)
    loss.backward()
    assert h.grad is None and w.grad is not None
    with torch.no_grad():
        assert not tb.linear_cross_entropy(h, w, t).requires_grad


def test_linear_cross_entropy_under_bf16_autocast_is_close_to_fp32():
    h, w, _, t = _hidden_weight(n=32, c=16, v=40)
    h, w = h.float().requires_grad_(), w.float().requires_grad_()
    ref = eager.linear_cross_entropy(h, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tb.linear_cross_entropy(h, w, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.02)
    out.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


# ------------------------------------------------------------------- loss edge cases and dtypes


def test_loss_defaults_are_plain_cross_entropy():
    """No label smoothing and no z-loss unless asked: the defaults give F.cross_entropy."""
    h, w, b, t = _hidden_weight()
    ref = F.cross_entropy(h @ w.t() + b, t)
    torch.testing.assert_close(eager.cross_entropy(h @ w.t() + b, t), ref)
    torch.testing.assert_close(tb.cross_entropy(h @ w.t() + b, t), ref)
    torch.testing.assert_close(eager.linear_cross_entropy(h, w, t, b), ref)
    torch.testing.assert_close(tb.linear_cross_entropy(h, w, t, b), ref)


def test_full_label_smoothing_is_allowed():
    """label_smoothing = 1 (the uniform target) is in range, as in PyTorch."""
    x, t = _logits_targets()
    ref = F.cross_entropy(x, t, label_smoothing=1.0)
    for fn in (eager.cross_entropy, tb.cross_entropy):
        torch.testing.assert_close(fn(x, t, label_smoothing=1.0), ref)


def test_masked_logits_give_a_finite_loss_without_label_smoothing():
    """A -inf logit (a masked word) is harmless unless smoothing puts mass on it."""
    x, t = _logits_targets(ignore=())
    x[:, 3] = float("-inf")
    t[t == 3] = 4
    ref = F.cross_entropy(x, t, reduction="none")
    assert torch.isfinite(ref).all()
    for fn in (eager.cross_entropy, tb.cross_entropy):
        torch.testing.assert_close(fn(x, t, reduction="none"), ref)
    h, w, b, t = _hidden_weight()
    b[5] = float("-inf")
    t[t == 5] = 6
    ref = F.cross_entropy(h @ w.t() + b, t)
    assert torch.isfinite(ref)
    for fn in (eager.linear_cross_entropy, tb.linear_cross_entropy):
        torch.testing.assert_close(fn(h, w, t, b), ref)


def test_huge_logits_give_a_finite_loss_without_z_loss():
    """Logits of a diverging run (~1e20, whose square overflows float32) still give PyTorch's
    finite loss when z-loss is off: its term is not computed at all."""
    x, t = _logits_targets(ignore=())
    x = (x * 1e19).float()
    ref = F.cross_entropy(x, t, reduction="none")
    assert torch.isfinite(ref).all() and not torch.isfinite(torch.logsumexp(x, -1) ** 2).all()
    for fn in (eager.cross_entropy, tb.cross_entropy):
        torch.testing.assert_close(fn(x, t, reduction="none"), ref)
    h, w, _, t = _hidden_weight()
    h, w = (h * 1e10).float(), (w * 1e10).float()
    ref = F.cross_entropy(h @ w.t(), t, reduction="none")
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(tb.linear_cross_entropy(h, w, t, reduction="none"), ref)


@pytest.mark.parametrize("fn", [eager.cross_entropy, tb.cross_entropy])
def test_mean_over_one_valid_token_is_its_loss(fn):
    x, t = _logits_targets(n=5, ignore=())
    t[1:] = -100
    torch.testing.assert_close(fn(x, t), F.cross_entropy(x[:1], t[:1]))


def test_linear_cross_entropy_mean_over_one_valid_token(small_chunks):
    h, w, _, t = _hidden_weight(n=7)
    t[0], t[1:] = 3, -100
    got = _vjp(lambda h, w: tb.linear_cross_entropy(h, w, t), (h, w))
    ref = _vjp(lambda h, w: F.cross_entropy(h @ w.t(), t), (h, w))
    _assert_same(got, ref)


def _mm_and_exp_calls(monkeypatch: pytest.MonkeyPatch, fn) -> dict[str, int]:
    """How many matmuls and in-place exps (the softmax of a gradient pass) fn() runs."""
    counts = {"mm": 0, "exp_": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__matmul__", counting("mm", torch.Tensor.__matmul__))
        m.setattr(torch.Tensor, "exp_", counting("exp_", torch.Tensor.exp_))
        m.setattr(tb, "addmm_fp32_", counting("mm", tb.addmm_fp32_))
        fn()
    return counts


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(("need_h", "need_w"), [(True, False), (False, True), (True, True)])
def test_linear_cross_entropy_computes_only_the_gradients_asked_for(
    small_chunks, monkeypatch, reduction, need_h, need_w
):
    """A frozen output layer (or frozen inputs) costs no gradient GEMM for it, and the
    gradients that are asked for equal the reference's."""
    h, w, _, t = _hidden_weight()  # 23 rows in chunks of 3: 8 chunks
    chunks = 8
    h.requires_grad_(need_h)
    w.requires_grad_(need_w)
    out = {}

    def run():
        loss = tb.linear_cross_entropy(h, w, t, None, -100, reduction)
        out["loss"] = loss
        loss.sum().backward()

    counts = _mm_and_exp_calls(monkeypatch, run)
    # one logits GEMM per chunk, one gradient GEMM per chunk for each gradient asked for; with
    # reduction="none" the backward pass recomputes the logits
    again = reduction == "none"
    assert counts["mm"] == chunks * (1 + again + need_h + need_w)
    assert counts["exp_"] == chunks  # one softmax per chunk for the gradients
    hr = h.detach().clone().requires_grad_(need_h)
    wr = w.detach().clone().requires_grad_(need_w)
    eager.linear_cross_entropy(hr, wr, t, None, -100, reduction).sum().backward()
    for got, ref in ((h.grad, hr.grad), (w.grad, wr.grad)):
        assert (got is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_without_gradients_runs_no_gradient_pass(
    small_chunks, monkeypatch, reduction
):
    h, w, _, t = _hidden_weight()
    with torch.no_grad():
        counts = _mm_and_exp_calls(
            monkeypatch, lambda: tb.linear_cross_entropy(h, w, t, None, -100, reduction)
        )
    assert counts == {"mm": 8, "exp_": 0}
    counts = _mm_and_exp_calls(
        monkeypatch, lambda: tb.linear_cross_entropy(h, w, t, None, -100, reduction)
    )
    assert counts == {"mm": 8, "exp_": 0}  # nothing requires a gradient


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_under_autocast_rounds_like_nn_linear(small_chunks, reduction):
    """Under bf16 autocast the logits and the input-gradient GEMMs run in bf16, as the
    materialised reference (nn.Linear-style matmul, then the loss in float32) does."""
    h, w, _, t = _hidden_weight(n=23, c=16, v=17)
    h, w = h.float().requires_grad_(), w.float().requires_grad_()
    hr, wr = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gen = torch.Generator().manual_seed(3)
    up = torch.rand(23, generator=gen) if reduction == "none" else torch.tensor(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tb.linear_cross_entropy(h, w, t, None, -100, reduction)
        ref = eager.linear_cross_entropy(hr, wr, t, None, -100, reduction)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)  # the same bf16 logits
    (out * up).sum().backward()
    (ref * up).sum().backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(h.grad, hr.grad, atol=1e-3, rtol=2e-2)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-3, rtol=2e-2)
    if reduction == "none":
        # d logits scaled per token, rounded to bf16, then a bf16 GEMM (d hidden) or bf16
        # operands summed in float32 (d weight; the reference rounds its sum to bf16): the same
        # bf16 values but for a rare last-bit rounding of d logits (float32 softmax in another
        # order). With "mean" the op scales after the GEMM (grad_output / N in float32).
        assert (h.grad != hr.grad).float().mean() < 0.05
        assert (w.grad.bfloat16() != wr.grad).float().mean() < 0.05


def test_linear_cross_entropy_rejects_mismatched_shapes():
    h, w, _, t = _hidden_weight()
    with pytest.raises(ValueError, match="expects hidden"):
        tb.linear_cross_entropy(h[:, :5], w, t)  # C differs
    with pytest.raises(ValueError, match="expects hidden"):
        tb.linear_cross_entropy(h[:6].reshape(2, 3, 6), w, t[:2])  # (B, T, C) hidden
    with pytest.raises(ValueError, match="expects hidden"):
        tb.linear_cross_entropy(h, w[0], t)  # 1-d weight
    with pytest.raises(ValueError, match="targets"):
        tb.linear_cross_entropy(h, w, t[:-1])


# ---------------------------------------------------------------------------------------- norm

NORM_CASES = [
    ("layernorm", True, True),
    ("layernorm", True, False),
    ("layernorm", False, False),
    ("rmsnorm", True, False),
    ("rmsnorm", False, False),
]


def _norm_inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 7, generator=g, dtype=F64) * 2 + 1
    r = torch.randn(3, 5, 7, generator=g, dtype=F64)
    w = torch.randn(7, generator=g, dtype=F64)
    b = torch.randn(7, generator=g, dtype=F64)
    return x, r, w, b


def test_eager_norms_match_definitions():
    x, _, w, b = _norm_inputs()
    torch.testing.assert_close(eager.norm(x, w, b), F.layer_norm(x, (7,), w, b, 1e-5))
    rms = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(eager.norm(x, w, None, "rmsnorm", 1e-6), rms)


@pytest.mark.parametrize(("kind", "weight", "bias"), NORM_CASES)
@pytest.mark.parametrize("residual", [False, True])
def test_torch_norm_equals_eager(kind, weight, bias, residual):
    x, r, w, b = _norm_inputs()

    def call(fn):
        def run(x, r, w, b):
            out = fn(
                x, w if weight else None, b if bias else None, kind, 1e-5, r if residual else None
            )
            return torch.stack(out) if residual else out  # (2, ...) normed and sum

        return run

    _assert_same(_vjp(call(tb.norm), (x, r, w, b)), _vjp(call(eager.norm), (x, r, w, b)))


def test_norm_keeps_input_dtype_and_rejects_rmsnorm_bias():
    x, _, w, b = _norm_inputs()
    for fn in (eager.norm, tb.norm):
        assert fn(x.float(), w.float()).dtype == torch.float32
        with pytest.raises(ValueError, match="bias"):
            fn(x, w, b, "rmsnorm")


# ------------------------------------------------------------------------------------- dispatch


def test_use_backends_selects_and_restores():
    x, t = _logits_targets()
    assert ops.selected("cross_entropy") == "auto"
    with ops.use_backends(cross_entropy="eager", norm="torch"):
        assert ops.selected("cross_entropy") == "eager"
        assert ops.selected("norm") == "torch"
        torch.testing.assert_close(ops.cross_entropy(x, t), eager.cross_entropy(x, t))
    assert ops.selected("cross_entropy") == "auto" and ops.selected("norm") == "auto"
    with pytest.raises(KernelError, match="no such backend"), ops.use_backends(norm="nope"):
        pass
    assert ops.selected("norm") == "auto"


def test_auto_prefers_torch_over_eager_on_cpu():
    assert ops.availability("attention")["eager"] is None
    assert ops.availability("attention")["torch"] is None
    assert ops.registry.resolve("attention", "auto", "cpu", *_qkv(1, 2, 2, 3, 3, 4)).priority >= 10


# ------------------------------------------------------------------------------------------ CUDA

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tq", "tk"), [(64, 64), (1, 77), (16, 80)])
def test_torch_attention_on_cuda_matches_float64_reference(dtype, tq, tk):
    q, k, v = _qkv(2, 8, 2, tq, tk, 64)
    ref = eager.attention(q, k, v, True)
    out = tb.attention(*(x.to("cuda", dtype) for x in (q, k, v)), True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)


@CUDA
def test_torch_linear_cross_entropy_on_cuda_under_autocast():
    h, w, _, t = _hidden_weight(n=300, c=64, v=1000)
    ref = eager.linear_cross_entropy(h, w, t)
    hc = h.float().cuda().requires_grad_()
    wc = w.float().cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = tb.linear_cross_entropy(hc, wc, t.cuda())
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-2, rtol=2e-2)
    out.backward()
    assert hc.grad.dtype == torch.float32 and torch.isfinite(wc.grad).all()
