"""Streaming dataset preparation: text files -> tokenizer -> `train.bin`, `val.bin`, `meta.json`.

JSON Lines and Parquet inputs (one document per record) are read by `craft/data/readers.py` into
the same chunks, with a separator after every document.

Memory stays bounded whatever the input size: files are read and decoded in chunks (cut after a
newline so that every tokenizer encodes a chunk exactly as it would encode the whole text), chunks
are encoded by a pool of worker processes with a bounded window of chunks in flight, and ids are
appended to a file. Everything is written into a hidden temporary directory next to the output,
fsynced, and renamed into place at the end, so an interrupted run never leaves a directory that
loads as a dataset. The validation split is the last `val_fraction` of the token stream.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from craft.data.progress import ByteProgress, quiet
from craft.data.readers import TEXT_SEPARATOR, RecordReader, encode_chunk, record_format
from craft.data.sources import is_source, resolve_source
from craft.data.tokenizers import Tokenizer, load_tokenizer
from craft.errors import DataError, TokenizerError
from craft.fileio import (
    atomic_write_json,
    exclusive_lock,
    fsync_dir,
    pid_alive,
    sha256_file,
    storage_error,
)
from craft.safety import (
    check_output_location,
    owned_entries,
    read_json_bounded,
    remove_owned,
    unique_sibling,
)

META_FILE = "meta.json"
FORMAT = "craft-tokens"
FORMAT_VERSION = 1
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".tex")
CHUNK_BYTES = 1 << 20  # bytes read per chunk
UINT16_VOCAB_LIMIT = 1 << 16  # ids 0..65535 fit uint16
_COPY_BLOCK = 1 << 24
SCAN_BLOCK = 1 << 24  # ids per block when scanning a split for its largest id
_TMP_MARK = ".preparing-"


@dataclass(frozen=True)
class InputFile:
    """One text file to prepare; `label` names it in messages and meta.json."""

    path: Path
    size: int
    label: str


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_VOCAB_LIMIT else np.dtype(np.uint32)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------- inputs


def _file_input(path: Path, label: str) -> InputFile:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{label}: cannot read ({e.strerror})") from None
    return InputFile(path=path, size=size, label=label)


def _dir_files(path: Path) -> list[Path]:
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and (p.suffix.lower() in TEXT_SUFFIXES or record_format(p) is not None)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(
            f"{path}: directory holds no text files (looked for {', '.join(TEXT_SUFFIXES)}, "
            ".jsonl[.gz], .json.gz, .parquet; hidden files skipped)"
        )
    return files


def resolve_inputs(inputs: Sequence[str | Path]) -> list[InputFile]:
    """Expand named sources, files, directories (recursive, text suffixes) and globs, in order."""
    if not inputs:
        raise DataError(
            "no input given; pass --input PATH (a file, directory, glob or source name)"
        )
    out: list[InputFile] = []
    seen: set[Path] = set()

    def add(path: Path, label: str) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(_file_input(path, label))

    for item in inputs:
        text = str(item)
        if not text.strip():  # Path("") is the working directory: never read it by accident
            raise DataError(f"input {text!r}: empty path")
        path = Path(text).expanduser()
        if path.is_file():
            add(path, text)
        elif path.is_dir():
            for p in _dir_files(path):
                add(p, str(p))
        elif any(c in text for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise DataError(f"{text}: glob matches no files")
            for p in files:
                add(p, str(p))
        elif not isinstance(item, Path) and is_source(text):
            add(resolve_source(text), text)
        elif path.exists():
            raise DataError(f"{text}: not a regular file or directory")
        else:
            raise DataError(f"{text}: no such file, directory or named source")
    if sum(f.size for f in out) == 0:
        names = ", ".join(f.label for f in out[:5])
        raise DataError(f"input is empty: {names} contain no text")
    return out


def iter_file_chunks(
    f: InputFile,
    errors: str = "strict",
    chunk_bytes: int = CHUNK_BYTES,
    hasher: Any = None,
) -> Iterator[tuple[str, int]]:
    """Yield `(text, raw_bytes)` chunks of one file, each ending after a newline when possible.

    Cutting after a newline (or, for a very long line, before a space) keeps the chunks safe for
    every tokenizer; `raw_bytes` adds up to the file size (for progress). A leading BOM is dropped.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    carry, offset, pending_bytes, first = "", 0, 0, True
    max_carry = max(chunk_bytes, 1024)
    with open(f.path, "rb") as fh:
        while True:
            raw = fh.read(chunk_bytes)
            final = not raw
            if hasher is not None and raw:
                hasher.update(raw)
            held = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                at = offset - held + e.start
                raise DataError(
                    f"{f.label}: not valid UTF-8 at byte offset {at} ({e.reason}); fix the file "
                    "or replace bad bytes with U+FFFD (--errors replace, data.errors = 'replace')"
                ) from None
            offset += len(raw)
            pending_bytes += len(raw)
            if first and text:
                text = text.removeprefix("\ufeff")
                first = False
            buf = carry + text
            if final:
                if buf or pending_bytes:
                    yield buf, pending_bytes
                return
            cut = buf.rfind("\n") + 1
            if cut == 0 and len(buf) > max_carry:
                # a very long line: cut before a space (pieces start at spaces), else anywhere
                cut = buf.rfind(" ", len(buf) // 2)
                cut = cut if cut > 0 else len(buf)
            if cut == 0:
                carry = buf
                continue
            yield buf[:cut], pending_bytes
            carry, pending_bytes = buf[cut:], 0


def input_chunks(
    f: InputFile,
    errors: str,
    chunk_bytes: int,
    records: RecordReader,
    hasher: Any = None,
) -> Iterator[tuple[Any, int]]:
    """Chunks of a text file, or of a JSON Lines / Parquet file (craft/data/readers.py)."""
    if record_format(f.path) is not None:
        return records.chunks(f, chunk_bytes, hasher)
    # `skip` is about records; a text file has none, so bad bytes there stay an error
    return iter_file_chunks(f, "strict" if errors == "skip" else errors, chunk_bytes, hasher)


class TextStream:
    """Re-iterable text chunks of all inputs, read lazily (a tokenizer that needs no text never
    reads it); each full pass shows a progress bar. Records are joined with a blank line."""

    def __init__(
        self,
        files: Sequence[InputFile],
        errors: str,
        chunk_bytes: int,
        label: str,
        text_field: str = "text",
    ) -> None:
        self.files, self.errors, self.chunk_bytes, self.label = files, errors, chunk_bytes, label
        self.text_field = text_field

    def __iter__(self) -> Iterator[str]:
        records = RecordReader(self.text_field, self.errors, TEXT_SEPARATOR)
        with ByteProgress(self.label, sum(f.size for f in self.files)) as bar:
            for f in self.files:
                for text, n in input_chunks(f, self.errors, self.chunk_bytes, records):
                    bar.advance(n)
                    yield text


# ---------------------------------------------------------------------------------- tokenizer


def _sp_model_path(model: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"tokenizer.model = {model!r}: SentencePiece model file not found")
    return path


def tokenizer_fingerprint(cfg: Any) -> dict[str, Any]:
    """What determines the ids a tokenizer config produces (a given model file counts by its
    sha256, not its path). Stored in meta.json and hashed into default dataset directory names.
    A tokenizer config may define `fingerprint()` to say this itself."""
    own = getattr(cfg, "fingerprint", None)
    if callable(own):
        return own()
    data = cfg.model_dump(mode="json")
    if data.get("type") == "sentencepiece" and data.get("model"):
        return {"type": "sentencepiece", "model_sha256": sha256_file(_sp_model_path(data["model"]))}
    return data


def tokenizer_matches(meta: dict[str, Any], cfg: Any) -> bool:
    """Whether a prepared dataset's tokenizer is the one `cfg` describes."""
    tok = meta.get("tokenizer", {})
    fp = tokenizer_fingerprint(cfg)
    if fp == tok.get("fingerprint"):
        return True
    sha = fp.get("model_sha256")
    return sha is not None and sha == tok.get("config", {}).get("model_sha256")


def build_tokenizer(cfg: Any, texts: Iterable[str] | None, workdir: Path | None) -> Tokenizer:
    """Build the tokenizer of `cfg` through the registry (plugins included)."""
    from craft.config import registry

    if cfg.model_dump().get("type") == "sentencepiece" and getattr(cfg, "model", None):
        path = Path(cfg.model).expanduser()
        if path.is_dir():
            tok = load_tokenizer(path)
            if tok.type != "sentencepiece":
                raise TokenizerError(
                    f"tokenizer.model = {cfg.model!r}: holds a {tok.type} tokenizer"
                )
            return tok
    return registry.build("tokenizer", cfg, texts, workdir)


# ------------------------------------------------------------------------------------- encode

_WORKER_TOKENIZER: Tokenizer | None = None
_WORKER_DTYPE: np.dtype | None = None


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    global _WORKER_TOKENIZER, _WORKER_DTYPE
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)
    _WORKER_DTYPE = np.dtype(dtype)


def _encode_in_worker(text: Any) -> bytes:
    assert _WORKER_TOKENIZER is not None and _WORKER_DTYPE is not None
    return encode_chunk(_WORKER_TOKENIZER, text).astype(_WORKER_DTYPE).tobytes()


def _encode_stream(
    tokenizer: Tokenizer,
    tokenizer_dir: Path,
    chunks: Iterable[tuple[Any, int]],
    dtype: np.dtype,
    workers: int,
    out: Any,
    bar: ByteProgress,
) -> int:
    """Encode chunks in order and append the ids to `out`; returns the number of tokens."""
    n_tokens = 0
    if workers <= 1:
        for text, nbytes in chunks:
            ids = encode_chunk(tokenizer, text).astype(dtype)
            out.write(ids.tobytes())
            n_tokens += ids.size
            bar.advance(nbytes)
        return n_tokens
    import multiprocessing as mp
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: safe whatever threads the parent runs (torch, accelerate); workers load the saved
    # tokenizer artifacts. At most 2 chunks per worker are in flight, so memory stays bounded.
    pending: deque[tuple[Future[bytes], int]] = deque()
    executor = ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(tokenizer_dir), dtype.str),
    )

    def drain_one() -> None:
        nonlocal n_tokens
        future, nbytes = pending.popleft()
        data = future.result()
        out.write(data)
        n_tokens += len(data) // dtype.itemsize
        bar.advance(nbytes)

    try:
        for text, nbytes in chunks:
            pending.append((executor.submit(_encode_in_worker, text), nbytes))
            if len(pending) >= 2 * workers:
                drain_one()
        while pending:
            drain_one()
    except BrokenProcessPool as e:
        raise DataError(
            f"an encoding worker process died ({e}); rerun with --workers 1 to encode in-process"
        ) from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return n_tokens


# ------------------------------------------------------------------------------------ prepare


def is_prepared(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def _tmp_prefix(out: Path) -> str:
    """`.<name>.preparing-<host>-`: a temporary directory names its host and then its pid."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"
    return f".{out.name}{_TMP_MARK}{host}-"


def _remove_stale_temps(out: Path) -> None:
    """Temporary directories of earlier runs on this host that were killed (process gone)."""
    prefix = _tmp_prefix(out)
    for p in out.parent.glob(f"{prefix}*"):
        try:
            pid = int(p.name[len(prefix) :].split("-", 1)[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def dataset_files(out: Path, *, option: str = "output directory") -> list[str]:
    """The entries of the dataset directory `out` that Craft wrote, which is all there is.

    Raises DataError unless `meta.json` is Craft's (format and version) and every entry of `out`
    is a plain file it lists (the splits, meta.json, the tokenizer files): what `--force` may
    delete, and nothing else.
    """
    meta = read_json_bounded(out / META_FILE, what=f"{option} {out / META_FILE}", error=DataError)
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or not isinstance(meta.get("format_version"), int)
    ):
        raise DataError(
            f"{option} {out}: its {META_FILE} is not one Craft wrote (format {FORMAT!r}); "
            "--force replaces only a dataset Craft prepared; choose another directory"
        )
    listed = {META_FILE, *SPLIT_FILES.values()}
    splits = meta.get("splits")
    if isinstance(splits, dict):
        listed.update(
            info["file"]
            for info in splits.values()
            if isinstance(info, dict) and isinstance(info.get("file"), str)
        )
    tok_files = (
        (meta.get("tokenizer") or {}).get("files")
        if isinstance(meta.get("tokenizer"), dict)
        else None
    )
    if isinstance(tok_files, dict):
        listed.update(tok_files)
    listed = {n for n in listed if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")}
    return owned_entries(out, listed, option=option, what="a dataset", error=DataError)


def _check_output(out: Path, force: bool) -> list[str]:
    """Refuse an output Craft must not write to; the entries `--force` will replace."""
    check_output_location(out, option="output directory", error=DataError)
    if not out.exists():
        return []
    if not out.is_dir():
        raise DataError(f"output directory {out}: exists and is not a directory")
    if is_prepared(out):
        if not force:
            raise DataError(
                f"output directory {out}: already holds a prepared dataset; pass --force to "
                "replace it"
            )
        return dataset_files(out)
    if any(out.iterdir()):
        raise DataError(
            f"output directory {out}: exists, is not empty and is not a prepared dataset; "
            "choose another directory (--output-dir or data.dir)"
        )
    return []


def _split_file(tokens_path: Path, out_dir: Path, n_train: int, itemsize: int) -> None:
    """Move the tail of `tokens_path` (the validation ids) to val.bin, keep the head as train.bin."""
    with open(tokens_path, "r+b") as src, open(out_dir / SPLIT_FILES["val"], "wb") as dst:
        src.seek(n_train * itemsize)
        while block := src.read(_COPY_BLOCK):
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
        src.truncate(n_train * itemsize)
        src.flush()
        os.fsync(src.fileno())
    os.replace(tokens_path, out_dir / SPLIT_FILES["train"])


def lock_path(out: Path) -> Path:
    """The lock file that gives a dataset directory one preparing process: `.<name>.lock` beside
    it (the directory itself does not exist until it is complete)."""
    return out.parent / f".{out.name}.lock"


def _make_parents(out: Path) -> list[Path]:
    """`mkdir -p` the parent of `out`; returns the directories it created, outermost first."""
    missing = [p for p in out.parents if not p.exists()][::-1]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only location, a parent that is a file
        raise DataError(f"output directory {out}: cannot create it ({e.strerror or e})") from None
    return missing


def prepare(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    tokenizer_cfg: Any,
    *,
    val_fraction: float = 0.1,
    workers: int | None = None,
    force: bool = False,
    errors: str = "strict",
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
    wait: bool = False,
    text_field: str = "text",
) -> dict[str, Any]:
    """Prepare `inputs` into `output_dir` with the tokenizer of `tokenizer_cfg`; returns meta.json.

    One process at a time prepares a given output directory: a second one gets a `BusyError`
    naming the first one's pid (see `craft.fileio.exclusive_lock`), or with `wait=True` waits for
    it and then uses what it prepared (unless `force`). `text_field` names the field that holds
    the text of JSON Lines and Parquet records.
    """
    out = Path(output_dir).expanduser().absolute()
    created = _make_parents(out)

    def waiting(holder: str) -> None:
        logging.getLogger("craft.data").warning(
            "waiting for another process (%s) that is preparing %s", holder, out
        )

    try:
        with exclusive_lock(
            lock_path(out), f"output directory {out}", wait=wait, remove=True, on_wait=waiting
        ):
            if wait and not force and is_prepared(out):
                try:
                    return json.loads((out / META_FILE).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    pass  # reported by the checks below
            return _prepare_locked(
                inputs, out, tokenizer_cfg, val_fraction=val_fraction, workers=workers,
                force=force, errors=errors, chunk_bytes=chunk_bytes, progress=progress,
                text_field=text_field,
            )  # fmt: skip
    except BaseException:
        for d in reversed(created):  # only directories this call made, and only when empty
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _prepare_locked(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    tokenizer_cfg: Any,
    *,
    val_fraction: float = 0.1,
    workers: int | None = None,
    force: bool = False,
    errors: str = "strict",
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
    text_field: str = "text",
) -> dict[str, Any]:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(
            f"--val-fraction {val_fraction}: expected a number strictly between 0 and 1 (both "
            "bounds excluded: each split needs tokens)"
        )
    if errors not in ("strict", "replace", "skip"):
        raise DataError(f"--errors {errors!r}: expected 'strict', 'replace' or 'skip'")
    if not text_field:
        raise DataError("--text-field: expected a field name, got an empty string")
    out = Path(output_dir).expanduser().absolute()
    check_output_location(out, option="output directory", error=DataError)
    files = resolve_inputs(inputs)
    check_output_location(
        out, option="output directory", inputs=[f.path for f in files], error=DataError
    )
    _check_output(out, force)
    fingerprint = tokenizer_fingerprint(tokenizer_cfg)
    total_bytes = sum(f.size for f in files)
    if workers is not None and workers < 1:
        raise DataError(f"--workers {workers}: expected at least 1")

    tmp = out.parent / f"{_tmp_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
        tmp.mkdir()
    except OSError as e:  # a read-only or missing location, a parent that is a file
        raise DataError(f"output directory {out}: cannot create it ({e.strerror or e})") from None
    start = time.monotonic()
    try:
        with quiet(not progress):
            stream = TextStream(
                files, errors, chunk_bytes, "reading text for the tokenizer", text_field
            )
            tokenizer = build_tokenizer(tokenizer_cfg, stream, tmp)
            tok_files = tokenizer.save(tmp)
            dtype = dtype_for_vocab(tokenizer.vocab_size)
            if workers is None:
                workers = default_workers() if tokenizer.parallel_encode else 1
            workers = min(workers, max(1, -(-total_bytes // chunk_bytes)))  # no idle processes
            hashes = {f.path: hashlib.sha256() for f in files}
            sep = tokenizer.eos_id if tokenizer.eos_id is not None else TEXT_SEPARATOR
            records = RecordReader(text_field, errors, sep)
            chunks = (
                item
                for f in files
                for item in input_chunks(f, errors, chunk_bytes, records, hashes[f.path])
            )
            tokens_path = tmp / "tokens.partial"
            with (
                open(tokens_path, "wb") as fh,
                ByteProgress(
                    f"encoding ({workers} worker{'s' * (workers > 1)})", total_bytes
                ) as bar,
            ):
                n_tokens = _encode_stream(tokenizer, tmp, chunks, dtype, workers, fh, bar)
                fh.flush()
                os.fsync(fh.fileno())
        n_val = int(n_tokens * val_fraction)
        n_train = n_tokens - n_val
        if n_tokens == 0:
            skipped = f" ({records.report.describe()})" if records.report.n_skipped else ""
            raise DataError(
                f"input is empty: {', '.join(f.label for f in files[:5])} contain no text{skipped}"
            )
        if n_val < 2 or n_train < 2:
            raise DataError(
                f"{n_tokens} tokens are too few to split with val_fraction {val_fraction} "
                f"(train {n_train}, val {n_val}; each split needs at least 2 tokens)"
            )
        _split_file(tokens_path, tmp, n_train, dtype.itemsize)
        meta = _meta(
            tokenizer, fingerprint, tok_files, tmp, dtype, n_train, n_val, files, hashes,
            val_fraction, errors, time.monotonic() - start,
        )  # fmt: skip
        for info in meta["splits"].values():
            ids = np.memmap(tmp / info["file"], dtype=dtype, mode="r")
            info["max_id"] = max_id(ids)
            if info["max_id"] >= tokenizer.vocab_size:
                raise TokenizerError(
                    f"the {tokenizer.type} tokenizer produced id {info['max_id']}, outside its "
                    f"vocabulary of {tokenizer.vocab_size} ids"
                )
        if any(record_format(f.path) for f in files):
            meta["records"] = _records_meta(records, text_field)
        atomic_write_json(tmp / META_FILE, meta)
        fsync_dir(tmp)
        _commit(tmp, out, force)
    except OSError as e:  # a full disk, permission denied: the partial output is removed
        err = storage_error(e, f"preparing {out}", name_file=False)
        if err is None:
            raise
        raise err from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def max_id(ids: np.ndarray) -> int:
    """The largest id of a split (-1 when empty), scanned in blocks so memory stays bounded."""
    top = -1
    for s in range(0, ids.shape[0], SCAN_BLOCK):
        top = max(top, int(ids[s : s + SCAN_BLOCK].max()))
    return top


def first_id_at_least(ids: np.ndarray, limit: int) -> int | None:
    """The position of the first id >= `limit`, or None."""
    for s in range(0, ids.shape[0], SCAN_BLOCK):
        block = ids[s : s + SCAN_BLOCK]
        if int(block.max()) >= limit:
            return s + int(np.flatnonzero(block >= limit)[0])
    return None


def _meta(
    tokenizer: Tokenizer,
    fingerprint: dict[str, Any],
    tok_files: list[str],
    tmp: Path,
    dtype: np.dtype,
    n_train: int,
    n_val: int,
    files: list[InputFile],
    hashes: dict[Path, Any],
    val_fraction: float,
    errors: str,
    seconds: float,
) -> dict[str, Any]:
    from craft import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "craft_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": {
            "type": tokenizer.type,
            "config": tokenizer.config(),
            "fingerprint": fingerprint,
            "files": {name: sha256_file(tmp / name) for name in tok_files},
        },
        "splits": {
            split: {"file": name, "tokens": n, "sha256": sha256_file(tmp / name)}
            for (split, name), n in zip(SPLIT_FILES.items(), (n_train, n_val), strict=True)
        },
        "val_fraction": val_fraction,
        "errors": errors,
        "sources": [
            {"name": f.label, "bytes": f.size, "sha256": hashes[f.path].hexdigest()} for f in files
        ],
        "prepare_seconds": round(seconds, 3),
    }


def _records_meta(records: RecordReader, text_field: str) -> dict[str, Any]:
    """How JSON Lines / Parquet records were read (meta.json `records`); warns about skips."""
    if records.report.n_skipped:
        import logging

        logging.getLogger("craft.data").warning("%s", records.report.describe())
    sep = records.separator
    return {
        "text_field": text_field,
        "separator": {"id": sep} if isinstance(sep, int) else {"text": sep},
        **records.report.meta(),
    }


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished temporary directory into place, replacing an empty directory or (with
    `force`) a dataset Craft prepared: only the files it wrote are deleted."""
    if out.exists():
        owned = _check_output(out, force)  # again: the directory may have changed meanwhile
        old = unique_sibling(out, "replaced")
        os.replace(out, old)
        os.replace(tmp, out)
        remove_owned(old, owned)
    else:
        try:
            os.replace(tmp, out)
        except OSError as e:
            raise DataError(f"{out}: cannot move the prepared dataset into place ({e})") from None
    fsync_dir(out.parent)


# ------------------------------------------------------------------------------ default paths


def default_dataset_dir(
    data_cfg: Any, tokenizer_cfg: Any, *, fingerprint: dict[str, Any] | None = None
) -> Path:
    """`<CRAFT_HOME>/datasets/<source or files-hash>-<tokenizer type>-<hash>`.

    The hash covers the tokenizer fingerprint, val_fraction and errors, so changing any of them
    never reuses a dataset prepared differently. For `files`, the base hash covers the resolved
    paths with their sizes and modification times, so edited files are prepared again.
    `fingerprint` replaces `tokenizer_fingerprint(tokenizer_cfg)` when already known.
    """
    from craft.fileio import short_hash
    from craft.paths import datasets_dir

    if data_cfg.source:
        base = data_cfg.source
    elif data_cfg.files:
        files = resolve_inputs(list(data_cfg.files))
        stamp = [(str(f.path.resolve()), f.size, f.path.stat().st_mtime_ns) for f in files]
        base = f"files-{short_hash(stamp, 8)}"
    else:
        raise DataError(
            "data: set data.source (a named source), data.files (text files, directories or "
            "globs) or data.dir (a prepared dataset)"
        )
    key = {
        "tokenizer": fingerprint or tokenizer_fingerprint(tokenizer_cfg),
        "val_fraction": data_cfg.val_fraction,
        "errors": data_cfg.errors,
        "format_version": FORMAT_VERSION,
    }
    if getattr(data_cfg, "text_field", "text") != "text":  # the default keeps existing names
        key["text_field"] = data_cfg.text_field
    tok_type = tokenizer_cfg.model_dump().get("type", "tok")
    return datasets_dir() / f"{base}-{tok_type}-{short_hash(key, 10)}"
