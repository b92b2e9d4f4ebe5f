"""Absurd sizes and inputs end with a one-line error before anything is allocated or read."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from craft.config import RawConfig, from_dict
from craft.config.components import GPTConfig, RNNConfig
from craft.config.loader import apply_overrides
from craft.errors import CheckpointError
from craft.models import flops, gpt, rnn
from tests.security._helpers import fix_complete, run_craft
from tests.training._helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
MICRO = REPO / "recipes" / "micro.toml"


@pytest.mark.parametrize(
    "args",
    [
        ["cross-entropy", "--batch", "100000", "--vocab", "1000000"],
        ["attention", "--batch", "1000", "--seq-lens", "100000"],
        ["linear-cross-entropy", "--batch", "100000", "--hidden", "100000", "--vocab", "100000"],
        ["norm", "--batch", "1000000", "--seq-lens", "100000", "--hidden", "100000"],
    ],
)
def test_bench_sizes_that_cannot_fit_are_refused_first(capsys, args) -> None:
    res = run_craft(["bench", *args, "--device", "cpu"], capsys)
    assert res.code == 2, res
    assert "needs at least" in res.err and "GiB" in res.err
    assert len(res.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(n_layer=2, n_head=4, d_model=64, block_size=32),
        GPTConfig(n_layer=3, n_head=4, n_kv_head=2, d_model=64, positions="rope", mlp="swiglu",
                  norm="rmsnorm", bias=False, tie_embeddings=False),
        GPTConfig(n_layer=1, n_head=2, d_model=32, mlp_hidden=40, norm="rmsnorm", vocab_size=99),
        RNNConfig(cell="lstm", n_layer=3, d_embed=16, hidden_size=24, tie_embeddings=True),
        RNNConfig(cell="gru", n_layer=1, d_embed=16, hidden_size=16, tie_embeddings=True),
        RNNConfig(cell="rnn", n_layer=2, d_embed=8, hidden_size=12),
    ],
)  # fmt: skip
def test_arithmetic_counts_match_the_built_model(cfg) -> None:
    module = gpt if cfg.type == "gpt" else rnn
    built = flops.count_params(flops.meta_model(module.build, cfg, 65))
    assert module.param_counts(cfg, 65) == built
    assert flops.param_counts(cfg, 65) == built


def test_model_info_never_builds_a_builtin_model(capsys, monkeypatch) -> None:
    def never(*a: object, **k: object) -> None:
        raise AssertionError("model info built the model")

    monkeypatch.setattr(flops, "meta_model", never)
    res = run_craft(
        ["model", "info", str(MICRO), "model.n_layer=10000", "--vocab-size", "65"], capsys
    )
    assert res.code == 0, res.err
    res = run_craft(
        ["model", "info", str(MICRO), "model.d_model=1000000000", "model.n_head=1",
         "--vocab-size", "65"],
        capsys,
    )  # fmt: skip
    assert res.code == 0, res.err
    total = gpt.param_counts(GPTConfig(n_layer=2, n_head=1, d_model=10**9, block_size=32), 65)
    assert f"{total.total:,}" in res.out.replace("\n", "")


@pytest.mark.parametrize(
    "args",
    [
        ["tokenizer", "train", "-i", "x.txt", "--vocab-size", "99999999999999999999", "-o", "t"],
        ["data", "prepare", "-i", "x.txt", "-o", "d", "-t", "sentencepiece", "--vocab-size",
         "99999999999999999999"],
    ],
)  # fmt: skip
def test_absurd_vocabulary_sizes_are_one_line_errors(tmp_path, capsys, args) -> None:
    (tmp_path / "x.txt").write_text("some text\n" * 50)
    res = run_craft(args, capsys, cwd=tmp_path)
    assert res.code == 2 and "--vocab-size" in res.err, res
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_deeply_nested_toml_is_a_one_line_error(tmp_path, capsys) -> None:
    deep = "[" * 500 + "]" * 500
    recipe = tmp_path / "deep.toml"
    recipe.write_text(f"[training]\nx = {deep}\n")
    res = run_craft(["config", "validate", str(recipe)], capsys)
    assert res.code == 2 and "nested more than" in res.err, res
    res = run_craft(["config", "validate", str(MICRO), f"training.x={deep}"], capsys)
    assert res.code == 2 and "nested more than" in res.err, res
    tables = tmp_path / "tables.toml"
    tables.write_text("[" + ".".join(["a"] * 500) + "]\nx = 1\n")
    res = run_craft(["config", "validate", str(tables)], capsys)
    assert res.code == 2 and "nested more than" in res.err, res


def _limited() -> None:  # a child that cannot eat the machine's memory if a read is unbounded
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _craft_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRAFT_DEBUG": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "craft", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,  # a FIFO that blocks would hang here
        preexec_fn=_limited,
    )


def test_includes_and_prompt_files_must_be_regular_files(tmp_path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for special, why in ((fifo, "is a FIFO"), (Path("/dev/zero"), "is a device")):
        recipe = tmp_path / f"inc_{special.name}.toml"
        recipe.write_text(f'include = ["{special}"]\n')
        res = _craft_subprocess(["config", "validate", str(recipe)], tmp_path)
        assert res.returncode == 2 and why in res.stderr, res.stderr
        res = _craft_subprocess(
            ["generate", "--checkpoint", str(tmp_path), "--prompt-file", str(special)], tmp_path
        )
        assert res.returncode == 2 and why in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_resume_with_a_wrong_size_rng_state_is_a_checkpoint_error(tmp_path) -> None:
    from craft.training.run import train

    cfg = tiny_config(tmp_path, "training.max_steps=2", "checkpoint.interval=2", "eval.interval=2")
    result = train(cfg)
    ck = result.last_checkpoint
    rng = load_file(str(ck / "rng.safetensors"))
    rng["rank0.torch.cpu"] = rng["rank0.torch.cpu"][:10].clone()
    save_file(rng, str(ck / "rng.safetensors"), {"world_size": "1"})
    fix_complete(ck)
    cfg = tiny_config(tmp_path, "training.max_steps=4", "checkpoint.interval=2", "eval.interval=2")
    with pytest.raises(CheckpointError, match=r"'torch\.cpu' holds 10 values"):
        train(cfg, resume=str(ck))


class _CountingDict(dict):
    """Counts how many keys are visited by iteration (the old override merge scanned them all)."""

    visited = 0

    def __iter__(self):
        for k in super().__iter__():
            _CountingDict.visited += 1
            yield k


def test_overrides_merge_in_linear_time() -> None:
    raw = RawConfig(data={}, origins=_CountingDict())
    n = 3000
    overrides = [f"training.k{i}={i}" for i in range(n)] + [f"training.k0={i}" for i in range(n)]
    apply_overrides(raw, overrides)
    assert _CountingDict.visited < 10 * n  # quadratic: ~n*n/2
    assert raw.data["training"]["k0"] == n - 1 and len(raw.data["training"]) == n
    assert raw.origin("training.k5") == "command line"
    apply_overrides(raw, ["training=3"])  # a table replaced by a value forgets its leaves
    assert not any(k.startswith("training.") for k in raw.origins)
    from_dict({"training": {"max_steps": 3}})  # the merge still validates as before
