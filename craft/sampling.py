"""Turning next-token logits into tokens: temperature, top-k, top-p, and reproducible draws.

The filters apply in a fixed order: logits are divided by the temperature first, then everything
outside the top-k is dropped, then everything outside the top-p nucleus of what is left
(temperature 0 is greedy: argmax, no random draw). `sample_next` draws every row of a batch from
one generator. `sample_rows` draws each row from its own generator with its own parameters, so a
row's tokens do not depend on which other rows share the batch: that is how `craft generate
--num-samples N` decodes N samples at once and how the server batches unrelated requests, and
why a seed gives the same text either way. Sample i of a run with seed s uses the generator
seeded with `sample_seed(s, i)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from craft.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy (top_k/top_p are then irrelevant)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(
                f"temperature = {self.temperature}: expected a number >= 0 (0 means greedy)"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k = {self.top_k}: expected an integer >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p = {self.top_p}: expected a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set the logits outside the top-k, then outside the top-p nucleus, to -inf.

    logits (B, V). Top-p keeps, per row, the smallest set of most probable tokens whose total
    probability reaches `top_p` (always at least one token).
    """
    out = logits
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (B, 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more probable tokens
        drop_sorted = before >= top_p  # the set already reached top_p without this token
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row: logits (B, V) -> (B,) int64. temperature 0 is argmax."""
    params = SamplingParams(temperature, top_k, top_p)
    logits = logits.float()
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next token of each row, each with its own parameters and generator: (B, V) -> (B,).

    Row i is drawn by the exponential race (argmax of p / E with E ~ Exp(1) from row i's
    generator, which picks token j with probability p_j), the draw torch.multinomial makes for
    one sample. The filters run once per distinct parameter set, batched over its rows. A row
    whose logits hold NaN or +inf (a broken or overflowing model) gets token -1, so the caller
    learns of it with the same host synchronisation that reads the tokens: its winning score
    (the largest logit, or the largest p / E) is then NaN or +inf, which no sound row's is.
    """
    tok, score = _sample_rows(logits.float(), params, generators)
    return torch.where(score < math.inf, tok, -1)


_TINY = torch.finfo(torch.float32).tiny


def _race(
    logits: torch.Tensor, p: SamplingParams, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """p / E of every token (R, V), E ~ Exp(1) drawn from each row's own generator."""
    if p.temperature != 1.0:
        logits = logits / p.temperature
    probs = torch.softmax(filter_logits(logits, p.top_k, p.top_p), dim=-1)
    race = torch.empty_like(probs)
    if len(generators) == 1:
        race.exponential_(generator=generators[0])
    else:
        for j, gen in enumerate(generators):
            race[j].exponential_(generator=gen)
    return probs / race.clamp_min_(_TINY)


def _sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B,), each row's winning score (B,)): one max over the rows of each parameter set."""
    first = params[0]
    if all(p == first for p in params):  # the usual case: one parameter set for the batch
        if first.greedy:
            score, tok = logits.max(dim=-1)
        else:
            score, tok = _race(logits, first, generators).max(dim=-1)
        return tok, score
    groups: dict[SamplingParams, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p, []).append(i)
    score, tok = logits.max(dim=-1)  # greedy rows keep these
    for p, rows in groups.items():
        if p.greedy:
            continue
        s, t = _race(logits[rows], p, [generators[r] for r in rows]).max(dim=-1)
        tok[rows], score[rows] = t, s
    return tok, score


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a run with `seed`: independent streams for every pair."""
    if seed < 0 or index < 0:
        raise ConfigError(f"seed = {seed}: expected an integer >= 0")
    words = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])  # < 2**63


def row_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of sample `index` of a run with `seed`, on `device`."""
    return torch.Generator(device=device).manual_seed(sample_seed(seed, index))


__all__ = [
    "SamplingParams",
    "filter_logits",
    "row_generator",
    "sample_next",
    "sample_rows",
    "sample_seed",
]
