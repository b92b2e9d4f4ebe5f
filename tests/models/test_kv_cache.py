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


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("single_rows", [(0, 1), (2, 0)])  # adjacent (a view) or gathered
@torch.no_grad()
def test_packed_step_matches_separate_recompute(cfg: dict, single_rows: tuple[int, int]) -> None:
    """Rows taking 1, 1, 3 and 5 new tokens in one packed forward (a continued prompt, a fresh
    one) give each row's last logits and cache as recomputing its whole sequence would."""
    model = _model(**cfg).double()
    g = torch.Generator().manual_seed(2)
    stored = {0: 5, 1: 2, 2: 9, 3: 4}  # tokens each row holds before the step
    new = {single_rows[0]: 1, single_rows[1]: 1, 3: 3}
    fresh = ({0, 1, 2} - set(single_rows)).pop()  # restarts from position 0 with 5 tokens
    new[fresh], stored[fresh] = 5, 0
    seqs = {r: torch.randint(0, 11, (stored[r] + new[r],), generator=g) for r in range(4)}
    cache = model.new_cache(4)
    cache.k.fill_(7.0)  # stale values where no row has written must never be read
    cache.v.fill_(-3.0)
    for r in range(4):
        if stored[r]:
            model(seqs[r][None, : stored[r]], cache=cache.rows(r, r + 1))
    order = [*single_rows, 3, fresh]
    step = cache.packed_step([(r, stored[r], new[r]) for r in order])
    idx = torch.cat([seqs[r][stored[r] :] for r in order])[None]  # (1, 10)
    logits, _ = model(idx, cache=step, last_only=True)  # (1, 4, V)
    assert logits.shape == (1, 4, 11)
    assert cache.lengths.tolist() == [len(seqs[r]) for r in range(4)]
    for i, r in enumerate(order):
        ref, _ = model(seqs[r][None])  # (1, T, V), no cache
        torch.testing.assert_close(logits[0, i], ref[0, -1], rtol=1e-10, atol=1e-10)
        # the row's cache now holds what a fresh prefill of its sequence stores
        alone = model.new_cache(1)
        model(seqs[r][None], cache=alone)
        n = len(seqs[r])
        torch.testing.assert_close(cache.k[:, r, :, :n], alone.k[:, 0, :, :n], rtol=0, atol=1e-12)
        torch.testing.assert_close(cache.v[:, r, :, :n], alone.v[:, 0, :, :n], rtol=0, atol=1e-12)


def test_packed_step_refuses_bad_segments() -> None:
    cache = _model().new_cache(2)
    with pytest.raises(ValueError, match="single-token segments must come before"):
        cache.packed_step([(0, 0, 3), (1, 2, 1)])
    with pytest.raises(ValueError, match="has 0 tokens"):
        cache.packed_step([(0, 0, 0)])
