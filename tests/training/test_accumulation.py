"""Gradient accumulation with ignored targets equals one big batch (the loss is a token mean).

Micro-batches that ignore different numbers of target tokens (padding, masked prompts) must be
weighted by their valid tokens, not by 1/k each: k micro-batches give exactly the gradient of
the concatenated batch's mean loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from craft.config.components import GPTConfig
from craft.models.gpt import GPT
from craft.training.accumulation import token_weights
from craft.training.trainer import Trainer
from tests.training._helpers import one_process_group, tiny_config

VOCAB, T = 11, 8


def _micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three micro-batches of 2 sequences ignoring 15, 0 and 8 of their 16 target tokens."""
    g = torch.Generator().manual_seed(0)
    out = []
    for ignored in (15, 0, 8):
        x = torch.randint(0, VOCAB, (2, T), generator=g)
        y = torch.randint(0, VOCAB, (2, T), generator=g)
        y.view(-1)[:ignored] = -100
        out.append((x, y))
    return out


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_weighted_micro_batches_give_the_big_batch_gradient() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=T), VOCAB).double()
    batches = _micro_batches()
    big_x = torch.cat([x for x, _ in batches])
    big_y = torch.cat([y for _, y in batches])
    big_loss = model(big_x, big_y)[1]
    big_loss.backward()
    want = _grads(model)
    model.zero_grad()

    weights = token_weights([y for _, y in batches])
    total = 0.0
    for (x, y), w in zip(batches, weights, strict=True):
        loss = model(x, y)[1] * w
        loss.backward()
        total += loss.item()
    assert abs(total - big_loss.item()) < 1e-6  # weights are float32, the model float64
    got = _grads(model)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-9, rtol=1e-6, msg=name)
    # the old weighting, 1/k per micro-batch, is not the big batch's gradient here
    model.zero_grad()
    for x, y in batches:
        (model(x, y)[1] / len(batches)).backward()
    assert not torch.allclose(_grads(model)["wte.weight"], want["wte.weight"])


def test_token_weights_edge_cases() -> None:
    full = torch.zeros(2, 4, dtype=torch.long)
    assert torch.equal(token_weights([full, full]), torch.tensor([0.5, 0.5]))
    none = torch.full((2, 4), -100)
    assert torch.equal(token_weights([none, none]), torch.zeros(2))  # no NaN: nothing to learn
    assert torch.equal(token_weights([full, none]), torch.tensor([1.0, 0.0]))


def test_token_weights_count_valid_targets_of_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = torch.tensor([[5, -100, -100]])
    assert torch.equal(token_weights([one]), torch.tensor([1.0]))  # a single valid token
    assert token_weights([one]).dtype == torch.float32
    two = torch.tensor([[5, 7, -100]])
    assert torch.equal(token_weights([one, two]), torch.tensor([1 / 3, 2 / 3]))
    # another ignore_index: -100 counts as a valid target, 0 does not
    assert torch.equal(token_weights([one, two], ignore_index=5), torch.tensor([0.5, 0.5]))
    ints = torch.tensor([[1, 2]], dtype=torch.int32)
    assert torch.equal(token_weights([ints, ints[:, :1]]), torch.tensor([2 / 3, 1 / 3]))
    # 2 processes: N is summed over them and each weight is 2 n_i / N, so the average over the
    # processes of sum_i w_i mean_i is the mean over every valid token of the step
    with one_process_group(tmp_path):  # the sum over one process: N is this process's count
        assert torch.equal(token_weights([one, two], world_size=2), torch.tensor([2 / 3, 4 / 3]))

    def other_process_has_5(t: torch.Tensor, op: Any = None) -> None:
        t += 5  # what the all-reduce adds when the other process holds 5 valid targets

    monkeypatch.setattr(torch.distributed, "all_reduce", other_process_has_5)
    assert torch.equal(token_weights([one, two], world_size=2), torch.tensor([0.25, 0.5]))


class _Fixed:
    """A train-batch iterator that replays given batches (state is not needed here)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.i = batches, 0

    def __iter__(self) -> _Fixed:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}


def _one_step(tmp_path: Path, accum: int, batches: list) -> dict[str, torch.Tensor]:
    cfg = tiny_config(
        tmp_path,
        "training.max_steps=1",
        f"training.grad_accum_steps={accum}",
        f"training.batch_size={batches[0][0].shape[0]}",
        "training.grad_clip=0",
        "optimizer.type=sgd",
        "optimizer.lr=1.0",
        "optimizer.momentum=0.0",
        "optimizer.weight_decay=0.0",
        "scheduler.warmup_steps=0",
        f"model.block_size={T}",
        "eval.at_end=false",
        "checkpoint.save_at_end=false",
        "checkpoint.export=false",
    )
    trainer = Trainer(cfg)
    trainer.train_iter = _Fixed(batches)
    before = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
    trainer.fit()
    return {n: p.detach() - before[n] for n, p in trainer.raw_model.named_parameters()}


def test_trainer_step_with_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    batches = _micro_batches()
    big = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    accumulated = _one_step(tmp_path / "accum", len(batches), batches)
    whole = _one_step(tmp_path / "whole", 1, big)
    assert any(d.abs().max() > 0 for d in whole.values())
    for name, d in whole.items():
        torch.testing.assert_close(accumulated[name], d, atol=2e-6, rtol=1e-4, msg=name)
