"""`DecodeEngine(compile=True)`: the Inductor-compiled decode step decodes as the eager one.

The compiled step is the fixed-shape step of a GPT's KV cache (`KVCache.fixed_step`): every row
every step, positions as a tensor, attention over the whole window under a mask. Its eager run is
checked against the plain engine in test_engine.py (rows joining, leaving and refilling); here it
goes through torch.compile with Inductor (C++ on the CPU), at the smallest shape, since the
compile time is the cost of this test. What cannot compile is an error, never a silent fallback.
"""

from __future__ import annotations

import copy

import pytest
import torch

from craft.engine import DecodeEngine
from craft.errors import ConfigError
from craft.generation import SamplingParams, row_generator
from tests.generation._fakes import tiny_gpt, tiny_rnn

GREEDY = SamplingParams(temperature=0.0)


def _decode(engine: DecodeEngine) -> list[list[int]]:
    # two rows: the short one retires first (the compiled step keeps running all rows), the
    # long one refills its 16-token window twice
    (a,) = engine.add([1, 2, 3], GREEDY, [None], max_new_tokens=40)
    (b,) = engine.add([4], SamplingParams(temperature=1.0), [row_generator(5, 0)], max_new_tokens=9)
    while engine.active:
        engine.step()
    return [a.tokens, b.tokens]


@pytest.mark.slow
def test_compiled_step_decodes_as_the_eager_step() -> None:
    model = tiny_gpt(12, block_size=16, n_layer=1, positions="rope").eval()
    want = _decode(DecodeEngine(model, 2))
    engine = DecodeEngine(model, 2, compile=True)
    assert _decode(engine) == want
    assert engine.compile_seconds is not None and engine.compile_seconds > 0
    assert torch._inductor.config.freezing is False  # the compile's settings did not leak

    # the compiled step holds the weights as constants: a model changed after one engine
    # compiled is decoded with its new weights by a new engine, never by the old graph
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    want = _decode(DecodeEngine(model, 2))
    assert _decode(DecodeEngine(model, 2, compile=True)) == want


def _logits_along(engine: DecodeEngine, prompt: list[int], steps: int) -> list[tuple]:
    """(context, next-token logits) after the prefill and after each greedy step of one row."""
    (row,) = engine.add(prompt, GREEDY, [None], max_new_tokens=steps)
    seen = [(list(row.context), engine.logits[row.slot].clone())]
    while engine.active:
        engine.step()
        if not row.done:
            seen.append((list(row.context), engine.logits[row.slot].clone()))
    return seen


@pytest.mark.slow
def test_compiled_bf16_step_is_as_close_to_float64_as_the_eager_one() -> None:
    """bf16 weight products go through Inductor's C++ GEMM template on the CPU (see
    `CPU_COMPILE_SETTINGS`), not oneDNN's: every step's logits are compared with a float64 forward
    of the same bf16-rounded weights over the same context. The compiled step may differ from the
    eager bf16 step only by rounding: its error stays within twice the eager one's (plus a bf16
    ulp at the logits' scale)."""
    model = tiny_gpt(40, block_size=16, n_layer=2, d_model=64, n_head=4, mlp="swiglu")
    model = model.to(torch.bfloat16).eval()
    exact = copy.deepcopy(model).to(torch.float64)

    def worst_error(engine: DecodeEngine) -> tuple[float, float]:
        """The largest error of any step's logits, and the largest logit (their scale)."""
        seen = _logits_along(engine, [1, 2, 3], steps=10)
        assert len(seen) == 10
        with torch.no_grad():
            error = max(
                (logits.double() - exact(torch.tensor([ctx]))[0][0, -1]).abs().max().item()
                for ctx, logits in seen
            )
        return error, max(logits.abs().max().item() for _, logits in seen)

    eager, scale = worst_error(DecodeEngine(model, 2))
    compiled, _ = worst_error(DecodeEngine(model, 2, compile=True))
    assert 0 < eager < 0.05 * scale  # bf16 rounding, far below the logits' scale
    assert compiled <= 2 * eager + scale * 2**-8, (compiled, eager, scale)


def test_a_model_without_a_fixed_shape_step_is_refused() -> None:
    with pytest.raises(ConfigError, match="compile: RNNLM has no KV cache with a fixed-shape"):
        DecodeEngine(tiny_rnn(12), 2, compile=True)
    with pytest.raises(ConfigError, match="compile: GPT has no KV cache"):  # recomputing
        DecodeEngine(tiny_gpt(12), 2, use_cache=False, compile=True)


def test_a_failing_compile_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn, **kw):
        def call(*args):
            raise RuntimeError("C++ compile failed: cc1plus not found\n(details)")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    engine = DecodeEngine(tiny_gpt(12).eval(), 1, compile=True)
    engine.add([1, 2], GREEDY, [None], max_new_tokens=5)
    with pytest.raises(ConfigError) as e:
        engine.step()
    assert str(e.value) == (
        "compile: torch.compile of the decode step failed (RuntimeError: C++ compile failed: "
        "cc1plus not found); decode without compiling"
    )


@pytest.mark.parametrize("n_kv_head", [2, 1])  # multi-head and grouped-query attention
def test_fixed_step_reads_only_the_span_it_is_given(n_kv_head: int) -> None:
    """The compiled step attends to the cache up to the longest row (`keys` 0..S-1): the same
    logits and cache as attending to the whole window, where the positions past S are masked."""
    model = tiny_gpt(12, n_layer=2, n_kv_head=n_kv_head, positions="rope").eval()
    lengths = torch.tensor([5, 9, 0])  # rows of different lengths; the last one is free
    outs = []
    for keys in (torch.arange(16), torch.arange(10)):  # the whole window, or up to row 1's end
        cache = model.new_cache(3, max_len=model.block_size + 1)
        torch.manual_seed(1)  # stale values past each row's end must not count
        cache.k.normal_(), cache.v.normal_()
        before = cache.k.clone()
        cache.lengths[:] = lengths
        with torch.no_grad():
            step = cache.fixed_step(lengths.clone(), keys)
            logits, _ = model(torch.tensor([[3], [4], [5]]), cache=step)  # (3, 1, V)
        written = (cache.k != before).any(dim=(2, 4))  # (L, B, max_len)
        assert written.nonzero()[:, 1:].unique(dim=0).tolist() == [[0, 5], [1, 9], [2, 0]]
        outs.append((logits, cache.k, cache.v))
    (a, ka, va), (b, kb, vb) = outs
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(kb, ka)  # layer 1's keys follow layer 0's attention
    torch.testing.assert_close(vb, va)


def test_a_cache_shorter_than_the_window_is_refused() -> None:
    model = tiny_gpt(12, block_size=16)
    assert model.new_cache(1, max_len=17).max_len == 17
    with pytest.raises(ValueError, match=r"max_len = 15: expected >= block_size \(16\)"):
        model.new_cache(1, max_len=15)
