"""FSDP2 through Craft's own path on two CPU processes (gloo): train, a full checkpoint, resume;
and the launches that would fall back silently (FSDP not applied, fewer processes than asked,
fp16 on the CPU) refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from craft.errors import ConfigError
from craft.training import checkpoint as ckpt
from craft.training.run import train
from craft.training.runtime import check_world_size, launch_processes
from tests.training._helpers import MICRO, REPO, TINY, tiny_config

pytestmark = pytest.mark.slow

# What `accelerate launch --config_file configs/accelerate/fsdp.yaml` puts in the environment.
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}

# Both processes train 4 steps, then resume the run to 6 (two Trainers in one launch: one start-up).
_SCRIPT = """
import sys
from craft.config import load_config
from craft.training.run import train
recipe, *overrides = sys.argv[1:]
train(load_config(recipe, [*overrides, "training.max_steps=4"]))
train(load_config(recipe, [*overrides, "training.max_steps=6"]), resume="auto")
"""

STEPS = ["model.n_layer=2", "checkpoint.interval=2", "eval.interval=2"]


def test_fsdp2_on_two_cpu_processes_trains_saves_full_checkpoints_and_resumes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "fsdp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **FSDP_ENV}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--no-python", sys.executable, "-c", _SCRIPT,
        str(MICRO), *TINY, *STEPS, f"run.output_dir={out}",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = (out / "micro").iterdir()
    log = (run_dir / "train.log").read_text()
    # The distributed type obtained is logged, for the first run and for the resumed one.
    assert log.count("distributed: FSDP2 (fully_shard) over 2 processes (gloo) on cpu") == 2
    assert "resuming from" in log and "(step 4)" in log

    # Full (unsharded) checkpoints: they load in one process, every tensor at its full shape.
    final = ckpt.latest_checkpoint(run_dir / "checkpoints")
    state = ckpt.read_trainer_state(final)
    assert state["step"] == 6 and state["world_size"] == 2
    model, _, _ = ckpt.load_model(final)
    single = train(tiny_config(tmp_path / "single", *STEPS, "training.max_steps=4",
                               "training.batch_size=8", "eval.batches=1"))  # fmt: skip
    reference = ckpt.weight_shapes(single.last_checkpoint / "model.safetensors")
    assert ckpt.weight_shapes(final / "model.safetensors") == reference
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()}.keys() >= reference.keys()

    # Every step logged once across the resume; the two-process loss tracks one process with
    # the same global batch (2 x 4 sequences), as DDP does.
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    val4 = [r["val_loss"] for r in records if r["split"] == "val" and r["step"] == 4]
    assert len(val4) == 1 and abs(val4[0] - single.last_val_loss) < 0.05


@pytest.mark.parametrize(
    ("argv", "asked"),
    [
        (["/usr/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "x"], "2"),
        (["python", "-m", "accelerate.commands.launch", "--num-processes=3", "x.py"], "3"),
        (["/usr/bin/accelerate", "launch", "--cpu", "-m", "x"], None),
        (["torchrun", "--nproc_per_node", "2", "-m", "x", "--num_processes", "2"], None),
    ],
)
def test_accelerate_launch_process_count_is_read_from_its_command_line(
    argv: list[str], asked: str | None
) -> None:
    # `accelerate launch --cpu --num_processes 2` starts one process and tells it nothing about
    # the count: the child reads its parent's command line (checked by hand with the real launcher).
    assert launch_processes(argv) == asked


def test_world_size_that_did_not_materialise_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="WORLD_SIZE 4 asked for 4 processes but 2 started"):
        check_world_size(2)
    check_world_size(4)


def test_fsdp_requested_on_one_process_is_refused_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in FSDP_ENV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=r"FSDP was requested .* but only 1 process runs"):
        train(tiny_config(tmp_path, "training.max_steps=1"))
    assert not (tmp_path / "outputs").exists()


def test_fp16_on_the_cpu_is_refused_suggesting_bf16(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match="fp16 mixed precision needs a GPU; on the CPU use 'bf16'"
    ):
        train(tiny_config(tmp_path, "training.precision=fp16", "training.max_steps=1"))
    assert not (tmp_path / "outputs").exists()
