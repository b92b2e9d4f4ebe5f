"""The training step against an independent oracle: a plain float64 PyTorch loop over the same
batches. Plain SGD (no momentum, constant lr) makes the update proportional to the gradient, so
a wrong accumulation divisor or a skipped clip shows in the weights (Adam would hide the scale).
A non-finite step is checked on the live weights, not only on the checkpoints on disk.
"""

from __future__ import annotations

import contextlib
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
from craft.training.step import StepOutput, TrainStep
from craft.training.trainer import Trainer
from tests.training._helpers import one_process_group, tiny_config

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


# ------------------------------------------------------------------ TrainStep with Accelerate's roles

V = 7


class _Bigram(torch.nn.Module):
    """(B, T) tokens -> (logits (B, T, V), mean cross-entropy over the targets not ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(V, V, dtype=torch.float64)
        torch.nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.table(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)


class _Accelerator:
    """Records what the step asks of Accelerate; `scaler`: an fp16 loss scaler is in use."""

    device = torch.device("cpu")

    def __init__(self, processes: int = 1, scaler: bool = False, sharded: bool = False) -> None:
        self.num_processes, self.calls, self.sharded = processes, [], sharded
        if scaler:
            self.scaler = object()

    def no_sync(self, model: Any) -> Any:
        self.calls.append(("no_sync", model))
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.calls.append("backward")
        loss.backward()

    def clip_grad_norm_(self, params: Any, max_norm: float) -> torch.Tensor:
        self.calls.append(("clip", max_norm))
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return _Sharded(norm) if self.sharded else norm


class _Sharded:
    """What FSDP2's clipping returns: a DTensor whose value is read with `full_tensor()`."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def full_tensor(self) -> torch.Tensor:
        return self.value


class _Wrapped:
    """Accelerate's optimizer wrapper: the torch optimizer as `.optimizer`, counted steps."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer, self.steps = optimizer, 0

    def step(self) -> None:
        self.steps += 1
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def _batches(accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(accum):
        x, y = torch.randint(0, V, (2, 5), generator=g), torch.randint(0, V, (2, 5), generator=g)
        y.view(-1)[: 3 * i] = -100  # a different number of ignored targets in each
        out.append((x, y))
    return out


def _step(
    accum: int, *, direct: bool, wrapped: bool = True, clip: float = 0.0, **acc: Any
) -> tuple[_Bigram, Any, _Accelerator, Any, torch.Tensor]:
    """One TrainStep (SGD, lr 0.5) over `_batches(accum)`: (model, optimizer, accelerator,
    output, weights before)."""
    model = _Bigram()
    before = model.table.weight.detach().clone()
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 0.5**s)
    optimizer = _Wrapped(sgd) if wrapped else sgd
    accelerator = _Accelerator(**acc)
    training = type("T", (), {"grad_accum_steps": accum, "grad_clip": clip})()
    step = TrainStep(model, optimizer, sched, accelerator, training, direct=direct)
    out = step(iter(_batches(accum)))
    return model, optimizer, accelerator, out, before


def _big_batch_grad(accum: int) -> tuple[torch.Tensor, float]:
    """The oracle: the gradient of the mean loss over every valid target of the step."""
    model, batches = _Bigram(), _batches(accum)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    loss = model(x, y)[1]
    loss.backward()
    return model.table.weight.grad, loss.item()


@pytest.mark.parametrize(("accum", "direct"), [(3, False), (3, True), (2, True)])
def test_the_step_syncs_on_the_last_micro_batch_and_uses_accelerate_unless_direct(
    accum: int, direct: bool
) -> None:
    model, opt, acc, out, before = _step(accum, direct=direct)
    grad, loss = _big_batch_grad(accum)
    torch.testing.assert_close(model.table.weight.detach(), before - 0.5 * grad)
    assert out.loss == pytest.approx(loss) and out.grad_norm == pytest.approx(float(grad.norm()))
    assert out.lr == 0.5 and out.finite and not out.stop
    assert opt.optimizer.param_groups[0]["lr"] == 0.25  # the schedule stepped once
    assert model.table.weight.grad is None  # zeroed (set to None) after the step
    no_sync = [("no_sync", model)]
    if direct:  # backward, clipping and the optimizer step bypass the wrappers
        assert acc.calls == no_sync * (accum - 1) and opt.steps == 0
    else:
        clip = ("clip", math.inf)
        assert acc.calls == [*no_sync, "backward", *no_sync, "backward", "backward", clip]
        assert opt.steps == 1


@pytest.mark.parametrize("sharded", [False, True])
def test_a_plain_optimizer_and_the_clip_threshold(sharded: bool) -> None:
    model, opt, acc, out, before = _step(1, direct=False, wrapped=False, clip=0.01, sharded=sharded)
    grad, _ = _big_batch_grad(1)
    assert out.grad_norm == pytest.approx(float(grad.norm())) and out.grad_norm > 0.02
    assert acc.calls == ["backward", ("clip", 0.01)]
    torch.testing.assert_close(
        model.table.weight.detach(), before - 0.5 * grad * (0.01 / float(grad.norm()))
    )
    assert opt.param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize("scaler", [False, True])
def test_a_non_finite_gradient_is_left_to_the_fp16_scaler(scaler: bool) -> None:
    """With a loss scaler the scaler skips non-finite steps itself (and lowers its scale), so
    the step calls it; without one the step skips the optimizer and drops the gradients."""
    model = _Bigram()
    model.table.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 0.5**s)
    opt, acc = _Wrapped(sgd), _Accelerator(scaler=scaler)
    training = type("T", (), {"grad_accum_steps": 1, "grad_clip": 0.0})()
    out = TrainStep(model, opt, sched, acc, training, direct=False)(iter(_batches(1)))
    assert math.isfinite(out.loss) and math.isnan(out.grad_norm)
    assert out.finite is scaler and opt.steps == int(scaler) and out.lr == 0.5
    assert sgd.param_groups[0]["lr"] == (0.25 if scaler else 0.5)
    assert model.table.weight.grad is None


@pytest.mark.parametrize(
    ("poison", "stop", "scaler"),
    [(False, False, False), (False, True, False), (True, False, False), (True, True, True)],
)
def test_with_several_processes_the_step_weights_by_world_tokens_and_agrees_flags(
    tmp_path: Path, poison: bool, stop: bool, scaler: bool
) -> None:
    """Accelerate reports 2 processes while the (one-process) group sums to this one's counts:
    each micro-batch weight is then world_size * n_i / N, twice the one-process weight."""
    model = _Bigram()
    if poison:
        model.table.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 0.5**s)
    opt, acc = _Wrapped(sgd), _Accelerator(processes=2, scaler=scaler)
    training = type("T", (), {"grad_accum_steps": 1, "grad_clip": 0.0})()
    with one_process_group(tmp_path):
        out = TrainStep(model, opt, sched, acc, training, direct=True)(iter(_batches(1)), stop=stop)
    grad, loss = _big_batch_grad(1)
    assert out.loss == pytest.approx(2 * loss)
    # a NaN gradient with a finite loss: skipped, unless an fp16 scaler is there to skip it
    skipped = poison and not scaler
    assert out.stop is stop and out.finite is not skipped
    assert opt.optimizer.param_groups[0]["lr"] == (0.5 if skipped else 0.25)
    if not poison:
        assert out.grad_norm == pytest.approx(2 * float(grad.norm()))


def test_the_non_finite_error_says_what_is_safe_and_what_to_try(tmp_path: Path) -> None:
    out = StepOutput(math.nan, 2.0, 0.1, finite=False, stop=False)
    first = str(out.error(4, None))
    assert first.startswith("non-finite training loss (nan) or gradient norm (2.0) at step 4;")
    assert "checkpoints on disk are intact (newest: none written yet);" in first
    assert first.endswith("try a lower optimizer.lr, training.grad_clip or training.precision")
    assert f"(newest: {tmp_path / 'step_00000002'});" in str(
        out.error(4, tmp_path / "step_00000002")
    )
