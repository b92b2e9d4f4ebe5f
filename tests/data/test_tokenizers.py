"""Tokenizers: round trips, vocabularies, errors, save/load, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from craft.config.components import (
    BytesTokenizerConfig,
    CharTokenizerConfig,
    SentencePieceTokenizerConfig,
)
from craft.config.registry import build
from craft.data.tokenizers import (
    BytesTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)
from craft.errors import TokenizerError

# Any text without lone surrogates (which no UTF-8 file can hold).
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
FAST = settings(max_examples=150, deadline=None)


@FAST
@given(ANY_TEXT)
def test_char_round_trip(text: str) -> None:
    tok = CharTokenizer.from_texts([text or "x"])
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text or "x"))


@FAST
@given(st.lists(ANY_TEXT, min_size=1, max_size=4))
def test_char_vocab_is_sorted_and_independent_of_chunking(chunks: list[str]) -> None:
    whole = "".join(chunks)
    assume(whole)
    assert CharTokenizer.from_texts(chunks).chars == sorted(set(whole))


def test_char_empty_vocabulary() -> None:
    with pytest.raises(TokenizerError, match="vocabulary is empty"):
        CharTokenizer.from_texts(["", ""])


def test_char_unknown_characters_are_listed() -> None:
    tok = CharTokenizer.from_texts(["abc\n"])
    with pytest.raises(TokenizerError) as e:
        tok.encode("abxyz☃x")
    msg = e.value.message
    assert "4 character(s)" in msg and "'x'" in msg and "'☃'" in msg and "tokenizer.unk" in msg
    assert "\n" not in msg


def test_char_unk_maps_to_last_id() -> None:
    tok = CharTokenizer.from_texts(["abc"], unk=True)
    assert tok.vocab_size == 4 and tok.unk_id == 3
    assert tok.encode("a☃c") == [0, 3, 2]
    assert tok.decode([0, 3, 2]) == "a\ufffdc"


def test_char_encode_array_is_int64_and_fast_path_matches() -> None:
    tok = CharTokenizer.from_texts(["hello"])
    arr = tok.encode_array("hello")
    assert arr.dtype == np.int64 and arr.tolist() == tok.encode("hello")


@FAST
@given(ANY_TEXT)
def test_bytes_round_trip(text: str) -> None:
    tok = BytesTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_bytes_specials() -> None:
    tok = BytesTokenizer()
    assert tok.vocab_size == 258 and (tok.bos_id, tok.eos_id) == (256, 257)
    assert tok.decode([256, 104, 105, 257]) == "hi"


# SentencePiece's space marker U+2581 is the one character it cannot round-trip.
SP_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"))


@settings(max_examples=150, deadline=None)
@given(SP_TEXT)
def test_sentencepiece_round_trip(sp_tokenizer: SentencePieceTokenizer, text: str) -> None:
    assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.sampled_from(["To be", " or not", "\n", "  ", "☃", "é", "\n\n", "x"]), max_size=30)
)
def test_sentencepiece_line_chunks_encode_like_the_whole(
    sp_tokenizer: SentencePieceTokenizer, parts: list[str]
) -> None:
    text = "".join(parts)
    cut = text.find("\n") + 1
    assert sp_tokenizer.encode(text[:cut]) + sp_tokenizer.encode(text[cut:]) == sp_tokenizer.encode(
        text
    )


def test_sentencepiece_training_defaults(sp_tokenizer: SentencePieceTokenizer) -> None:
    assert sp_tokenizer.vocab_size == 400
    assert (sp_tokenizer.unk_id, sp_tokenizer.bos_id, sp_tokenizer.eos_id) == (0, 1, 2)
    assert sp_tokenizer.byte_fallback
    # newline is a piece of its own; no dummy prefix is invented at the start
    assert sp_tokenizer.id_to_piece(sp_tokenizer.encode("\n")[0]) == "\n"
    assert sp_tokenizer.decode(sp_tokenizer.encode("the")) == "the"


def test_sentencepiece_training_failure_is_one_line() -> None:
    with pytest.raises(TokenizerError) as e:
        SentencePieceTokenizer.train(["tiny text\n"], vocab_size=5000)
    assert "vocab_size=5000" in e.value.message and "\n" not in e.value.message


def test_sentencepiece_bad_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        load_tokenizer(bad)


@pytest.mark.parametrize("kind", ["char", "bytes", "sentencepiece"])
def test_save_load_round_trip(
    kind: str, tmp_path: Path, sp_tokenizer: SentencePieceTokenizer
) -> None:
    tok = {
        "char": CharTokenizer.from_texts(["hello ☃\n"], unk=True),
        "bytes": BytesTokenizer(),
        "sentencepiece": sp_tokenizer,
    }[kind]
    names = tok.save(tmp_path / "tok")
    assert names[-1] == "tokenizer.json"
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert data["type"] == kind and data["format_version"] == 1
    assert not list((tmp_path / "tok").glob("*.pkl"))
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.config() == tok.config()
    sample = "hello ☃\n"
    assert loaded.encode(sample) == tok.encode(sample)


def test_load_errors(tmp_path: Path, sp_tokenizer: SentencePieceTokenizer) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    d = tmp_path / "sp"
    sp_tokenizer.save(d)
    (d / "tokenizer.model").write_bytes(b"changed")
    with pytest.raises(TokenizerError, match="sha256"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text('{"type": "wordpiece", "format_version": 1}')
    with pytest.raises(TokenizerError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(d)
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(d)


def test_decode_rejects_out_of_range_ids() -> None:
    with pytest.raises(TokenizerError, match="id 258 is out of range"):
        BytesTokenizer().decode([1, 258])


def test_decode_accepts_arrays_and_tensors() -> None:
    import torch

    tok = BytesTokenizer()
    ids = tok.encode("ok")
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "ok"


@pytest.mark.parametrize("kind", ["char", "bytes", "sentencepiece"])
def test_incremental_decoder_emits_whole_characters(
    kind: str, sp_tokenizer: SentencePieceTokenizer
) -> None:
    text = "Héllo ☃ wörld 日本\n  end"
    tok = {
        "char": CharTokenizer.from_texts([text]),
        "bytes": BytesTokenizer(),
        "sentencepiece": sp_tokenizer,
    }[kind]
    dec = tok.decoder()
    pieces = [dec.push(i) for i in tok.encode(text)]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    if kind != "char":  # multi-byte characters were held back at least once
        assert "" in pieces[:-1]


def test_incremental_decoder_releases_invalid_bytes() -> None:
    dec = BytesTokenizer().decoder(max_hold=3)
    out = [dec.push(i) for i in [0xE2, 0x98, 0x41, 0x42]]
    assert "".join(out) + dec.flush() == "\ufffdAB"


@pytest.mark.parametrize(
    "cfg",
    [CharTokenizerConfig(), BytesTokenizerConfig(), SentencePieceTokenizerConfig(vocab_size=300)],
)
def test_registry_builders(cfg, tmp_path: Path) -> None:
    from craft.data.progress import quiet

    texts = ["Some text to learn from.\n" * 50, "More lines ☃\n" * 20]
    with quiet():
        tok = build("tokenizer", cfg, texts, tmp_path)
    assert tok.type == cfg.type
    assert tok.decode(tok.encode("Some text ☃\n")) == "Some text ☃\n"


def test_builders_without_text() -> None:
    with pytest.raises(TokenizerError, match="no text"):
        build("tokenizer", CharTokenizerConfig(), None, None)
    with pytest.raises(TokenizerError, match="no text"):
        build("tokenizer", SentencePieceTokenizerConfig(), None, None)
    assert build("tokenizer", BytesTokenizerConfig(), None, None).vocab_size == 258


def test_sentencepiece_builder_loads_given_model(tmp_path: Path, sp_tokenizer) -> None:
    sp_tokenizer.save(tmp_path)
    cfg = SentencePieceTokenizerConfig(model=str(tmp_path / "tokenizer.model"))
    tok = build("tokenizer", cfg, None, None)
    assert tok.model_proto == sp_tokenizer.model_proto
