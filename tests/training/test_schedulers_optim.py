"""Learning-rate schedules and optimizer parameter groups."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from craft.config import load_config
from craft.config.components import (
    AdamWConfig,
    ConstantSchedulerConfig,
    CosineSchedulerConfig,
    LinearSchedulerConfig,
    SGDConfig,
    WSDSchedulerConfig,
)
from craft.training.optim import build_adamw, build_sgd, param_groups
from craft.training.schedulers import (
    build_constant,
    build_cosine,
    build_linear,
    build_wsd,
    restore_scheduler,
    scheduler_state,
)


def _opt(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=lr)


def _lrs(sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_cosine_warmup_peak_and_floor() -> None:
    cfg = CosineSchedulerConfig(warmup_steps=10, min_lr=1e-4)
    lrs = _lrs(build_cosine(cfg, _opt(1e-3), max_steps=101), 102)  # lrs[k - 1]: step k's lr
    assert lrs[0] == pytest.approx(1e-3 / 11)
    assert lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)  # peak right after warmup
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway down the cosine
    assert lrs[100] == pytest.approx(1e-4) and lrs[99] > 1e-4  # floor at the last step
    assert lrs[101] == pytest.approx(1e-4)  # and after
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_linear_constant_and_wsd_shapes() -> None:
    lin = _lrs(build_linear(LinearSchedulerConfig(min_lr=0.0), _opt(1.0), 11), 11)
    assert lin[0] == pytest.approx(1.0) and lin[5] == pytest.approx(0.5) and lin[10] == 0.0
    const = _lrs(build_constant(ConstantSchedulerConfig(warmup_steps=3), _opt(2.0), 10), 6)
    assert const[:3] == pytest.approx([0.5, 1.0, 1.5]) and const[3:] == [2.0, 2.0, 2.0]
    wsd = _lrs(build_wsd(WSDSchedulerConfig(decay_fraction=0.2, min_lr=0.1), _opt(1.0), 10), 11)
    assert wsd[:8] == [1.0] * 8  # stable until the last 20% (2 of 10 steps)
    assert wsd[8] == pytest.approx(0.55) and wsd[9] == pytest.approx(0.1)  # last step: min_lr
    assert wsd[10] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("build", "cfg"),
    [
        (build_cosine, CosineSchedulerConfig(warmup_steps=3, min_lr=0.1)),
        (build_linear, LinearSchedulerConfig(warmup_steps=3, min_lr=0.1)),
        (build_wsd, WSDSchedulerConfig(warmup_steps=3, decay_fraction=0.5, min_lr=0.1)),
    ],
)
def test_decaying_schedules_reach_min_lr_on_the_last_step(build, cfg) -> None:
    """Step 1 trains at lr / (warmup + 1), step warmup + 1 at the peak, step max_steps at min_lr."""
    lrs = _lrs(build(cfg, _opt(1.0), 9), 9)  # lrs[k - 1]: the lr of training step k
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and lrs[-2] > 0.1


def test_restore_recomputes_lr_from_step_with_new_max_steps() -> None:
    cfg = CosineSchedulerConfig(warmup_steps=0, min_lr=0.0)
    s1 = build_cosine(cfg, _opt(1.0), max_steps=10)
    _lrs(s1, 5)
    s2 = build_cosine(cfg, _opt(1.0), max_steps=20)  # the run was extended
    restore_scheduler(s2, scheduler_state(s1), 5)
    assert s2.last_epoch == 5
    assert s2.optimizer.param_groups[0]["lr"] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 5 / 19))
    )
    assert s2.get_last_lr()[0] == s2.optimizer.param_groups[0]["lr"]


def test_weight_decay_only_on_matrices_and_tied_params_once() -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=True)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, torch.nn.LayerNorm(4), head)
    groups = param_groups(model, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and len(decay["params"]) == 1
    assert all(p.dim() < 2 for p in no_decay["params"]) and len(no_decay["params"]) == 3
    opt = build_adamw(AdamWConfig(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), model)
    assert not opt.defaults.get("fused")  # CPU parameters: no fused kernel
    assert opt.defaults["betas"] == (0.9, 0.99)
    sgd = build_sgd(SGDConfig(lr=0.1, weight_decay=0.01), model)
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.01, 0.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW needs CUDA")
def test_adamw_fused_on_cuda() -> None:
    model = torch.nn.Linear(4, 4).cuda()
    assert build_adamw(AdamWConfig(), model).defaults["fused"] is True


def test_recipes_validate() -> None:
    from tests.training._helpers import REPO

    for recipe in sorted((REPO / "recipes").glob("*.toml")):
        cfg = load_config(recipe)
        assert cfg.training.max_steps >= 1, recipe


def test_schedule_edges_min_lr_above_the_peak_and_decay_of_one_step() -> None:
    # min_lr above the peak: the floor is the peak (never an lr above the configured one)
    lrs = _lrs(build_cosine(CosineSchedulerConfig(min_lr=2.0), _opt(1.0), 5), 5)
    assert lrs == [1.0] * 5
    # warmup leaves one step: it runs at the peak (no division by an empty decay)
    lrs = _lrs(build_linear(LinearSchedulerConfig(warmup_steps=3, min_lr=0.1), _opt(1.0), 4), 5)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and lrs[4] == pytest.approx(0.1)
    # WSD whose warmup reaches into the decay window: the plateau starts after the warmup
    cfg = WSDSchedulerConfig(warmup_steps=8, decay_fraction=0.5, min_lr=0.2)
    lrs = _lrs(build_wsd(cfg, _opt(1.0), 10), 10)
    assert lrs[7] == pytest.approx(8 / 9) and lrs[8] == 1.0 and lrs[9] == pytest.approx(0.2)


def test_restore_gives_other_schedulers_their_saved_state() -> None:
    def step_lr(lr: float) -> torch.optim.lr_scheduler.StepLR:
        return torch.optim.lr_scheduler.StepLR(_opt(lr), step_size=2, gamma=0.5)

    s1 = step_lr(1.0)
    _lrs(s1, 5)
    state = json.loads(json.dumps(scheduler_state(s1)))  # what a checkpoint stores: JSON only
    s2 = step_lr(2.0)  # the config's peak lr changed in between: the new one is kept
    restore_scheduler(s2, state, 5)
    assert s2.last_epoch == 5 and s2.optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    assert s2.get_last_lr() == pytest.approx([0.25]) and s2.base_lrs == [2.0]
    assert _lrs(s2, 2) == _lrs(s1, 2)  # and it continues like the original
    cosine = build_cosine(CosineSchedulerConfig(), _opt(1.0), 10)
    assert "lr_lambdas" not in scheduler_state(cosine) and json.dumps(scheduler_state(cosine))


def test_wsd_whose_decay_rounds_to_one_step_decays_on_the_last_step_only() -> None:
    cfg = WSDSchedulerConfig(decay_fraction=0.1, min_lr=0.1)  # 0.1 x 10 steps: one step
    lrs = _lrs(build_wsd(cfg, _opt(1.0), 10), 10)
    assert lrs[:9] == [1.0] * 9 and lrs[9] == pytest.approx(0.1)
    cfg = WSDSchedulerConfig(decay_fraction=0.01, min_lr=0.1)  # rounds to 0: still one step
    assert _lrs(build_wsd(cfg, _opt(1.0), 10), 10) == lrs


def test_restoring_another_scheduler_checks_its_groups_and_takes_an_older_state() -> None:
    def step_lr(groups: int) -> torch.optim.lr_scheduler.StepLR:
        params = [[torch.nn.Parameter(torch.zeros(2))] for _ in range(groups)]
        opt = torch.optim.SGD([{"params": p} for p in params], lr=1.0)
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    one = step_lr(1)
    _lrs(one, 3)
    # a state saved with another number of parameter groups is refused, not applied in part
    with pytest.raises(ValueError):
        restore_scheduler(step_lr(2), scheduler_state(one), 3)
    # a state without `_last_lr` (nothing to take the lr from) leaves the built lr in place
    state = {k: v for k, v in scheduler_state(one).items() if k != "_last_lr"}
    fresh = step_lr(1)
    restore_scheduler(fresh, state, 3)
    assert fresh.last_epoch == 3 and fresh.optimizer.param_groups[0]["lr"] == 1.0


def test_a_warmup_of_one_step_and_a_group_at_lr_zero() -> None:
    lrs = _lrs(build_constant(ConstantSchedulerConfig(warmup_steps=1), _opt(1.0), 3), 3)
    assert lrs == [0.5, 1.0, 1.0]
    # a group at lr 0 (frozen) stays at 0 under every schedule, without a division by zero
    assert _lrs(build_cosine(CosineSchedulerConfig(min_lr=0.1), _opt(0.0), 3), 3) == [0.0] * 3


def test_the_floor_is_relative_to_the_initial_lr_of_an_already_scheduled_group() -> None:
    opt = _opt(1.0)
    _lrs(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), 1)  # lr now 0.5
    assert opt.param_groups[0]["initial_lr"] == 1.0 and opt.param_groups[0]["lr"] == 0.5
    lrs = _lrs(build_cosine(CosineSchedulerConfig(min_lr=0.1), opt, 3), 3)
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.1)
