"""`craft eval` / `craft generate` name the checkpoint they used and warn about one they skipped;
unusable weights and seeds are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from craft.config import from_dict, to_toml
from craft.config.components import CharTokenizerConfig
from craft.data.datasets import PreparedDataset
from craft.data.prepare import prepare
from craft.errors import CheckpointError
from craft.training import checkpoint as ckpt
from craft.training.builders import build_model
from craft.training.rng import capture_rng

TEXT = "".join(f"line {i}: pack my box with five dozen liquor jugs.\n" for i in range(200))


def _craft(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRAFT_DEBUG": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "craft", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose newest checkpoint (step 2) lost its marker; step 1 is intact."""
    root = tmp_path_factory.mktemp("choice")
    (root / "text.txt").write_text(TEXT)
    data = root / "data"
    prepare([root / "text.txt"], data, CharTokenizerConfig(), progress=False)
    tok = PreparedDataset(data).tokenizer
    cfg = from_dict(
        {
            "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 16},
            "data": {"dir": str(data)},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    run = root / "run"
    for step in (1, 2):
        ckpt.save_checkpoint(
            run / ckpt.CHECKPOINTS,
            step,
            model_state=model.state_dict(),
            optimizer_state={"state": {}, "param_groups": []},
            rng_states=[capture_rng()],
            trainer_state={"step": step},
            config_toml=to_toml(cfg),
            tokenizer=tok,
            keep_last=5,
        )
    (run / ckpt.CHECKPOINTS / "step_00000002" / "COMPLETE").unlink()
    return run


def test_eval_json_names_the_checkpoint_used_and_warns_about_the_skipped_one(run: Path) -> None:
    r = _craft("eval", "--checkpoint", str(run), "--json", "--windows", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["checkpoint"] == str(run / "checkpoints" / "step_00000001")
    assert out["windows"] == 3 and out["selection"] == "spread"
    skipped = run / "checkpoints" / "step_00000002"
    assert f"warning: skipped checkpoint {skipped}: no COMPLETE marker" in r.stderr
    assert skipped.is_dir()


def test_generate_names_the_checkpoint_used_and_warns_about_the_skipped_one(run: Path) -> None:
    r = _craft("generate", "--checkpoint", str(run), "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint: {run / 'checkpoints' / 'step_00000001'}" in r.stderr
    assert "warning: skipped checkpoint" in r.stderr and "step_00000002" in r.stderr


def test_non_finite_weights_are_a_checkpoint_error(run: Path, tmp_path: Path) -> None:
    model, tok, cfg = ckpt.load_model(run)
    state = model.state_dict()
    state["lm_head.weight"][3, 1] = float("nan")
    export = ckpt.write_export(
        tmp_path / "nan", model_state=state, config_toml=to_toml(cfg), tokenizer=tok, step=1
    )
    with pytest.raises(CheckpointError, match=r"holds 1 non-finite value\(s\)"):
        ckpt.load_model(export)
    r = _craft("generate", "--checkpoint", str(export), "--max-new-tokens", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "non-finite value(s) (NaN or inf)" in r.stderr.strip().splitlines()[-1]
    # Finite weights whose logits overflow: sampling meets NaN probabilities.
    state["lm_head.weight"][3, 1] = 0.0
    state["lm_head.weight"][5] = 3e38
    state["lm_head.weight"][6] = -3e38
    huge = ckpt.write_export(
        tmp_path / "huge", model_state=state, config_toml=to_toml(cfg), tokenizer=tok, step=1
    )
    r = _craft("generate", "--checkpoint", str(huge), "--max-new-tokens", "3", "--seed", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "next-token probabilities are not finite" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("seed", ["99999999999999999999999"])
def test_out_of_range_seed_is_a_usage_error(run: Path, seed: str) -> None:
    r = _craft("generate", "--checkpoint", str(run), "--seed", seed)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "--seed" in r.stderr
