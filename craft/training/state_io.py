"""Nested state (dicts, lists, tensors, numbers) to safetensors + JSON and back.

Optimizer state, data-sampler state and anything else with tensors inside is split into a flat
`{key: tensor}` map (saved with safetensors) and a JSON structure that refers to those keys, so a
checkpoint is readable without unpickling anything.

A tensor's key is its place in the structure: the dict keys and list indices on the way to it,
joined by "/", each with "~" written "~0" and "/" written "~1" (as in a JSON Pointer), so two
places never share a key ({"a/b": x} and {"a": {"b": y}} are "/a~1b" and "/a/b"). The structure
names the key of each tensor, so states written before keys were escaped load unchanged; one
whose keys collided (a key named in two places) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from craft.errors import CheckpointError
from craft.fileio import fsync_file, write_text_durable

TENSOR = "__tensor__"
NDARRAY = "__ndarray__"
TUPLE = "__tuple__"
ITEMS = "__items__"


def _part(key: Any) -> str:
    """One step of a tensor's key: "~" and "/" escaped, so joined steps stay unambiguous."""
    return str(key).replace("~", "~0").replace("/", "~1")


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Replace every tensor in `obj` by a reference into `tensors` (filled in place)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {TENSOR: path}
    if isinstance(obj, np.ndarray):
        dtype = str(obj.dtype)
        arr = obj.astype(np.int64) if obj.dtype in (np.uint32, np.uint64) else obj
        tensors[path] = torch.from_numpy(np.ascontiguousarray(arr).copy())
        return {NDARRAY: path, "dtype": dtype}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten_state(v, tensors, f"{path}/{_part(k)}") for k, v in obj.items()}
        return {
            ITEMS: [
                [k, flatten_state(v, tensors, f"{path}/{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {TUPLE: [flatten_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {path or '/'})")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`. A ValueError when two places name the same tensor (keys that
    collided when they were joined without escaping: one of the two tensors is lost)."""
    return _unflatten(obj, tensors, set())


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor], seen: set[str]) -> Any:
    if isinstance(obj, dict):
        ref = obj.get(TENSOR, obj.get(NDARRAY))
        if ref is not None:
            if ref in seen:
                raise ValueError(
                    f"tensor {ref!r} is named in more than one place (keys containing '/' that "
                    "collided when this state was written): the state is ambiguous"
                )
            seen.add(ref)
        if TENSOR in obj:
            return tensors[obj[TENSOR]]
        if NDARRAY in obj:
            return tensors[obj[NDARRAY]].numpy().astype(obj["dtype"])
        if TUPLE in obj:
            return tuple(_unflatten(v, tensors, seen) for v in obj[TUPLE])
        if ITEMS in obj:
            return {k: _unflatten(v, tensors, seen) for k, v in obj[ITEMS]}
        return {k: _unflatten(v, tensors, seen) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors, seen) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    write_text_durable(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors file, fsynced. A tensor whose memory an earlier one already uses (a view, or
    the same tensor referenced twice in a state) is stored as a copy; see `dedupe_shared` to
    store tied weights once instead."""
    save_file(_unshared(tensors), str(path), metadata=metadata)
    fsync_file(path)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every tensor that shares memory with an earlier one cloned
    (safetensors refuses to write tensors that share memory)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr and ptr in seen else t
        seen.add(ptr)
    return out


def save_state(directory: Path, stem: str, state: Any, meta: dict[str, Any]) -> None:
    """`<stem>.safetensors` with the tensors of `state` and `<stem>.json` with its structure."""
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten_state(state, tensors)
    save_tensors(directory / f"{stem}.safetensors", tensors, {"format": "craft-state"})
    write_json(directory / f"{stem}.json", {**meta, "state": structure})


def load_state(directory: Path, stem: str) -> tuple[Any, dict[str, Any]]:
    """Inverse of `save_state`: (state, the JSON document without `state`)."""
    from craft.safety import read_json_bounded

    doc = read_json_bounded(directory / f"{stem}.json", what=str(directory / f"{stem}.json"))
    tensors = load_file(str(directory / f"{stem}.safetensors"))
    structure = doc.pop("state")
    try:
        return unflatten_state(structure, tensors), doc
    except ValueError as e:
        raise CheckpointError(f"{directory / f'{stem}.json'}: {e}") from None


def dedupe_shared(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names whose tensor is the very same view as an earlier one (tied weights).

    Returns (tensors to save, {dropped name: kept name}). Tensors that overlap in memory without
    being the same view are cloned so safetensors can store them.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        if t.device.type == "meta" or t.numel() == 0:
            kept[name] = t.contiguous()
            continue
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in views:
            aliases[name] = views[key]
            continue
        views[key] = name
        if ptr in storages:
            t = t.clone()
        storages.add(ptr)
        kept[name] = t.contiguous()
    return kept, aliases
