"""The Trainer in-process on the CPU: exact resume, config changes, faults, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from craft.errors import CheckpointError, TrainingError
from craft.training import checkpoint as ckpt
from craft.training.precision import apply_auto_precision
from craft.training.run import train
from tests.training._helpers import PoisonAt, StopAt, tiny_config, train_losses

FAST = [
    "training.max_steps=12",
    "training.log_interval=1",
    "eval.interval=4",
    "checkpoint.interval=4",
    "checkpoint.keep_last=5",
]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def test_exact_resume_is_bitwise_identical(tmp_path: Path) -> None:
    """12 steps straight == 5 steps, resume, 4 more, resume again, finish (deterministic CPU).

    Dropout is on, so every step reads the torch RNG: a resume that does not restore it differs.
    """
    run = [*FAST, "model.dropout=0.2"]
    straight = train(tiny_config(tmp_path / "a", *run))
    first = train(tiny_config(tmp_path / "b", *run), callbacks=[StopAt(5)])
    assert first.status == "stopped" and first.step == 5
    second = train(tiny_config(tmp_path / "b", *run), resume="auto", callbacks=[StopAt(9)])
    assert second.run_dir == first.run_dir and second.step == 9
    third = train(tiny_config(tmp_path / "b", *run), resume="auto")
    assert third.status == "completed" and third.step == 12 and third.run_dir == first.run_dir

    a, b = train_losses(straight.run_dir), train_losses(third.run_dir)
    assert sorted(a) == list(range(1, 13)) and a == b  # bitwise: float equality, every step
    wa, wb = _weights(straight.last_checkpoint), _weights(third.last_checkpoint)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = load_file(str(straight.last_checkpoint / "optimizer.safetensors"))
    ob = load_file(str(third.last_checkpoint / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert straight.last_val_loss == third.last_val_loss


def test_resume_rejects_shape_change_and_reports_other_changes(tmp_path: Path) -> None:
    first = train(tiny_config(tmp_path, "training.max_steps=4", "checkpoint.interval=4"))
    with pytest.raises(CheckpointError, match=r"model shape.*model\.d_model: 16 -> 32"):
        train(tiny_config(tmp_path, "training.max_steps=8", "model.d_model=32"), resume="auto")
    resumed = train(
        tiny_config(tmp_path, "training.max_steps=6", "optimizer.lr=1e-3"),
        resume=str(first.last_checkpoint),
    )
    assert resumed.step == 6 and resumed.run_dir == first.run_dir
    log_text = (first.run_dir / "train.log").read_text()
    assert "optimizer.lr: 0.003 -> 0.001" in log_text
    assert "training.max_steps: 4 -> 6" in log_text
    lrs = [
        json.loads(line)["lr"]
        for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert max(lrs[-2:]) <= 1e-3  # the new peak lr is in effect after resuming


def test_non_finite_loss_stops_before_the_step_and_keeps_checkpoints(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, *FAST)
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\).*at step 7"):
        train(cfg, callbacks=[PoisonAt(6)])
    run_dir = next((tmp_path / "outputs" / "micro").iterdir())
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and latest.name == "step_00000004"
    assert all(torch.isfinite(t).all() for t in _weights(latest).values())
    model, _, _ = ckpt.load_model(run_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_outputs_export_and_load_model(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        "training.max_steps=6",
        "eval.interval=3",
        "checkpoint.interval=3",
        "checkpoint.keep_last=1",
        "checkpoint.keep_best=true",
        "logging.plot=true",
        "logging.sample_interval=6",
        "logging.sample_tokens=8",
        "training.grad_accum_steps=2",
    )
    res = train(cfg)
    names = {p.name for p in res.run_dir.iterdir()}
    assert {"config.toml", "metrics.jsonl", "train.log", "checkpoints", "model"} <= names
    assert (res.run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "sample at step 6" in (res.run_dir / "train.log").read_text()
    ck_root = res.run_dir / "checkpoints"
    kept = [s for s, _ in ckpt.complete_checkpoints(ck_root)]
    best = (ck_root / "best").read_text().strip()
    assert kept[-1] == 6 and len(kept) <= 2 and best in {"step_00000003", "step_00000006"}
    state = ckpt.read_trainer_state(res.last_checkpoint)
    assert state["tokens_seen"] == 6 * 2 * 4 * 16  # steps x accum x batch x block
    resolved, _ = apply_auto_precision(cfg)  # the run records what `auto` chose, and why
    assert state["config_hash"] == ckpt.config_hash(resolved)
    assert (
        f'precision_auto = "{resolved.training.precision_auto}"'
        in (res.run_dir / "config.toml").read_text()
    )
    assert (res.run_dir / "train.log").read_text().count("precision auto:") == 1
    ref = _weights(res.last_checkpoint)
    for path in (res.run_dir, res.last_checkpoint, res.export_dir):
        model, tok, loaded_cfg = ckpt.load_model(path)
        assert loaded_cfg.model == cfg.model and tok.vocab_size == model.vocab_size
        sd = model.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    with pytest.raises(CheckpointError, match="exported model"):
        train(cfg, resume=str(res.export_dir))


def test_early_stopping_stops_with_a_checkpoint_and_trackers_log(tmp_path: Path) -> None:
    # lr so small that validation loss cannot improve by more than rounding: patience 1 stops.
    cfg = tiny_config(
        tmp_path,
        "training.max_steps=40",
        "eval.interval=2",
        "checkpoint.interval=100",
        "training.early_stopping_patience=1",
        "optimizer.lr=1e-12",
        "scheduler.warmup_steps=0",
        'logging.trackers=["tensorboard"]',
    )
    res = train(cfg)
    assert res.status == "stopped" and res.step < 40 and res.step % 2 == 0
    assert list((res.run_dir / "tb").rglob("events.out.tfevents.*"))
    assert res.last_checkpoint is not None and res.last_checkpoint.name.endswith(f"{res.step:08d}")
    assert math.isfinite(res.best_val_loss)


def test_run_directory_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    from craft.errors import ConfigError
    from craft.training.trainer import _new_run_dir

    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(ConfigError, match=r"run\.output_dir: cannot create a run directory under"):
        _new_run_dir(tmp_path / "a_file" / "micro")
