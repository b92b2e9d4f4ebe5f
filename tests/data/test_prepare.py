"""Streaming preparation: outputs, meta.json, splits, dtypes, chunking, atomicity, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from craft.config.components import (
    BytesTokenizerConfig,
    CharTokenizerConfig,
    SentencePieceTokenizerConfig,
)
from craft.data import prepare as prep
from craft.data.datasets import PreparedDataset
from craft.data.prepare import dtype_for_vocab, iter_file_chunks, prepare, resolve_inputs
from craft.data.tokenizers import load_tokenizer
from craft.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _run(inputs, out: Path, cfg=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return prepare(inputs, out, cfg or CharTokenizerConfig(), **kw)


def _ids(out: Path) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    dt = np.dtype(meta["dtype"])
    return np.concatenate([np.fromfile(out / "train.bin", dt), np.fromfile(out / "val.bin", dt)])


def test_prepare_files_outputs_and_meta(text_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    meta = _run([str(p) for p in text_files], out, val_fraction=0.25)
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    texts = [p.read_text(encoding="utf-8") for p in text_files]
    tok = load_tokenizer(out)
    expected = np.array(tok.encode("".join(texts)))
    n = expected.size
    assert meta["format"] == "craft-tokens" and meta["format_version"] == 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(set("".join(texts)))
    assert meta["splits"]["val"]["tokens"] == int(n * 0.25)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == n
    assert meta["val_fraction"] == 0.25 and meta["errors"] == "strict"
    assert meta["tokenizer"]["type"] == "char"
    assert meta["tokenizer"]["fingerprint"] == {"type": "char", "unk": False}
    assert set(meta["tokenizer"]["files"]) == {"tokenizer.json"}
    import hashlib

    assert [s["name"] for s in meta["sources"]] == [str(p) for p in text_files]
    for src, p in zip(meta["sources"], text_files, strict=True):
        assert src["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert src["bytes"] == p.stat().st_size
    # the validation split is the tail of the stream
    np.testing.assert_array_equal(_ids(out), expected)
    assert (out / "train.bin").stat().st_size == 2 * meta["splits"]["train"]["tokens"]


def test_directory_and_glob_inputs(text_files: list[Path], tmp_path: Path) -> None:
    folder = text_files[0].parent
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    (folder / ".hidden.txt").write_text("secret")
    by_dir = resolve_inputs([str(folder)])
    by_glob = resolve_inputs([str(folder / "*.txt")])
    assert [f.path for f in by_dir] == [f.path for f in by_glob] == sorted(text_files)
    # a file named twice is read once
    assert len(resolve_inputs([str(text_files[0]), str(folder)])) == 3


@pytest.mark.parametrize("cfg", [BytesTokenizerConfig(), CharTokenizerConfig()])
def test_small_chunks_give_the_same_ids(cfg, text_files: list[Path], tmp_path: Path) -> None:
    a = _run(text_files, tmp_path / "a", cfg)
    b = _run(text_files, tmp_path / "b", cfg, chunk_bytes=7)
    assert a["splits"] == b["splits"]
    np.testing.assert_array_equal(_ids(tmp_path / "a"), _ids(tmp_path / "b"))


def test_sentencepiece_chunking_and_workers_give_the_same_ids(
    sp_tokenizer, text_files: list[Path], tmp_path: Path
) -> None:
    sp_tokenizer.save(tmp_path / "tok")
    cfg = SentencePieceTokenizerConfig(model=str(tmp_path / "tok" / "tokenizer.model"))
    _run(text_files, tmp_path / "one", cfg)
    _run(text_files, tmp_path / "many", cfg, workers=2, chunk_bytes=64)  # a real process pool
    whole = sp_tokenizer.encode("".join(p.read_text(encoding="utf-8") for p in text_files))
    np.testing.assert_array_equal(_ids(tmp_path / "one"), whole)
    np.testing.assert_array_equal(_ids(tmp_path / "many"), whole)
    meta = json.loads((tmp_path / "many" / "meta.json").read_text())
    assert (
        meta["tokenizer"]["fingerprint"]["model_sha256"]
        == meta["tokenizer"]["files"]["tokenizer.model"]
    )


def test_sentencepiece_is_trained_when_no_model_given(text_files, tmp_path: Path) -> None:
    cfg = SentencePieceTokenizerConfig(vocab_size=300)
    meta = _run(text_files * 1, tmp_path / "ds", cfg)
    assert meta["vocab_size"] == 300 and (tmp_path / "ds" / "tokenizer.model").is_file()
    tok = load_tokenizer(tmp_path / "ds")
    text = "".join(p.read_text(encoding="utf-8") for p in text_files)
    assert tok.decode(_ids(tmp_path / "ds").tolist()) == text


def test_dtype_switches_at_65536(tmp_path: Path) -> None:
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    # 65,536 distinct characters fit uint16 ids; one more needs uint32
    chars = [chr(c) for c in range(0x20, 0x110000) if not 0xD800 <= c < 0xE000][: 65536 + 1]
    for n, dtype in [(65536, "uint16"), (65537, "uint32")]:
        f = tmp_path / f"chars{n}.txt"
        f.write_text("".join(chars[:n]) * 2, encoding="utf-8")
        out = tmp_path / f"ds{n}"
        meta = _run([f], out)
        assert meta["vocab_size"] == n and meta["dtype"] == dtype
        ds = PreparedDataset(out)
        assert ds.split("train").dtype == np.dtype(dtype)
        assert int(np.asarray(ds.split("val")).max()) == n - 1


def test_non_utf8_names_file_and_offset_across_chunks(tmp_path: Path) -> None:
    f = tmp_path / "bad.txt"
    data = "héllo\nwörld\n".encode() + b"ab\xe2\x98" + b"\xff tail\n"
    f.write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as whole:
        data.decode("utf-8")
    assert whole.value.start == 16  # the broken sequence starts at byte 16
    for chunk_bytes in (3, 4, 17, 1 << 20):  # the sequence straddles chunk boundaries
        with pytest.raises(DataError) as e:
            _run([f], tmp_path / "ds", chunk_bytes=chunk_bytes)
        assert f"{f}: not valid UTF-8 at byte offset 16 " in e.value.message
    assert "--errors replace" in e.value.message
    assert not (tmp_path / "ds").exists()
    meta = _run([f], tmp_path / "ds", BytesTokenizerConfig(), errors="replace", val_fraction=0.2)
    assert meta["errors"] == "replace"
    assert "\ufffd" in load_tokenizer(tmp_path / "ds").decode(_ids(tmp_path / "ds").tolist())


def test_bom_is_dropped(tmp_path: Path) -> None:
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbf" + b"abc\n" * 10)
    chunks = list(iter_file_chunks(resolve_inputs([f])[0], chunk_bytes=2))
    assert "".join(t for t, _ in chunks) == "abc\n" * 10
    assert sum(n for _, n in chunks) == f.stat().st_size


def test_long_lines_are_cut_before_a_space(sp_tokenizer, tmp_path: Path) -> None:
    f = tmp_path / "long.txt"
    text = "To be, or not to be: that is the question. " * 300
    f.write_text(text, encoding="utf-8")
    chunks = [t for t, _ in iter_file_chunks(resolve_inputs([f])[0], chunk_bytes=1024)]
    assert len(chunks) > 3 and "".join(chunks) == text
    assert all(len(c) <= 3 * 1024 for c in chunks)
    assert all(c.startswith(" ") for c in chunks[1:])
    # so that SentencePiece pieces (which start at a space) are never split
    sp_tokenizer.save(tmp_path / "tok")
    cfg = SentencePieceTokenizerConfig(model=str(tmp_path / "tok"))
    _run([f], tmp_path / "ds", cfg, chunk_bytes=1024)
    np.testing.assert_array_equal(_ids(tmp_path / "ds"), sp_tokenizer.encode(text))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: [str(d / "missing.txt")], "no such file, directory or named source"),
        (lambda d: [str(d / "*.nothing")], "glob matches no files"),
        (lambda d: [str(d / "empty.txt")], "input is empty"),
        (lambda d: [str(d / "nontext")], "directory holds no text files"),
        (lambda d: [], "no input given"),
        (lambda d: [""], "input '': empty path"),  # not the working directory
    ],
)
def test_bad_inputs(make, message: str, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nontext").mkdir()
    (tmp_path / "nontext" / "data.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match=message):
        _run(make(tmp_path), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_too_few_tokens_to_split(tmp_path: Path) -> None:
    f = tmp_path / "tiny.txt"
    f.write_text("abc")
    with pytest.raises(DataError, match="too few to split"):
        _run([f], tmp_path / "ds")


def test_existing_output_needs_force(text_files, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    _run(text_files[:1], out)
    with pytest.raises(DataError, match="pass --force"):
        _run(text_files, out)
    meta = _run(text_files, out, force=True)
    assert len(meta["sources"]) == 3 and PreparedDataset(out).meta == meta
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset"):
        _run(text_files, other, force=True)
    assert (other / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    _run(text_files, empty)
    assert PreparedDataset(empty).num_tokens("train") > 0


def test_output_that_cannot_be_created_is_a_data_error(text_files, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(DataError, match="a_file/ds: cannot create it"):
        _run(text_files, tmp_path / "a_file" / "ds")


def test_interrupted_prepare_leaves_nothing(text_files, tmp_path: Path, monkeypatch) -> None:
    def encode_then_interrupt(*args, **kwargs):
        out = args[5]
        out.write(b"\x01\x00" * 100)  # some ids were already written
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_encode_stream", encode_then_interrupt)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        _run(text_files, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [text_files[0].parent]  # no temporary directory left


def test_stale_temporary_directories_are_removed(text_files, tmp_path: Path) -> None:
    prefix = prep._tmp_prefix(tmp_path / "ds")
    dead = tmp_path / f"{prefix}999999999-abcd"  # a pid that cannot exist
    dead.mkdir()
    (dead / "meta.json").write_text("{}")
    alive = tmp_path / f"{prefix}{os.getpid()}-beef"
    other_host = tmp_path / ".ds.preparing-otherhost-999999999-abcd"
    for d in (alive, other_host):
        d.mkdir()
    _run(text_files, tmp_path / "ds")
    assert not dead.exists() and alive.exists() and other_host.exists()


def test_named_source_from_mirror(tmp_path: Path, shakespeare: Path) -> None:
    meta = _run(["tinyshakespeare"], tmp_path / "ds")
    assert meta["sources"][0]["name"] == "tinyshakespeare"
    assert meta["sources"][0]["sha256"].startswith("86c4e6aa")
    assert meta["vocab_size"] == 65
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == 1115394


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_val_fraction_bounds_are_said_to_be_exclusive(text_files, tmp_path: Path, fraction) -> None:
    with pytest.raises(DataError, match="strictly between 0 and 1 \\(both bounds excluded"):
        prepare(text_files, tmp_path / "o", CharTokenizerConfig(), val_fraction=fraction)
    assert not (tmp_path / "o").exists()
