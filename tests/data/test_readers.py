"""JSON Lines and Parquet inputs: the token stream, separators, chunking, workers, bad records."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from craft.config.components import (
    BytesTokenizerConfig,
    CharTokenizerConfig,
    SentencePieceTokenizerConfig,
)
from craft.data import readers
from craft.data.prepare import prepare
from craft.data.tokenizers import load_tokenizer
from craft.errors import DataError

# Documents with what makes splitting and encoding interesting: several lines, none, multi-byte
# characters, an empty one, trailing newlines, and one much longer than the test chunk size.
DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.",
    "",
    "Ünïcödé ☃ text with a snowman\n\n",
    "a long line " * 40 + "\nand a second line " * 10,
    "x" * 300,  # no newline and no space: cut anywhere
    "Last one",
]
SMALL_CHUNKS = 64  # bytes: every long document is cut into pieces


def write_jsonl(path: Path, rows: list, field: str = "text") -> Path:
    lines = "".join(json.dumps({"id": i, field: r}) + "\n" for i, r in enumerate(rows))
    data = lines.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_parquet(path: Path, rows: list, field: str = "text", **kw) -> Path:
    pq.write_table(pa.table({"id": list(range(len(rows))), field: rows}), path, **kw)
    return path


def _run(inputs, out: Path, cfg=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return prepare([str(p) for p in inputs], out, cfg or CharTokenizerConfig(), **kw)


def _ids(out: Path) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    dt = np.dtype(meta["dtype"])
    return np.concatenate([np.fromfile(out / "train.bin", dt), np.fromfile(out / "val.bin", dt)])


def expected_ids(tok, docs: list[str]) -> np.ndarray:
    """The oracle: each document encoded on its own, then the eos id, or (no eos) the texts
    joined with a blank line after each and encoded whole."""
    if tok.eos_id is None:
        return np.array(tok.encode("".join(d + "\n\n" for d in docs)))
    return np.array([i for d in docs for i in [*tok.encode(d), tok.eos_id]])


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz", "c.json.gz", "c.parquet"])
@pytest.mark.parametrize(
    "cfg", [CharTokenizerConfig(), BytesTokenizerConfig()], ids=lambda c: c.type
)
def test_token_stream_is_the_documents_with_separators(name: str, cfg, tmp_path: Path) -> None:
    src = tmp_path / name
    write_parquet(src, DOCS, row_group_size=3) if name.endswith(".parquet") else write_jsonl(
        src, DOCS
    )
    out = tmp_path / "ds"
    meta = _run([src], out, cfg, chunk_bytes=SMALL_CHUNKS)
    tok = load_tokenizer(out)
    np.testing.assert_array_equal(_ids(out), expected_ids(tok, DOCS))
    assert meta["sources"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    sep = {"id": tok.eos_id} if tok.eos_id is not None else {"text": "\n\n"}
    assert meta["records"] == {"text_field": "text", "separator": sep, "records": 7, "skipped": {}}
    # chunk size does not change the ids
    _run([src], tmp_path / "big", cfg)
    np.testing.assert_array_equal(_ids(tmp_path / "big"), _ids(out))


def test_sentencepiece_with_workers_text_and_records_mixed(sp_tokenizer, tmp_path: Path) -> None:
    """A real process pool encodes list chunks (ids between texts); a text file in between keeps
    its place and gets no separator."""
    sp_tokenizer.save(tmp_path / "tok")
    cfg = SentencePieceTokenizerConfig(model=str(tmp_path / "tok" / "tokenizer.model"))
    a = write_jsonl(tmp_path / "a.jsonl", DOCS[:4], field="body")
    txt = tmp_path / "b.txt"
    txt.write_text("Plain text\nin between.\n", encoding="utf-8")
    c = write_parquet(tmp_path / "c.parquet", DOCS[4:], field="body")
    out = tmp_path / "ds"
    _run([a, txt, c], out, cfg, workers=2, chunk_bytes=SMALL_CHUNKS, text_field="body")
    tok = load_tokenizer(out)
    assert tok.eos_id is not None
    expected = np.concatenate(
        [expected_ids(tok, DOCS[:4]), tok.encode(txt.read_text()), expected_ids(tok, DOCS[4:])]
    )
    np.testing.assert_array_equal(_ids(out), expected)


def test_directory_input_finds_record_files(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "a.jsonl.gz", DOCS[:3])
    write_parquet(d / "b.parquet", DOCS[3:])
    meta = _run([d], tmp_path / "ds", BytesTokenizerConfig())
    assert [Path(s["name"]).name for s in meta["sources"]] == ["a.jsonl.gz", "b.parquet"]
    assert meta["records"]["records"] == len(DOCS)
    np.testing.assert_array_equal(
        _ids(tmp_path / "ds"), expected_ids(load_tokenizer(tmp_path / "ds"), DOCS)
    )


# ----------------------------------------------------------------------------- bad records

GOOD = json.dumps({"text": "good"})
BAD_LINES = [
    ('{"text": "unterminated', "invalid JSON", "invalid JSON: Unterminated string"),
    ('["text"]', "not an object", "a JSON array, expected an object"),
    ('{"body": "x", "id": 3}', "missing field 'text'", "no field 'text' (fields: 'body', 'id')"),
    ('{"text": null}', "field 'text' not a string", "field 'text' is a JSON null"),
    ('{"text": 12}', "field 'text' not a string", "field 'text' is a JSON number"),
    ('{"text": "\\ud800 lone"}', "invalid UTF-8", "lone surrogate \\ud800"),
]


@pytest.mark.parametrize(("line", "reason", "message"), BAD_LINES, ids=[b[1] for b in BAD_LINES])
def test_bad_record_is_an_error_naming_file_and_record(
    line: str, reason: str, message: str, tmp_path: Path
) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text(f"{GOOD}\n\n{GOOD}\n{line}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl record 4: ") as e:  # blank lines count
        _run([src], tmp_path / "ds", BytesTokenizerConfig())
    assert message in e.value.message and "--errors skip" in e.value.message
    assert "\n" not in e.value.message
    assert not (tmp_path / "ds").exists()


def test_skip_counts_bad_records_and_keeps_the_good_ones(tmp_path: Path) -> None:
    lines = [GOOD]
    for line, _, _ in BAD_LINES:
        lines += [line, json.dumps({"text": f"after {len(lines)}"})]
    raw = ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n'
    src = tmp_path / "c.jsonl"
    src.write_bytes(raw)
    meta = _run([src], tmp_path / "ds", BytesTokenizerConfig(), errors="skip")
    good = ["good", *(f"after {i}" for i in range(1, 2 * len(BAD_LINES), 2))]
    tok = load_tokenizer(tmp_path / "ds")
    np.testing.assert_array_equal(_ids(tmp_path / "ds"), expected_ids(tok, good))
    assert meta["records"]["records"] == len(good)
    assert meta["records"]["skipped"] == {
        "invalid JSON": 1,
        "not an object": 1,
        "missing field 'text'": 1,
        "field 'text' not a string": 2,
        "invalid UTF-8": 2,  # the lone surrogate and the 0xff byte
    }


def test_replace_substitutes_invalid_utf8_and_surrogates(tmp_path: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_bytes(b'{"text": "bad \xff byte"}\n{"text": "lone \\udc80 surrogate"}\n')
    _run([src], tmp_path / "ds", BytesTokenizerConfig(), errors="replace")
    tok = load_tokenizer(tmp_path / "ds")
    docs = ["bad \ufffd byte", "lone \ufffd surrogate"]
    np.testing.assert_array_equal(_ids(tmp_path / "ds"), expected_ids(tok, docs))
    with pytest.raises(
        DataError, match=r"c\.jsonl record 1: not valid UTF-8 at byte 14.*--errors replace"
    ):
        _run([src], tmp_path / "strict", BytesTokenizerConfig())


def test_truncated_gzip(tmp_path: Path) -> None:
    whole = gzip.compress(
        "".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(400)).encode()
    )
    src = tmp_path / "c.jsonl.gz"
    src.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"c\.jsonl\.gz record \d+: corrupt or truncated gzip"):
        _run([src], tmp_path / "ds", BytesTokenizerConfig())
    meta = _run([src], tmp_path / "ds", BytesTokenizerConfig(), errors="skip")
    assert 0 < meta["records"]["records"] < 400
    assert meta["records"]["skipped"] == {"unreadable rest of a gzip file": 1}
    assert meta["sources"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


@pytest.mark.parametrize("block", [1 << 20, 16], ids=["one-block", "lines-across-blocks"])
def test_record_longer_than_the_limit(
    block: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 100)
    monkeypatch.setattr(readers, "_READ_BUFFER", block)
    src = tmp_path / "c.jsonl"
    src.write_text(f'{GOOD}\n{{"text": "{"y" * 500}"}}\n{GOOD}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl record 2: longer than 100 bytes"):
        _run([src], tmp_path / "ds", BytesTokenizerConfig())
    meta = _run([src], tmp_path / "ds", BytesTokenizerConfig(), errors="skip", val_fraction=0.5)
    assert meta["records"]["records"] == 2 and meta["records"]["skipped"] == {"too long": 1}
    tok = load_tokenizer(tmp_path / "ds")
    np.testing.assert_array_equal(_ids(tmp_path / "ds"), expected_ids(tok, ["good", "good"]))
    long_last = tmp_path / "last.jsonl"  # the long record is the last line, without a newline
    long_last.write_text(f'{GOOD}\n{GOOD}\n{{"text": "{"y" * 500}"}}', encoding="utf-8")
    with pytest.raises(DataError, match=r"last\.jsonl record 3: longer than 100 bytes"):
        _run([long_last], tmp_path / "ds2", BytesTokenizerConfig(), val_fraction=0.5)


def test_bad_parquet_files(tmp_path: Path) -> None:
    good = write_parquet(
        tmp_path / "g.parquet", [f"document {i} " * 20 for i in range(3000)], row_group_size=500
    )
    data = good.read_bytes()
    cases = {
        "truncated.parquet": (data[: len(data) // 2], "not a readable Parquet file"),
        "garbage.parquet": (b"not parquet at all" * 10, "not a readable Parquet file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=rf"{name}: {message}"):
            _run([tmp_path / name], tmp_path / "ds", BytesTokenizerConfig())
    damaged = bytearray(data)
    damaged[len(data) // 2 : len(data) // 2 + 200] = b"\xff" * 200  # inside a data page
    (tmp_path / "damaged.parquet").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"damaged\.parquet record \d+: cannot read"):
        _run([tmp_path / "damaged.parquet"], tmp_path / "ds", BytesTokenizerConfig())
    meta = _run(
        [tmp_path / "damaged.parquet"], tmp_path / "ds", BytesTokenizerConfig(), errors="skip"
    )
    kept, skipped = meta["records"]["records"], meta["records"]["skipped"]
    assert 0 < kept < 3000 and kept + skipped["unreadable (damaged file)"] == 3000


def test_parquet_column_problems(tmp_path: Path) -> None:
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), ints)
    with pytest.raises(
        DataError, match=r"ints\.parquet: column 'text' holds int64, expected strings"
    ):
        _run([ints], tmp_path / "ds", BytesTokenizerConfig())
    src = write_parquet(tmp_path / "c.parquet", ["a", None, "b"], field="body")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: 'id', 'body'\)"):
        _run([src], tmp_path / "ds", BytesTokenizerConfig())
    with pytest.raises(DataError, match=r"c\.parquet record 2: column 'body' is null"):
        _run([src], tmp_path / "ds", BytesTokenizerConfig(), text_field="body")
    raw = pa.array([b"ok", b"bad \xff"], type=pa.binary()).view(pa.string())  # unvalidated
    pq.write_table(pa.table({"text": raw}), tmp_path / "utf8.parquet")
    with pytest.raises(DataError, match=r"utf8\.parquet record 2: not valid UTF-8 at byte 4"):
        _run([tmp_path / "utf8.parquet"], tmp_path / "ds", BytesTokenizerConfig())


def test_every_record_skipped_is_an_empty_input(tmp_path: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text('{"body": "x"}\n{"body": "y"}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"input is empty.*skipped 2 bad record\(s\): 2 missing field"
    ):
        _run([src], tmp_path / "ds", BytesTokenizerConfig(), errors="skip")


def test_missing_pyarrow_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_parquet(tmp_path / "c.parquet", DOCS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(
        DataError,
        match=r"c\.parquet: reading Parquet needs pyarrow; install it with pip install 'craft-lm\[parquet\]'",
    ):
        _run([src], tmp_path / "ds", BytesTokenizerConfig())


def test_chunks_stay_bounded(tmp_path: Path) -> None:
    """Memory is bounded by the chunk size: no chunk holds much more than `chunk_bytes` of text,
    however many records the file has (a long record is cut, not held whole in one chunk)."""
    docs = [f"record {i}\n" * 30 for i in range(200)] + ["z " * 5000]
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    reader = readers.RecordReader(separator=7)
    f = type("F", (), {"path": src, "size": src.stat().st_size, "label": "c.jsonl"})()
    sizes, total = [], 0
    for chunk, n in reader.chunks(f, chunk_bytes=1000):
        sizes.append(sum(len(x) for x in chunk if isinstance(x, str)))
        total += n
    assert total == src.stat().st_size  # progress adds up to the file size
    assert sum(sizes) == sum(len(d) for d in docs)
    # a chunk is closed once it reaches chunk_bytes, and a record above chunk_bytes is cut
    assert max(sizes) < 2 * 1000 and len(sizes) >= 10 + 200 * 270 // 2000


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + f"{GOOD}\r\n{GOOD}\r\n".encode())
    _run([src], tmp_path / "ds", BytesTokenizerConfig(), val_fraction=0.5)
    tok = load_tokenizer(tmp_path / "ds")
    np.testing.assert_array_equal(_ids(tmp_path / "ds"), expected_ids(tok, ["good", "good"]))


def test_cli_prepare_records(tmp_path: Path) -> None:
    from tests.data.test_cli import assert_user_error, craft

    src = tmp_path / "c.jsonl.gz"
    write_jsonl(src, [*DOCS, None], field="body")  # the last record's body is null
    bad = craft("data", "prepare", "-i", str(src), "-o", str(tmp_path / "a"), "-t", "bytes",
                "--text-field", "body", "-q")  # fmt: skip
    assert_user_error(bad, "c.jsonl.gz record 8: field 'body' is a JSON null", "--errors skip")
    res = craft("data", "prepare", "-i", str(src), "-o", str(tmp_path / "b"), "-t", "bytes",
                "--text-field", "body", "--errors", "skip", "-q")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "records: 7 read from field 'body', 1 bad record(s) skipped" in res.stdout
    assert "warning: skipped 1 bad record(s): 1 field 'body' not a string" in res.stderr
    info = craft("data", "info", str(tmp_path / "b"))
    assert "records     7 from field 'body', separator id 257, 1 skipped" in info.stdout
