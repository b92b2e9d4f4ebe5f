"""Token datasets over memory-mapped `.bin` files, resumable samplers and the `data` builders.

A training batch is `block_size + 1` consecutive ids per row, drawn at random offsets: `x` is the
first `block_size`, `y` the last (shifted by one). Batch `i` of rank `r` is drawn from a generator
seeded by `(seed, r, i)`, so the sampler state is just `(seed, step)`: resuming reproduces exactly
the batches an uninterrupted run would have seen, each DDP rank draws its own stream, and the
state saved by any rank restores every rank.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft.data.prepare import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    UINT16_VOCAB_LIMIT,
    default_dataset_dir,
    first_id_at_least,
    is_prepared,
    prepare,
    tokenizer_fingerprint,
    tokenizer_matches,
)
from craft.data.tokenizers import Tokenizer, load_tokenizer
from craft.errors import CraftError, DataError
from craft.fileio import sha256_file
from craft.paths import cache_dir
from craft.safety import check_private, inside, read_json_bounded

SPLITS = ("train", "val")
SAMPLER_STATE_VERSION = 1
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}

Batch = tuple[torch.Tensor, torch.Tensor]  # x, y: (B, T) int64 each


# ---------------------------------------------------------------------------- prepared dataset


class PreparedDataset:
    """A prepared directory opened read-only: memmapped splits, meta.json and the tokenizer.

    Opening validates meta.json against the files (sizes, dtype, tokenizer artifacts and
    vocabulary), so a damaged or hand-edited dataset fails here with a one-line DataError rather
    than deep inside training.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.meta = _read_meta(self.path)
        self.dtype = np.dtype(_DTYPES[self.meta["dtype"]])
        self.vocab_size: int = self.meta["vocab_size"]
        self.tokenizer: Tokenizer = self._load_tokenizer()
        self._splits: dict[str, np.memmap] = {}
        for split in SPLITS:
            self._check_size(split)
        for split in SPLITS:
            self._check_ids(split)

    def _load_tokenizer(self) -> Tokenizer:
        where = f"{self.path / META_FILE}"
        files = self.meta["tokenizer"].get("files", {})
        if not isinstance(files, dict):
            raise DataError(f"{where}: tokenizer.files: expected an object of file name -> sha256")
        for name, digest in files.items():
            file = inside(self.path, name, what=f"{where}: tokenizer.files", error=DataError)
            if not file.is_file():
                raise DataError(f"{where}: tokenizer file {name} is missing from {self.path}")
            if sha256_file(file) != digest:
                raise DataError(
                    f"{where}: tokenizer file {name} does not match its recorded sha256; the "
                    "tokenizer was changed after preparation, prepare the dataset again"
                )
        try:
            tok = load_tokenizer(self.path)
        except CraftError as e:
            raise DataError(
                f"{self.path}: cannot load the dataset's tokenizer: {e.message}"
            ) from None
        if tok.type != self.meta["tokenizer"].get("type"):
            raise DataError(
                f"{where}: tokenizer type {self.meta['tokenizer'].get('type')!r} disagrees with "
                f"the saved tokenizer ({tok.type!r})"
            )
        if tok.vocab_size != self.vocab_size:
            raise DataError(
                f"{where}: vocab_size {self.vocab_size} disagrees with the saved tokenizer "
                f"({tok.vocab_size}); prepare the dataset again"
            )
        return tok

    def _check_size(self, split: str) -> None:
        info = self.meta["splits"][split]
        file = inside(
            self.path,
            info["file"],
            what=f"{self.path / META_FILE}: splits.{split}.file",
            error=DataError,
        )
        if not file.is_file():
            raise DataError(f"{self.path}: {info['file']} is missing (listed in {META_FILE})")
        expected = info["tokens"] * self.dtype.itemsize
        actual = file.stat().st_size
        if actual != expected:
            raise DataError(
                f"{file}: holds {actual} bytes but {META_FILE} says {info['tokens']} {self.dtype.name} "
                f"tokens ({expected} bytes); the dataset is incomplete or was modified, prepare it again"
            )

    def _check_ids(self, split: str) -> None:
        """Every id must index the vocabulary (one pass over the memmap; about 1 GB/s)."""
        info = self.meta["splits"][split]
        if info.get("max_id", -1) >= self.vocab_size:
            raise DataError(
                f"{self.path / META_FILE}: splits.{split}.max_id {info['max_id']} is outside the "
                f"vocabulary of {self.vocab_size} ids; prepare the dataset again"
            )
        ids = self.split(split)
        bad = first_id_at_least(ids, self.vocab_size)
        if bad is not None:
            file = self.path / info["file"]
            raise DataError(
                f"{file}: token id {int(ids[bad])} at position {bad:,} is outside the vocabulary "
                f"of {self.vocab_size} ids; the file was modified or written with another "
                "tokenizer, prepare the dataset again"
            )

    def split(self, name: str) -> np.memmap:
        """The ids of split `name` ('train' or 'val') as a read-only memmap, (N,)."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        if name not in self._splits:
            info = self.meta["splits"][name]
            self._splits[name] = np.memmap(
                self.path / info["file"], dtype=self.dtype, mode="r", shape=(info["tokens"],)
            )
        return self._splits[name]

    def num_tokens(self, name: str) -> int:
        return int(self.meta["splits"][name]["tokens"])

    def __repr__(self) -> str:
        return (
            f"PreparedDataset({str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"train={self.num_tokens('train')}, val={self.num_tokens('val')})"
        )


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not path.is_dir():
        raise DataError(f"{path}: prepared dataset directory not found")
    if not meta_path.is_file():
        raise DataError(
            f"{path}: not a prepared dataset (no {META_FILE}); prepare it with `craft data prepare`"
        )
    inside(path, META_FILE, what="dataset", error=DataError)
    meta = read_json_bounded(meta_path, what=str(meta_path), error=DataError)
    problems = _meta_problems(meta)
    if problems:
        raise DataError(f"{meta_path}: {problems[0]}")
    return meta


def _meta_problems(meta: Any) -> list[str]:
    if not isinstance(meta, dict):
        return ["expected a JSON object"]
    if meta.get("format") != FORMAT:
        return [f"format {meta.get('format')!r} is not {FORMAT!r}"]
    if meta.get("format_version") != FORMAT_VERSION:
        return [
            f"format_version {meta.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        ]
    if meta.get("dtype") not in _DTYPES:
        return [f"dtype {meta.get('dtype')!r}: expected one of {', '.join(_DTYPES)}"]
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        return [f"vocab_size {vocab!r}: expected a positive integer"]
    if meta["dtype"] == "uint16" and vocab > UINT16_VOCAB_LIMIT:
        return [f"dtype uint16 cannot hold the ids of a vocabulary of {vocab}"]
    if not isinstance(meta.get("tokenizer"), dict):
        return ["'tokenizer' is missing"]
    splits = meta.get("splits")
    for split in SPLITS:
        info = splits.get(split) if isinstance(splits, dict) else None
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("file"), str)
            or not isinstance(info.get("tokens"), int)
            or isinstance(info["tokens"], bool)
            or info["tokens"] < 0
            or "/" in info["file"]
        ):
            return [f"splits.{split}: expected {{file, tokens}}"]
        top = info.get("max_id")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < -1):
            return [f"splits.{split}.max_id {top!r}: expected an integer id"]
    sources = meta.get("sources", [])
    if not isinstance(sources, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("name"), str)
        and _is_int(s.get("bytes"))
        and isinstance(s.get("sha256"), str)
        for s in sources
    ):
        return ["sources: expected a list of {name, bytes (an integer), sha256}"]
    return []


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ------------------------------------------------------------------------------------ sampling


def batch_generator(seed: int, rank: int, step: int, salt: int = 0) -> np.random.Generator:
    """The generator of batch `step` on `rank`: independent of every other (seed, rank, step)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank, step, salt])))


def _to_batch(windows: np.ndarray) -> Batch:
    """(B, T+1) ids -> x (B, T), y (B, T), both int64 CPU tensors."""
    w = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class TokenSource:
    """Windows of `block_size + 1` ids from one split held in a 1-D array (usually a memmap)."""

    def __init__(self, data: np.ndarray, block_size: int) -> None:
        self.data = data
        self.block_size = block_size
        self.num_starts = data.shape[0] - block_size  # valid window starts: [0, n - T - 1]

    def sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        starts = rng.integers(0, self.num_starts, size=batch_size)
        return self.windows(starts)

    def windows(self, starts: np.ndarray) -> np.ndarray:
        """(len(starts), T+1) int64 windows starting at `starts`."""
        span = self.block_size + 1
        out = np.empty((len(starts), span), dtype=np.int64)  # (B, T+1)
        for row, s in enumerate(starts.tolist()):
            out[row] = self.data[s : s + span]  # reads only these pages of the memmap
        return out

    def eval_starts(self, count: int | None) -> np.ndarray:
        """Non-overlapping windows at stride block_size; `count` of them spread evenly, or all."""
        all_starts = np.arange(0, self.num_starts, self.block_size, dtype=np.int64)
        return all_starts[spread_evenly(all_starts.size, count)]


def spread_evenly(total: int, count: int | None) -> np.ndarray:
    """Indices of `count` items spread evenly over `total` (first and last included), or all of
    them when `count` is None or not smaller. The rule behind every fixed evaluation subset."""
    if count is None or count >= total:
        return np.arange(total, dtype=np.int64)
    return np.linspace(0, total - 1, count).round().astype(np.int64)


class RandomSource:
    """Uniform random ids in [0, vocab_size): data for throughput benchmarks."""

    def __init__(self, vocab_size: int, block_size: int) -> None:
        self.vocab_size = vocab_size
        self.block_size = block_size

    def sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        return rng.integers(0, self.vocab_size, size=(batch_size, self.block_size + 1))


class TrainBatches(Iterator[Batch]):
    """An endless, resumable iterator of training batches (x, y), each (B, T) int64.

    `state_dict()` is `{version, seed, step}`; `load_state_dict()` continues exactly where the
    saved iterator stopped (on any rank: the rank is not part of the state).
    """

    def __init__(
        self,
        sample: Callable[[np.random.Generator, int], np.ndarray],
        batch_size: int,
        seed: int,
        rank: int = 0,
        salt: int = 0,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size}: expected at least 1")
        if seed < 0:
            raise DataError(f"seed {seed}: expected a non-negative integer")
        self._sample = sample
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.salt = salt  # mixed into every generator (the random dataset's own seed)
        self.step = 0

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> Batch:
        windows = self._sample(
            batch_generator(self.seed, self.rank, self.step, self.salt), self.batch_size
        )
        self.step += 1
        return _to_batch(windows)

    def state_dict(self) -> dict[str, int]:
        return {"version": SAMPLER_STATE_VERSION, "seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ok = (
            isinstance(state, dict)
            and state.get("version") == SAMPLER_STATE_VERSION
            and all(
                isinstance(state.get(k), int)
                and not isinstance(state.get(k), bool)
                and state[k] >= 0
                for k in ("seed", "step")
            )
        )
        if not ok:
            raise DataError(
                f"sampler state {state!r}: expected {{'version': {SAMPLER_STATE_VERSION}, "
                "'seed': int >= 0, 'step': int >= 0}"
            )
        self.seed = int(state["seed"])
        self.step = int(state["step"])


class EvalBatches(Sequence[Batch]):
    """A fixed, deterministic sequence of evaluation batches, built lazily (memory stays small
    even when it covers a whole split). The last batch may be smaller than batch_size."""

    def __init__(self, make: Callable[[int, int], np.ndarray], num_windows: int, batch_size: int):
        self._make = make  # (first window, count) -> (count, T+1) ids
        self.num_windows = num_windows
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    def __getitem__(self, i: int) -> Batch:  # type: ignore[override]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"eval batch {i} out of range ({len(self)} batches)")
        first = i * self.batch_size
        return _to_batch(self._make(first, min(self.batch_size, self.num_windows - first)))

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self[i]


# ---------------------------------------------------------------------------------- DataModule


class DataModule:
    """What training needs from the data section: batches, the tokenizer and the vocabulary.

    `tokenizer` is None for the random dataset. `dir` is the prepared directory (None for random).
    """

    def __init__(
        self,
        *,
        train: TokenSource | RandomSource,
        val: TokenSource | RandomSource,
        tokenizer: Tokenizer | None,
        vocab_size: int,
        block_size: int,
        rank: int = 0,
        world_size: int = 1,
        dir: Path | None = None,
        dataset: PreparedDataset | None = None,
        eval_seed: int = 0,
    ) -> None:
        # eval_seed: seed of the random dataset (0 for prepared data, whose eval is not random)
        self.sources = {"train": train, "val": val}
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.rank = rank
        self.world_size = world_size
        self.dir = dir
        self.dataset = dataset
        self.eval_seed = eval_seed

    def train_batches(self, batch_size: int, seed: int) -> TrainBatches:
        """Endless random training batches for this rank; see `TrainBatches` for resuming."""
        return TrainBatches(
            self.sources["train"].sample, batch_size, seed, self.rank, salt=self.eval_seed
        )

    def eval_batches(
        self,
        split: str,
        batch_size: int,
        max_batches: int | None = None,
        *,
        windows: int | None = None,
    ) -> EvalBatches:
        """Fixed windows of `split` in batches of `batch_size`: `windows` windows spread evenly
        over the split (`max_batches * batch_size` when only `max_batches` is given), or every
        non-overlapping window when neither is. The windows depend on neither the batch size nor
        the rank, and are identical on every call."""
        if split not in self.sources:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if batch_size < 1 or any(n is not None and n < 1 for n in (max_batches, windows)):
            raise DataError(
                f"eval batches: batch_size {batch_size}, max_batches {max_batches} and windows "
                f"{windows} must be >= 1"
            )
        if windows is None and max_batches is not None:
            windows = max_batches * batch_size
        src = self.sources[split]
        if isinstance(src, RandomSource):
            split_id = SPLITS.index(split)

            def make_random(first: int, n: int) -> np.ndarray:
                rows = [
                    batch_generator(self.eval_seed, 1_000_000 + split_id, first + j).integers(
                        0, src.vocab_size, size=self.block_size + 1
                    )
                    for j in range(n)
                ]  # one generator per window: the same windows whatever the batching
                return np.stack(rows)

            return EvalBatches(make_random, windows or batch_size, batch_size)
        starts = src.eval_starts(windows)
        return EvalBatches(
            lambda first, n: src.windows(starts[first : first + n]), int(starts.size), batch_size
        )

    def num_tokens(self, split: str) -> int | None:
        src = self.sources[split]
        return int(src.data.shape[0]) if isinstance(src, TokenSource) else None

    def __repr__(self) -> str:
        where = f"dir={str(self.dir)!r}" if self.dir else "random"
        return f"DataModule({where}, vocab_size={self.vocab_size}, block_size={self.block_size})"


# ------------------------------------------------------------------------------------ builders


def open_prepared(
    path: str | Path | PreparedDataset, block_size: int, rank: int = 0, world_size: int = 1
) -> DataModule:
    """A DataModule over an existing prepared directory."""
    ds = path if isinstance(path, PreparedDataset) else PreparedDataset(path)
    sources = {}
    for split in SPLITS:
        n = ds.num_tokens(split)
        if n < block_size + 1:
            raise DataError(
                f"{ds.path}: the {split} split has {n} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; use a smaller block_size, more text or a larger val_fraction"
            )
        sources[split] = TokenSource(ds.split(split), block_size)
    return DataModule(
        train=sources["train"],
        val=sources["val"],
        tokenizer=ds.tokenizer,
        vocab_size=ds.vocab_size,
        block_size=block_size,
        rank=rank,
        world_size=world_size,
        dir=ds.path,
        dataset=ds,
    )


def build_tokens(
    cfg: Any,
    tokenizer_cfg: Any,
    *,
    block_size: int,
    rank: int = 0,
    world_size: int = 1,
    is_main: bool = True,
    wait: Callable[[], Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> DataModule:
    """Registry builder of `data.type = "tokens"`: open the prepared directory, preparing it first
    (main process only; the others wait) when it is missing and a source or files are given."""
    out = Path(cfg.dir).expanduser() if cfg.dir else default_dataset_dir(cfg, tokenizer_cfg)
    cached = not cfg.dir  # in CRAFT_HOME: checked, since it is used without being asked for
    try:
        if cached and is_main:
            cache_dir("datasets", error=DataError)
            if out.exists():
                check_private(out, what="cached dataset", error=DataError)
        if is_main and not is_prepared(out):
            if not cfg.source and not cfg.files:
                raise DataError(
                    f"data.dir = {cfg.dir!r}: not a prepared dataset (no {META_FILE}) and neither "
                    "data.source nor data.files is set to prepare one"
                )
            inputs = [cfg.source] if cfg.source else list(cfg.files)
            prepare(
                inputs,
                out,
                tokenizer_cfg,
                val_fraction=cfg.val_fraction,
                errors=cfg.errors,
                workers=workers,
                progress=progress,
                wait=True,  # another run preparing the same dataset: use its result
                text_field=cfg.text_field,
            )
    finally:
        if wait is not None:
            wait()
    if not is_main and not is_prepared(out):
        raise DataError(
            f"{out}: not a prepared dataset after the main process prepared it (rank {rank}); "
            "see the main process's error"
        )
    ds = PreparedDataset(out)
    if cached and is_main:
        verify_cached(ds, cfg)
    if not tokenizer_matches(ds.meta, tokenizer_cfg):
        where = f"data.dir = {cfg.dir!r}" if cfg.dir else str(out)
        raise DataError(
            f"{where}: prepared with tokenizer "
            f"{json.dumps(ds.meta['tokenizer'].get('fingerprint'), sort_keys=True)}, but the "
            f"recipe's tokenizer is {json.dumps(tokenizer_fingerprint(tokenizer_cfg), sort_keys=True)}; "
            "prepare it again (craft data prepare --force) or fix the tokenizer section"
        )
    return open_prepared(ds, block_size, rank=rank, world_size=world_size)


def verify_cached(ds: PreparedDataset, cfg: Any) -> None:
    """Check a dataset found in the cache against the hashes recorded when it was prepared.

    The token files must match their recorded sha256, and a named source's recorded sha256 must be
    that source's published one, so a dataset that was altered (or planted) is never trained on.
    """
    from craft.data.sources import get_source

    for split in SPLITS:
        info = ds.meta["splits"][split]
        digest = info.get("sha256")
        if digest is not None and sha256_file(ds.path / info["file"]) != digest:
            raise DataError(
                f"{ds.path}: {info['file']} does not match the sha256 recorded when it was "
                "prepared; the cached dataset was modified: delete it and run again"
            )
    if cfg.source:
        expected = get_source(cfg.source).sha256
        recorded = [s.get("sha256") for s in ds.meta.get("sources", [])]
        if recorded != [expected]:
            raise DataError(
                f"{ds.path / META_FILE}: sources do not record the published sha256 of "
                f"{cfg.source!r}; the cached dataset was not prepared from it: delete it and run "
                "again"
            )


def build_random(
    cfg: Any,
    tokenizer_cfg: Any = None,
    *,
    block_size: int,
    rank: int = 0,
    world_size: int = 1,
    is_main: bool = True,
    wait: Callable[[], Any] | None = None,
) -> DataModule:
    """Registry builder of `data.type = "random"`: uniform random ids, no tokenizer, no files."""
    src = RandomSource(cfg.vocab_size, block_size)
    return DataModule(
        train=src,
        val=src,
        tokenizer=None,
        vocab_size=cfg.vocab_size,
        block_size=block_size,
        rank=rank,
        world_size=world_size,
        eval_seed=cfg.seed,
    )
