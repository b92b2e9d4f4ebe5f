"""The `cuda` norm backend: the Python side everywhere, the compiled kernels where there is a GPU.

Kernel results are compared with a float64 reference; their error must stay within a small
multiple of the error that torch's own F.layer_norm / F.rms_norm makes in the same dtype.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import craft.ops
from craft.errors import KernelError
from craft.ops import cuda as cuda_backend
from craft.ops import set_backend, torch_backend
from craft.ops.registry import backends

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
cpu_torch_only = pytest.mark.skipif(
    torch.version.cuda is not None, reason="checks the behaviour with a CPU-only torch"
)


@pytest.fixture
def select_cuda() -> Iterator[None]:
    set_backend("norm", "cuda")
    try:
        yield
    finally:
        set_backend("norm", "auto")


def _setup_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("craft_setup", REPO / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() only runs under __main__
    return module


# ------------------------------------------------------------------------- Python side (any CPU)


def test_backend_registered_with_priority_and_device() -> None:
    b = backends("norm")["cuda"]
    assert b.priority == 20
    assert b.devices == ("cuda",)
    assert b.fn is cuda_backend.norm


@pytest.mark.skipif(HAS_CUDA, reason="checks the reason given on a machine without CUDA")
def test_unavailable_reason_names_the_missing_piece() -> None:
    reason = craft.ops.availability("norm")["cuda"]
    assert reason is not None
    assert "CPU-only build" in reason or "no CUDA device" in reason
    with pytest.raises(KernelError, match="not available"):
        cuda_backend.extension()


def test_selecting_cuda_for_cpu_tensors_raises_kernel_error(select_cuda: None) -> None:
    x = torch.randn(4, 8)
    with pytest.raises(KernelError, match=re.escape("kernels.norm = 'cuda' cannot run")):
        craft.ops.norm(x, torch.ones(8))


def test_auto_never_picks_cuda_for_cpu_tensors() -> None:
    x = torch.randn(3, 16)
    w = torch.randn(16)
    out = craft.ops.norm(x, w, None, "rmsnorm")
    torch.testing.assert_close(out, torch_backend.norm(x, w, None, "rmsnorm"))


def test_supports_rejects_cpu_tensors() -> None:
    reason = cuda_backend.supports(torch.randn(2, 8), None, None, "layernorm", None)
    assert reason is not None and "not a CUDA device" in reason


@pytest.mark.parametrize(
    ("x", "weight", "bias", "residual", "expected"),
    [
        (torch.zeros(2, 8, dtype=torch.float64), None, None, None, "dtype torch.float64"),
        (torch.zeros(2, 8, dtype=torch.int32), None, None, None, "dtype torch.int32"),
        (torch.zeros(2, 0), None, None, None, "no last dimension"),
        (torch.zeros(()), None, None, None, "no last dimension"),
        (torch.zeros(2, 8), torch.ones(7), None, None, "weight has shape (7,)"),
        (torch.zeros(2, 8), None, torch.ones(8, 1), None, "bias has shape (8, 1)"),
        (torch.zeros(2, 8), torch.ones(8, dtype=torch.float64), None, None, "weight has dtype"),
        (torch.zeros(2, 8), None, None, torch.zeros(2, 9), "does not match"),
        (torch.zeros(2, 8), None, None, torch.zeros(2, 8, dtype=torch.float64), "does not match"),
    ],
)
def test_input_problems_are_named(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    expected: str,
) -> None:
    reason = cuda_backend.input_problem(x, weight, bias, residual)
    assert reason is not None and expected in reason


def test_input_problem_accepts_mixed_parameter_dtypes() -> None:
    x = torch.zeros(3, 8, dtype=torch.bfloat16)
    assert (
        cuda_backend.input_problem(x, torch.ones(8), torch.zeros(8, dtype=torch.float16), x) is None
    )


def test_kernel_sources_are_found_and_keyed_by_content() -> None:
    src = cuda_backend.kernel_source_dir()
    assert src == REPO / "kernels"
    name = cuda_backend._build_name(src)
    assert name.startswith("craft_norm_") and name == cuda_backend._build_name(src)


def test_jit_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRAFT_CUDA_JIT", "0")
    module, reason = cuda_backend._jit_build()
    assert module is None and reason is not None and "CRAFT_CUDA_JIT=0" in reason


@cpu_torch_only
def test_jit_without_cuda_toolkit_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRAFT_CUDA_JIT", raising=False)
    module, reason = cuda_backend._jit_build()
    assert module is None and reason is not None and "no CUDA toolkit" in reason


def test_setup_build_modes() -> None:
    setup = _setup_module()
    assert setup.build_mode({}) == "auto"
    assert setup.build_mode({"CRAFT_BUILD_CUDA": "0"}) == "off"
    assert setup.build_mode({"CRAFT_BUILD_CUDA": "1"}) == "required"
    with pytest.raises(setup.CudaBuildError, match="expected 0, 1 or unset"):
        setup.build_mode({"CRAFT_BUILD_CUDA": "sometimes"})
    assert setup.plan_extension({"CRAFT_BUILD_CUDA": "0"}) == (False, "CRAFT_BUILD_CUDA=0")
    assert setup.SOURCES == cuda_backend.SOURCES
    assert setup.NVCC_FLAGS == cuda_backend.NVCC_FLAGS
    assert setup.CXX_FLAGS == cuda_backend.CXX_FLAGS


@cpu_torch_only
def test_setup_skips_or_fails_on_a_cpu_torch() -> None:
    setup = _setup_module()
    build, why = setup.plan_extension({})
    assert not build and "CPU-only build" in why
    with pytest.raises(
        setup.CudaBuildError, match=re.escape("CRAFT_BUILD_CUDA=1 but craft._C cannot be")
    ):
        setup.plan_extension({"CRAFT_BUILD_CUDA": "1"})


@cpu_torch_only
@pytest.mark.parametrize(("flag", "code"), [("0", 0), ("1", 1)])
def test_setup_py_exit_codes(flag: str, code: int) -> None:
    env = {**os.environ, "CRAFT_BUILD_CUDA": flag}
    proc = subprocess.run(
        [sys.executable, "setup.py", "--name"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    if code == 0:
        assert "craft-lm" in proc.stdout and "pure-Python install" in proc.stderr
    else:
        assert "error: CRAFT_BUILD_CUDA=1 but craft._C cannot be built" in proc.stderr


# ------------------------------------------------------------------------------ kernels (GPU)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# warp-per-row (64, 100, 768), block-per-row (2048, 4096, 8192), odd sizes on the scalar path
# (1, 100, 4097), and rows too long for registers, streamed (8193, 12288).
COLS = [1, 64, 100, 768, 1000, 2048, 4096, 4097, 8192, 8193, 12288]


def _reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    kind: str,
    eps: float,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """float64 norm of s = x + residual (rounded to x's dtype, as the op defines it)."""
    s = x if residual is None else x + residual
    s64 = s.double()
    if kind == "layernorm":
        y = (s64 - s64.mean(-1, keepdim=True)) * torch.rsqrt(
            s64.var(-1, unbiased=False, keepdim=True) + eps
        )
    else:
        y = s64 * torch.rsqrt(s64.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _leaves(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _run(fn, x, w, b, kind, res):  # type: ignore[no-untyped-def]
    """Forward + backward through `fn`; returns outputs and the grads of (x, w, b, res)."""
    x, w, b, res = _leaves(x, w, b, res)
    out = fn(x, w, b, kind, 1e-5, res)
    y, s = (out, None) if res is None else out
    gen = torch.Generator(device=x.device).manual_seed(1)
    dy = torch.randn(y.shape, device=y.device, generator=gen).to(y.dtype)
    loss = (y.float() * dy.float()).sum()
    if s is not None:
        ds = torch.randn(s.shape, device=s.device, generator=gen).to(s.dtype)
        loss = loss + (s.float() * ds.float()).sum()
    loss.backward()
    grads = [None if t is None else t.grad for t in (x, w, b, res)]
    return y, s, grads


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize(
    ("kind", "affine", "fused"),
    [
        ("layernorm", "wb", False),
        ("layernorm", "wb", True),
        ("rmsnorm", "w", True),
        ("rmsnorm", "", False),
        ("layernorm", "", True),
    ],
)
def test_matches_float64_reference(
    dtype: torch.dtype, cols: int, kind: str, affine: str, fused: bool
) -> None:
    torch.manual_seed(cols)
    rows = 37  # not a multiple of any block's rows
    dev = "cuda"
    x = (torch.randn(rows, cols, device=dev) * 2 + 0.5).to(dtype)
    res = torch.randn(rows, cols, device=dev).to(dtype) if fused else None
    w = (torch.rand(cols, device=dev) + 0.5).to(dtype) if "w" in affine else None
    b = (torch.randn(cols, device=dev) * 0.1).to(dtype) if "b" in affine else None

    y, s, grads = _run(cuda_backend.norm, x, w, b, kind, res)
    ty, ts, tgrads = _run(torch_backend.norm, x, w, b, kind, res)

    ref_y = _reference(x, w, b, kind, 1e-5, res)
    assert y.dtype == dtype and y.shape == x.shape
    slack = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert _rel_err(y, ref_y) <= 2 * _rel_err(ty, ref_y) + slack
    if fused:
        assert s is not None and torch.equal(s, ts)  # the sum is rounded exactly like x + residual
    # float64 reference gradients of the same loss
    x64, w64, b64, r64 = _leaves(*(None if t is None else t.double() for t in (x, w, b, res)))
    out = torch_backend.norm(x64, w64, b64, kind, 1e-5, r64)
    y64, s64 = (out, None) if r64 is None else out
    gen = torch.Generator(device=dev).manual_seed(1)
    dy = torch.randn(y64.shape, device=dev, generator=gen).to(dtype).double()
    loss = (y64 * dy).sum()
    if s64 is not None:
        ds = torch.randn(s64.shape, device=dev, generator=gen).to(dtype).double()
        loss = loss + (s64 * ds).sum()
    loss.backward()
    for name, g, tg, leaf in zip("xwbr", grads, tgrads, (x64, w64, b64, r64), strict=True):
        if leaf is None:
            continue
        assert g is not None and g.dtype == dtype, name
        assert _rel_err(g, leaf.grad) <= 2 * _rel_err(tg, leaf.grad) + slack, name


@needs_cuda
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cols", [7, 64, 100, 768, 4096, 8193])
@pytest.mark.parametrize(
    ("kind", "fused"), [("layernorm", True), ("rmsnorm", True), ("layernorm", False)]
)
def test_autocast_mixed_dtypes_match_torch_backend(
    half: torch.dtype, cols: int, kind: str, fused: bool
) -> None:
    """A GPT block under autocast: bf16/fp16 branch + fp32 residual (ln_2), fp32 input (ln_1)."""
    torch.manual_seed(cols)
    rows, dev = 37, "cuda"
    x = (torch.randn(rows, cols, device=dev) * 2 + 0.5).to(half if fused else torch.float32)
    res = torch.randn(rows, cols, device=dev) * 3 if fused else None  # the fp32 stream
    w = torch.rand(cols, device=dev) + 0.5
    b = torch.randn(cols, device=dev) * 0.1 if kind == "layernorm" else None
    with torch.autocast("cuda", dtype=half):
        y, s, grads = _run(cuda_backend.norm, x, w, b, kind, res)
        ty, ts, tgrads = _run(torch_backend.norm, x, w, b, kind, res)
    assert y.dtype == half == ty.dtype
    if fused:
        assert s is not None and s.dtype == torch.float32 and torch.equal(s, ts)
    ref_y = _reference(x, w, b, kind, 1e-5, res)
    slack = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[half]
    assert _rel_err(y, ref_y) <= 2 * _rel_err(ty, ref_y) + slack
    for name, g, tg in zip("xwbr", grads, tgrads, strict=True):
        if tg is None:
            continue
        assert g is not None and g.dtype == tg.dtype, name  # each in its own input's dtype
        torch.testing.assert_close(g.float(), tg.float(), atol=2 * slack, rtol=2 * slack, msg=name)


@needs_cuda
def test_weight_grads_are_deterministic() -> None:
    torch.manual_seed(0)
    x = torch.randn(4099, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(4096, device="cuda")
    b = torch.zeros(4096, device="cuda")
    runs = [_run(cuda_backend.norm, x, w, b, "layernorm", None)[2] for _ in range(2)]
    for g0, g1 in zip(runs[0], runs[1], strict=True):
        if g0 is not None:
            assert torch.equal(g0, g1)


@needs_cuda
def test_mixed_precision_params_unaligned_and_strided_inputs() -> None:
    torch.manual_seed(0)
    buf = torch.randn(5 * 3 * 512 + 1, device="cuda", dtype=torch.bfloat16)
    x = buf[1:].view(5, 3, 512)  # 2-byte offset: not 16-byte aligned, takes the scalar path
    w = torch.rand(512, device="cuda")  # float32 weight with bfloat16 activations
    y, _, grads = _run(cuda_backend.norm, x, w, None, "rmsnorm", None)
    ty, _, tgrads = _run(torch_backend.norm, x, w, None, "rmsnorm", None)
    torch.testing.assert_close(y.float(), ty.float(), atol=2e-2, rtol=2e-2)
    assert grads[1] is not None and grads[1].dtype == torch.float32
    torch.testing.assert_close(grads[1], tgrads[1], atol=5e-2, rtol=2e-2)
    xt = torch.randn(64, 6, device="cuda").t()  # (6, 64) non-contiguous
    y2 = cuda_backend.norm(xt, None, None, "layernorm")
    torch.testing.assert_close(y2, torch.nn.functional.layer_norm(xt, (64,)), atol=1e-5, rtol=1e-5)


@needs_cuda
def test_empty_rows() -> None:
    x = torch.empty(0, 32, device="cuda", requires_grad=True)
    w = torch.ones(32, device="cuda", requires_grad=True)
    y = cuda_backend.norm(x, w, None, "layernorm")
    y.sum().backward()
    assert y.shape == (0, 32) and torch.equal(w.grad, torch.zeros(32, device="cuda"))


@needs_cuda
def test_ops_norm_dispatches_to_cuda(select_cuda: None) -> None:
    x = torch.randn(2, 5, 96, device="cuda", dtype=torch.float16)
    r = torch.randn_like(x)
    w = torch.rand(96, device="cuda", dtype=torch.float16)
    y, s = craft.ops.norm(x, w, None, "rmsnorm", 1e-6, residual=r)
    ty, ts = torch_backend.norm(x, w, None, "rmsnorm", 1e-6, r)
    assert torch.equal(s, ts)
    torch.testing.assert_close(y, ty, atol=2e-3, rtol=2e-3)


@needs_cuda
def test_binding_rejects_misuse() -> None:
    ext = cuda_backend.extension()
    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ext.norm_fwd(x.cpu(), None, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ext.norm_fwd(torch.randn(16, 4, device="cuda").t(), None, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ext.norm_fwd(x.view(2, 2, 16), None, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ext.norm_fwd(x.double(), None, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="residual has shape"):
        ext.norm_fwd(x, torch.randn(4, 8, device="cuda"), None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ext.norm_fwd(x, None, torch.ones(8, device="cuda"), None, False, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be finite"):
        ext.norm_fwd(x, None, None, None, False, -1.0)
    y, _, mean, rstd = ext.norm_fwd(x, None, None, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="needs the mean"):
        ext.norm_bwd(y, None, x, None, rstd, None, False, False, False)
    with pytest.raises(RuntimeError, match="rstd must have shape"):
        ext.norm_bwd(y, None, x, mean, rstd[:2], None, False, False, False)
