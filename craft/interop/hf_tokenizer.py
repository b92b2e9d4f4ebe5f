"""Craft tokenizers as Hugging Face `tokenizer.json` files that `AutoTokenizer` loads unchanged.

Each representation is built with the `tokenizers` library to give exactly Craft's ids and text
(the round trip is tested on tinyshakespeare and on adversarial strings):

- `char`: a WordLevel vocabulary of the characters behind a pre-tokenizer that isolates every
  character, and a decoder that concatenates them. With `unk` the unknown token is U+FFFD, the
  text Craft decodes it to; without it, an unseen character fails to encode, as in Craft.
- `bytes`: a byte-level BPE with no merges (id = byte value), `<bos>` = 256 and `<eos>` = 257 as
  special tokens; invalid UTF-8 decodes to U+FFFD as in Craft.
- `sentencepiece`: the model's pieces, scores and byte fallback as a BPE (merges ordered by the
  score of the piece they make) or Unigram model, whitespace as U+2581 split like SentencePiece,
  `\\n` as a token of its own (Craft trains it as a user-defined symbol). Control pieces (`<s>`,
  `</s>`) decode to nothing. One known difference: a Unigram model may encode a control or byte
  piece written literally in the text (`<s>`, `<0x41>`) as its id, which SentencePiece never does.
  Byte pieces that do not form valid UTF-8 decode to one U+FFFD per byte in `tokenizers`
  (SentencePiece: one per maximal invalid subsequence, so `<0xB6><0x7F>` gives "\ufffd\x7f"
  there and "\ufffd\ufffd" here); valid byte sequences decode alike.

Converted tokenizers set `split_special_tokens`, so special tokens written in the text stay plain
text, as in Craft.
- `hf`: already in that format.

Another tokenizer type can take part by giving its class a `to_hf()` method returning an
`HFTokenizer`.
"""

from __future__ import annotations

import json
from typing import Any

from craft.data.tokenizers.hf import HFTokenizer
from craft.errors import TokenizerError

SP_SPACE = "\u2581"


def to_hf_tokenizer(tokenizer: Any) -> HFTokenizer:
    """An `HFTokenizer` that encodes and decodes exactly like `tokenizer`."""
    own = getattr(tokenizer, "to_hf", None)
    if callable(own):
        return own()
    convert = _CONVERTERS.get(getattr(tokenizer, "type", ""))
    if convert is None:
        raise TokenizerError(
            f"a {getattr(tokenizer, 'type', type(tokenizer).__name__)} tokenizer has no Hugging "
            f"Face representation (supported: {', '.join(sorted([*_CONVERTERS, 'hf']))})"
        )
    return convert(tokenizer)


def _finish(backend: Any, specials: dict[str, str | None], origin: str) -> HFTokenizer:
    # Craft never turns text into special ids: "<eos>" in the text is five characters.
    return HFTokenizer(
        backend.to_str(), specials=specials, split_special_tokens=True, origin=origin
    )


def _char(tok: Any) -> HFTokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(tok.chars)}
    unk = None
    if tok.unk:
        if "\ufffd" in vocab:
            raise TokenizerError(
                "char tokenizer: its vocabulary holds U+FFFD and it maps unknown characters to "
                "<unk> (decoded as U+FFFD); this has no faithful Hugging Face representation"
            )
        unk = "\ufffd"
        vocab[unk] = tok.unk_id
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # No unk_token in the special tokens: transformers would skip it when decoding, Craft gives U+FFFD.
    return _finish(backend, {}, "char tokenizer")


def _bytes(tok: Any) -> HFTokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte -> printable character map, in byte order.
    chars = sorted(alphabet, key=_byte_of)
    vocab = {ch: _byte_of(ch) for ch in chars}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken("<bos>", special=True, normalized=False),
            AddedToken("<eos>", special=True, normalized=False),
        ]
    )
    ids = (backend.token_to_id("<bos>"), backend.token_to_id("<eos>"))
    if ids != (tok.bos_id, tok.eos_id):
        raise TokenizerError(f"bytes tokenizer: special ids {ids} != {(tok.bos_id, tok.eos_id)}")
    return _finish(backend, {"bos_token": "<bos>", "eos_token": "<eos>"}, "bytes tokenizer")


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256+."""
    cp = ord(ch)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if cp in printable:
        return cp
    others = [b for b in range(256) if b not in printable]
    return others[cp - 256]


def _sentencepiece(tok: Any) -> HFTokenizer:
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    proto = pb.ModelProto()
    proto.ParseFromString(tok.model_proto)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        problems.append(f"normalization {norm.name!r}")
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix")
    if not norm.escape_whitespaces or trainer.treat_whitespace_as_suffix:
        problems.append("whitespace handling")
    if not trainer.split_by_whitespace:
        problems.append("split_by_whitespace = false")
    if problems:
        raise TokenizerError(
            f"sentencepiece model ({tok.origin}): {', '.join(problems)} has no exact Hugging Face "
            "representation here; Craft converts models trained with its own settings "
            "(identity normalization, no dummy prefix)"
        )
    NORMAL, UNKNOWN, CONTROL, USER, BYTE = 1, 2, 3, 4, 6  # ModelProto.SentencePiece.Type
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk = next((p for p, _, t in pieces if t == UNKNOWN), None)
    byte_fallback = any(t == BYTE for _, _, t in pieces)
    if trainer.model_type == pb.TrainerSpec.BPE:
        merges = []
        for i, (piece, score, kind) in enumerate(pieces):
            if kind != NORMAL:
                continue
            for k in range(1, len(piece)):
                a, b = piece[:k], piece[k:]
                if a in vocab and b in vocab:
                    merges.append((-score, i, vocab[a], (a, b)))
        merges.sort(key=lambda m: m[:3])
        model = models.BPE(
            vocab=vocab,
            merges=[m[3] for m in merges],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    elif trainer.model_type == pb.TrainerSpec.UNIGRAM:
        # One difference: SentencePiece never matches a control or byte piece written in the
        # text ("<s>", "<0x41>"), a Unigram lattice may.
        model = models.Unigram(
            [(p, s) for p, s, _ in pieces],
            unk_id=vocab.get(unk),
            byte_fallback=byte_fallback,
        )
    else:
        raise TokenizerError(
            f"sentencepiece model ({tok.origin}): model type {trainer.model_type} is not "
            "supported (bpe and unigram are)"
        )
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SP_SPACE, prepend_scheme="never", split=True
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    user = [p for p, _, t in pieces if t == USER]
    if user:
        backend.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])
    # Control pieces decode to nothing, as in SentencePiece (special tokens are skipped).
    controls = [p for p, _, t in pieces if t == CONTROL]
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in controls])
    specials = {
        "bos_token": _piece(tok, tok.bos_id),
        "eos_token": _piece(tok, tok.eos_id),
        "unk_token": unk,
    }
    return _finish(backend, specials, f"sentencepiece {tok.origin}")


def _piece(tok: Any, i: int | None) -> str | None:
    return None if i is None else tok.id_to_piece(i)


_CONVERTERS = {"char": _char, "bytes": _bytes, "sentencepiece": _sentencepiece}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
