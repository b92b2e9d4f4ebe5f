"""Attention dropout: the op's `dropout_p`, the GPT's `model.attn_dropout`, nanoGPT's char model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from craft.config import load_config
from craft.config.components import GPTConfig
from craft.models.gpt import GPT
from craft.ops import eager
from craft.ops import torch_backend as tb

REPO = Path(__file__).resolve().parents[2]


def _qkv(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    return q.expand(batch, -1, -1, -1), k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)


@pytest.mark.parametrize("fn", [eager.attention, tb.attention], ids=["eager", "torch"])
def test_dropout_is_unbiased_and_zero_p_is_exact(fn) -> None:
    q, k, v = _qkv(4000)  # 4000 copies of one problem: independent masks, one expected value
    plain = eager.attention(q[:1], k[:1], v[:1], True)
    torch.manual_seed(0)
    out = fn(q, k, v, True, None, 0.3)
    assert not torch.allclose(out[0], plain[0])  # something was dropped
    torch.testing.assert_close(out.mean(0, keepdim=True), plain, atol=0.06, rtol=0)
    torch.testing.assert_close(
        fn(q[:2], k[:2], v[:2], True, None, 0.0), plain.expand(2, -1, -1, -1)
    )
    with pytest.raises(ValueError, match="dropout_p"):
        fn(q[:1], k[:1], v[:1], True, None, 1.0)


def test_triton_backend_runs_dropout_on_torch_and_says_so_once(caplog) -> None:
    pytest.importorskip("triton")
    from craft.ops.triton import attention as tri

    q, k, v = (t.float().contiguous() for t in _qkv(2))
    with caplog.at_level(logging.WARNING, logger="craft.ops"):
        torch.manual_seed(1)
        got = tri.attention(q, k, v, True, None, 0.25)
        torch.manual_seed(1)
        tri.attention(q, k, v, True, None, 0.25)
    torch.manual_seed(1)
    torch.testing.assert_close(got, tb.attention(q, k, v, True, None, 0.25))
    notes = [r for r in caplog.records if "no dropout" in r.getMessage()]
    assert len(notes) <= 1  # once per process (another test may have triggered it already)


def _tiny(attn_dropout: float, dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        n_layer=2,
        n_head=2,
        d_model=16,
        block_size=8,
        mlp_hidden=32,
        dropout=dropout,
        attn_dropout=attn_dropout,
    )
    return GPT(cfg, 11, kernels={"attention": "torch"})


def test_gpt_drops_attention_only_while_training() -> None:
    idx = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(2))
    with_drop, without = _tiny(0.5), _tiny(0.0)
    with_drop.eval(), without.eval()
    torch.testing.assert_close(with_drop(idx)[0], without(idx)[0])  # eval: no dropout
    with_drop.train(), without.train()
    torch.manual_seed(3)
    a = with_drop(idx)[0]
    torch.manual_seed(4)
    b = with_drop(idx)[0]
    assert not torch.allclose(a, b)  # training: attention probabilities are dropped
    torch.testing.assert_close(without(idx)[0], without(idx)[0])  # p = 0: deterministic


def test_char_gpt_recipe_is_nanogpts_shakespeare_char_config() -> None:
    """nanoGPT config/train_shakespeare_char.py, with its train.py defaults for the rest."""
    cfg = load_config(REPO / "recipes" / "char_gpt.toml", [])
    m, tr, opt, sch = cfg.model, cfg.training, cfg.optimizer, cfg.scheduler
    assert (m.n_layer, m.n_head, m.d_model, m.block_size) == (6, 6, 384, 256)
    assert (m.dropout, m.attn_dropout, m.bias, m.tie_embeddings) == (0.2, 0.2, False, True)
    assert (tr.batch_size, tr.grad_accum_steps, tr.max_steps, tr.grad_clip) == (64, 1, 5000, 1.0)
    assert (opt.lr, tuple(opt.betas), opt.weight_decay) == (1e-3, (0.9, 0.99), 0.1)
    assert (sch.type, sch.warmup_steps, sch.min_lr) == ("cosine", 100, 1e-4)
    assert (cfg.eval.interval, cfg.eval.windows) == (250, 200 * 64)  # 200 batches of 64
    assert cfg.data.val_fraction == 0.1 and cfg.tokenizer.type == "char"


def test_attn_dropout_is_validated() -> None:
    with pytest.raises(ValueError, match="attn_dropout"):
        GPTConfig(attn_dropout=1.0)
