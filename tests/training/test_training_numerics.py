"""The training step against an independent oracle: a plain float64 PyTorch loop over the same
batches. Plain SGD (no momentum, constant lr) makes the update proportional to the gradient, so
a wrong accumulation divisor or a skipped clip shows in the weights (Adam would hide the scale).
A non-finite step is checked on the live weights, not only on the checkpoints on disk.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from craft.errors import TrainingError
from craft.training.builders import build_data
from craft.training.callbacks import Callback
from craft.training.trainer import Trainer
from tests.training._helpers import tiny_config

SGD = [
    "optimizer.type=sgd",
    "optimizer.momentum=0",
    "optimizer.weight_decay=0",
    "optimizer.lr=0.5",
    "scheduler.warmup_steps=0",
    "scheduler.min_lr=0.5",  # the recipe's cosine schedule, flat at the peak lr
    "eval.interval=1000",
    "eval.at_end=false",
    "checkpoint.interval=1000",
    "checkpoint.save_at_end=false",
]


def _oracle(cfg: Any, model: torch.nn.Module) -> tuple[torch.nn.Module, list[float]]:
    """`max_steps` SGD steps in float64 over the run's batch stream; returns (model, grad norms).

    One step: the mean cross-entropy over all accum x B x T tokens, its gradient, the global
    norm clipped to `grad_clip` (0: off), then p -= lr * g.
    """
    t = cfg.training
    model = copy.deepcopy(model).double().train()
    data = build_data(cfg, rank=0, world_size=1, is_main=True, wait=lambda: None)
    batches = data.train_batches(t.batch_size, cfg.run.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for _ in range(t.max_steps):
        micro = [next(batches) for _ in range(t.grad_accum_steps)]
        logits = [model(x)[0] for x, _ in micro]  # (B, T, V) each
        loss = F.cross_entropy(
            torch.cat(logits).flatten(0, 1), torch.cat([y for _, y in micro]).flatten()
        )
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
        norms.append(norm)
        scale = min(1.0, t.grad_clip / norm) if t.grad_clip > 0 else 1.0
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= cfg.optimizer.lr * scale * g
    return model, norms


def _logged_grad_norms(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["grad_norm"] for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.parametrize(
    ("accum", "clip"),
    [(3, 0.0), (2, 0.05)],  # accumulation alone; accumulation with the clip active on every step
)
def test_sgd_steps_match_a_float64_loop_over_the_same_batches(
    tmp_path: Path, accum: int, clip: float
) -> None:
    cfg = tiny_config(
        tmp_path,
        *SGD,
        "training.max_steps=3",
        f"training.grad_accum_steps={accum}",
        f"training.grad_clip={clip}",
    )
    trainer = Trainer(cfg)
    initial = copy.deepcopy(trainer.unwrapped_model)
    res = trainer.fit()
    oracle, norms = _oracle(cfg, initial)
    if clip:
        assert min(norms) > 2 * clip  # the clip changes every step: skipping it must show
    live, start = trainer.unwrapped_model.state_dict(), initial.state_dict()
    want = oracle.state_dict()
    moved = torch.cat([(live[k].double() - start[k].double()).flatten() for k in want])
    expected = torch.cat([(want[k] - start[k].double()).flatten() for k in want])
    # float32 weights against float64: agreement to float32 rounding (a wrong scale is >= 1.5x)
    assert float((moved - expected).norm()) <= 1e-4 * float(expected.norm())
    # the logged gradient norm is the norm before clipping
    assert _logged_grad_norms(res.run_dir) == pytest.approx(norms, rel=1e-4)


class _NonFiniteAt(Callback):
    """After step `at`, makes the next step's loss (or only its gradient) NaN; records the weights
    the model had then."""

    def __init__(self, at: int, where: str) -> None:
        self.at, self.where = at, where
        self.weights: dict[str, torch.Tensor] = {}

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if metrics["step"] != self.at:
            return
        model = trainer.unwrapped_model
        self.weights = copy.deepcopy(model.state_dict())
        emb = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
        if self.where == "loss":
            emb.register_forward_hook(lambda m, i, out: out * math.nan)
        else:
            emb.weight.register_hook(lambda g: torch.full_like(g, math.nan))


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_non_finite_step_changes_no_live_weight(tmp_path: Path, where: str) -> None:
    cfg = tiny_config(tmp_path, "training.max_steps=6", "checkpoint.interval=2")
    poison = _NonFiniteAt(3, where)
    trainer = Trainer(cfg, callbacks=[poison])
    with pytest.raises(TrainingError, match=r"non-finite training (loss|.*gradient).*at step 4"):
        trainer.fit()
    live = trainer.unwrapped_model.state_dict()
    assert poison.weights.keys() == live.keys()
    for name, before in poison.weights.items():
        assert torch.equal(live[name], before), f"{name} changed by the failed step"
