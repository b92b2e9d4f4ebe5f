"""The benchmarks' baseline: nanoGPT's CPU setting and its learning-rate schedule, whatever the recipe."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from plain_loop import NANOGPT_CPU, PlainLoop  # noqa: E402

from craft.config import load_config  # noqa: E402


def nanogpt_get_lr(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """nanoGPT train.py's get_lr, written from its three cases."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_nanogpt_cpu_setting_ignores_the_recipes_own(tmp_path: Path) -> None:
    recipe = tmp_path / "other.toml"
    recipe.write_text(
        f'include = ["{REPO / "recipes" / "char_small.toml"}"]\n'
        "[optimizer]\nlr = 3e-3\nbetas = [0.9, 0.95]\nweight_decay = 0.0\n"
        "[scheduler]\nwarmup_steps = 7\nmin_lr = 0.0\n"
        "[training]\nmax_steps = 500\nbatch_size = 32\n"
        "[model]\nd_model = 64\nn_layer = 2\npositions = 'rope'\nnorm = 'rmsnorm'\nmlp = 'swiglu'\n"
    )
    cfg = load_config(str(recipe), NANOGPT_CPU)
    m, o, s, t = cfg.model, cfg.optimizer, cfg.scheduler, cfg.training
    assert (m.n_layer, m.n_head, m.d_model, m.block_size, m.dropout, m.bias) == (
        4, 4, 128, 64, 0.0, False
    )  # fmt: skip
    assert (m.positions, m.norm, m.mlp) == ("learned", "layernorm", "gelu")
    assert (o.lr, tuple(o.betas), o.weight_decay) == (1e-3, (0.9, 0.99), 0.1)
    assert (s.type, s.warmup_steps, s.min_lr) == ("cosine", 100, 1e-4)
    assert (t.max_steps, t.batch_size, t.grad_clip) == (2000, 12, 1.0)


@pytest.mark.parametrize("it", [0, 1, 50, 99, 100, 101, 1000, 1999, 2000, 2001, 2500, 4999])
def test_lr_is_nanogpts_get_lr_and_holds_min_lr_past_decay(it: int) -> None:
    cfg = SimpleNamespace(
        optimizer=SimpleNamespace(lr=1e-3),
        scheduler=SimpleNamespace(warmup_steps=100, min_lr=1e-4),
        training=SimpleNamespace(max_steps=2000),
    )
    loop = PlainLoop.__new__(PlainLoop)  # the schedule alone: no data, model or optimizer
    loop.cfg = cfg
    assert loop.lr(it) == pytest.approx(nanogpt_get_lr(it, 1e-3, 1e-4, 100, 2000), rel=1e-12)
