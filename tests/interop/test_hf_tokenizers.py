"""HF tokenizers in Craft, and Craft tokenizers as HF files that AutoTokenizer loads unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craft.data.tokenizers import (
    BytesTokenizer,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)
from craft.errors import TokenizerError
from craft.interop.hf_tokenizer import to_hf_tokenizer
from tests.interop import hf_models

ADVERSARIAL = (
    "  Hello   wörld 日本語 ☃ \t tabs\n\n  x <s> </s> <eos> <bos> <|endoftext|> émoji 🎉 "
    " end  \r\n<0x41> ⁇ \x00\x7f"
)


@pytest.fixture(scope="module")
def craft_tokenizers(text: str) -> dict[str, object]:
    sample = text[:300_000]
    return {
        "char": CharTokenizer.from_texts([text]),
        "char_unk": CharTokenizer.from_texts([text], unk=True),
        "bytes": BytesTokenizer(),
        "sp_bpe": SentencePieceTokenizer.train([sample], vocab_size=400, model_type="bpe"),
        "sp_unigram": SentencePieceTokenizer.train(
            [text[:30_000]], vocab_size=360, model_type="unigram"
        ),
    }


def _auto(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("name", ["char", "char_unk", "bytes", "sp_bpe", "sp_unigram"])
def test_export_round_trip_through_auto_tokenizer(
    craft_tokenizers, text: str, tmp_path: Path, name: str
) -> None:
    tok = craft_tokenizers[name]
    hf = to_hf_tokenizer(tok)
    hf.save_hf(tmp_path)
    auto = _auto(tmp_path)
    samples = [text[:30_000], text[-5_000:]]
    if name != "char":  # the char vocabulary of tinyshakespeare cannot encode the rest
        adv = ADVERSARIAL
        if name == "sp_unigram":  # the documented difference: control/byte pieces as text
            adv = adv.replace("<s> </s> ", "").replace("<0x41>", "")
        samples.append(adv)
    for s in samples:
        ids = tok.encode(s)
        assert hf.encode(s) == ids
        assert auto.encode(s, add_special_tokens=True) == ids
        want = tok.decode(ids)
        assert hf.decode(ids) == want
        assert auto.decode(ids, skip_special_tokens=True) == want
    assert auto.eos_token_id == tok.eos_id and auto.bos_token_id == tok.bos_id
    if tok.eos_id is not None:  # an eos id decodes to nothing, as in Craft
        ids = [*tok.encode("ab"), tok.eos_id]
        assert auto.decode(ids, skip_special_tokens=True) == tok.decode(ids) == "ab"


def test_char_without_unk_refuses_unseen_characters(craft_tokenizers, tmp_path: Path) -> None:
    hf = to_hf_tokenizer(craft_tokenizers["char"])
    with pytest.raises(TokenizerError):
        craft_tokenizers["char"].encode("€")
    with pytest.raises(TokenizerError, match="cannot encode"):
        hf.encode("€")


def test_unsupported_tokenizer_type_is_refused() -> None:
    class Odd:
        type = "odd"

    with pytest.raises(TokenizerError, match="no Hugging Face representation"):
        to_hf_tokenizer(Odd())


def test_hf_tokenizer_directory_with_specials_and_chat_template(bpe, tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    hf_models.save_tokenizer(bpe, tmp_path / "a", chat_template=template)
    tok = load_tokenizer(tmp_path / "a")
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == tok.bos_id == bpe.token_to_id(hf_models.SPECIAL)
    assert tok.chat_template == template
    # chat_template.jinja (newer transformers) is read too
    hf_models.save_tokenizer(bpe, tmp_path / "b")
    (tmp_path / "b" / "chat_template.jinja").write_text(template, encoding="utf-8")
    assert HFTokenizer.from_hf_dir(tmp_path / "b").chat_template == template
    # Craft's own tokenizers have none
    assert CharTokenizer(["a"]).chat_template is None


def test_hf_tokenizer_saved_by_craft_round_trips(bpe, text: str, tmp_path: Path) -> None:
    hf_models.save_tokenizer(bpe, tmp_path / "hf", chat_template="{{ x }}")
    tok = load_tokenizer(tmp_path / "hf")
    tok.save(tmp_path / "craft")
    again = load_tokenizer(tmp_path / "craft")
    assert isinstance(again, HFTokenizer)
    assert again.artifact() == tok.artifact() and again.chat_template == "{{ x }}"
    assert again.encode(text[:5000]) == tok.encode(text[:5000])
    # a changed file is noticed
    path = tmp_path / "craft" / "hf_tokenizer.json"
    path.write_text(path.read_text().replace('"<|endoftext|>"', '"<|end|>"', 1))
    with pytest.raises(TokenizerError, match="sha256"):
        load_tokenizer(tmp_path / "craft")


def test_streaming_decode_of_byte_level_pieces(bpe, tmp_path: Path) -> None:
    hf_models.save_tokenizer(bpe, tmp_path)
    tok = load_tokenizer(tmp_path)
    s = "Thou art 日本語 ☃ and 🎉 too, quoth he.\n"
    ids = tok.encode(s)
    dec = tok.decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == s
    assert all("\ufffd" not in p for p in pieces)  # half characters are held back


def test_bad_hf_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"}, "version": "1.0"}')
    with pytest.raises(TokenizerError, match=r"not a valid Hugging Face tokenizer\.json"):
        load_tokenizer(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        HFTokenizer.from_hf_dir(empty)


def test_special_token_missing_from_vocab(bpe, tmp_path: Path) -> None:
    hf_models.save_tokenizer(bpe, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<never>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="eos_token '<never>' is not in"):
        load_tokenizer(tmp_path)
