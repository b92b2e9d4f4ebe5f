"""Shared fixtures: tiny HF checkpoints written by transformers (built once per test process)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop import hf_models


@pytest.fixture(scope="session")
def text() -> str:
    path = Path(os.environ["CRAFT_DATA_MIRROR"]) / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"tinyshakespeare mirror not found at {path}")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def bpe(text: str):
    """GPT-2-style byte-level BPE (vocab 300) trained on tinyshakespeare."""
    return hf_models.train_bpe(text, 300, kind="gpt2")


@pytest.fixture(scope="session")
def llama_bpe(text: str):
    """Llama-style BPE (Metaspace, byte fallback, <s> prepended) trained on tinyshakespeare."""
    return hf_models.train_bpe(text[:200_000], 400, kind="llama")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory, bpe, llama_bpe) -> dict[str, Path]:
    """HF model directories: GPT-2 (tanh GELU), Llama untied + GQA (sharded), Llama tied,
    Mistral; each with its tokenizer."""
    root = tmp_path_factory.mktemp("hf_zoo")
    v, lv = bpe.get_vocab_size(), llama_bpe.get_vocab_size()
    return {
        "gpt2": hf_models.save_model(hf_models.gpt2_model(v), root / "gpt2", bpe),
        "llama": hf_models.save_model(
            hf_models.llama_model(lv), root / "llama", llama_bpe, "llama", max_shard_size="40KB"
        ),
        "llama_tied": hf_models.save_model(
            hf_models.llama_model(lv, seed=1, tie_word_embeddings=True, num_key_value_heads=4),
            root / "llama_tied",
            llama_bpe,
            "llama",
        ),
        "mistral": hf_models.save_model(
            hf_models.llama_model(lv, seed=2, arch="mistral", sliding_window=None),
            root / "mistral",
            llama_bpe,
            "llama",
        ),
    }


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def craft_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run `craft ARGS` in this process (the real entry point, no interpreter start-up)."""
    from craft.cli.main import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["craft", *args])
        monkeypatch.setenv("CRAFT_DEBUG", "0")
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Iterator[None]:
    """Never reach the Hub from tests; a private HF cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))
    yield
