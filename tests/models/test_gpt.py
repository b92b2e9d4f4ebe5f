"""GPT: shapes, causality, KV cache, parameter counts, initialisation, tied weights, learning."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import craft.ops as ops
from craft.config import registry
from craft.config.components import GPTConfig
from craft.models.gpt import GPT, build, mlp_hidden_size

TINY = dict(n_layer=2, n_head=4, d_model=32, block_size=16, mlp_hidden=48)


def tiny(vocab: int = 11, seed: int = 0, fused_loss: bool = False, **over) -> GPT:
    torch.manual_seed(seed)
    return build(GPTConfig(**{**TINY, **over}), vocab, fused_loss=fused_loss).eval()


def test_shapes_and_loss():
    m = tiny()
    idx = torch.randint(0, 11, (3, 16))
    logits, loss = m(idx)
    assert logits.shape == (3, 16, 11) and loss is None
    with torch.no_grad():
        logits, loss = m(idx[:, :5], targets=idx[:, 1:6])
    assert logits.shape == (3, 5, 11) and loss.shape == ()
    assert abs(loss.item() - math.log(11)) < 0.3  # small init: near-uniform predictions
    assert m.block_size == 16 and m.vocab_size == 11


def test_too_long_input_raises():
    m = tiny()
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_causality(positions, n_kv_head):
    m = tiny(positions=positions, n_kv_head=n_kv_head)
    idx = torch.randint(0, 11, (2, 16))
    base, _ = m(idx)
    for t in (0, 7, 14):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 11
        out, _ = m(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("n_kv_head", [None, 1])
def test_kv_cache_logits_equal_full_forward_at_every_step(positions, n_kv_head):
    m = tiny(positions=positions, n_kv_head=n_kv_head, norm="rmsnorm")
    idx = torch.randint(0, 11, (2, 16))
    full, _ = m(idx)  # (B, T, V)
    cache = m.new_cache(2, "cpu", torch.float32)
    prefill, _ = m(idx[:, :5], cache=cache)
    torch.testing.assert_close(prefill, full[:, :5], rtol=0, atol=1e-5)
    assert cache.pos == 5
    for t in range(5, 16):
        step, _ = m(idx[:, t : t + 1], cache=cache)  # (B, 1, V)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5)
    assert cache.pos == 16
    with pytest.raises(ValueError, match="16 cached"):
        m(idx[:, :1], cache=cache)
    cache.reset()
    again, _ = m(idx[:, :3], cache=cache)
    torch.testing.assert_close(again, full[:, :3], rtol=0, atol=1e-5)


def test_cache_batch_mismatch_raises():
    m = tiny()
    with pytest.raises(ValueError, match="cache holds 2"):
        m(torch.zeros(3, 1, dtype=torch.long), cache=m.new_cache(2))


def _expected_params(cfg: GPTConfig, vocab: int) -> tuple[int, int]:
    """(total, total without position embeddings) written out from the architecture."""
    c, hs = cfg.d_model, cfg.d_model // cfg.n_head
    kv = (cfg.n_kv_head or cfg.n_head) * hs
    hidden = mlp_hidden_size(cfg)
    b = 1 if cfg.bias else 0
    norm = c + (c * b if cfg.norm == "layernorm" else 0)
    attn = c * (c + 2 * kv) + b * (c + 2 * kv) + c * c + b * c
    up = hidden if cfg.mlp == "gelu" else 2 * hidden
    mlp = c * up + b * up + hidden * c + b * c
    wpe = cfg.block_size * c if cfg.positions == "learned" else 0
    total = vocab * c + wpe + cfg.n_layer * (2 * norm + attn + mlp) + norm
    total += 0 if cfg.tie_embeddings else vocab * c
    return total, total - wpe


def test_nanogpt_shakespeare_parameter_count():
    cfg = GPTConfig(n_layer=6, n_head=6, d_model=384, block_size=256, bias=True)
    with torch.device("meta"):
        m = build(cfg, 65)
    assert m.num_params() == 10_770_816
    assert m.num_params(exclude_position_embeddings=True) == 10_672_512
    assert _expected_params(cfg, 65) == (10_770_816, 10_672_512)


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"bias": False, "tie_embeddings": False},
        {"norm": "rmsnorm", "positions": "rope", "mlp": "swiglu", "mlp_hidden": None},
        {"n_kv_head": 2, "mlp": "swiglu", "bias": False},
        {"n_kv_head": 1, "norm": "rmsnorm", "tie_embeddings": False, "positions": "rope"},
    ],
)
def test_parameter_count_formula(over):
    cfg = GPTConfig(**{**TINY, **over})
    m = build(cfg, 13)
    assert (m.num_params(), m.num_params(True)) == _expected_params(cfg, 13)


def test_swiglu_default_hidden_size():
    assert mlp_hidden_size(GPTConfig(d_model=384, mlp="swiglu")) == 1024
    assert mlp_hidden_size(GPTConfig(d_model=384, mlp="gelu")) == 1536


def test_tied_weights_share_storage():
    m = tiny()
    assert m.lm_head.weight is m.wte.weight
    assert m.lm_head.weight.data_ptr() == m.wte.weight.data_ptr()
    assert sum(1 for _ in m.parameters()) == len(m.state_dict()) - 1  # one tensor, two names
    u = tiny(tie_embeddings=False)
    assert u.lm_head.weight.data_ptr() != u.wte.weight.data_ptr()


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_head=4, d_model=128, block_size=64)
    m = build(cfg, 50)
    resid = 0.02 / math.sqrt(8)
    for block in m.blocks:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert abs(proj.weight.std().item() - resid) < 0.1 * resid
            assert torch.count_nonzero(proj.bias) == 0
        assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
        assert torch.equal(block.ln_1.weight, torch.ones(128))
    assert abs(m.wte.weight.std().item() - 0.02) < 0.002


def test_rope_tables_are_not_in_the_state_dict():
    m = tiny(positions="rope")
    assert not any("rope" in k for k in m.state_dict())
    assert m.wpe is None


def test_fused_loss_equals_materialised_loss():
    idx = torch.randint(0, 11, (2, 12))
    y = torch.randint(0, 11, (2, 12))
    plain, fused = tiny(), tiny(fused_loss=True)
    logits, loss = plain(idx, y)
    none, fused_loss = fused(idx, y)
    # With grad enabled the loss may consume the logits' memory, so neither path returns them.
    assert none is None and logits is None
    torch.testing.assert_close(fused_loss, loss)
    loss.backward()
    fused_loss.backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert fused(idx)[0].shape == (2, 12, 11)  # without targets there are logits
    with torch.no_grad():
        assert plain(idx, y)[0].shape == (2, 12, 11)  # and under no_grad too


def test_eager_and_torch_backends_give_the_same_model_output():
    m = tiny(n_kv_head=2, positions="rope").double()
    idx = torch.randint(0, 11, (2, 16))
    ref = m(idx, idx)
    every = {op: "eager" for op in ops.OPS}
    with ops.use_backends(**every):
        out = m(idx, idx)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


def test_registry_build_and_config_vocab_size_wins():
    cfg = GPTConfig(**TINY, vocab_size=20)
    m = registry.build("model", cfg, 11, fused_loss=True)
    assert isinstance(m, GPT) and m.vocab_size == 20 and m.fused_loss


# A period-8 sequence in which "1" is followed by 2, 3 or 4 depending on the token before it:
# only a model whose attention reads the context gets below ~0.5 nats.
PATTERN = [1, 2, 1, 3, 1, 4, 0, 5]
VARIANTS = list(
    itertools.product(
        ["layernorm", "rmsnorm"], ["learned", "rope"], ["gelu", "swiglu"], [True, False], [None, 1]
    )
)


@pytest.mark.parametrize(("norm", "positions", "mlp", "tie", "n_kv_head"), VARIANTS)
def test_every_variant_learns_a_repeating_sequence(norm, positions, mlp, tie, n_kv_head):
    torch.manual_seed(0)
    cfg = GPTConfig(
        n_layer=1,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=32,
        block_size=16,
        norm=norm,
        positions=positions,
        mlp=mlp,
        mlp_hidden=64,
        tie_embeddings=tie,
        bias=False,
    )
    m = build(cfg, 6)
    seq = torch.tensor(PATTERN * 4)
    x = torch.stack([seq[s : s + 16] for s in range(8)])  # (8, 16) every phase of the pattern
    y = torch.stack([seq[s + 1 : s + 17] for s in range(8)])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(100):
        _, loss = m(x, y)
        if loss.item() < 0.15:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.15
