"""The real `craft data` / `craft tokenizer` commands in a subprocess: results and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def craft(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("CRAFT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "craft", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_prepare_info_and_dataset_alias(text_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    r = craft(
        "data", "prepare", "--input", str(text_files[0]), str(text_files[1]),
        "--input", str(text_files[2]), "--output-dir", str(out), "--tokenizer", "bytes",
        "--val-fraction", "0.2", "--workers", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"prepared {out}" in r.stdout and "bytes" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["sources"]) == 3 and meta["val_fraction"] == 0.2
    assert "encoding" in r.stderr  # progress is shown (plain lines when not a terminal)
    r = craft("data", "info", str(out))
    assert r.returncode == 0 and "bytes (vocab 258)" in r.stdout
    again = craft(
        "dataset",
        "prepare",
        "-i",
        str(text_files[0]),
        "-o",
        str(out),
        "-t",
        "char",
        "--force",
        "-q",
    )
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""


def test_prepare_from_recipe(tmp_path: Path, shakespeare: Path) -> None:
    # A private CRAFT_HOME: another test on this worker may already have prepared micro's data.
    home = {"CRAFT_HOME": str(tmp_path / "craft_home")}
    r = craft(
        "data",
        "prepare",
        "--config",
        str(REPO / "recipes" / "micro.toml"),
        "-q",
        "--workers",
        "1",
        env=home,
    )
    assert r.returncode == 0, r.stderr
    assert "tinyshakespeare-char-" in r.stdout and "vocab 65" in r.stdout
    r = craft(
        "data", "prepare", "--config", str(REPO / "recipes" / "micro.toml"), "--input", "x.txt"
    )
    assert_user_error(r, "--input cannot be combined with --config")


def test_tokenizer_train_then_prepare_with_it(tmp_path: Path, shakespeare: Path) -> None:
    tok = tmp_path / "tok"
    part = tmp_path / "part.txt"
    part.write_text(shakespeare.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    r = craft(
        "tokenizer", "train", "--input", str(part), "--vocab-size", "400",
        "--model-type", "unigram", "--output", str(tok),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tok / "tokenizer.model").is_file() and (tok / "tokenizer.json").is_file()
    assert "training sentencepiece unigram" in r.stderr
    r = craft(
        "data", "prepare", "-i", "tinyshakespeare", "-o", str(tmp_path / "ds"),
        "--tokenizer-model", str(tok / "tokenizer.model"), "-q", "-w", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "vocab 400" in r.stdout
    r = craft("tokenizer", "encode", str(tmp_path / "ds"), "To be, or not")
    ids = r.stdout.split()
    r2 = craft("tokenizer", "encode", str(tok), "--decode", " ".join(ids))
    assert r2.stdout == "To be, or not\n"


@pytest.fixture
def bad_inputs(tmp_path: Path) -> Path:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    (tmp_path / "nontext").mkdir()
    (tmp_path / "nontext" / "blob.bin").write_bytes(b"\x00\x01")
    (tmp_path / "ok.txt").write_text("some text for a dataset\n" * 20)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["-i", "empty.txt"], ["input is empty", "empty.txt"]),
        (["-i", "missing.txt"], ["missing.txt", "no such file"]),
        (
            ["-i", "latin1.txt"],
            ["latin1.txt", "not valid UTF-8 at byte offset 3", "--errors replace"],
        ),
        (["-i", "nontext"], ["nontext", "no text files"]),
        (["-i", "ok.txt", "-t", "wordpiece"], ["--tokenizer 'wordpiece'"]),
        (["-i", "ok.txt", "--val-fraction", "1.5"], ["--val-fraction 1.5"]),
        (["-i", "ok.txt", "-t", "sentencepiece", "--vocab-size", "5"], ["--vocab-size 5"]),
        (["-i", "ok.txt", "--errors", "ignore"], ["--errors 'ignore'"]),
    ],
)
def test_prepare_bad_input_exits_2(bad_inputs: Path, args: list[str], fragments: list[str]) -> None:
    full = ["data", "prepare", *args, "-o", "out", "-q"]
    if "-t" not in args:
        full += ["-t", "char"]
    r = craft(*full, cwd=bad_inputs)
    assert_user_error(r, *fragments)
    assert not (bad_inputs / "out").exists()


def test_existing_dataset_needs_force(bad_inputs: Path) -> None:
    first = craft(
        "data", "prepare", "-i", "ok.txt", "-o", "out", "-t", "char", "-q", cwd=bad_inputs
    )
    assert first.returncode == 0, first.stderr
    r = craft("data", "prepare", "-i", "ok.txt", "-o", "out", "-t", "bytes", "-q", cwd=bad_inputs)
    assert_user_error(r, "already holds a prepared dataset", "--force")


def test_damaged_dataset_is_reported(bad_inputs: Path) -> None:
    assert (
        craft(
            "data", "prepare", "-i", "ok.txt", "-o", "out", "-t", "char", "-q", cwd=bad_inputs
        ).returncode
        == 0
    )
    with open(bad_inputs / "out" / "train.bin", "ab") as f:
        f.write(b"\x00\x00")
    assert_user_error(
        craft("data", "info", "out", cwd=bad_inputs), "train.bin: holds", "meta.json says"
    )
    meta = json.loads((bad_inputs / "out" / "meta.json").read_text())
    (bad_inputs / "out" / "train.bin").write_bytes(b"\x00" * 2 * meta["splits"]["train"]["tokens"])
    tok = json.loads((bad_inputs / "out" / "tokenizer.json").read_text())
    tok["chars"] = tok["chars"][:-1]
    (bad_inputs / "out" / "tokenizer.json").write_text(json.dumps(tok))
    assert_user_error(craft("data", "info", "out", cwd=bad_inputs), "tokenizer.json does not match")


def test_offline_named_source_without_mirror(tmp_path: Path) -> None:
    env = {"CRAFT_HOME": str(tmp_path / "home"), "CRAFT_OFFLINE": "1", "CRAFT_DATA_MIRROR": ""}
    r = craft(
        "data", "prepare", "-i", "tinyshakespeare", "-o", str(tmp_path / "o"), "-t", "char", env=env
    )
    assert_user_error(r, "CRAFT_DATA_MIRROR=DIR", "download https://")


def test_tokenizer_train_bad_input(bad_inputs: Path) -> None:
    r = craft(
        "tokenizer",
        "train",
        "--input",
        "ok.txt",
        "--vocab-size",
        "100000",
        "--output",
        "t",
        cwd=bad_inputs,
    )
    assert_user_error(r, "sentencepiece training failed", "vocab_size=100000")
    assert not (bad_inputs / "t").exists()
    r = craft("tokenizer", "train", "--input", "latin1.txt", "--output", "t", cwd=bad_inputs)
    assert_user_error(r, "latin1.txt: not valid UTF-8")
    r = craft(
        "tokenizer",
        "train",
        "--input",
        "ok.txt",
        "--model-type",
        "wordpiece",
        "--output",
        "t",
        cwd=bad_inputs,
    )
    assert_user_error(r, "--model-type 'wordpiece'")


def test_info_refuses_ids_outside_the_vocabulary(text_files: list[Path], tmp_path: Path) -> None:
    from craft.config.components import CharTokenizerConfig
    from craft.data.prepare import prepare

    out = tmp_path / "ds"
    meta = prepare(text_files, out, CharTokenizerConfig(), workers=1, progress=False)
    ids = np.fromfile(out / "val.bin", dtype=np.uint16)
    ids[7] = meta["vocab_size"]  # one id past the vocabulary; sizes and meta.json unchanged
    ids.tofile(out / "val.bin")
    assert_user_error(
        craft("data", "info", str(out)),
        f"val.bin: token id {meta['vocab_size']} at position 7 is outside the vocabulary",
    )
