"""Trainer details that broke before: eval sharding, the run directory of a failed start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from craft.errors import DataError
from craft.training import checkpoint as ckpt
from craft.training.run import train
from craft.training.trainer import Trainer, eval_shard
from tests.training._helpers import tiny_config


@pytest.mark.parametrize("num_batches", [0, 1, 2, 3, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shard_covers_every_batch_once_with_equal_forward_counts(
    num_batches: int, world: int
) -> None:
    plans = [eval_shard(num_batches, r, world) for r in range(world)]
    # A sharded forward is a collective: every process must run the same number of them.
    assert len({len(p) for p in plans}) == 1
    counted = sorted(i for p in plans for i, c in p if c)
    assert counted == list(range(num_batches))  # each batch counted exactly once
    assert all(0 <= i < num_batches for p in plans for i, _ in p)


def test_failed_data_setup_leaves_no_run_directory(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, f"data.dir={tmp_path / 'missing'}", "data.source=''")
    with pytest.raises(DataError, match="not a prepared dataset"):
        train(cfg)
    runs = tmp_path / "outputs" / "micro"
    assert not runs.exists() or not any(runs.iterdir())


def test_train_log_starts_with_the_setup_records(tmp_path: Path) -> None:
    res = train(tiny_config(tmp_path, "training.max_steps=1"))
    text = (res.run_dir / "train.log").read_text()
    # Logged before the directory existed (model summary), then after it (run directory).
    assert text.index("model: gpt") < text.index("run directory:") < text.index("step 1/1")


def test_resume_auto_orders_same_second_runs_numerically(tmp_path: Path) -> None:
    for name in ("20260101-120000", "20260101-120000-9", "20260101-120000-10"):
        target = tmp_path / name / ckpt.CHECKPOINTS / ckpt.checkpoint_name(1)
        ckpt.commit_directory(
            target, lambda d: (d / "x").write_text("x"), kind="checkpoint", step=1
        )
    run, _ = ckpt.newest_run_with_checkpoint(tmp_path)
    assert run.name == "20260101-120000-10"


_SCRIPTED_VAL = {1: 5.0, 2: 4.0, 3: 1.0, 4: 3.0, 5: 2.0, 6: 3.5}


class _ScriptedEval(Trainer):
    """Validation losses fixed per step, so the `best` bookkeeping can be checked exactly."""

    def evaluate(self) -> float:
        val = _SCRIPTED_VAL[self.step]
        self.last_val_loss, self._evaluated_step = val, self.step
        self.best_val_loss = min(val, self.best_val_loss or val)
        self._last_eval_improved = val == self.best_val_loss
        return val


def test_keep_best_names_the_best_checkpoint_not_the_best_evaluation(tmp_path: Path) -> None:
    """Step 3's loss is the lowest but has no checkpoint; step 4's is the best one on disk."""
    cfg = tiny_config(
        tmp_path,
        "training.max_steps=6",
        "eval.interval=1",
        "checkpoint.interval=2",
        "checkpoint.keep_last=1",
        "checkpoint.keep_best=true",
    )
    res = _ScriptedEval(cfg).fit()
    root = res.run_dir / ckpt.CHECKPOINTS
    assert (root / ckpt.BEST).read_text().strip() == "step_00000004"
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [4, 6]


def test_tied_weights_offloaded_as_copies_are_stored_once(tmp_path: Path) -> None:
    """A GPU model's state offloaded to the CPU holds one copy per name; re-tied, one is stored."""
    emb = torch.nn.Embedding(8, 4)
    head = torch.nn.Linear(4, 8, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # what cpu_offload returns
    ckpt.save_model_weights(tmp_path / "m.safetensors", ckpt.retie_state(state, model))
    stored = ckpt.weight_shapes(tmp_path / "m.safetensors")
    assert set(stored) == {"0.weight", "1.weight"}
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["0.weight"]  # the tied head is an alias
    loaded = ckpt.load_model_weights(tmp_path / "m.safetensors")
    assert torch.equal(loaded["1.weight"], emb.weight.detach())
