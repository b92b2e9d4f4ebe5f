"""KV cache rows of different lengths (a server's batch) against full recomputation."""

from __future__ import annotations

import pytest
import torch

from craft.config.components import GPTConfig
from craft.models.gpt import GPT

CFGS = [
    {},
    {"positions": "rope", "n_kv_head": 1, "norm": "rmsnorm", "mlp": "swiglu"},
    {"positions": "rope", "n_head": 4, "n_kv_head": 2},
]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _model(**cfg: object) -> GPT:
    torch.manual_seed(0)
    kw = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 16, **cfg}
    return GPT(GPTConfig(**kw), 11).eval()


@pytest.mark.parametrize("cfg", CFGS)
@torch.no_grad()
def test_ragged_rows_match_separate_recompute(cfg: dict) -> None:
    model = _model(**cfg)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 11, (n,), generator=g) for n in (6, 3, 10)]
    cache = model.new_cache(3)
    cache.k.fill_(7.0)  # stale values where no row has written must never be read
    for b, s in enumerate(seqs):  # each row prefilled on its own, through a view of the batch
        model(s[None, :-3], cache=cache.rows(b, b + 1))
    assert cache.lengths.tolist() == [3, 0, 7]
    two, _ = model(torch.stack([s[-3:-1] for s in seqs]), cache=cache)  # (3, 2, V), ragged
    one, _ = model(torch.stack([s[-1:] for s in seqs]), cache=cache, last_only=True)  # (3, 1, V)
    assert one.shape == (3, 1, 11)
    assert cache.lengths.tolist() == [len(s) for s in seqs]
    for b, s in enumerate(seqs):
        full, _ = model(s[None])  # (1, n, V)
        torch.testing.assert_close(two[b], full[0, -3:-1], **TOL)
        torch.testing.assert_close(one[b, 0], full[0, -1], **TOL)


@torch.no_grad()
def test_copy_row_and_reset_one_row() -> None:
    model = _model(positions="rope")
    prompt = torch.tensor([[1, 2, 3, 4]])
    cache = model.new_cache(3)
    first, _ = model(prompt, cache=cache.rows(0, 1), last_only=True)
    full, _ = model(prompt)
    torch.testing.assert_close(first[0, -1], full[0, -1], **TOL)
    cache.copy_row(0, 2)
    cache.rows(0, 1).reset()
    model(torch.tensor([[5, 6]]), cache=cache.rows(0, 1))  # row 0 starts again: [5, 6]
    model(torch.tensor([[9]]), cache=cache.rows(1, 2))  # row 1: [9]
    step, _ = model(torch.tensor([[7], [8], [5]]), cache=cache)
    for b, seq in enumerate(([5, 6, 7], [9, 8], [1, 2, 3, 4, 5])):
        ref, _ = model(torch.tensor([seq]))
        torch.testing.assert_close(step[b, -1], ref[0, -1], **TOL)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(3, 12, dtype=torch.long), cache=cache)
