"""Downloaded datasets and tokenizers stay inside their directory, within size limits; the dataset
cache refuses what another user could have planted; text from files is printed inert."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from craft.config import from_dict
from craft.config.components import CharTokenizerConfig
from craft.data.datasets import PreparedDataset, build_tokens
from craft.data.prepare import default_dataset_dir, prepare
from craft.data.tokenizers import load_tokenizer
from craft.data.tokenizers.sentencepiece import SentencePieceTokenizer
from craft.errors import DataError, TokenizerError
from tests.security._helpers import Canary, run_craft

REPO = Path(__file__).resolve().parents[2]
TEXT = "".join(
    f"{i} a tiny corpus for a tiny tokenizer, with words and more words.\n" for i in range(80)
)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine saved SentencePiece tokenizer directory."""
    root = tmp_path_factory.mktemp("sp")
    tok = SentencePieceTokenizer.train([TEXT], vocab_size=320)
    tok.save(root / "tok")
    return root / "tok"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    (root / "text.txt").write_text(TEXT)
    prepare([root / "text.txt"], root / "data", CharTokenizerConfig(), progress=False)
    return root / "data"


def _set_model_file(directory: Path, value: object) -> None:
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model_file"] = value
    path.write_text(json.dumps(data))


def test_sentencepiece_model_file_must_stay_inside(sp_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(sp_dir, other)  # a valid model a doctored tokenizer.json could point at
    evil = tmp_path / "dl" / "a" / "b" / "tok"
    shutil.copytree(sp_dir, evil)
    (evil / "tokenizer.model").unlink()
    secret = Canary(tmp_path / "private" / "shadow")
    for value, why in (
        (str(secret.path), "absolute path"),
        ("../../../../other/tokenizer.model", "leaves its directory"),
    ):
        _set_model_file(evil, value)
        with pytest.raises(TokenizerError, match=why):
            load_tokenizer(evil)
    os.symlink(other / "tokenizer.model", evil / "tokenizer.model")
    _set_model_file(evil, "tokenizer.model")
    with pytest.raises(TokenizerError, match="points outside"):
        load_tokenizer(evil)
    assert secret.untouched()


def test_oversized_model_file_is_refused_before_reading(sp_dir, tmp_path, monkeypatch) -> None:
    import craft.data.tokenizers.sentencepiece as sp

    evil = tmp_path / "tok"
    shutil.copytree(sp_dir, evil)
    with open(evil / "tokenizer.model", "wb") as f:
        f.truncate(2 << 20)  # sparse: stands for the 8 GB file, against a 1 MiB limit
    monkeypatch.setattr(sp, "MAX_MODEL_FILE_BYTES", 1 << 20, raising=False)
    with pytest.raises(TokenizerError, match="more than"):
        load_tokenizer(evil)
    with pytest.raises(TokenizerError, match="more than"):
        load_tokenizer(evil / "tokenizer.model")


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_meta_json_cannot_name_files_outside_the_dataset(dataset, tmp_path) -> None:
    secret = Canary(tmp_path / "private" / "shadow")
    evil = tmp_path / "dl" / "data"
    shutil.copytree(dataset, evil)

    def tokenizer_file(meta: dict) -> None:
        meta["tokenizer"]["files"] = {str(secret.path): "0" * 64}

    _edit_meta(evil, tokenizer_file)
    with pytest.raises(DataError, match="absolute path"):
        PreparedDataset(evil)
    assert secret.untouched()
    shutil.rmtree(evil)
    shutil.copytree(dataset, evil)
    (evil / "val.bin").unlink()
    shutil.copy(dataset / "val.bin", tmp_path / "val.bin")
    (evil / "val.bin").symlink_to(tmp_path / "val.bin")
    with pytest.raises(DataError, match="points outside"):
        PreparedDataset(evil)


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda m: m.pop("sources"), 0),
        (lambda m: m.update(val_fraction="x") or m.pop("created"), 0),
        (lambda m: m["sources"][0].update(bytes="many"), 2),
        (lambda m: m["sources"][0].update(name=["x"]), 2),
    ],
)
def test_data_info_on_odd_meta_never_tracebacks(dataset, tmp_path, capsys, edit, expect) -> None:
    evil = tmp_path / "data"
    shutil.copytree(dataset, evil)
    _edit_meta(evil, edit)
    res = run_craft(["data", "info", str(evil)], capsys)
    assert res.code == expect, res
    assert "Traceback" not in res.err


def test_data_info_prints_control_characters_escaped(dataset, tmp_path, capsys) -> None:
    evil = tmp_path / "data"
    shutil.copytree(dataset, evil)
    osc = "\x1b]0;pwned\x07\x1b]52;c;cm0gLXJmIH4=\x07name"

    def plant(meta: dict) -> None:
        meta["sources"][0]["name"] = osc
        meta["created"] = "\x1b[2Jtoday"

    _edit_meta(evil, plant)
    res = run_craft(["data", "info", str(evil)], capsys)
    assert res.code == 0, res
    assert "\x1b" not in res.out and "\x07" not in res.out
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07name" in res.out


def test_error_messages_escape_control_characters(tmp_path, capsys) -> None:
    bad = tmp_path / "bad\x1b]0;t\x07.toml"
    bad.write_text("x = \n")
    res = run_craft(["config", "validate", str(bad)], capsys)
    assert res.code == 2 and "\x1b" not in res.err and "\\x1b]0;t\\x07" in res.err


def _recipe(tmp_path: Path, source: str | None = None) -> object:
    (tmp_path / "corpus.txt").write_text(TEXT)
    data = {"source": source} if source else {"files": [str(tmp_path / "corpus.txt")]}
    return from_dict({"data": {"type": "tokens", **data}, "tokenizer": {"type": "char"}})


def test_a_cache_others_can_write_is_refused(tmp_path, monkeypatch) -> None:
    home = tmp_path / "shared_home"
    home.mkdir()
    os.chmod(home, 0o777)
    monkeypatch.setenv("CRAFT_HOME", str(home))
    cfg = _recipe(tmp_path)
    with pytest.raises(DataError, match="can be written by other users"):
        build_tokens(cfg.data, cfg.tokenizer, block_size=8, progress=False)
    assert list(home.iterdir()) == []
    os.chmod(home, 0o755)
    build_tokens(cfg.data, cfg.tokenizer, block_size=8, progress=False)
    planted = default_dataset_dir(cfg.data, cfg.tokenizer)
    os.chmod(planted, 0o777)  # a dataset directory someone else could have filled
    with pytest.raises(DataError, match="other users"):
        build_tokens(cfg.data, cfg.tokenizer, block_size=8, progress=False)


def test_a_modified_cached_dataset_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CRAFT_HOME", str(tmp_path / "home"))
    cfg = _recipe(tmp_path)
    build_tokens(cfg.data, cfg.tokenizer, block_size=8, progress=False)
    path = default_dataset_dir(cfg.data, cfg.tokenizer)
    data = bytearray((path / "train.bin").read_bytes())
    data[:4] = bytes(4)  # same size, other tokens: poisoned data
    (path / "train.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match the sha256 recorded"):
        build_tokens(cfg.data, cfg.tokenizer, block_size=8, progress=False)


def test_a_planted_named_source_dataset_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CRAFT_HOME", str(tmp_path / "home"))
    cfg = _recipe(tmp_path, source="tinyshakespeare")
    path = default_dataset_dir(cfg.data, cfg.tokenizer)
    path.parent.mkdir(parents=True)
    # consistent in itself (token hashes match) but prepared from other text
    prepare([tmp_path / "corpus.txt"], path, cfg.tokenizer, progress=False)
    with pytest.raises(DataError, match="not prepared from it"):
        build_tokens(cfg.data, cfg.tokenizer, block_size=8, progress=False)


def test_cuda_jit_build_folder_others_can_write_is_never_loaded(tmp_path, monkeypatch) -> None:
    from torch.utils import cpp_extension

    from craft.ops import cuda

    loaded: list[str] = []
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: loaded.append(kw["build_directory"]))
    monkeypatch.setenv("CRAFT_CUDA_JIT", "1")
    home = tmp_path / "home"
    (home / "torch_extensions").mkdir(parents=True)
    os.chmod(home, 0o700)
    os.chmod(home / "torch_extensions", 0o777)  # anyone could plant a built library here
    monkeypatch.setenv("CRAFT_HOME", str(home))
    module, reason = cuda._jit_build()
    assert module is None and loaded == []
    assert "refused" in reason and "other users" in reason
    os.chmod(home / "torch_extensions", 0o700)
    cuda._jit_build()
    assert len(loaded) == 1 and loaded[0].startswith(str(home / "torch_extensions"))
