"""`craft bench`: correctness gate, work formulas, the CLI's JSON/PNG output, the train bench."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from craft.bench import (
    OK,
    SKIPPED,
    WRONG,
    Case,
    Impl,
    Settings,
    family,
    peak_for,
    register_impl,
    run_family,
    unregister_impl,
)
from craft.bench.core import compare
from craft.ops.registry import backends

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Steady CPU timings on a shared machine; restores the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "craft", "bench", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=300,
    )


# ---------------------------------------------------------------------------- unit checks


def test_compare_flags_scale_errors_missing_grads_and_nans() -> None:
    ref = [torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))]
    tol = (1e-5, 1e-4)
    close = compare([ref[0].float()], ref, ["out"], tol)
    assert close.ok and close.rms_err < 1e-6
    scaled = compare([(ref[0] * 1.001).float()], ref, ["out"], tol)
    assert not scaled.ok and "out: rms err" in (scaled.reason or "")
    assert not compare([None], ref, ["grad w"], tol).ok
    nan = ref[0].clone()
    nan[3] = math.nan
    assert "non-finite" in (compare([nan], ref, ["out"], tol).reason or "")
    assert "shape" in (compare([ref[0][:10]], ref, ["out"], tol).reason or "")
    # one bad element out of 64 passes the RMS bound but not the max bound
    spike = ref[0].clone()
    spike[7] += 10 * ref[0].abs().max()
    assert not compare([spike], ref, ["out"], (1.0, 1e-4)).ok


def test_attention_flops_follow_flashattention() -> None:
    fam = family("attention")
    dims = {"batch": 2, "heads": 3, "kv_heads": 3, "seq_len": 16, "head_dim": 8, "causal": False}
    fwd = 4 * 2 * 3 * 16**2 * 8
    assert fam.work(Case("attention", dims, CPU, torch.float32, "fwd")) == fwd
    assert fam.work(Case("attention", dims, CPU, torch.float32, "bwd")) == 2.5 * fwd
    assert fam.work(Case("attention", dims, CPU, torch.float32, "fwd+bwd")) == 3.5 * fwd
    causal = {**dims, "causal": True}
    assert fam.work(Case("attention", causal, CPU, torch.float32, "fwd")) == fwd / 2


def test_memory_bound_bytes() -> None:
    ce = family("cross-entropy")
    dims = {"batch": 1, "seq_len": 4, "tokens": 4, "vocab": 10}
    assert ce.work(Case("cross_entropy", dims, CPU, torch.bfloat16, "fwd+bwd")) == 3 * 4 * 10 * 2
    norm = family("norm")
    nd = {"batch": 1, "seq_len": 8, "rows": 8, "hidden": 16, "kind": "rmsnorm", "residual": False}
    assert norm.work(Case("norm", nd, CPU, torch.float32, "fwd")) == 2 * 8 * 16 * 4


def test_peak_table_by_device_name() -> None:
    assert peak_for("NVIDIA H100 80GB HBM3").bf16_flops == pytest.approx(989.4e12)
    assert peak_for("NVIDIA H100 PCIe").bf16_flops == pytest.approx(756e12)
    assert peak_for("NVIDIA H200").bandwidth == pytest.approx(4.8e12)
    assert peak_for("NVIDIA A100-SXM4-80GB").bf16_flops == pytest.approx(312e12)
    assert peak_for("NVIDIA GeForce GTX 1080") is None


# ------------------------------------------------------------------- the correctness gate


def _noncausal_attention(case: Case):
    """A classic bug: the causal mask is forgotten."""

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)

    return fn


def _norm_without_weight_grad(case: Case):
    """Right forward, but the weight gets no gradient."""

    def fn(x, weight, bias, residual):
        w, b = weight.detach(), None if bias is None else bias.detach()
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

    return fn


@pytest.mark.usefixtures("one_thread")
def test_wrong_implementations_are_flagged_and_never_timed() -> None:
    register_impl("attention", Impl("test.noncausal", _noncausal_attention))
    register_impl("norm", Impl("test.nograd", _norm_without_weight_grad))
    try:
        att = run_family(
            family("attention"),
            Settings(CPU, torch.float32, quick=True, seq_lens=[24], impls=["eager", "test.*"]),
        )
        norm = run_family(
            family("norm"),
            Settings(CPU, torch.float32, quick=True, hidden=[32], impls=["torch", "test.*"]),
        )
    finally:
        unregister_impl("attention", "test.noncausal")
        unregister_impl("norm", "test.nograd")
    by_impl = {r.impl: r for r in att.results + norm.results}
    for name, why in (("test.noncausal", "out: rms err"), ("test.nograd", "grad weight")):
        bad = by_impl[name]
        assert bad.status == WRONG and why in (bad.reason or "")
        assert bad.median_ms is None and bad.throughput is None and bad.peak_mem_bytes is None
        assert bad.speedup is None
    for name in ("eager", "torch"):
        good = by_impl[name]
        assert good.status == OK and good.median_ms > 0 and good.throughput > 0
        assert good.peak_mem_bytes is not None and good.peak_mem_bytes > 0
        assert good.rms_err <= good.tol[0]


def test_unavailable_implementations_are_skipped_with_a_reason() -> None:
    def never(case: Case, args: tuple) -> str:
        return "needs hardware this machine lacks"

    register_impl("cross_entropy", Impl("test.absent", _noncausal_attention, never))
    try:
        report = run_family(
            family("cross_entropy"),
            Settings(CPU, torch.float32, quick=True, vocab=[64], impls=["test.absent"]),
        )
    finally:
        unregister_impl("cross_entropy", "test.absent")
    (res,) = report.results
    assert res.status == SKIPPED and res.median_ms is None
    assert report.skipped_summary() == [
        {"impl": "test.absent", "reason": "needs hardware this machine lacks", "cases": 1}
    ]


# ----------------------------------------------------------------------------------- CLI


def test_cli_all_quick_writes_json_and_png(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = _run_cli("all", "--quick", "--threads", "1", "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Skipped on this machine" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["format"] == "craft-bench/1"
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["date"]
    assert set(doc["benchmarks"]) == {"attention", "cross_entropy", "linear_cross_entropy", "norm"}
    for name, bench in doc["benchmarks"].items():
        ok = [r for r in bench["results"] if r["status"] == "ok"]
        assert {"eager", "craft.eager", "craft.torch"} <= {r["impl"] for r in ok}, name
        for r in ok:
            assert r["median_ms"] > 0 and r["throughput"] > 0 and r["rms_err"] <= r["tol"][0]
        assert all(s["reason"] for s in bench["skipped"])
        if not torch.cuda.is_available() and "triton" in backends(name):
            assert any(s["impl"] == "craft.triton" for s in bench["skipped"]), name
    att = doc["benchmarks"]["attention"]
    assert {r["impl"] for r in att["results"] if r["status"] == "ok"} >= {"sdpa.flash", "sdpa.math"}
    train = doc["train"]
    assert train["tokens_per_s"] > 0 and len(train["step_ms"]) == train["steps"] == 3
    assert math.isfinite(train["loss_last"]) and train["peak_mem_bytes"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_flags_a_plugin_implementation_that_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "bad_norm.py").write_text(
        textwrap.dedent(
            """
            import torch
            from craft.bench import Impl, register_impl

            def make(case):
                def fn(x, weight, bias, residual):
                    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, None, 1e-5)
                return fn

            register_impl("norm", Impl("plugin.nobias", make))
            """
        )
    )
    out = tmp_path / "norm.json"
    proc = _run_cli(
        "norm",
        "--quick",
        "--threads",
        "1",
        "--hidden",
        "32",
        "--impls",
        "torch,plugin.*",
        "--import",
        "bad_norm",
        "--json",
        str(out),
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "norm/plugin.nobias" in proc.stderr
    assert "WRONG" in proc.stdout
    results = {r["impl"]: r for r in json.loads(out.read_text())["benchmarks"]["norm"]["results"]}
    assert results["plugin.nobias"]["status"] == "wrong"
    assert results["plugin.nobias"]["median_ms"] is None
    assert results["torch"]["status"] == "ok" and results["torch"]["median_ms"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["attention", "--seq-lens", "64,abc"], "--seq-lens '64,abc'"),
        (["attention", "--heads", "4", "--kv-heads", "3"], "--kv-heads 3"),
        (["norm", "--mode", "backward"], "--mode 'backward'"),
        (["train", "no/such/recipe.toml"], "file not found"),
        (["attention", "--quick", "--impls", "sdpa.math,nomatch*"], "--impls 'nomatch*'"),
    ],
)
def test_cli_bad_arguments_are_one_line_errors(args: list[str], message: str) -> None:
    proc = _run_cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr


def test_cli_unwritable_output_is_a_one_line_error() -> None:
    proc = _run_cli(
        "norm", "--quick", "--hidden", "32", "--impls", "torch", "--json", "README.md/q"
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("error: --json README.md/q: cannot write")
    )


# ---------------------------------------------------------------------------------- train


@pytest.mark.usefixtures("one_thread")
def test_train_bench_runs_a_recipe_on_random_tokens() -> None:
    from craft.bench.train import load_bench_config, run_train_bench

    # micro.toml trains on tinyshakespeare; data.type=random drops its dataset keys.
    cfg = load_bench_config(REPO / "recipes" / "micro.toml", ["data.type=random"])
    assert cfg.data.type == "random"
    rec = run_train_bench(cfg, steps=2, warmup=1, label="micro")
    assert rec["steps"] == 2 and len(rec["step_ms"]) == 2 and rec["ms_per_step"] > 0
    assert rec["tokens_per_step"] == cfg.training.batch_size * cfg.model.block_size
    assert rec["tokens_per_s"] == pytest.approx(
        rec["tokens_per_step"] * 2 / (sum(rec["step_ms"]) / 1e3), rel=1e-3
    )
    assert rec["flops_per_token"] > 6 * rec["params"] * 0.5
    assert rec["mfu"] is None and "CUDA" in rec["mfu_note"]
    assert rec["peak_mem_bytes"] > 4 * rec["params"]
    assert math.isfinite(rec["loss_last"])
