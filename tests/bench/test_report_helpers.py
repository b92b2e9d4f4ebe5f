"""The statistics, conditions and writer every benchmark script shares (craft.bench)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from craft.bench.core import OK, Result, _set_speedups
from craft.bench.hardware import machine_info
from craft.bench.report import conditions, write_results
from craft.bench.timing import fmt_spread, per_call_s, spread


def test_spread_is_median_min_max_scaled() -> None:
    s = spread([3.0, 1.0, 10.0, 2.0], scale=1e3)
    assert s == {"median": 2500.0, "min": 1000.0, "max": 10000.0, "n": 4}
    assert fmt_spread(spread([45.3, 43.0, 47.9]), ".1f", "ms") == "45.3 (43.0–47.9) ms"
    with pytest.raises(ValueError):
        spread([])


def test_per_call_s_counts_calls_in_blocks() -> None:
    calls = []
    samples = per_call_s(lambda: calls.append(1), calls=10, blocks=3, warmup=2)
    assert len(samples) == 3 and len(calls) == 2 + 3 * 10
    assert all(0 <= t < 0.01 for t in samples)


def test_conditions_state_machine_versions_date_and_load(tmp_path: Path) -> None:
    m = machine_info(torch.device("cpu"))
    assert isinstance(m["cpu_bf16"], list) and m["cpu_capability"]
    text = "\n".join(conditions(m, [9.5, 1.0, 1.0]))
    assert m["device_name"] in text and f"torch {torch.__version__}" in text and m["date"] in text
    assert "at the start, 9.50 at the end" in text
    assert "not available" in "\n".join(conditions({**m, "load_avg": None}))
    paths = write_results(tmp_path / "new", "x", {"machine": m}, "# X")
    assert [p.name for p in paths] == ["x.json", "x.md"]
    assert json.loads(paths[0].read_text())["machine"]["date"] == m["date"]
    assert paths[1].read_text() == "# X\n"


def _ok(family: str, impl: str, ms: float) -> Result:
    return Result(family, impl, {}, 1, "", OK, median_ms=ms)


@pytest.mark.parametrize(
    ("family", "dtype", "same"),
    [("norm", "float32", True), ("cross_entropy", "float32", True),
     ("cross_entropy", "bfloat16", False), ("linear_cross_entropy", "float32", False)],
)  # fmt: skip
def test_a_backend_calling_the_baseline_claims_no_speedup(family, dtype, same) -> None:
    base = "eager" if family == "linear_cross_entropy" else "torch"
    results = [_ok(family, base, 2.0), _ok(family, "craft.torch", 1.0)]
    _set_speedups(results, (base,), dtype)
    craft = results[1]
    assert craft.baseline == base and craft.same_kernel is same
    assert craft.speedup == (None if same else 2.0)
