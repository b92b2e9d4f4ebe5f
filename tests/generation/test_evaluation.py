"""Evaluation metrics against a hand computation, window planning, and input checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from craft.data.tokenizers import CharTokenizer
from craft.errors import DataError
from craft.evaluation import evaluate_tokens, plan_batches, plan_windows
from tests.generation._fakes import TableBigram, tiny_gpt

# a 3-token vocabulary whose characters take 1, 2 and 3 UTF-8 bytes
TOK = CharTokenizer(["a", "é", "€"])
TABLE = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-2.0, 1.0, 3.0]]


def _hand_nll(tokens: list[int]) -> float:
    """Total negative log-likelihood in nats of a bigram table model, by hand."""
    total = 0.0
    for cur, nxt in itertools.pairwise(tokens):
        row = TABLE[cur]
        log_z = math.log(sum(math.exp(v) for v in row))
        total += log_z - row[nxt]
    return total


def test_metrics_equal_hand_computation() -> None:
    tokens = [0, 1, 2, 2, 0, 0, 1, 2, 1, 0, 2]  # 11 tokens, 10 predictions
    model = TableBigram(torch.tensor(TABLE))
    res = evaluate_tokens(model, TOK, np.array(tokens, dtype=np.uint16), window=4, batch_size=2)
    nll = _hand_nll(tokens)
    targets = TOK.decode(tokens[1:])
    assert res.tokens == 10 and res.windows == 3 and res.batches == 2 and res.complete
    assert res.characters == len(targets) == 10
    assert res.bytes == len(targets.encode("utf-8"))
    assert math.isclose(res.loss, nll / 10, rel_tol=1e-6)
    assert math.isclose(res.perplexity, math.exp(nll / 10), rel_tol=1e-6)
    assert math.isclose(res.bits_per_token, nll / 10 / math.log(2), rel_tol=1e-6)
    assert math.isclose(res.bits_per_char, nll / math.log(2) / 10, rel_tol=1e-6)
    assert math.isclose(res.bits_per_byte, nll / math.log(2) / res.bytes, rel_tol=1e-6)
    assert res.bytes > res.characters  # the multi-byte characters are counted as bytes


def test_max_batches_scores_a_prefix() -> None:
    tokens = [0, 1, 2, 2, 0, 0, 1, 2, 1, 0, 2]
    model = TableBigram(torch.tensor(TABLE))
    res = evaluate_tokens(model, TOK, tokens, window=3, batch_size=1, max_batches=2)
    assert res.tokens == 6 and not res.complete
    assert math.isclose(res.loss, _hand_nll(tokens[:7]) / 6, rel_tol=1e-6)


def test_windows_cover_every_prediction_once() -> None:
    for n, w in [(2, 5), (10, 3), (11, 5), (101, 8)]:
        wins = plan_windows(n, w)
        predicted = [s + 1 + j for s, length in wins for j in range(length)]
        assert predicted == list(range(1, n))
        assert all(1 <= length <= w for _, length in wins)
    batches = plan_batches(plan_windows(11, 3), 2)  # lengths 3, 3, 3, 1
    assert [[length for _, length in b] for b in batches] == [[3, 3], [3], [1]]


def test_context_model_is_deterministic_and_model_mode_restored() -> None:
    tokens = np.random.default_rng(0).integers(0, 3, size=200)
    model = tiny_gpt(3, block_size=16).train()
    a = evaluate_tokens(model, TOK, tokens, window=16, batch_size=4)
    b = evaluate_tokens(model, TOK, tokens, window=16, batch_size=3)
    assert model.training
    assert a.tokens == b.tokens == 199
    assert math.isclose(a.loss, b.loss, rel_tol=1e-5)


def test_bad_inputs() -> None:
    model = TableBigram(torch.tensor(TABLE))
    with pytest.raises(DataError, match="at least 2"):
        evaluate_tokens(model, TOK, [1], window=4)
    with pytest.raises(DataError, match="max_batches"):
        evaluate_tokens(model, TOK, [1, 2, 0], window=4, max_batches=0)
