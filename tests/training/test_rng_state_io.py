"""RNG capture/restore (python, numpy, torch, CUDA) and nested state to safetensors + JSON."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from craft.errors import CheckpointError, CraftError
from craft.training import rng as rng_mod
from craft.training.rng import capture_rng, restore_rng, seed_everything
from craft.training.state_io import (
    dedupe_shared,
    flatten_state,
    load_state,
    save_state,
    save_tensors,
    write_json,
)


def _draws() -> tuple[Any, ...]:
    """Draws that read every part of each generator's state, the cached Gaussians included."""
    return (
        random.gauss(0, 1), random.random(), np.random.standard_normal(), np.random.rand(),
        torch.rand(2).tolist(),
    )  # fmt: skip


@pytest.mark.parametrize("gauss_cached", [False, True])
def test_restore_rng_continues_every_generator_exactly(gauss_cached: bool) -> None:
    seed_everything(11)
    if gauss_cached:  # a Gaussian is cached by python (gauss) and by numpy (standard_normal)
        random.gauss(0, 1), np.random.standard_normal()
    state = capture_rng()
    expected = _draws()
    _draws(), seed_everything(99)
    restore_rng({k: v.clone() for k, v in state.items()})
    assert _draws() == expected


def test_seed_everything_seeds_each_generator_and_folds_large_seeds_for_numpy() -> None:
    seed_everything(5)
    a = _draws()
    seed_everything(5)
    assert _draws() == a
    for other in (6, 7):
        seed_everything(other)
        b = _draws()
        assert all(x != y for x, y in zip(a, b, strict=True)), other
    seed_everything(2**32 + 5)  # numpy takes 32-bit seeds: 2**32 + 5 seeds it like 5
    big = np.random.rand()
    seed_everything(5)
    assert np.random.rand() == big


def test_cuda_states_are_captured_and_restored_for_the_devices_present(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA branch, with the CUDA calls recorded (this machine has no GPU)."""
    restored: dict[int, torch.Tensor] = {}
    states = [torch.full((4,), i, dtype=torch.uint8) for i in (7, 8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.__setitem__(i, s))
    cpu = torch.get_rng_state()
    captured = capture_rng()
    assert torch.equal(captured["torch.cuda.0"], states[0])
    assert torch.equal(captured["torch.cuda.1"], states[1])
    captured["torch.cuda.2"] = torch.zeros(4, dtype=torch.int64)  # a device this host lacks
    captured["torch.cuda.1"] = captured["torch.cuda.1"].to(torch.int64)
    restore_rng(captured)
    assert sorted(restored) == [0, 1]
    assert all(s.dtype == torch.uint8 for s in restored.values())
    assert torch.equal(restored[1], states[1].to(torch.uint8))
    assert torch.equal(torch.get_rng_state(), cpu)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # no CUDA work yet: skip
    assert not any(k.startswith("torch.cuda") for k in rng_mod.capture_rng())


def test_nested_state_round_trips_with_types_and_dtypes(tmp_path: Path) -> None:
    t = torch.arange(6.0).view(2, 3)
    state = {
        "ints": {0: {"step": torch.tensor(3.0)}, 7: {"exp_avg": t}},
        "mixed": [1, 2.5, "s", None, True, (4, (5, t[0].clone()))],
        "np": {
            "u32": np.array([1, 2**32 - 1], dtype=np.uint32),
            "u64": np.array([2**40], dtype=np.uint64),
            "i32": np.array([-3], dtype=np.int32),
            "f32": np.float32(0.5),
            "i64": np.int64(9),
        },
        "empty": {},
    }
    save_state(tmp_path, "s", state, {"format": "x", "version": 2})
    back, meta = load_state(tmp_path, "s")
    assert meta == {"format": "x", "version": 2}
    assert list(back["ints"]) == [0, 7] and torch.equal(back["ints"][7]["exp_avg"], t)
    assert back["mixed"][:5] == [1, 2.5, "s", None, True] and back["mixed"][5][0] == 4
    assert isinstance(back["mixed"][5], tuple) and isinstance(back["mixed"][5][1], tuple)
    assert torch.equal(back["mixed"][5][1][1], t[0])
    for key in ("u32", "u64", "i32"):
        assert back["np"][key].dtype == state["np"][key].dtype
        assert back["np"][key].tolist() == state["np"][key].tolist()
    assert back["np"]["f32"] == 0.5 and type(back["np"]["f32"]) is float
    assert back["np"]["i64"] == 9 and type(back["np"]["i64"]) is int
    assert back["empty"] == {}
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["format"] == "x" and "state" in doc  # readable structure, no pickle
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "craft-state"}


def test_flatten_names_each_tensor_by_its_place_and_copies_it_to_the_cpu() -> None:
    tensors: dict[str, torch.Tensor] = {}
    t = torch.arange(4.0).view(2, 2).t()  # not contiguous
    out = flatten_state({"a": [t, {"b": t}]}, tensors, "root")
    assert set(tensors) == {"root/a/0", "root/a/1/b"}
    assert all(v.is_contiguous() and torch.equal(v, t) for v in tensors.values())
    assert out == {"a": [{"__tensor__": "root/a/0"}, {"b": {"__tensor__": "root/a/1/b"}}]}
    tensors.clear()  # a dict with other keys than strings, tuples and lists: named by position
    flatten_state({3: t, "t": (1, t), "l": [[t]]}, tensors)
    assert set(tensors) == {"/0", "/1/1", "/2/0/0"}
    with pytest.raises(TypeError, match=r"cannot store a object in a checkpoint \(at root/x\)"):
        flatten_state({"x": object()}, {}, "root")
    with pytest.raises(TypeError, match=r"\(at /\)"):
        flatten_state(object(), {})


def test_keys_with_slashes_never_share_a_tensor_name(tmp_path: Path) -> None:
    # "a/b" at the top and "b" inside "a" both read "/a/b" when names join keys with "/"
    state = {
        "a/b": torch.tensor([1.0]),
        "a": {"b": torch.tensor([2.0]), "~1": torch.tensor([3.0]), "/": torch.tensor([4.0])},
        "x": [torch.tensor([5.0])],
        "x/0": torch.tensor([6.0]),
    }
    tensors: dict[str, torch.Tensor] = {}
    flatten_state(state, tensors)
    assert len(tensors) == 6
    save_state(tmp_path, "s", state, {})
    back, _ = load_state(tmp_path, "s")
    assert back["a/b"].item() == 1.0 and back["a"]["b"].item() == 2.0
    assert back["a"]["~1"].item() == 3.0 and back["a"]["/"].item() == 4.0
    assert back["x"][0].item() == 5.0 and back["x/0"].item() == 6.0


def test_a_state_whose_tensor_names_collided_is_refused(tmp_path: Path) -> None:
    # what an earlier version wrote for {"a/b": t1, "a": {"b": t2}}: one name, two places
    save_tensors(
        tmp_path / "s.safetensors", {"/a/b": torch.tensor([2.0])}, {"format": "craft-state"}
    )
    ref = {"__tensor__": "/a/b"}
    write_json(tmp_path / "s.json", {"state": {"a/b": ref, "a": {"b": ref}}})
    with pytest.raises(CheckpointError, match=r"s\.json: .*'/a/b'.*more than one place"):
        load_state(tmp_path, "s")


def test_tensor_names_are_json_pointers() -> None:
    """Names escape "~" and "/" as JSON Pointer does (RFC 6901: "~0", "~1"), so other tools can
    map a name in the file back to its place in the state."""
    tensors: dict[str, torch.Tensor] = {}
    flatten_state({"a/b": torch.ones(1), "c~d": [torch.ones(1)], "e~1": torch.ones(1)}, tensors)
    assert set(tensors) == {"/a~1b", "/c~0d/0", "/e~01"}


def test_an_array_named_in_two_places_is_refused(tmp_path: Path) -> None:
    save_tensors(tmp_path / "s.safetensors", {"/a": torch.arange(3)}, {"format": "craft-state"})
    ref = {"__ndarray__": "/a", "dtype": "uint32"}
    write_json(tmp_path / "s.json", {"state": {"a": ref, "b": [ref]}})
    with pytest.raises(CheckpointError, match=r"'/a'.*more than one place"):
        load_state(tmp_path, "s")


def test_a_damaged_state_document_is_named(tmp_path: Path) -> None:
    save_state(tmp_path, "s", {"a": torch.ones(1)}, {})
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(CraftError) as e:
        load_state(tmp_path, "s")
    assert e.value.message.startswith(f"{tmp_path / 's.json'}: not valid JSON")


def test_write_json_keeps_key_order_and_ends_with_a_newline(tmp_path: Path) -> None:
    write_json(tmp_path / "t.json", {"step": 3, "a": "é"})
    text = (tmp_path / "t.json").read_text(encoding="utf-8")
    assert text == '{\n  "step": 3,\n  "a": "\\u00e9"\n}\n'


def test_dedupe_shared_keeps_one_name_per_view_and_clones_overlaps() -> None:
    base = torch.arange(12.0)
    state = {
        "emb": base.view(3, 4),
        "head": base.view(3, 4),  # the same view: an alias
        "half": base[:6],  # overlaps the same memory as another view: cloned
        "empty": torch.empty(0),
        "empty2": torch.empty(0),  # empty tensors hold no memory: never aliases of each other
        "meta": torch.empty(2, device="meta"),
        "meta2": torch.empty(2, device="meta"),  # no memory either: never aliases
        "other": torch.ones(2),
        "other2": torch.ones(2),  # the same view of other memory: not an alias
    }
    kept, aliases = dedupe_shared(state)
    assert aliases == {"head": "emb"}
    assert list(kept) == ["emb", "half", "empty", "empty2", "meta", "meta2", "other", "other2"]
    assert all(isinstance(kept[k], torch.Tensor) for k in kept)
    assert kept["meta2"].device.type == "meta" and kept["empty2"].numel() == 0
    assert kept["half"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert torch.equal(kept["half"], base[:6]) and kept["emb"] is not None
    transposed = {"a": base.view(3, 4), "b": base.view(3, 4).t()}  # same storage, other view
    kept, aliases = dedupe_shared(transposed)
    assert aliases == {} and torch.equal(kept["b"], base.view(3, 4).t())
    assert kept["b"].is_contiguous()


def test_a_state_whose_tensors_share_memory_is_saved(tmp_path: Path) -> None:
    """The same tensor in two places of a state (or a view of another) used to make safetensors
    refuse the whole checkpoint."""
    t = torch.arange(6.0)
    save_state(tmp_path, "s", {"best": t, "last": t, "head": t[:2]}, {})
    back, _ = load_state(tmp_path, "s")
    assert all(torch.equal(back[k], v) for k, v in {"best": t, "last": t, "head": t[:2]}.items())
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the caller's tensors are untouched
