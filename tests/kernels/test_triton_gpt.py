"""A tiny GPT on the Triton kernels (interpreted on CPU) gives the torch backend's loss and grads."""

from __future__ import annotations

import pytest
import torch

from craft import ops
from craft.config.components import GPTConfig
from craft.models.gpt import GPT
from tests.kernels._triton import DEVICE, needs_triton

pytestmark = needs_triton


def loss_and_grads(
    cfg: GPTConfig, fused_loss: bool, backend: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(cfg, 50, fused_loss=fused_loss).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (2, cfg.block_size), generator=g).to(DEVICE)
    targets = torch.randint(0, 50, (2, cfg.block_size), generator=g)
    targets[0, :3] = -100  # some ignored positions, as padded batches have
    names = {"attention": backend, "cross_entropy": backend, "linear_cross_entropy": backend}
    with ops.use_backends(**names):
        _, loss = model(idx, targets.to(DEVICE))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "variant,fused_loss",
    [("mha-learned", False), ("gqa-rope-fused", True)],
)
def test_gpt_loss_and_gradients_match_torch_backend(variant: str, fused_loss: bool) -> None:
    extra = {"n_kv_head": 1, "positions": "rope", "norm": "rmsnorm"} if "gqa" in variant else {}
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, block_size=17, dropout=0.0, **extra)
    loss_t, grads_t = loss_and_grads(cfg, fused_loss, "torch")
    loss_k, grads_k = loss_and_grads(cfg, fused_loss, "triton")
    torch.testing.assert_close(loss_k, loss_t, atol=1e-5, rtol=1e-5)
    assert grads_k.keys() == grads_t.keys() and len(grads_k) > 0
    for name, g in grads_t.items():
        torch.testing.assert_close(grads_k[name], g, atol=2e-5, rtol=1e-4, msg=name)
