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


def _assert_as_recomputed(model: GPT, cache, logits: torch.Tensor, order: list[int], seqs) -> None:
    """Row order[i]'s logits logits[0, i] are its whole sequence's last logits, recomputed, and
    its cache holds what a fresh prefill of the sequence stores (float64)."""
    for i, r in enumerate(order):
        ref, _ = model(seqs[r][None])  # (1, T, V), no cache
        torch.testing.assert_close(logits[0, i], ref[0, -1], rtol=1e-10, atol=1e-10)
        alone = model.new_cache(1)
        model(seqs[r][None], cache=alone)
        n = len(seqs[r])
        torch.testing.assert_close(cache.k[:, r, :, :n], alone.k[:, 0, :, :n], rtol=0, atol=1e-12)
        torch.testing.assert_close(cache.v[:, r, :, :n], alone.v[:, 0, :, :n], rtol=0, atol=1e-12)


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
    _assert_as_recomputed(model, cache, logits, order, seqs)


def test_packed_step_refuses_bad_segments() -> None:
    cache = _model().new_cache(2)
    with pytest.raises(ValueError, match="has 0 tokens"):
        cache.packed_step([(0, 0, 0)])


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("in_flight", ["batched", "packed"])
@torch.no_grad()
def test_sequences_joining_between_blocks_match_separate_recompute(
    cfg: dict, layer: int, in_flight: str
) -> None:
    """New prompts (5 tokens, and 1 token: a single after a longer segment) join a decoding
    forward before block `layer`: every row's logits and cache are as if recomputed alone."""
    model = _model(**cfg, n_layer=3).double()
    g = torch.Generator().manual_seed(3)
    stored = {0: 6, 1: 3, 2: 0}  # rows 0, 1 decode; row 2 a prompt of the packed step in flight
    fed = {0: 1, 1: 1, 2: 4}
    new = {3: 5, 4: 1}  # the rows joining
    rows = [0, 1] if in_flight == "batched" else [0, 1, 2]
    lengths = {r: stored[r] + fed[r] for r in rows} | new
    seqs = {r: torch.randint(0, 11, (n,), generator=g) for r, n in lengths.items()}
    cache = model.new_cache(5)
    cache.k.fill_(7.0)  # stale values where no row has written must never be read
    cache.v.fill_(-3.0)
    for r in (0, 1):
        model(seqs[r][None, : stored[r]], cache=cache.rows(r, r + 1))
    flight = [(r, stored[r], fed[r]) for r in rows]
    joined = [(r, 0, n) for r, n in new.items()]
    calls = []

    def join(at: int):
        calls.append(at)
        if at != layer:
            return None
        idx = torch.cat([seqs[r] for r, _, _ in joined])[None]  # (1, 6)
        return idx, cache.packed_step(joined), cache.packed_step(flight + joined)

    if in_flight == "batched":
        idx = torch.stack([seqs[r][-1:] for r in rows])  # (2, 1)
        logits, _ = model(idx, cache=cache.rows(0, 2), last_only=True, join=join)
    else:
        idx = torch.cat([seqs[r][stored[r] :] for r in rows])[None]  # (1, 6)
        logits, _ = model(idx, cache=cache.packed_step(flight), last_only=True, join=join)
    order = rows + list(new)
    assert logits.shape == (1, len(order), 11) and calls == [0, 1, 2]  # asked before each block
    assert cache.lengths.tolist() == [len(seqs[r]) if r in seqs else 0 for r in range(5)]
    _assert_as_recomputed(model, cache, logits, order, seqs)
