"""`mlp = "gelu_tanh"`: GPT-2's tanh-approximated GELU (`gelu_new`), against a float64 formula."""

from __future__ import annotations

import math

import pytest
import torch

from craft import ops
from craft.config.components import GPTConfig
from craft.models.gpt import GPT, MLP, mlp_hidden_size


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's definition, in float64."""
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_mlp_applies_the_tanh_gelu(dtype: torch.dtype, atol: float) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(n_head=2, d_model=16, mlp="gelu_tanh", dropout=0.0)
    mlp = MLP(cfg).to(dtype)
    x = torch.randn(3, 5, 16, dtype=dtype) * 3
    want = _gelu_new(mlp.c_fc(x)) @ mlp.c_proj.weight.double().T + mlp.c_proj.bias.double()
    torch.testing.assert_close(mlp(x).double(), want, atol=atol, rtol=0)
    # and it is not the exact GELU: the two differ by ~1e-3 on this range
    exact = MLP(GPTConfig(n_head=2, d_model=16, mlp="gelu"))
    exact.load_state_dict(mlp.state_dict())
    assert (exact.to(dtype)(x) - mlp(x)).abs().max() > 1e-5


def test_hidden_size_and_flops_follow_gelu() -> None:
    cfg = GPTConfig(d_model=384, mlp="gelu_tanh")
    assert mlp_hidden_size(cfg) == 4 * 384


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_gpt_with_gelu_tanh_trains_through_every_loss_backend(backend: str) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=8, mlp="gelu_tanh")
    idx = torch.randint(0, 11, (2, 8))
    losses = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg, 11, fused_loss=fused)
        with ops.use_backends(cross_entropy=backend, linear_cross_entropy=backend):
            _, loss = model(idx, targets=idx)
        loss.backward()
        losses.append((loss.detach(), model.blocks[0].mlp.c_fc.weight.grad))
    torch.testing.assert_close(losses[0][0], losses[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(losses[0][1], losses[1][1], atol=1e-5, rtol=1e-4)
