"""torch.compile of a GPT on each kernel backend gives eager's loss and gradients.

The custom autograd Functions use `_base`, `increment_version`, attributes on ctx and in-place
gradients; dynamo and AOTAutograd must trace them (fullgraph where the backend's kernels are
traceable) or break the graph around them, and the numbers must not change. On the CPU the
`aot_eager` backend runs dynamo and AOTAutograd without code generation (inductor's C++ build
takes minutes on two cores); the Triton kernels run interpreted there, which dynamo cannot trace,
so that case runs with graph breaks. With CRAFT_GPU_GRID=1 on CUDA the Triton and cuda kernels
are compiled with inductor and fullgraph=True under bf16 autocast.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from craft.config.components import GPTConfig
from craft.models.gpt import GPT
from craft.ops import cuda as cuda_backend
from tests.kernels._triton import DEVICE, gpu_grid, needs_triton
from tests.ops._norm_binding import BindingModel

CFG = GPTConfig(n_layer=1, n_head=2, d_model=32, block_size=16, mlp_hidden=64)


def _loss_and_grads(
    names: dict[str, str],
    fused_loss: bool,
    compile_kw: dict | None,
    autocast: torch.dtype | None = None,
    device: str = "cpu",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(CFG, 40, fused_loss=fused_loss, kernels=names).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 40, (2, 16), generator=g).to(device)
    y = torch.randint(0, 40, (2, 16), generator=g)
    y[0, :3] = -100
    run = torch.compile(model, **compile_kw) if compile_kw is not None else model
    ctx = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        _, loss = run(x, y.to(device))
    loss.backward()
    return loss.detach().float(), {n: p.grad for n, p in model.named_parameters()}


def _compare(names, fused_loss, compile_kw, autocast=None, device="cpu", tol=1e-5):
    torch._dynamo.reset()
    want_loss, want = _loss_and_grads(names, fused_loss, None, autocast, device)
    got_loss, got = _loss_and_grads(names, fused_loss, compile_kw, autocast, device)
    torch.testing.assert_close(got_loss, want_loss, atol=tol, rtol=tol)
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=tol, rtol=100 * tol, msg=name)


def test_compiled_eager_backend_fullgraph() -> None:
    every = dict.fromkeys(("attention", "cross_entropy", "linear_cross_entropy", "norm"), "eager")
    _compare(every, False, {"backend": "aot_eager", "fullgraph": True})


def test_compiled_torch_backend_fullgraph_fused_loss_under_bf16_autocast() -> None:
    every = dict.fromkeys(("attention", "cross_entropy", "linear_cross_entropy", "norm"), "torch")
    _compare(every, True, {"backend": "aot_eager", "fullgraph": True}, torch.bfloat16, tol=2e-3)


@needs_triton
def test_compiled_triton_backend_with_graph_breaks_on_cpu() -> None:
    names = {"attention": "triton", "cross_entropy": "triton", "linear_cross_entropy": "triton"}
    _compare(names, False, {"backend": "aot_eager"}, device=DEVICE)


def test_compiled_cuda_norm_is_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuda norm's extension calls are torch custom ops: fullgraph holds around them.

    On the CPU the extension is replaced by a torch model of its binding (the kernels are
    checked on a GPU and in the emulator); what is compiled here is the Python side: the
    autograd Function, the custom ops' fake shapes and dtypes, the autocast dtype contract.
    """
    # opaque to dynamo, as the compiled extension is
    opaque = SimpleNamespace(
        norm_fwd=torch.compiler.disable(BindingModel.norm_fwd),
        norm_bwd=torch.compiler.disable(BindingModel.norm_bwd),
    )
    monkeypatch.setattr(cuda_backend, "extension", lambda: opaque)
    monkeypatch.setattr(cuda_backend, "supports", lambda *a: None)

    def block(a: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, s = cuda_backend.norm(a, w, b, "layernorm", 1e-5, x)  # ln_2(attn out, x)
            y = cuda_backend.norm(s, w, None, "rmsnorm", 1e-5)  # an fp32 input into bf16
        return (h.float() * 3).sum() + (y.float() * s).sum()

    g = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(4, 16, generator=g).to(torch.bfloat16),
        torch.randn(4, 16, generator=g),
        torch.rand(16, generator=g) + 0.5,
        torch.randn(16, generator=g) * 0.1,
    ]
    torch._dynamo.reset()
    results = []
    for fn in (block, torch.compile(block, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


@gpu_grid
@pytest.mark.cuda
@pytest.mark.parametrize("fused_loss", [False, True])
def test_compiled_triton_and_cuda_kernels_fullgraph_on_gpu(fused_loss: bool) -> None:
    names = {
        "attention": "triton",
        "cross_entropy": "triton",
        "linear_cross_entropy": "triton",
        "norm": "cuda",
    }
    _compare(names, fused_loss, {"fullgraph": True}, torch.bfloat16, "cuda", tol=2e-2)
