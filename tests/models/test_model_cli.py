"""`craft model info` through the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _craft(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "craft", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_model_info_reports_counts_flops_memory_and_kernels():
    r = _craft(
        "model",
        "info",
        "recipes/char_gpt.toml",
        "model.bias=true",
        "model.vocab_size=65",
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "10,770,816" in out  # nanoGPT's shakespeare-char model
    assert "10,647,552" in out  # non-embedding: total - (65 + 256) * 384
    assert "from model.vocab_size" in out
    assert "6N + 12·L·H·hs·T" in out
    assert f"{6 * 10_672_512 + 12 * 6 * 6 * 64 * 256:,}" in out
    assert "optimizer state" in out and "activations" in out
    assert "attention" in out and "torch: ok" in out and "eager: ok" in out
    # `auto` is described as what it is: an order of preference, not a measured "fastest"
    assert "order of preference" in out and "fastest" not in out


def test_model_info_states_an_assumed_vocab_size_and_takes_the_option(tmp_path, monkeypatch):
    # A private cache: another test may have prepared the recipe's dataset in the shared one.
    monkeypatch.setenv("CRAFT_HOME", str(tmp_path))
    r = _craft("model", "info", "recipes/rnn_char.toml")
    assert r.returncode == 0, r.stderr
    assert "ASSUMED" in r.stdout and "--vocab-size" in r.stdout
    r = _craft("model", "info", "recipes/rnn_char.toml", "--vocab-size", "65")
    assert r.returncode == 0, r.stderr
    assert "from --vocab-size" in r.stdout and "ASSUMED" not in r.stdout


def test_model_info_bad_override_exits_2_without_traceback():
    for bad in ("model.n_head=5", "model.bogus=1"):
        r = _craft("model", "info", "recipes/micro.toml", bad)
        assert r.returncode == 2, (bad, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ")
        assert "Traceback" not in r.stderr + r.stdout


def test_model_info_reads_the_vocab_size_of_a_prepared_dataset(tmp_path):
    from craft.config.components import CharTokenizerConfig
    from craft.data.prepare import prepare

    text = tmp_path / "text.txt"
    text.write_text("abcdefg\n" * 200, encoding="utf-8")
    out = tmp_path / "prepared"
    prepare([text], out, CharTokenizerConfig(), val_fraction=0.1, workers=1, progress=False)
    r = _craft("model", "info", "recipes/micro.toml", f"data.dir={str(out)!r}")
    assert r.returncode == 0, r.stderr
    assert "vocab_size = 8" in r.stdout  # a-g and the newline
    assert "prepared dataset" in r.stdout


def test_model_info_of_a_plugin_model_without_a_memory_formula() -> None:
    r = _craft("model", "info", "tests/config/plugins/bigram.toml", "model.vocab_size=65")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "Training memory estimate: n/a" in r.stdout and "4,225" in r.stdout
