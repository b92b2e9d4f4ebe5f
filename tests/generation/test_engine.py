"""The decoding engine: rows joining and leaving a batch decode exactly as they would alone."""

from __future__ import annotations

import pytest
import torch

from craft.engine import DecodeEngine, Request
from craft.generation import SamplingParams, generate, row_generator
from tests.generation._fakes import Scripted, tiny_gpt, tiny_rnn
from tests.generation.test_generate import _char

SAMPLE = SamplingParams(temperature=1.0, top_k=7)
GREEDY = SamplingParams(temperature=0.0)


def _alone(
    model, prompt: list[int], n: int, sampling: SamplingParams, seed: int, sample: int = 0
) -> list[int]:
    """The tokens of sample `sample` of (prompt, seed), decoded alone."""
    engine = DecodeEngine(model, 1)
    (row,) = engine.add(prompt, sampling, [row_generator(seed, sample)], max_new_tokens=n)
    while engine.active:
        engine.step()
    return row.tokens


def _models():
    return {
        "gpt": tiny_gpt(12, block_size=12).eval(),  # small window: rows refill while batched
        "gpt-rope-gqa": tiny_gpt(12, block_size=12, positions="rope", n_head=4, n_kv_head=2),
        "lstm": tiny_rnn(12).eval(),
    }


@pytest.mark.parametrize("name", ["gpt", "gpt-rope-gqa", "lstm"])
def test_rows_joining_and_leaving_decode_as_alone(name: str) -> None:
    model = _models()[name].eval()
    _join_and_leave(model, DecodeEngine(model, 3))


@pytest.mark.parametrize("name", ["gpt", "gpt-rope-gqa"])
def test_fixed_shape_step_decodes_as_the_eager_step(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.compile as the identity: the fixed-shape step that `compile=True` hands to the
    # compiler (all rows every step, positions as a tensor, the whole window under a mask), run
    # eagerly; tests/generation/test_compiled_step.py compiles it for real
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = _models()[name].eval()
    engine = DecodeEngine(model, 3, compile=True)
    _join_and_leave(model, engine)
    assert engine.compile_seconds is not None  # the fixed-shape step ran


def _join_and_leave(model, engine: DecodeEngine) -> None:
    """Rows join and leave `engine` (3 rows) and refill their window: each decodes as alone."""
    requests = [  # (prompt, max_new_tokens, sampling, seed, step it joins at)
        ([1, 2, 3], 20, SAMPLE, 1, 0),
        ([4], 6, SamplingParams(temperature=0.8, top_p=0.9), 2, 0),
        ([5, 6, 7, 8, 9, 10, 11], 15, GREEDY, 3, 2),
        ([2, 2], 9, SAMPLE, 4, 5),
        ([3, 1, 4, 1, 5], 12, SamplingParams(temperature=1.3), 5, 7),
    ]
    expect = [_alone(model, p, n, s, seed) for p, n, s, seed, _ in requests]
    rows: dict[int, object] = {}
    waiting = list(enumerate(requests))
    step = 0
    while waiting or engine.active:
        while waiting and waiting[0][1][4] <= step and engine.free:
            i, (p, n, s, seed, _) = waiting.pop(0)
            (rows[i],) = engine.add(p, s, [row_generator(seed, 0)], max_new_tokens=n)
        engine.step()
        step += 1
    assert [rows[i].tokens for i in range(len(requests))] == expect
    assert all(r.finish_reason == "length" for r in rows.values())


def test_samples_of_one_batch_equal_separate_runs() -> None:
    tok = _char()
    model = tiny_gpt(tok.vocab_size, block_size=24)  # 40 tokens: every row refills
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=8, top_p=0.95, seed=123)
    batch = generate(model, tok, "abc", num_samples=3, **kw)
    alone = [generate(model, tok, "abc", first_sample=i, **kw)[0] for i in range(3)]
    assert batch == alone
    assert len(set(batch)) == 3


def test_cancel_frees_the_slot_and_keeps_the_others() -> None:
    model = tiny_gpt(12, block_size=32).eval()
    expect = _alone(model, [1, 2], 10, SAMPLE, 9)
    engine = DecodeEngine(model, 2)
    (a,) = engine.add([3, 3, 3], SAMPLE, [row_generator(1, 0)], max_new_tokens=10)
    (b,) = engine.add([1, 2], SAMPLE, [row_generator(9, 0)], max_new_tokens=10)
    engine.step()
    engine.cancel(a)  # a held slot 0: b moves into it
    assert a.finish_reason == "cancelled" and engine.active == 1 and b.slot == 0
    (c,) = engine.add([5], GREEDY, [None], max_new_tokens=3)
    while engine.active:
        engine.step()
    assert b.tokens == expect and len(c.tokens) == 3
    with pytest.raises(ValueError, match="free"):
        engine.add([1], SAMPLE, [None, None, None], max_new_tokens=1)


def test_eos_finishes_a_row_and_a_cache_without_row_operations_works() -> None:
    # Scripted's cache is a plain dict: the engine keeps one cache per row
    model = Scripted(12, [0, 0, 5, 6, 3, 7, 7, 7])
    engine = DecodeEngine(model, 2)
    assert engine.mode == "per_row"
    (a,) = engine.add([1], GREEDY, [None], max_new_tokens=10, eos_id=3)
    (b,) = engine.add([1, 1, 1], GREEDY, [None], max_new_tokens=2, eos_id=3)
    while engine.active:
        engine.step()
    assert a.tokens == [0, 5, 6, 3] and a.finish_reason == "stop"
    assert b.tokens == [6, 3] and b.finish_reason == "stop"  # eos on the last allowed token


def test_streamed_pieces_stay_in_sample_order() -> None:
    tok = _char()
    model = tiny_gpt(tok.vocab_size, block_size=16)
    seen: list[tuple[int, str]] = []
    out = generate(
        model,
        tok,
        "ab",
        max_new_tokens=12,
        seed=4,
        num_samples=3,
        on_text=lambda *a: seen.append(a),
    )
    order = [i for i, _ in seen]
    assert order == sorted(order)  # sample 0's pieces, then 1's, then 2's
    assert ["".join(p for i, p in seen if i == k) for k in range(3)] == out


def test_requests_added_together_prefill_together_and_decode_as_alone() -> None:
    model = tiny_gpt(12, block_size=16, positions="rope").eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9, 10, 11, 1, 2], [3, 3]]
    engine = DecodeEngine(model, 8)
    reqs = [
        Request(p, SAMPLE, [row_generator(i, j) for j in range(1 + (i == 2))], 12, None, 0)
        for i, p in enumerate(prompts)
    ]
    rows = engine.add_many(reqs)
    assert sorted(r.slot for g in rows for r in g) == list(range(6))
    while engine.active:
        engine.step()
    for i, p in enumerate(prompts):
        assert rows[i][0].tokens == _alone(model, p, 12, SAMPLE, i)
    second = DecodeEngine(model, 1)
    (row,) = second.add([6, 7, 8], SAMPLE, [row_generator(2, 1)], max_new_tokens=12)
    while second.active:
        second.step()
    assert rows[2][1].tokens == row.tokens and rows[2][1].index == 1


def test_sample_then_advance_is_step_and_rows_join_only_after_advance() -> None:
    """A server hands tokens on between `sample` and `advance`: the halves decode as `step` does,
    a row cancelled between them leaves the others unchanged, and no row joins stale logits."""
    model = _models()["gpt"].eval()
    prompts = [([1, 2, 3], 1), ([4, 5], 2), ([6], 3)]
    expect = [_alone(model, p, 18, SAMPLE, seed) for p, seed in prompts]
    engine = DecodeEngine(model, 3)
    rows = [engine.add(p, SAMPLE, [row_generator(s, 0)], max_new_tokens=18)[0] for p, s in prompts]
    for step in range(18):
        engine.sample()
        if step == 0:
            with pytest.raises(RuntimeError, match="after advance"):
                engine.add([1], SAMPLE, [row_generator(9, 0)], max_new_tokens=2)
            with pytest.raises(RuntimeError, match="without advance"):
                engine.sample()
        if step == 4:
            engine.cancel(rows[1])  # its client went away between the halves
        engine.advance()
    assert rows[0].tokens == expect[0] and rows[2].tokens == expect[2]
    assert rows[1].tokens == expect[1][:5] and rows[1].finish_reason == "cancelled"
    assert not engine.active
    (late,) = engine.add([1], SAMPLE, [row_generator(9, 0)], max_new_tokens=2)  # empty: may add
    engine.step()
    engine.step()
    assert late.tokens == _alone(model, [1], 2, SAMPLE, 9)


@pytest.mark.parametrize("name", ["gpt", "gpt-rope-gqa"])
def test_prompts_added_between_the_halves_ride_along_and_decode_as_alone(name: str) -> None:
    """`add_many(defer=True)` between `sample` and `advance`: the next forward prefills the new
    prompts with the other rows' next token (and refills full windows: block 12); every row
    decodes as alone, a further sample copies its first row, a row cancelled before its prefill
    frees its slot, and nothing is sampled before the prefill."""
    model = _models()[name].eval()
    engine = DecodeEngine(model, 6)
    assert engine.packed
    (first,) = engine.add_many([Request([1, 2, 3], SAMPLE, [row_generator(1, 0)], 20)])[0]
    joins = {  # step -> (prompt, max_new_tokens, seed, samples)
        2: ([5, 6, 7, 8, 9, 10, 11], 15, 3, 2),
        5: ([4], 9, 4, 1),
        9: ([2, 2, 3, 1, 4, 4, 5, 9, 1, 2, 3, 6, 7], 8, 5, 1),  # longer than the window
    }
    added: list[tuple[list[int], int, int, list]] = []
    dropped = None
    for step in range(40):
        if not engine.active:
            break
        engine.sample()
        if step in joins:
            prompt, n, seed, k = joins[step]
            gens = [row_generator(seed, j) for j in range(k)]
            (rows,) = engine.add_many([Request(prompt, SAMPLE, gens, n)], defer=True)
            added.append((prompt, n, seed, rows))
            with pytest.raises(RuntimeError, match="await advance"):
                engine.sample()
        if step == 6:  # a request cancelled before its prefill ran
            (gone,) = engine.add_many([Request([3], SAMPLE, [row_generator(8, 0)], 5)], defer=True)
            dropped = gone[0]
            engine.cancel(dropped)
        engine.advance()
    assert not engine.active and dropped is not None
    assert dropped.tokens == [] and dropped.finish_reason == "cancelled"
    assert first.tokens == _alone(model, [1, 2, 3], 20, SAMPLE, 1)
    for prompt, n, seed, rows in added:
        for j, row in enumerate(rows):
            assert row.tokens == _alone(model, prompt, n, SAMPLE, seed, j)


def test_deferred_prefill_needs_packed_steps() -> None:
    model = _models()["lstm"].eval()
    engine = DecodeEngine(model, 2)
    assert not engine.packed
    with pytest.raises(ValueError, match="packed steps"):
        engine.add_many([Request([1], SAMPLE, [None], 3)], defer=True)


@pytest.mark.parametrize("name", ["gpt", "gpt-rope-gqa"])
def test_prompts_joining_a_forward_between_blocks_decode_as_alone(name: str) -> None:
    """`advance(admit=...)`: prompts that arrive while the forward runs join it before the next
    block, into a decoding step (batched rows) or a packed step (a deferred prompt, a refill of
    the 12-token window), once per forward: later arrivals, and those during the last block,
    wait for the next forward. A 1-token prompt, a further sample and a prompt longer than the
    window all decode as alone."""
    model = _models()[name].eval()
    engine = DecodeEngine(model, 8)
    (first,) = engine.add_many([Request([1, 2, 3], SAMPLE, [row_generator(1, 0)], 24)])[0]
    arrivals = {  # (step, block running when they arrive; -1: none yet) -> requests
        (1, 0): [([5, 6, 7, 8, 9], 15, 3, 2), ([4], 9, 4, 1)],  # join a decoding step
        (4, -1): [([7, 7, 1], 6, 6, 1)],  # join the packed step of a deferred prompt
        (4, 0): [([2, 2, 3, 1, 4, 4, 5, 9, 1, 2, 3, 6, 7], 8, 5, 1)],  # a second: waits
        (9, 0): [([9, 3], 5, 7, 1)],  # step 9 also refills `first`'s full window
        (12, 1): [([3, 1], 4, 2, 1)],  # during the last block: the next forward
    }
    deferred = {4: ([8, 1], 7, 9, 1)}  # added before the forward: a packed step in flight
    now = {"step": -1, "block": -1}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: now.__setitem__("block", i))
    queue = sorted(arrivals.items())
    added: list[tuple[list[int], int, int, list]] = []
    admitted_at: dict[tuple[int, int], int] = {}  # arrival -> (step, block it joined before)
    joins_per_step: dict[int, int] = {}

    def add(prompt, n, seed, k) -> list:
        gens = [row_generator(seed, j) for j in range(k)]
        return engine.add_many([Request(prompt, SAMPLE, gens, n)], defer=True)[0]

    def admit() -> None:
        due = [(at, reqs) for at, reqs in queue if at <= (now["step"], now["block"])]
        if due:
            joins_per_step[now["step"]] = joins_per_step.get(now["step"], 0) + 1
        for at, reqs in due:
            queue.remove((at, reqs))
            admitted_at[at] = (now["step"], now["block"] + 1)
            added.extend((p, n, seed, add(p, n, seed, k)) for p, n, seed, k in reqs)

    for step in range(60):
        if not engine.active and not queue:
            break
        engine.sample()
        now["step"], now["block"] = step, -1
        if step in deferred:
            prompt, n, seed, k = deferred[step]
            added.append((prompt, n, seed, add(prompt, n, seed, k)))
        engine.advance(admit=admit)
        assert engine._deferred == 0 and not any(r.pending for r in engine.slots)
    assert not engine.active and not queue and len(added) == 7
    assert admitted_at == {(1, 0): (1, 1), (4, -1): (4, 0), (4, 0): (5, 0), (9, 0): (9, 1),
                           (12, 1): (13, 0)}  # fmt: skip
    assert set(joins_per_step.values()) == {1}
    assert first.tokens == _alone(model, [1, 2, 3], 24, SAMPLE, 1)
    for prompt, n, seed, rows in added:
        for j, row in enumerate(rows):
            assert row.tokens == _alone(model, prompt, n, SAMPLE, seed, j), prompt
