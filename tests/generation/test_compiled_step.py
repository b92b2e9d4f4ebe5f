"""`DecodeEngine(compile=True)`: the Inductor-compiled decode step decodes as the eager one.

The compiled step is the fixed-shape step of a GPT's KV cache (`KVCache.fixed_step`): every row
every step, positions as a tensor, attention over the whole window under a mask. Its eager run is
checked against the plain engine in test_engine.py (rows joining, leaving and refilling); here it
goes through torch.compile with Inductor (C++ on the CPU), at the smallest shape, since the
compile time is the cost of this test. What cannot compile is an error, never a silent fallback.
"""

from __future__ import annotations

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
