"""SentencePiece tokenizer (BPE or unigram): load a `.model` file or train one on the data.

Training defaults (chosen so that text survives a round trip byte for byte and so that encoding
a file chunk by chunk gives exactly the ids of encoding it whole):

- `normalization_rule_name="identity"`, `remove_extra_whitespaces=False`: no NFKC folding and no
  whitespace squeezing; the text is modelled as written.
- `add_dummy_prefix=False`: no space is invented at the start of each chunk or line.
- `"\\n"` is a user-defined symbol: a newline is always one piece and never part of another, so
  lines encode independently (training sees one line per sentence).
- `byte_fallback=True` (config): characters outside the vocabulary become UTF-8 byte pieces
  instead of `<unk>`, so any text encodes losslessly; `character_coverage=1.0` (config).
- Special ids: `<unk>`=0, `<s>`=1, `</s>`=2, no padding id.
- At most `input_sentence_size` (2,000,000) lines, sampled at random with a fixed seed, are used
  for training, which bounds its memory on large corpora.

Text is encoded line by line (a model trained elsewhere is applied per line, as it was trained).
The one character that does not survive a round trip is U+2581 (▁), SentencePiece's space marker.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from craft.data.tokenizers.base import Tokenizer
from craft.errors import TokenizerError
from craft.safety import MAX_MODEL_FILE_BYTES, inside, read_bytes_bounded

MODEL_FILE = "tokenizer.model"
INPUT_SENTENCE_SIZE = 2_000_000
MAX_SENTENCE_CHARS = 4000  # longer lines are cut for training (SentencePiece skips long ones)
MAX_SENTENCE_BYTES = 4 * MAX_SENTENCE_CHARS + 16
TRAIN_SEED = 1234
MAX_VOCAB_SIZE = 1 << 24  # piece ids are 32-bit in SentencePiece; real vocabularies are far smaller


def _spm() -> Any:
    import sentencepiece

    return sentencepiece


def _split_lines(text: str) -> list[str]:
    """Split after every newline; the pieces concatenate back to `text` exactly."""
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


class SentencePieceTokenizer(Tokenizer):
    type = "sentencepiece"

    def __init__(self, model_proto: bytes, origin: str = "<memory>") -> None:
        spm = _spm()
        self.model_proto = bytes(model_proto)
        self.origin = origin
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise TokenizerError(
                f"{origin}: not a valid SentencePiece model ({str(e).strip().splitlines()[-1]})"
            ) from None
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.unk_id = self._sp.unk_id() if self._sp.unk_id() >= 0 else None
        self.byte_fallback = any(self._sp.is_byte(i) for i in range(self._sp.get_piece_size()))
        self.threads = 1  # encode threads; preparation parallelises with processes instead

    @property
    def splits_characters(self) -> bool:  # type: ignore[override]
        return self.byte_fallback

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path).expanduser()
        if not path.is_file():
            raise TokenizerError(f"{path}: SentencePiece model file not found")
        data = read_bytes_bounded(path, MAX_MODEL_FILE_BYTES, what=str(path), error=TokenizerError)
        return cls(data, origin=str(path))

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int,
        model_type: str = "bpe",
        byte_fallback: bool = True,
        character_coverage: float = 1.0,
        input_sentence_size: int = INPUT_SENTENCE_SIZE,
    ) -> SentencePieceTokenizer:
        """Train a model on text chunks (streamed; see the module docstring for the defaults)."""
        from craft.data.progress import status

        spm = _spm()
        counter = _SentenceCounter(texts)
        model = io.BytesIO()
        label = f"training sentencepiece {model_type} (vocab {vocab_size})"
        try:
            spm.set_random_generator_seed(TRAIN_SEED)
            with status(label):
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(counter),
                    model_writer=model,
                    vocab_size=vocab_size,
                    model_type=model_type,
                    byte_fallback=byte_fallback,
                    character_coverage=character_coverage,
                    normalization_rule_name="identity",
                    remove_extra_whitespaces=False,
                    add_dummy_prefix=False,
                    user_defined_symbols=["\n"],
                    max_sentence_length=MAX_SENTENCE_BYTES,
                    input_sentence_size=input_sentence_size,
                    shuffle_input_sentence=True,
                    num_threads=max(1, os.cpu_count() or 1),
                    minloglevel=2,
                )
        except RuntimeError as e:
            if counter.sentences == 0:
                raise TokenizerError(
                    "sentencepiece: no text to train on (the input is empty)"
                ) from None
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            reason = lines[-1] if lines else "unknown error"
            if ") [" in reason and "] " in reason:  # drop "src/x.cc(123) [cond] " prefixes
                reason = reason.split("] ", 1)[1]
            raise TokenizerError(
                f"sentencepiece training failed ({model_type}, vocab_size={vocab_size}, "
                f"{counter.sentences} lines): {reason}"
            ) from None
        return cls(model.getvalue(), origin=f"trained {model_type} model")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode_array(self, text: str) -> np.ndarray:
        lines = _split_lines(text)
        if not lines:
            return np.zeros(0, dtype=np.int64)
        pieces = self._sp.encode(lines, num_threads=self.threads)
        count = sum(len(p) for p in pieces)
        return np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=count)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def extra_files(self) -> dict[str, bytes]:
        return {MODEL_FILE: self.model_proto}

    def artifact(self) -> dict[str, Any]:
        return {
            "model_file": MODEL_FILE,
            "model_sha256": hashlib.sha256(self.model_proto).hexdigest(),
            "vocab_size": self.vocab_size,
        }

    def config(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "vocab_size": self.vocab_size,
            "byte_fallback": self.byte_fallback,
            "model_sha256": hashlib.sha256(self.model_proto).hexdigest(),
        }

    @classmethod
    def from_artifact(cls, data: dict[str, Any], directory: Path) -> SentencePieceTokenizer:
        where = f"{directory / 'tokenizer.json'}: model_file"
        path = inside(
            directory, data.get("model_file", MODEL_FILE), what=where, error=TokenizerError
        )
        if not path.is_file():
            raise TokenizerError(
                f"{path}: SentencePiece model file named in tokenizer.json is missing"
            )
        proto = read_bytes_bounded(path, MAX_MODEL_FILE_BYTES, what=str(path), error=TokenizerError)
        expected = data.get("model_sha256")
        if expected is not None and hashlib.sha256(proto).hexdigest() != expected:
            raise TokenizerError(
                f"{path}: sha256 does not match tokenizer.json; the model file was changed"
            )
        return cls(proto, origin=str(path))


class _SentenceCounter:
    """Turn text chunks into training sentences (non-empty lines, long ones cut) and count them."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts = texts
        self.sentences = 0

    def __iter__(self) -> Iterator[str]:
        carry = ""
        for chunk in self.texts:
            lines = (carry + chunk).split("\n")
            carry = lines.pop()
            for line in lines:
                yield from self._cut(line)
        yield from self._cut(carry)

    def _cut(self, line: str) -> Iterator[str]:
        for start in range(0, len(line), MAX_SENTENCE_CHARS):
            piece = line[start : start + MAX_SENTENCE_CHARS]
            if piece.strip():
                self.sentences += 1
                yield piece


def build(
    cfg: Any, texts: Iterable[str] | None = None, workdir: Path | None = None
) -> SentencePieceTokenizer:
    """Registry builder: load `cfg.model` when set, else train on `texts` (`workdir` unused)."""
    if cfg.model:
        return SentencePieceTokenizer.from_file(cfg.model)
    if texts is None:
        raise TokenizerError(
            "sentencepiece: tokenizer.model is not set and there is no text to train one on"
        )
    return SentencePieceTokenizer.train(
        texts,
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        byte_fallback=cfg.byte_fallback,
        character_coverage=cfg.character_coverage,
    )
