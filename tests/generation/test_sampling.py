"""Sampling filters: greedy, top-k, top-p, temperature and seeding."""

from __future__ import annotations

import math

import pytest
import torch

from craft.errors import ConfigError
from craft.generation import SamplingParams, filter_logits, sample_next


def _kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


def test_top_k_one_equals_greedy_argmax() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 100, generator=g)
    for _ in range(5):
        out = sample_next(logits, temperature=1.5, top_k=1, generator=g)
        assert torch.equal(out, logits.argmax(-1))


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert _kept(filter_logits(logits, top_k=2)) == [1, 3]
    assert _kept(filter_logits(logits, top_k=10)) == [0, 1, 2, 3, 4]


# probabilities 0.4, 0.3, 0.2, 0.1 on tokens 2, 0, 3, 1
_PROBS = torch.tensor([[0.3, 0.1, 0.4, 0.2]])


@pytest.mark.parametrize(
    ("p", "kept"),
    [
        (0.05, [2]),  # the most probable token alone already exceeds p
        (0.39, [2]),
        (0.41, [0, 2]),  # 0.4 < p <= 0.7: two tokens
        (0.69, [0, 2]),
        (0.71, [0, 2, 3]),  # 0.7 < p <= 0.9: three
        (0.89, [0, 2, 3]),
        (0.91, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(p: float, kept: list[int]) -> None:
    assert _kept(filter_logits(_PROBS.log(), top_p=p)) == kept


def test_top_p_samples_only_from_the_nucleus() -> None:
    g = torch.Generator().manual_seed(0)
    logits = _PROBS.log().expand(4000, 4)
    out = sample_next(logits, temperature=1.0, top_p=0.6, generator=g)
    counts = torch.bincount(out, minlength=4).tolist()
    assert counts[1] == counts[3] == 0
    # renormalised nucleus: 0.4/0.7 and 0.3/0.7
    assert math.isclose(counts[2] / 4000, 4 / 7, abs_tol=0.04)


def test_top_k_then_top_p_compose() -> None:
    logits = _PROBS.log()
    # top_k=2 leaves {2: 4/7, 0: 3/7}; top_p=0.5 then keeps token 2 only
    assert _kept(filter_logits(logits, top_k=2, top_p=0.5)) == [2]


def test_same_seed_same_samples_different_seed_differs() -> None:
    logits = torch.zeros(1, 1000)
    a = [sample_next(logits, generator=torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [sample_next(logits, generator=torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a == b
    c = sample_next(logits.expand(16, 1000), generator=torch.Generator().manual_seed(7))
    d = sample_next(logits.expand(16, 1000), generator=torch.Generator().manual_seed(8))
    assert not torch.equal(c, d)


def test_temperature_sharpens() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 0.0]]).expand(2000, 2)
    cold = sample_next(logits, temperature=0.2, generator=g).eq(0).float().mean().item()
    warm = sample_next(logits, temperature=5.0, generator=g).eq(0).float().mean().item()
    assert cold > 0.97  # sigmoid(5) = 0.993
    assert 0.5 < warm < 0.65  # sigmoid(0.2) = 0.55


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
    ],
)
def test_invalid_parameters_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def test_top_p_at_exactly_the_mass_of_the_kept_tokens_stops_there() -> None:
    """Four equal logits: probabilities exactly 0.25, so the cumulative mass hits p exactly."""
    logits = torch.zeros(1, 4)
    for p, kept in [(0.25, 1), (0.5, 2), (0.75, 3), (0.7499, 3), (0.5001, 3)]:
        assert len(_kept(filter_logits(logits, top_p=p))) == kept, p
    # the same through sampling: p = 0.5 draws from two tokens only
    g = torch.Generator().manual_seed(0)
    out = sample_next(logits.expand(400, 4), temperature=1.0, top_p=0.5, generator=g)
    assert len(out.unique()) == 2


def test_temperature_is_applied_before_top_p() -> None:
    """logits 3, 2, 1, 0: at temperature 1 a nucleus of 0.7 holds tokens {0, 1} (0.64 + 0.24);
    at temperature 10 the distribution is flatter (0.29, 0.26, 0.24, 0.21) and it holds {0, 1, 2}."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 6000
    hot = sample_next(logits.expand(n, 4), temperature=10.0, top_p=0.7, generator=g)
    counts = torch.bincount(hot, minlength=4).tolist()
    probs = torch.softmax(logits[0] / 10.0, dim=-1)[:3]
    expected = (probs / probs.sum()).tolist()  # renormalised over the tempered nucleus
    assert counts[3] == 0
    for c, e in zip(counts[:3], expected, strict=True):
        assert math.isclose(c / n, e, abs_tol=0.03)
    cold = sample_next(logits.expand(n, 4), temperature=1.0, top_p=0.7, generator=g)
    assert set(cold.tolist()) == {0, 1}


def test_temperature_and_top_k_commute_and_keep_the_k_largest() -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    out = sample_next(logits.expand(3000, 5), temperature=4.0, top_k=2, generator=g)
    counts = torch.bincount(out, minlength=5).tolist()
    p1 = 1 / (1 + math.exp((2.0 - 3.0) / 4.0))  # token 1 vs token 3 at temperature 4
    assert counts[0] == counts[2] == counts[4] == 0
    assert math.isclose(counts[1] / 3000, p1, abs_tol=0.03)


def test_top_p_one_and_top_k_equal_to_the_vocabulary_keep_every_token() -> None:
    # token 1's probability underflows: a cumulative sum would already read 1.0 before it
    logits = torch.tensor([[0.0, -200.0, -1.0]])
    assert _kept(filter_logits(logits, top_p=1.0)) == [0, 1, 2]
    assert _kept(filter_logits(logits, top_k=3, top_p=1.0)) == [0, 1, 2]
    assert SamplingParams(top_p=1.0).top_p == 1.0  # 1.0 is valid: no nucleus filtering


def test_default_temperature_is_one() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]]).expand(64, 3)
    a = sample_next(logits, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and SamplingParams().temperature == 1.0


# ------------------------------------------------------------------ batched rows (sample_rows)

_ROW_LOGITS = torch.tensor([[0.3, 0.1, 0.4, 0.2]]).log()  # probabilities 0.3, 0.1, 0.4, 0.2


def _frequencies(params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """How often each token is drawn for n rows of _ROW_LOGITS sharing one generator."""
    from craft.sampling import sample_rows

    g = torch.Generator().manual_seed(seed)
    tok = sample_rows(_ROW_LOGITS.expand(n, -1), [params] * n, [g] * n)
    return torch.bincount(tok, minlength=4).double() / n


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(), [0.3, 0.1, 0.4, 0.2]),
        # temperature 0.5 squares the probabilities: 0.09, 0.01, 0.16, 0.04 over 0.30
        (SamplingParams(temperature=0.5), [0.3, 1 / 30, 16 / 30, 4 / 30]),
        (SamplingParams(temperature=2.0, top_k=2), [0.3**0.5, 0, 0.4**0.5, 0]),
        (SamplingParams(top_p=0.65), [3 / 7, 0, 4 / 7, 0]),
    ],
)
def test_sample_rows_draws_each_token_with_its_probability(
    params: SamplingParams, expected: list[float]
) -> None:
    """The exponential race picks token j with probability p_j after temperature and filters
    (4000 draws: a standard error under 0.008 per token)."""
    want = torch.tensor(expected, dtype=torch.float64)
    want = want / want.sum()
    got = _frequencies(params)
    assert (got - want).abs().max() < 0.03, (got, want)
    assert torch.all((want == 0) <= (got == 0))  # filtered tokens are never drawn


def test_sample_rows_gives_each_row_its_own_parameters_and_stream() -> None:
    """A row's token depends on its logits, its parameters and its generator only: the same as
    when it is sampled alone, whatever the other rows of the batch are."""
    from craft.sampling import sample_rows

    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(4))
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(top_p=0.5),
        SamplingParams(temperature=0.0),
    ]

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batched = sample_rows(logits, params, gens(range(6)))
    alone = [sample_rows(logits[i : i + 1], [params[i]], gens([i]))[0] for i in range(6)]
    assert batched.tolist() == [int(t) for t in alone]
    assert batched[0] == logits[0].argmax() and batched[5] == logits[5].argmax()
    for draws in range(20):  # another seed for row 2 changes row 2 only (eventually)
        other = sample_rows(logits, params, gens([0, 1, 100 + draws, 3, 4, 5]))
        assert torch.equal(other[[0, 1, 3, 4, 5]], batched[[0, 1, 3, 4, 5]])
        if other[2] != batched[2]:
            break
    else:
        raise AssertionError("row 2 ignores its generator")
    assert batched.dtype == torch.int64 and batched.shape == (6,)


def test_sample_rows_all_greedy_and_broken_rows() -> None:
    from craft.sampling import sample_rows

    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(5))
    greedy = [SamplingParams(temperature=0.0)] * 4
    assert torch.equal(sample_rows(logits, greedy, [None] * 4), logits.argmax(-1))
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, 2] = float("-inf")  # a masked token: not broken
    g = torch.Generator().manual_seed(0)
    mixed = [greedy[0], SamplingParams(top_k=3), greedy[0], SamplingParams(temperature=0.7)]
    for params in (greedy, [SamplingParams()] * 4, mixed, mixed[::-1]):
        out = sample_rows(logits, params, [g] * 4)
        assert out[1] == out[2] == -1 and out[0] >= 0 and out[3] >= 0 and out[3] != 2
    half = sample_rows(logits.half(), [SamplingParams()] * 4, [g] * 4)  # any float dtype
    assert half[1] == half[2] == -1 and half[3] not in (-1, 2)
