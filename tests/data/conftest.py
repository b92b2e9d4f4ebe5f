"""Fixtures of the data tests: small text files and a SentencePiece model trained once."""

from __future__ import annotations

from pathlib import Path

import pytest

from craft.data.tokenizers import SentencePieceTokenizer

SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    """A 400-piece BPE model trained on the first 200 kB of tinyshakespeare (or a local sample)."""
    import os

    path = Path(os.environ["CRAFT_DATA_MIRROR"]) / "tinyshakespeare" / "input.txt"
    text = path.read_text(encoding="utf-8")[:200_000] if path.exists() else SAMPLE * 400
    from craft.data.progress import quiet

    with quiet():
        return SentencePieceTokenizer.train([text], vocab_size=400, model_type="bpe")


@pytest.fixture
def text_files(tmp_path: Path) -> list[Path]:
    """Three small UTF-8 files (one with multi-byte characters and no final newline)."""
    files = []
    for i, body in enumerate([SAMPLE * 3, "Ünïcödé ☃ text\n" * 5 + "end", SAMPLE]):
        p = tmp_path / "in" / f"part{i}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(body, encoding="utf-8")
        files.append(p)
    return files
