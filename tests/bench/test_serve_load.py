"""The serving benchmark's traffic and verdicts: arrival plans, the lock-step bound, the table."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from serve_load import lockstep_bound, markdown, parse_variant, plans  # noqa: E402

ARGS = argparse.Namespace(requests=4, max_tokens=64)


def test_lockstep_is_the_old_traffic() -> None:
    assert plans(8, ARGS, "lockstep", span=0.5, repeat=2) == [(0.0, [64] * 4)] * 8


def test_staggered_offsets_and_lengths_are_seeded_and_spread() -> None:
    plan = plans(8, ARGS, "staggered", span=0.5, repeat=0)
    assert plan == plans(8, ARGS, "staggered", span=0.5, repeat=0)  # same traffic every run
    assert plan != plans(8, ARGS, "staggered", span=0.5, repeat=1)  # rounds differ
    offsets = [o for o, _ in plan]
    assert min(offsets) == 0.0 and max(offsets) <= 0.5 and len(set(offsets)) == 8
    lengths = [mt for _, mts in plan for mt in mts]
    assert all(32 <= mt <= 96 for mt in lengths) and len(set(lengths)) > 8
    # the same mean as lock-step's max_tokens, over many draws
    many = [mt for r in range(40) for _, mts in plans(8, ARGS, "staggered", 0.5, r) for mt in mts]
    assert min(many) == 32 and max(many) == 96
    assert abs(statistics.fmean(many) - 64) < 2.0


def test_lockstep_bound_adds_the_extra_prefill_to_one_clients_ttft() -> None:
    bound = {"ms": {"1": {"median": 10.0}, "8": {"median": 25.0}}}
    ratio, ttft = lockstep_bound(bound, 8, one_client_p95_s=0.020)
    assert ratio == pytest.approx(2.5)
    assert ttft == pytest.approx((20 - 10 + 25) / 20)
    assert lockstep_bound(bound, 32, 0.020) is None  # not measured


def _row(variant: str, arrivals: str, clients: int, tps: float, p95: float) -> dict:
    def s(x: float) -> dict:
        return {"median": x, "min": x, "max": x, "n": 1}

    return {
        "variant": variant,
        "arrivals": arrivals,
        "clients": clients,
        "requests": 4 * clients,
        "errors": 0,
        "model_threads": 1,
        "rounds": [{"ttft_p95_s": p95}],
        "tokens_per_s": s(tps),
        "ttft_p50_s": s(p95),
        "ttft_p95_s": s(p95),
        "per_request_tokens_per_s_median": s(tps / clients),
    }


def test_each_pattern_is_judged_against_its_own_one_client_row() -> None:
    result = {
        "machine": {"device": "cpu"},
        "server_threads": None,
        "variants": {"default": {}},
        "command": "python bench/serve_load.py",
        "repeats": 1,
        "requests": 4,
        "prompt_chars": 32,
        "max_tokens": 64,
        "max_batch": 32,
        "span_s": {"m": 0.5},
        "prefill_bound": {  # model -> torch threads -> prefill times
            "m": {
                str(threads): {
                    "threads": threads,
                    "prompt_tokens": 32,
                    "ms": {
                        k: {"median": v * threads, "min": v * threads, "max": v * threads, "n": 1}
                        for k, v in {"1": 10.0, "8": 30.0 / threads}.items()
                    },
                }
                for threads in (1, 2)
            }
        },
        "models": {
            "m": [
                _row("default", "lockstep", 1, 100.0, 0.020),
                _row("default", "lockstep", 8, 400.0, 0.050),
                _row("default", "staggered", 1, 100.0, 0.030),
                _row("default", "staggered", 8, 350.0, 0.050),
            ]
        },
    }
    text = markdown(result)
    lock8 = next(line for line in text.splitlines() if line.startswith("| m | lockstep | 8 |"))
    stag8 = next(line for line in text.splitlines() if line.startswith("| m | staggered | 8 |"))
    # lock-step: 2.5x its own one-client p95, and the bound (20 - 10 + 30) / 20 = 2 says why
    assert "| 2.50 |" in lock8 and "| 3.00, 2.00 |" in lock8
    assert lock8.endswith("x>=3 and p95<2x: NO (bound >= 2x) |")
    # staggered: 50 / 30 ms against its own one-client row, no lock-step bound
    assert "| 1.67 |" in stag8 and "| - |" in stag8 and stag8.endswith("p95<2x: yes |")
    # the bound of the rows' own thread count (1): with 2 threads it would be 1.00
    assert "| m | 1 | 32 | 10.0 (10.0–10.0) | 30.0 (30.0–30.0) | 3.00 |" in text
    assert "| m | 2 | 32 | 20.0 (20.0–20.0) | 30.0 (30.0–30.0) | 1.50 |" in text


def test_variants_parse_and_bad_ones_are_refused() -> None:
    assert parse_variant("passive:OMP_WAIT_POLICY=PASSIVE;A=1") == (
        "passive",
        {"OMP_WAIT_POLICY": "PASSIVE", "A": "1"},
    )
    assert parse_variant("default:") == ("default", {})
    for bad in ("noname", ":A=1", "x:A"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)
