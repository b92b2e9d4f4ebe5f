"""Corpora in the formats they come in: JSON Lines (plain or gzip-compressed) and Parquet.

One document per record, its text in a named field (`--text-field`, `data.text_field`; default
`text`). Records are streamed: JSON Lines line by line through a buffered (and, for `.gz`,
decompressing) reader, Parquet in batches of rows of the one column that is needed, so memory
stays bounded by the chunk size (plus the longest record) whatever the size of the corpus.

Records become the same chunks that text files give (`prepare.py` encodes both), each document
followed by a separator: the tokenizer's end-of-text id where it has one (bytes, SentencePiece),
else a blank line, `"\\n\\n"` (char, whose vocabulary is learned from the data and has no special
ids). A chunk is either a string or a list of strings and ids, encoded in order; a document longer
than a chunk is cut after a newline (else before a space) like text files are, so that encoding it
in pieces gives the ids of encoding it whole.

Bad records (invalid JSON, not an object, a missing field, a value that is not a string, invalid
UTF-8, a corrupt or truncated file) stop preparation with one line naming the file and the
record number (JSON Lines records are counted by line, blank lines included), unless
`errors = "skip"`: then they are counted by reason and reported once at the end.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from craft.errors import DataError

if TYPE_CHECKING:
    from craft.data.prepare import InputFile
    from craft.data.tokenizers import Tokenizer

RECORD_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".ndjson.gz": "jsonl",
    ".parquet": "parquet",
}
TEXT_SEPARATOR = "\n\n"  # between documents when the tokenizer has no end-of-text id
MAX_RECORD_BYTES = 256 << 20  # a longer JSON line is a bad record (a file without newlines)
PARQUET_BATCH_ROWS = 1024
_READ_BUFFER = 1 << 20
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_JSON = json.JSONDecoder()

Chunk = str | list[str | int]


def record_format(path: Path) -> str | None:
    """'jsonl' or 'parquet' from the file name, None for text."""
    name = path.name.lower()
    for suffix, fmt in RECORD_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def encode_chunk(tokenizer: Tokenizer, chunk: Chunk) -> np.ndarray:
    """Ids of a chunk: a string is encoded whole; a list's strings are encoded and ids kept."""
    if isinstance(chunk, str):
        return tokenizer.encode_array(chunk)
    parts = [
        tokenizer.encode_array(x) if isinstance(x, str) else np.array([x], dtype=np.int64)
        for x in chunk
    ]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


@dataclass
class RecordReport:
    """Records read and bad records skipped, by reason, with where each reason was first seen."""

    records: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str, n: int = 1) -> None:
        self.skipped[reason] += n
        self.first.setdefault(reason, where)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def describe(self) -> str:
        """'skipped 3 bad records: 2 missing field 'text' (first: a.jsonl record 4), ...'."""
        parts = [
            f"{n} {reason} (first: {self.first[reason]})" for reason, n in self.skipped.items()
        ]
        return f"skipped {self.n_skipped} bad record(s): {', '.join(parts)}"

    def meta(self) -> dict[str, Any]:
        return {"records": self.records, "skipped": dict(self.skipped)}


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str, replaceable: bool = False) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.replaceable = reason, detail, replaceable


class _Tap(io.RawIOBase):
    """A raw file that hashes and counts the bytes read through it (for sha256 and progress)."""

    def __init__(self, raw: BinaryIO, hasher: Any) -> None:
        self.raw, self.hasher, self.count = raw, hasher, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.raw.readinto(b)
        if n:
            self.count += n
            if self.hasher is not None:
                self.hasher.update(memoryview(b)[:n])
        return n or 0


def _cut_point(text: str, limit: int) -> int:
    """Where to cut a long document so both pieces encode as the whole does (see prepare.py)."""
    cut = text.rfind("\n", 0, limit) + 1
    if cut == 0:
        cut = text.rfind(" ", limit // 2, limit)
        cut = cut if cut > 0 else limit
    return cut


@dataclass
class RecordReader:
    """Reads JSON Lines and Parquet inputs into chunks: the document separator and error policy
    are fixed per pass (the tokenizer-training pass uses text; encoding uses the eos id)."""

    text_field: str = "text"
    errors: str = "strict"
    separator: int | str = TEXT_SEPARATOR
    report: RecordReport = field(default_factory=RecordReport)

    # ----------------------------------------------------------------------------- chunking

    def chunks(
        self, f: InputFile, chunk_bytes: int, hasher: Any = None
    ) -> Iterator[tuple[Chunk, int]]:
        """`(chunk, raw_bytes)` of one record file; `raw_bytes` adds up to the file size."""
        fmt = record_format(f.path)
        if fmt == "parquet":
            if hasher is not None:
                _hash_file(f, hasher)
            docs = self._parquet_docs(f)
        else:
            docs = self._jsonl_docs(f, hasher)
        items: list[str | int] = []
        size = reported = 0
        for doc, done in docs:
            while len(doc) > chunk_bytes:
                cut = _cut_point(doc, chunk_bytes)
                items.append(doc[:cut])
                doc = doc[cut:]
                chunk, items, size = self._pack(items), [], 0
                yield chunk, _fraction(done, f.size) - reported
                reported = _fraction(done, f.size)
            items.append(doc)
            items.append(self.separator)
            size += len(doc)
            if size >= chunk_bytes:
                chunk, items, size = self._pack(items), [], 0
                yield chunk, _fraction(done, f.size) - reported
                reported = _fraction(done, f.size)
        yield self._pack(items), f.size - reported

    def _pack(self, items: list[str | int]) -> Chunk:
        """One string when the separator is text (the fast path), else the list."""
        if isinstance(self.separator, str):
            return "".join(items)  # type: ignore[arg-type]
        return items

    def _bad(self, f: InputFile, n: int, err: _BadRecord) -> None:
        where = f"{f.label} record {n}"
        if self.errors != "skip":
            replace = ", --errors replace substitutes U+FFFD" if err.replaceable else ""
            raise DataError(
                f"{where}: {err.detail}; fix the record, or --errors skip skips bad records"
                f"{replace} (data.errors in a recipe)"
            )
        self.report.skip(err.reason, where)

    # -------------------------------------------------------------------------- JSON Lines

    def _jsonl_docs(self, f: InputFile, hasher: Any) -> Iterator[tuple[str, float]]:
        """(text, fraction of the file read) per good record; bad ones raise or are counted."""
        with open(f.path, "rb", buffering=0) as raw:
            tap = _Tap(raw, hasher)
            buffered = io.BufferedReader(tap, buffer_size=_READ_BUFFER)
            gz = f.path.name.lower().endswith(".gz")
            stream: Any = gzip.GzipFile(fileobj=buffered, mode="rb") if gz else buffered
            for n, line in self._lines(f, stream):
                if line is None:
                    self._bad(f, n, _BadRecord("too long", _too_long()))
                    continue
                if n == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                if not line or line.isspace():
                    continue  # blank lines are not records (but count as lines)
                try:
                    text = self._parse_json_line(line)
                except _BadRecord as err:
                    self._bad(f, n, err)
                    continue
                self.report.records += 1
                yield text, tap.count / max(f.size, 1)
            while tap.readinto(bytearray(_READ_BUFFER)):  # hash what was left unread (skip)
                pass

    def _lines(self, f: InputFile, stream: Any) -> Iterator[tuple[int, bytes | None]]:
        """(line number, line without its newline) from blocks of the stream; None stands for a
        line longer than MAX_RECORD_BYTES, which is read past without being held."""
        pending: list[bytes] = []  # the start of a line that continues in the next block
        held = 0
        too_long = False
        n = 0
        while True:
            try:
                block = stream.read1(_READ_BUFFER)  # what one step gives: damage loses least
            except (OSError, EOFError, zlib.error) as e:
                detail = f"corrupt or truncated gzip data ({e})"
                self._unreadable(f, n + 1, detail, reason="unreadable rest of a gzip file")
                return
            if not block:
                break
            lines: list[bytes | None] = list(block.split(b"\n"))
            tail = lines.pop()
            if lines and (pending or too_long):
                first = lines[0]
                assert first is not None
                whole = not too_long and held + len(first) <= MAX_RECORD_BYTES
                lines[0] = b"".join([*pending, first]) if whole else None
                pending, held, too_long = [], 0, False
            for line in lines:
                n += 1
                yield n, line if line is None or len(line) <= MAX_RECORD_BYTES else None
            if tail and not too_long:
                pending.append(tail)
                held += len(tail)
                if held > MAX_RECORD_BYTES:
                    pending, held, too_long = [], 0, True
        if pending or too_long:  # a last line without a newline
            n += 1
            yield n, None if too_long else b"".join(pending)

    def _parse_json_line(self, line: bytes) -> str:
        try:
            decoded = line.decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            if self.errors != "replace":
                detail = f"not valid UTF-8 at byte {e.start} of the line ({e.reason})"
                raise _BadRecord("invalid UTF-8", detail, replaceable=True) from None
            decoded = line.decode("utf-8", errors="replace")
        try:
            obj = _parse_json(decoded)
        except json.JSONDecodeError as e:
            raise _BadRecord("invalid JSON", f"invalid JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise _BadRecord("invalid JSON", "invalid JSON: nested too deeply") from None
        if not isinstance(obj, dict):
            raise _BadRecord("not an object", f"a JSON {_json_type(obj)}, expected an object")
        if self.text_field not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise _BadRecord(
                f"missing field {self.text_field!r}",
                f"no field {self.text_field!r} (fields: {keys}); choose one with --text-field "
                "(data.text_field)",
            )
        text = obj[self.text_field]
        if not isinstance(text, str):
            raise _BadRecord(
                f"field {self.text_field!r} not a string",
                f"field {self.text_field!r} is a JSON {_json_type(text)}, expected a string",
            )
        if b"\\u" in line or b"\\U" in line:  # only escapes can make lone surrogates
            text = self._check_surrogates(text)
        return text

    def _check_surrogates(self, text: str) -> str:
        m = _SURROGATE_RE.search(text)
        if m is None:
            return text
        if self.errors == "replace":
            return _SURROGATE_RE.sub("\ufffd", text)
        raise _BadRecord(
            "invalid UTF-8",
            f"field {self.text_field!r} holds a lone surrogate \\u{ord(m.group()):04x} at "
            f"character {m.start()} (not encodable text)",
            replaceable=True,
        )

    def _unreadable(
        self, f: InputFile, n: int, detail: str, count: int = 1, reason: str = "unreadable"
    ) -> None:
        """The rest of a file cannot be read: an error, or (skip) `count` records skipped."""
        where = f"{f.label} record {n}"
        if self.errors != "skip":
            raise DataError(
                f"{where}: {detail}; the file is damaged from here on (--errors skip keeps the "
                "records before it)"
            )
        self.report.skip(reason, where, count)

    # ------------------------------------------------------------------------------ Parquet

    def _parquet_docs(self, f: InputFile) -> Iterator[tuple[str, float]]:
        pa, pq = _pyarrow(f)
        try:
            pf = pq.ParquetFile(f.path, buffer_size=_READ_BUFFER, pre_buffer=False)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f.label}: not a readable Parquet file ({_one_line(e)})") from None
        with pf:
            schema = pf.schema_arrow
            if self.text_field not in schema.names:
                cols = ", ".join(repr(c) for c in schema.names[:8]) or "none"
                raise DataError(
                    f"{f.label}: no column {self.text_field!r} (columns: {cols}); choose one with "
                    "--text-field (data.text_field)"
                )
            kind = schema.field(self.text_field).type
            value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
            if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)):
                raise DataError(
                    f"{f.label}: column {self.text_field!r} holds {kind}, expected strings"
                )
            total = max(pf.metadata.num_rows, 1)
            batches = pf.iter_batches(
                batch_size=PARQUET_BATCH_ROWS, columns=[self.text_field], use_threads=False
            )
            n = 0
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as e:
                    left = max(pf.metadata.num_rows - n, 1)
                    detail = f"cannot read ({_one_line(e)})"
                    self._unreadable(f, n + 1, detail, left, reason="unreadable (damaged file)")
                    break
                for value in self._parquet_values(batch.column(0), pa):
                    n += 1
                    if isinstance(value, _BadRecord):
                        self._bad(f, n, value)
                        continue
                    if value is None:
                        self._bad(
                            f,
                            n,
                            _BadRecord(
                                f"field {self.text_field!r} not a string",
                                f"column {self.text_field!r} is null",
                            ),
                        )
                        continue
                    self.report.records += 1
                    yield value, n / total

    def _parquet_values(self, column: Any, pa: Any) -> list[Any]:
        """The column's strings (None for nulls); invalid UTF-8 is a bad record or replaced."""
        try:
            return column.to_pylist()
        except UnicodeDecodeError:  # Parquet writers are meant to store valid UTF-8; not all do
            out: list[Any] = []
            for raw in column.cast(pa.binary()).to_pylist():
                try:
                    out.append(None if raw is None else raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    if self.errors == "replace":
                        out.append(raw.decode("utf-8", errors="replace"))
                    else:
                        detail = f"not valid UTF-8 at byte {e.start} of the text ({e.reason})"
                        out.append(_BadRecord("invalid UTF-8", detail, replaceable=True))
            return out


def _parse_json(text: str) -> Any:
    """`json.loads` without its whitespace scans in the common case (no leading whitespace)."""
    try:
        obj, end = _JSON.raw_decode(text)
    except json.JSONDecodeError:
        return json.loads(text)  # leading whitespace, or the error with its position
    if end != len(text) and not text[end:].isspace():
        raise json.JSONDecodeError("Extra data", text, end)
    return obj


def _pyarrow(f: InputFile) -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{f.label}: reading Parquet needs pyarrow; install it with "
            "pip install 'craft-lm[parquet]' (or pip install pyarrow)"
        ) from None
    return pa, pq


def _hash_file(f: InputFile, hasher: Any) -> None:
    with open(f.path, "rb") as fh:
        while block := fh.read(_READ_BUFFER):
            hasher.update(block)


def _fraction(done: float, size: int) -> int:
    """Bytes of progress for a fraction of the file read (whole bytes, never past the size)."""
    return min(size, int(done * size))


def _too_long() -> str:
    limit = MAX_RECORD_BYTES
    size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
    return f"longer than {size} (a JSON Lines file holds one record per line)"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(
        type(value), "object"
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
