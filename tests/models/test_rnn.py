"""Recurrent LM: shapes, carried state, tied weights, parameter counts, learning."""

from __future__ import annotations

import pytest
import torch

from craft.config import registry
from craft.config.components import RNNConfig
from craft.models.rnn import RNNLM, build

CELLS = ["rnn", "lstm", "gru"]


def tiny(cell: str = "lstm", vocab: int = 9, fused_loss: bool = False, **over) -> RNNLM:
    torch.manual_seed(0)
    cfg = RNNConfig(cell=cell, n_layer=2, d_embed=12, hidden_size=20, block_size=16, **over)
    return build(cfg, vocab, fused_loss=fused_loss).eval()


@pytest.mark.parametrize("cell", CELLS)
def test_shapes_and_contract(cell):
    m = tiny(cell)
    idx = torch.randint(0, 9, (3, 7))
    logits, loss = m(idx)
    assert logits.shape == (3, 7, 9) and loss is None
    _, loss = m(idx, targets=idx)
    assert loss.shape == ()
    assert m.block_size is None and m.vocab_size == 9


@pytest.mark.parametrize("cell", CELLS)
def test_carried_state_equals_unrolled_forward(cell):
    m = tiny(cell)
    idx = torch.randint(0, 9, (2, 20))
    full, _ = m(idx)  # (B, T, V) in one call from a zero state
    cache = m.new_cache(2, "cpu", torch.float32)
    pieces, start = [], 0
    for size in (5, 1, 1, 7, 6):  # a prompt, single tokens, then longer chunks
        out, _ = m(idx[:, start : start + size], cache=cache)
        pieces.append(out)
        start += size
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-6)
    assert (cache.c is not None) == (cell == "lstm")


def test_state_detach_keeps_values():
    m = tiny().train()
    cache = m.new_cache(1)
    m(torch.randint(0, 9, (1, 4)), cache=cache)
    assert cache.h.requires_grad
    h = cache.h.clone()
    cache.detach_()
    assert not cache.h.requires_grad and torch.equal(cache.h, h)


@pytest.mark.parametrize("d_embed", [20, 12])
def test_tied_weights_share_storage(d_embed):
    torch.manual_seed(0)
    cfg = RNNConfig(d_embed=d_embed, hidden_size=20, tie_embeddings=True)
    m = build(cfg, 9)
    assert m.lm_head.weight.data_ptr() == m.wte.weight.data_ptr()
    assert (m.proj is None) == (d_embed == 20)
    m(torch.randint(0, 9, (2, 5)))  # the projection makes the shapes fit


def _expected_params(cfg: RNNConfig, vocab: int) -> int:
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[cfg.cell]
    hd, e = cfg.hidden_size, cfg.d_embed
    rnn = sum(gates * hd * ((e if i == 0 else hd) + hd + 2) for i in range(cfg.n_layer))
    tie_proj = cfg.tie_embeddings and hd != e
    out = e if tie_proj else hd
    head = vocab + (0 if cfg.tie_embeddings else out * vocab)
    return vocab * e + rnn + (hd * e if tie_proj else 0) + head


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_formula(cell, tie):
    cfg = RNNConfig(cell=cell, n_layer=3, d_embed=12, hidden_size=20, tie_embeddings=tie)
    assert build(cfg, 9).num_params() == _expected_params(cfg, 9)


def test_fused_loss_equals_materialised_loss():
    idx = torch.randint(0, 9, (2, 8))
    _, loss = tiny("gru")(idx, idx)
    logits, fused = tiny("gru", fused_loss=True)(idx, idx)
    assert logits is None
    torch.testing.assert_close(fused, loss)


def test_registry_build_uses_config_vocab_size():
    m = registry.build("model", RNNConfig(vocab_size=30), 9)
    assert isinstance(m, RNNLM) and m.vocab_size == 30


@pytest.mark.parametrize("cell", CELLS)
def test_learns_a_repeating_sequence(cell):
    torch.manual_seed(0)
    m = build(RNNConfig(cell=cell, n_layer=1, d_embed=16, hidden_size=32), 6)
    seq = torch.tensor([1, 2, 1, 3, 1, 4, 0, 5] * 4)
    x = torch.stack([seq[s : s + 16] for s in range(8)])  # (8, 16)
    y = torch.stack([seq[s + 1 : s + 17] for s in range(8)])
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    for _ in range(100):
        _, loss = m(x, y)
        if loss.item() < 0.15:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.15
