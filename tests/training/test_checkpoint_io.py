"""Checkpoint files: state serialisation, tied weights, atomic commit, completeness, pruning."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
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


def test_config_changes_lists_keys_present_on_one_side_only() -> None:
    old = {"scheduler": {"type": "cosine", "min_lr": 0.0}, "model": {"d_model": 16}}
    new = {"scheduler": {"type": "wsd", "decay_fraction": 0.2}, "model": {"d_model": 16}}
    assert ckpt.config_changes(old, new) == [
        "scheduler.decay_fraction: '<unset>' -> 0.2",
        "scheduler.min_lr: 0.0 -> '<unset>'",
        "scheduler.type: 'cosine' -> 'wsd'",
    ]
    assert ckpt.config_changes(new, new) == []


def _rng_of_another_process() -> dict[str, torch.Tensor]:
    saved = capture_rng()
    random.random(), np.random.rand(), torch.rand(1)
    other = capture_rng()
    restore_rng(saved)
    return other


def test_each_rank_reads_back_its_own_rng_states(tmp_path: Path) -> None:
    ranks = [capture_rng(), _rng_of_another_process()]
    ck = ckpt.save_checkpoint(
        tmp_path / "checkpoints", 1, model_state={"w": torch.zeros(2)},
        optimizer_state={"state": {}, "param_groups": []}, rng_states=ranks,
        trainer_state={"step": 1}, config_toml="", tokenizer=None, keep_last=1,
    )  # fmt: skip
    for rank, saved in enumerate(ranks):
        back = ckpt.read_rng(ck, rank)
        assert back is not None, f"rank {rank}"
        torch.testing.assert_close(back, saved, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(ranks[0]["torch.cpu"], ranks[1]["torch.cpu"])
    assert ckpt.read_rng(ck, 2) is None  # a process that did not exist when it was saved


class _FailingTok(_Tok):
    def save(self, d: Path) -> list[str]:
        raise OSError(28, "No space left on device")


def test_a_checkpoint_that_fails_to_write_leaves_latest_and_older_ones(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    first = _save(root, 1, keep_last=1)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(
            root, 2, model_state={"w": torch.zeros(2)},
            optimizer_state={"state": {}, "param_groups": []}, rng_states=[capture_rng()],
            trainer_state={"step": 2}, config_toml="", tokenizer=_FailingTok(), keep_last=1,
        )  # fmt: skip
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert ckpt.latest_checkpoint(root) == first and ckpt.is_complete(first)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]


def test_a_checkpoint_is_on_disk_before_it_appears_and_before_latest_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests._disk_trace import DiskTrace

    root = tmp_path / "checkpoints"
    _save(root, 1)
    trace = DiskTrace(monkeypatch)
    final = _save(root, 2)
    i, tmp = trace.rename_to(final)
    assert tmp != final.resolve() and tmp.parent == root.resolve()
    files = [p.relative_to(final) for p in final.rglob("*") if p.is_file()]
    assert {"COMPLETE", "model.safetensors", "rng.safetensors", "trainer_state.json"} <= {
        str(f) for f in files
    }
    for rel in files:  # every file's data, then its directory entry, before the rename
        synced = trace.fsyncs_of(tmp / rel)
        assert synced and synced[-1] < i, f"{rel} not synced before it appeared"
        assert trace.fsynced_between(tmp / rel.parent, synced[-1], i), f"entry of {rel} not synced"
    assert trace.fsynced_between(root, i, None), "the rename itself is not made durable"
    j, _ = trace.rename_to(root / "latest")
    assert j > min(k for k in trace.fsyncs_of(root) if k > i), "latest moved before the rename"
    assert (root / "latest").read_text().strip() == final.name


def test_replacing_a_directory_keeps_the_old_one_until_the_new_one_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests._disk_trace import DiskTrace

    out = tmp_path / "model"
    ckpt.commit_directory(out, lambda d: (d / "w").write_text("old"), kind="export", step=1)
    trace = DiskTrace(monkeypatch)
    ckpt.commit_directory(out, lambda d: (d / "w").write_text("new"), kind="export", step=2)
    i, tmp = trace.rename_to(out)
    assert trace.fsynced_between(tmp / "w", -1, i)
    assert trace.fsynced_between(tmp / "COMPLETE", -1, i)
    durable = min(k for k in trace.fsyncs_of(tmp_path) if k > i)  # the swap reached the disk
    assert trace.removals() and min(trace.removals()) > durable, "old copy removed too early"
    assert (out / "w").read_text() == "new" and ckpt.read_marker(out)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old copy is gone

    def fail(d: Path) -> None:
        (d / "w").write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ckpt.commit_directory(out, fail, kind="export", step=3)
    assert (out / "w").read_text() == "new" and ckpt.is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _marked(directory: Path, files: object) -> Path:
    directory.mkdir(parents=True)
    (directory / "COMPLETE").write_text(json.dumps({"format": "craft-checkpoint", "files": files}))
    return directory


def test_a_marker_listing_a_file_outside_its_directory_is_named(tmp_path: Path) -> None:
    for i, rel in enumerate(["../secret", "/etc/passwd", "a/../../x"]):
        d = _marked(tmp_path / f"d{i}", {rel: 1})
        why = ckpt.unsafe_marker_path(d)
        assert why is not None and why.startswith(f"{d / 'COMPLETE'} lists a file that"), why
        assert not ckpt.is_complete(d)
    # what is not a doctored path: no marker, a marker that is not Craft's, a safe list
    assert ckpt.unsafe_marker_path(tmp_path) is None
    assert ckpt.unsafe_marker_path(_marked(tmp_path / "list", ["../x"])) is None
    (tmp_path / "arr").mkdir()
    (tmp_path / "arr" / "COMPLETE").write_text('["../x"]')
    assert ckpt.unsafe_marker_path(tmp_path / "arr") is None
    (tmp_path / "ok" / "sub").mkdir(parents=True)
    (tmp_path / "ok" / "sub" / "w").write_text("x")
    (tmp_path / "ok" / "COMPLETE").write_text(json.dumps({"files": {"sub/w": 1}}))
    assert ckpt.unsafe_marker_path(tmp_path / "ok") is None and ckpt.is_complete(tmp_path / "ok")
    assert not ckpt.is_complete(tmp_path / "arr") and not ckpt.is_complete(tmp_path / "d0" / "x")


def test_only_a_directory_craft_wrote_and_nothing_else_is_replaced(tmp_path: Path) -> None:
    def write(d: Path) -> None:
        (d / "w").write_text("new")

    outside = ckpt.commit_directory(tmp_path / "real", write, kind="export", step=1)
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    extra = ckpt.commit_directory(tmp_path / "extra", write, kind="export", step=1)
    (extra / "notes.txt").write_text("mine")
    cases = {
        "link": "is not a directory Craft wrote",
        "file": "is not a directory Craft wrote",
        "foreign": "has no COMPLETE marker of Craft's",
        "extra": r"holds files Craft did not write \(notes\.txt\)",
    }
    for name, why in cases.items():
        with pytest.raises(CheckpointError, match=why):
            ckpt.commit_directory(tmp_path / name, write, kind="export", step=2)
    assert (tmp_path / "link").is_symlink() and ckpt.read_marker(outside)["step"] == 1
    assert (tmp_path / "file").read_text() == "mine"
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    assert (extra / "notes.txt").read_text() == "mine" and ckpt.read_marker(extra)["step"] == 1


def test_prune_leaves_no_trace_and_an_interrupted_deletion_is_tidied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]

    from craft.training import checkpoint_dirs

    def crash(path: Path, marker: dict) -> None:
        (path / "model.safetensors").unlink()
        raise OSError("killed while deleting")

    monkeypatch.setattr(checkpoint_dirs, "_delete_listed", crash)
    with pytest.raises(OSError, match="killed"):
        _save(root, 4, keep_last=2)
    monkeypatch.undo()
    # the half-deleted checkpoint was moved aside first: it never looks complete or damaged
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert len(left) == 1 and left[0].startswith(".step_00000002.trash-"), left
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [3, 4]
    assert ckpt.scan_checkpoints(root)[1] == []
    assert [p.name for p in ckpt.clean_stale(root)] == left
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_replacing_a_directory_never_deletes_through_a_symlink_out_of_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()

    def write(d: Path) -> None:
        (d / "a").mkdir()
        (d / "a" / "x").write_text("1")
        (d / "b").write_text("2")

    out = ckpt.commit_directory(tmp_path / "model", write, kind="export", step=1)
    shutil.rmtree(out / "a")
    (out / "a").symlink_to(outside, target_is_directory=True)  # same name, now leads out
    (outside / "x").write_text("keep")
    ckpt.commit_directory(out, write, kind="export", step=2)
    assert (outside / "x").read_text() == "keep"
    assert ckpt.read_marker(out)["step"] == 2 and (out / "a" / "x").read_text() == "1"
    old = [p for p in tmp_path.iterdir() if p.name.startswith(".model.replaced-")]
    assert len(old) == 1 and sorted(p.name for p in old[0].iterdir()) == ["a"]  # b deleted


def test_clean_stale_tidies_each_kind_of_leftover_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    me = os.getpid()  # this process's own leftovers are stale (a predecessor's pid)

    def write(d: Path) -> None:
        (d / "w").write_text("x")
        (d / "sub").mkdir()
        (d / "sub" / "v").write_text("y")

    def leftover(name: str) -> Path:
        d = ckpt.commit_directory(root / "staging", write, kind="checkpoint", step=1)
        return d.rename(root / name)

    (root / "-notes").parent.mkdir(parents=True, exist_ok=True)
    (root / "-notes").write_text("mine")  # sorts before every leftover: not Craft's name
    (root / ".a.tmp-1").mkdir()  # a live writer's (pid 1 is alive), sorted first
    half = root / f".step_00000009.tmp-{me}"  # a write killed half-way: no marker
    half.mkdir()
    (half / "model.safetensors").write_text("partial")
    trash_done = leftover(f".step_00000001.trash-{me}-ab12")  # moved aside, then killed
    trash_foreign = leftover(f".step_00000002.trash-{me}")
    (trash_foreign / "notes.txt").write_text("mine")
    kept = ckpt.commit_directory(root / "step_00000003", write, kind="checkpoint", step=3)
    replaced = leftover(f".step_00000003.replaced-{me}")  # its replacement arrived
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "f").write_text("keep")
    (root / f".step_00000004.tmp-{me}").symlink_to(elsewhere, target_is_directory=True)
    (root / f".step_00000005.tmp-{me}").write_text("a file")

    removed = {p.name for p in ckpt.clean_stale(root)}

    assert removed == {
        half.name, trash_done.name, replaced.name, f".step_00000004.tmp-{me}",
        f".step_00000005.tmp-{me}",
    }  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == [
        "-notes", ".a.tmp-1", trash_foreign.name, "step_00000003",
    ]  # fmt: skip
    assert (elsewhere / "f").read_text() == "keep"  # the symlink, never what it points to
    assert sorted(str(p.relative_to(trash_foreign)) for p in trash_foreign.rglob("*")) == [
        "notes.txt"
    ]  # only what Craft listed was deleted
    assert ckpt.read_marker(kept)["step"] == 3


def test_commit_marks_what_it_wrote_and_stages_under_a_name_clean_stale_knows(
    tmp_path: Path,
) -> None:
    target = tmp_path / "out"
    target.mkdir()  # an empty directory is replaced
    staged: list[Path] = []

    def write(d: Path) -> None:
        staged.append(d)
        (d / "w").write_text("x")

    ckpt.commit_directory(target, write, kind="export", step=7)
    assert staged[0].parent == tmp_path
    assert staged[0].name.startswith(f".out.tmp-{os.getpid()}-")
    marker = json.loads((target / "COMPLETE").read_text())
    assert marker == {
        "format": "craft-checkpoint", "version": 1, "kind": "export", "step": 7,
        "files": {"w": 1},
    }  # fmt: skip
    # a marker of another format is not Craft's: incomplete, and never replaced
    other = _marked(tmp_path / "other", {"w": 1})
    (other / "w").write_text("x")
    assert ckpt.is_complete(other)
    (other / "COMPLETE").write_text(json.dumps({"format": "zip", "files": {"w": 1}}))
    assert ckpt.checkpoint_problem(other) == (
        "its COMPLETE marker is not one Craft wrote (unreadable, not valid JSON, listing no "
        "files or names outside the directory)"
    )
    (tmp_path / "a-file").write_text("x")
    assert ckpt.checkpoint_problem(tmp_path / "a-file") == "not a directory"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is not a directory Craft wrote"):
        ckpt.commit_directory(tmp_path / "dangling", write, kind="export", step=8)
    assert (tmp_path / "dangling").is_symlink()


def test_loading_weights_names_what_does_not_fit_and_refuses_non_finite_values(
    tmp_path: Path,
) -> None:
    path = tmp_path / "model.safetensors"
    lin = torch.nn.Linear(3, 2)
    ckpt.save_model_weights(path, {**lin.state_dict(), "extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"missing: \[\], unexpected: \['extra'\]"):
        ckpt.load_weights_into(torch.nn.Linear(3, 2), path)
    ckpt.save_model_weights(path, {"weight": lin.weight.detach()})
    with pytest.raises(CheckpointError, match=r"missing: \['bias'\], unexpected: \[\]"):
        ckpt.load_weights_into(torch.nn.Linear(3, 2), path)
    bad = lin.weight.detach().clone()
    bad[0, 0], bad[1, 2] = math.nan, -math.inf
    ckpt.save_model_weights(path, {"weight": bad, "bias": lin.bias.detach()})
    fresh = torch.nn.Linear(3, 2)
    before = fresh.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r": weight holds 2 non-finite value\(s\)"):
        ckpt.load_weights_into(fresh, path)
    assert torch.equal(fresh.weight, before)  # nothing loaded
    # integer buffers are not checked for finiteness; everything loads, values and dtypes
    m = torch.nn.Module()
    m.register_buffer("count", torch.tensor([3, -1]))
    m.register_buffer("w", torch.tensor([0.5], dtype=torch.float64))
    ckpt.save_model_weights(path, m.state_dict())
    m2 = torch.nn.Module()
    m2.register_buffer("count", torch.zeros(2, dtype=torch.int64))
    m2.register_buffer("w", torch.zeros(1, dtype=torch.float64))
    ckpt.load_weights_into(m2, path)
    assert m2.count.tolist() == [3, -1] and m2.w.tolist() == [0.5]
    assert ckpt.read_tensors(path, "weights")["w"].dtype == torch.float64
    path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read weights: "):
        ckpt.read_tensors(path, "weights")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read model weights: "):
        ckpt.stored_shapes(path)


def test_alias_metadata_must_name_stored_tensors_by_string(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    for aliases, why in [
        ('{"head.weight": 5}', "is not a JSON object of tensor names"),
        ("{not json", "is not a JSON object of tensor names"),
        ('{"head.weight": "gone"}', "ties 'head.weight' to 'gone', which the file does not hold"),
    ]:
        save_file({"emb.weight": torch.zeros(2)}, str(path), {"craft.aliases": aliases})
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: metadata .*{why}"):
            ckpt.load_model_weights(path)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: metadata .*{why}"):
            ckpt.stored_shapes(path)


def test_weights_files_say_they_hold_torch_tensors_and_retying_skips_absent_names(
    tmp_path: Path,
) -> None:
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    ckpt.save_model_weights(path, Tied().state_dict())
    with safe_open(str(path), framework="pt") as f:  # transformers expects "pt" here
        assert f.metadata()["format"] == "pt"
    head = torch.zeros(7, 4)
    state = {"head.weight": head}  # the first name of the tied pair is absent
    assert ckpt.retie_state(state, Tied()) == {"head.weight": head}
    assert state["head.weight"] is head
