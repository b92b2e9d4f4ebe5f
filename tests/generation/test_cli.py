"""`craft generate` and `craft eval` end to end, through the real CLI in subprocesses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from craft.config import from_dict, to_toml
from craft.config.components import CharTokenizerConfig
from craft.data.datasets import PreparedDataset
from craft.data.prepare import prepare
from craft.evaluation import evaluate_checkpoint, evaluate_tokens
from craft.generation import generate
from craft.training.builders import build_model
from craft.training.checkpoint import load_model, write_export

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


def _craft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRAFT_DEBUG": "0", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "craft", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        input=stdin,
    )


def _config(data_dir: Path | None, **model: object) -> dict:
    gpt = {"type": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32}
    data = {"type": "tokens", "dir": str(data_dir)} if data_dir else {"type": "random"}
    return {
        "model": {**gpt, **model},
        "data": data,
        "tokenizer": {"type": "char"},
        "eval": {"batch_size": 4},
    }


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen_cli")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    data = root / "data"
    prepare([root / "text.txt"], data, CharTokenizerConfig(), val_fraction=0.1, progress=False)
    (root / "other.txt").write_text("completely different symbols: XYZ#@!\n" * 50, encoding="utf-8")
    other = root / "other_data"
    prepare([root / "other.txt"], other, CharTokenizerConfig(), val_fraction=0.2, progress=False)

    tok = PreparedDataset(data).tokenizer
    cfg = from_dict(_config(data))
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    export = root / "export"
    write_export(
        export, model_state=model.state_dict(), config_toml=to_toml(cfg), tokenizer=tok, step=7
    )
    rnn_cfg = from_dict(
        {
            **_config(data),
            "model": {"type": "rnn", "cell": "gru", "n_layer": 1, "d_embed": 8, "hidden_size": 16},
        }
    )
    rnn = build_model(rnn_cfg, tok.vocab_size)
    rnn_export = root / "rnn_export"
    write_export(
        rnn_export,
        model_state=rnn.state_dict(),
        config_toml=to_toml(rnn_cfg),
        tokenizer=tok,
        step=1,
    )
    return {"root": root, "data": data, "other": other, "export": export, "rnn": rnn_export}


def test_recurrent_checkpoint_evaluates_in_training_windows(artifacts: dict[str, Path]) -> None:
    res = evaluate_checkpoint(artifacts["rnn"], split="val", progress=False)
    model, tok, cfg = load_model(artifacts["rnn"])
    val = PreparedDataset(artifacts["data"]).split("val")
    assert res.window == cfg.model.block_size == 128 and res.complete
    assert res.data == str(artifacts["data"])
    ref = evaluate_tokens(model, tok, val, window=128, batch_size=4)
    assert math.isclose(res.loss, ref.loss, rel_tol=1e-6)
    assert generate(model, tok, "line", max_new_tokens=10, seed=0) == generate(
        model, tok, "line", max_new_tokens=10, seed=0, use_cache=False
    )


def test_generate_stream_and_no_stream_print_the_same(artifacts: dict[str, Path]) -> None:
    args = ["generate", "--checkpoint", str(artifacts["export"]), "--prompt", "line 1"]
    args += ["--max-new-tokens", "40", "--seed", "3", "--num-samples", "2", "--top-k", "5"]
    streamed = _craft(*args, "--stream")
    plain = _craft(*args, "--no-stream")
    assert streamed.returncode == 0, streamed.stderr
    assert plain.returncode == 0, plain.stderr
    assert streamed.stdout == plain.stdout
    # the same as the Python API with the same seed
    model, tok, _ = load_model(artifacts["export"])
    texts = generate(model, tok, "line 1", max_new_tokens=40, seed=3, num_samples=2, top_k=5)
    assert streamed.stdout == f"line 1{texts[0]}\n---------------\nline 1{texts[1]}\n"


def test_generate_warns_when_the_prompt_is_cropped(artifacts: dict[str, Path]) -> None:
    prompt = "the lazy dog " * 5  # 65 characters > block_size 32
    (artifacts["root"] / "prompt.txt").write_text(prompt, encoding="utf-8")
    r = _craft(
        "generate", "--checkpoint", str(artifacts["export"]),
        "--prompt-file", str(artifacts["root"] / "prompt.txt"),
        "--max-new-tokens", "3", "--temperature", "0", "--no-stream", "--seed", "0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "warning: prompt has 65 tokens" in r.stderr and "cropped from the left" in r.stderr
    assert r.stdout.startswith(prompt) and len(r.stdout) == len(prompt) + 3 + 1


def test_eval_json_equals_in_process_computation(artifacts: dict[str, Path]) -> None:
    r = _craft("eval", "--checkpoint", str(artifacts["export"]), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    model, tok, _ = load_model(artifacts["export"])
    val = PreparedDataset(artifacts["data"]).split("val")
    ref = evaluate_tokens(model, tok, val, window=32, batch_size=4)
    assert got["complete"] and got["tokens"] == len(val) - 1 == ref.tokens
    for key in ("loss", "bits_per_char", "bits_per_byte", "perplexity"):
        assert math.isclose(got[key], getattr(ref, key), rel_tol=1e-5), key
    assert math.isclose(got["bits_per_token"], got["loss"] / math.log(2), rel_tol=1e-9)

    r = _craft(
        "eval", "--checkpoint", str(artifacts["export"]), "--data", str(artifacts["data"]),
        "--split", "train", "--max-batches", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "first 2 batches" in r.stdout and "bits/char" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--checkpoint", "{root}/missing"], "not found"),
        (["generate", "--checkpoint", "{export}", "--prompt", "ab~§"], "'§'"),
        (["generate", "--checkpoint", "{export}", "--top-p", "1.5"], "top_p = 1.5"),
        (["generate", "--checkpoint", "{export}", "--temperature", "-1"], "--temperature"),
        (
            ["generate", "--checkpoint", "{export}", "--prompt", "a", "--prompt-file", "x"],
            "not both",
        ),
        (["generate", "--checkpoint", "{export}", "--prompt-file", "{root}/nope.txt"], "not found"),
        (["generate", "--checkpoint", "{export}", "--device", "tpu"], "--device"),
        (["eval", "--checkpoint", "{export}", "--data", "{other}"], "vocabulary mismatch"),
        (["eval", "--checkpoint", "{export}", "--split", "test"], "--split"),
        (["eval", "--checkpoint", "{root}/incomplete"], "incomplete checkpoint"),
    ],
)
def test_bad_inputs_exit_2_without_traceback(
    artifacts: dict[str, Path], args: list[str], message: str
) -> None:
    incomplete = artifacts["root"] / "incomplete"
    incomplete.mkdir(exist_ok=True)
    (incomplete / "model.safetensors").write_bytes(b"partial")
    fmt = {k: str(v) for k, v in artifacts.items()}
    r = _craft(*[a.format(**fmt) for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert message in r.stderr, r.stderr
