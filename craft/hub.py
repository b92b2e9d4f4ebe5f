"""Where the files of a Hugging Face model come from: a local directory or a Hub id.

A local directory is read as it is. A Hub id (`gpt2`, `org/name`, optionally `@revision`) is
fetched through `huggingface_hub` into the standard Hugging Face cache, downloading only the config,
the safetensors weights and the tokenizer files (never pickles or code); `HF_HUB_OFFLINE=1` is
honoured. Every file is then resolved inside the model's own place: names that are absolute, hold
`..` or lead through a symlink to somewhere else are refused, so a downloaded directory cannot make
Craft read an unrelated file. A Hub snapshot's own place is its repository folder in the cache,
whose snapshot files are symlinks into that folder's `blobs/`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from craft.errors import CheckpointError

# What a Hub download may fetch: configs, safetensors weights (single or sharded), tokenizer files.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[\w.\-]{1,96})?(@[\w.\-/]{1,200})?$")


@dataclass(frozen=True)
class ModelFiles:
    """A directory of model files and the folder that nothing read from it may leave."""

    dir: Path
    root: Path
    source: str  # as the user wrote it (path or Hub id), for messages

    def file(self, name: str) -> Path:
        """`dir/name`, refusing names and symlinks that lead outside `root`."""
        rel = PurePosixPath(name.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or ":" in rel.parts[0]:
            raise CheckpointError(
                f"{self.dir}: refuses file name {name!r} (absolute or with '..'); a model "
                "directory may only name files inside itself"
            )
        path = self.dir.joinpath(*rel.parts)
        real = Path(os.path.realpath(path))
        if real != self.root and self.root not in real.parents:
            raise CheckpointError(
                f"{path}: is a link to {real}, outside {self.root}; refusing to read it"
            )
        return path

    def exists(self, name: str) -> bool:
        return self.file(name).is_file()


def local_files(path: str | Path) -> ModelFiles:
    """A local model directory; its own place is the directory itself."""
    p = Path(path).expanduser()
    return ModelFiles(dir=p, root=Path(os.path.realpath(p)), source=str(path))


def looks_like_hub_id(source: str) -> bool:
    """Whether `source` could be a Hub id (`name`, `org/name`, `...@revision`), not a path."""
    s = str(source)
    return (
        bool(_HUB_ID.match(s))
        and not s.startswith((".", "~"))
        and ".." not in s
        and not s.endswith((".toml", ".json", ".safetensors", ".bin"))
    )


def hub_files(source: str) -> ModelFiles:
    """Download (or find in the cache) the config, weights and tokenizer files of a Hub model."""
    repo_id, _, revision = source.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of Craft
        raise CheckpointError(
            f"{source}: reading a Hugging Face Hub id needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0", "false", "False")
    try:
        local = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=HUB_FILES,
            local_files_only=offline,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,  # read now, not at import
        )
    except Exception as e:  # huggingface_hub raises many types: offline, not found, gated, HTTP
        reason = _hub_reason(e, offline)
        raise CheckpointError(
            f"{source}: not a local directory, and the Hugging Face Hub id {repo_id!r} "
            f"cannot be fetched: {reason}"
        ) from None
    snap = Path(local)
    # <cache>/models--org--name/snapshots/<commit>/ -> files link into <cache>/models--org--name/blobs
    root = snap.parents[1] if snap.parent.name == "snapshots" else snap
    return ModelFiles(dir=snap, root=Path(os.path.realpath(root)), source=source)


def _hub_reason(e: Exception, offline: bool) -> str:
    name = type(e).__name__
    if offline or name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return "offline (HF_HUB_OFFLINE is set or the Hub cannot be reached) and it is not in the cache"
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return "no such model on the Hub (or it is private/gated: log in with `hf auth login`)"
    if name == "RevisionNotFoundError":
        return "no such revision"
    text = " ".join(str(e).split())
    return f"{name}: {text[:200]}" if text else name


def model_files(source: str | Path) -> ModelFiles:
    """The files of `source`: an existing local directory, else a Hub id."""
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: is a file; expected a model directory")
        return local_files(p)
    if looks_like_hub_id(str(source)):
        return hub_files(str(source))
    raise CheckpointError(f"{source}: not found (expected a model directory or a Hub id)")
