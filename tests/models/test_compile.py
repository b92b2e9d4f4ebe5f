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

import pytest
import torch

from craft.config.components import GPTConfig
from craft.models.gpt import GPT
from tests.kernels._triton import DEVICE, gpu_grid, needs_triton

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
