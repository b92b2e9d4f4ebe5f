"""Checkpoint files: state serialisation, tied weights, atomic commit, completeness, pruning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from craft.errors import CheckpointError
from craft.training import checkpoint as ckpt
from craft.training.rng import capture_rng, restore_rng
from craft.training.state_io import flatten_state, load_state, save_state, unflatten_state


def test_state_roundtrip_keeps_types(tmp_path: Path) -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
        "groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": ["a.weight"]}],
        "np": np.arange(5, dtype=np.uint32),
        "none": None,
    }
    save_state(tmp_path, "s", state, {"format": "x"})
    back, meta = load_state(tmp_path, "s")
    assert meta == {"format": "x"}
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["groups"][0]["betas"] == (0.9, 0.99)
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    assert back["none"] is None
    tensors: dict[str, torch.Tensor] = {}
    assert unflatten_state(flatten_state([1, "a"], tensors), tensors) == [1, "a"]
    with pytest.raises(TypeError):
        flatten_state({"x": object()}, {})


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight


def test_tied_weights_stored_once_and_restored(tmp_path: Path) -> None:
    m = Tied()
    path = tmp_path / "model.safetensors"
    ckpt.save_model_weights(path, m.state_dict())
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {"emb.weight"}
    assert ckpt.weight_shapes(path) == {"emb.weight": (7, 4), "head.weight": (7, 4)}
    m2 = Tied()
    ckpt.load_weights_into(m2, path)
    assert torch.equal(m2.head.weight, m.emb.weight)
    assert m2.head.weight is m2.emb.weight  # still tied after loading


def test_shape_mismatch_names_the_parameter(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    ckpt.save_model_weights(path, torch.nn.Linear(3, 2).state_dict())
    with pytest.raises(CheckpointError, match=r"weight has shape \(2, 3\).*\(4, 3\)"):
        ckpt.load_weights_into(torch.nn.Linear(3, 4), path)


class _Tok:
    def save(self, d: Path) -> list[str]:
        (Path(d) / "tokenizer.json").write_text("{}")
        return ["tokenizer.json"]


def _save(root: Path, step: int, keep_last: int = 10, protect: set[str] | None = None) -> Path:
    return ckpt.save_checkpoint(
        root,
        step,
        model_state={"w": torch.full((2,), float(step))},
        optimizer_state={"state": {}, "param_groups": []},
        rng_states=[capture_rng()],
        trainer_state={"step": step},
        config_toml="",
        tokenizer=_Tok(),
        keep_last=keep_last,
        protect=protect,
    )


def test_commit_marker_latest_and_prune(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step, keep_last=2, protect={"step_00000001"})
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["step_00000001", "step_00000002", "step_00000003"]  # 1 is protected
    _save(root, 4, keep_last=2)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [3, 4]
    assert (root / "latest").read_text().strip() == "step_00000004"
    marker = json.loads((root / "step_00000004" / "COMPLETE").read_text())
    assert marker["step"] == 4 and "model.safetensors" in marker["files"]


def test_incomplete_or_corrupt_checkpoints_are_never_loaded(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    good = _save(root, 5)
    # A newer checkpoint whose marker is missing (killed mid-write) ...
    bad = _save(root, 6)
    (bad / "COMPLETE").unlink()
    # ... and one whose file was truncated after the marker was written.
    trunc = _save(root, 7)
    with open(trunc / "model.safetensors", "r+b") as f:
        f.truncate(10)
    assert ckpt.latest_checkpoint(root) == good
    assert ckpt.resolve_checkpoint(tmp_path / "run") == good
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint \(no COMPLETE marker"):
        ckpt.resolve_checkpoint(bad)
    with pytest.raises(
        CheckpointError, match=r"incomplete checkpoint \(model\.safetensors holds 10 "
    ):
        ckpt.resolve_checkpoint(trunc)
    # Damaged checkpoints are skipped, never removed (tests/training/test_run_safety.py).


def _scramble_header(path: Path) -> None:
    """Overwrite the start of a safetensors file, keeping its size (the marker still matches)."""
    data = bytearray(path.read_bytes())
    data[8:20] = b"{" * 12
    path.write_bytes(bytes(data))


def test_corrupt_tensor_files_of_a_complete_checkpoint_are_checkpoint_errors(
    tmp_path: Path,
) -> None:
    ck = _save(tmp_path / "checkpoints", 1)
    for name in ("model.safetensors", "rng.safetensors"):
        _scramble_header(ck / name)
    assert ckpt.resolve_checkpoint(ck) == ck  # sizes match: only reading finds the damage
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read model weights"):
        ckpt.weight_shapes(ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"rng\.safetensors: cannot read RNG states"):
        ckpt.read_rng(ck, 0)
    (ck / "trainer_state.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"trainer_state\.safetensors: cannot read"):
        ckpt.read_trainer_tensors(ck)


@pytest.mark.parametrize("doc", ["[]", "{}", '{"step": "x"}', '{"step": true}', '{"step": -3}'])
def test_trainer_state_without_an_integer_step_is_a_checkpoint_error(
    tmp_path: Path, doc: str
) -> None:
    ck = _save(tmp_path / "checkpoints", 1)
    (ck / "trainer_state.json").write_text(doc)
    with pytest.raises(CheckpointError, match="expected a JSON object with an integer 'step'"):
        ckpt.read_trainer_state(ck)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def boom(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.commit_directory(tmp_path / "step_00000001", boom, kind="checkpoint", step=1)
    assert list(tmp_path.iterdir()) == []


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a run, checkpoint or exported model"):
        ckpt.resolve_checkpoint(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "run")


def test_rng_roundtrip() -> None:
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_config_changes_lists_dotted_keys() -> None:
    old = {"training": {"max_steps": 10, "batch_size": 4}, "model": {"d_model": 16}}
    new = {"training": {"max_steps": 20, "batch_size": 4}, "model": {"d_model": 16}}
    assert ckpt.config_changes(old, new) == ["training.max_steps: 10 -> 20"]
