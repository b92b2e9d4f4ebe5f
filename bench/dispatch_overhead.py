"""Per-call cost of choosing a kernel backend: a model's Kernels table vs resolving on every call.

    python bench/dispatch_overhead.py [--out bench/results] [--calls 20000]

The op call a model makes (`Kernels.attention`, `.norm`, `.cross_entropy`) looks the input
signature up in a dict and calls the chosen backend. Before, every call resolved the backend:
sorted the registered backends and asked them whether they run on the device and `supports` the
inputs (what `craft.ops.registry.resolve` still does once per signature). To time the dispatch
alone, the backend `auto` picks on the CPU keeps its place in the registry (so `resolve` walks
the real order and runs the real checks) but its function is swapped for one that returns at
once. Side by side, on the same tiny CPU tensors:

- direct: calling that function (the floor: a Python call);
- table: through a `craft.ops.Kernels` table (what models do now);
- resolve per call: `registry.resolve(...)` then the function (what every op call did before).

Microseconds per call: median with min-max of 7 blocks of --calls calls (`craft.bench.timing`'s
timer). Writes dispatch_overhead.json and .md to --out (`craft.bench.report`'s writer) with the
machine, versions, date and load (`craft.bench.hardware.machine_info`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from craft import ops  # noqa: E402
from craft.bench.hardware import load_avg, machine_info  # noqa: E402
from craft.bench.report import conditions, write_results  # noqa: E402
from craft.bench.timing import fmt_spread, per_call_s, spread  # noqa: E402
from craft.ops.registry import resolve  # noqa: E402


def per_call_us(fn: Callable[[], Any], calls: int, blocks: int = 7) -> dict[str, Any]:
    """Median, min and max over `blocks` blocks of `calls` calls, microseconds per call."""
    return spread(per_call_s(fn, calls=calls, blocks=blocks, warmup=min(calls, 1000)), 1e6)


def noop(*args: Any) -> None:
    return None


def signature(op: str, a: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arguments `resolve` (and the backends' `supports`) take for an op call's arguments."""
    if op == "norm":
        x, weight, bias, kind, _eps, residual = a
        return (x, weight, bias, kind, residual)
    if op == "cross_entropy":
        return a[:2]
    return a


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--calls", type=int, default=20000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_info(torch.device("cpu"))
    q = torch.randn(1, 1, 1, 16)
    x, w = torch.randn(1, 16), torch.ones(16)
    logits, targets = torch.randn(1, 8), torch.zeros(1, dtype=torch.long)
    cases = {  # label: (op, the arguments a model passes)
        "attention": ("attention", (q, q, q, True, None, 0.0)),
        "norm (residual)": ("norm", (x, w, None, "rmsnorm", 1e-5, x)),
        "cross_entropy": ("cross_entropy", (logits, targets, -100, "mean", 0.0, 0.0)),
    }
    rows = []
    for label, (op, args_) in cases.items():
        b = resolve(op, "auto", "cpu", *signature(op, args_))
        real = b.fn
        b.fn = noop  # the registry entry, as `resolve` and a fresh table will find it
        try:
            table = ops.Kernels()
            method = getattr(table, op)
            sig = signature(op, args_)
            r = {
                "op": label,
                "backend": b.name,
                "direct": per_call_us(lambda a=args_: noop(*a), args.calls),
                "table": per_call_us(lambda m=method, a=args_: m(*a), args.calls),
                "resolve_per_call": per_call_us(
                    lambda o=op, s=sig, a=args_: resolve(o, "auto", "cpu", *s).fn(*a), args.calls
                ),
            }
        finally:
            b.fn = real
        for key in ("table", "resolve_per_call"):
            r[f"{key}_overhead_us"] = r[key]["median"] - r["direct"]["median"]
        rows.append(r)
    load_end = load_avg()
    lines = ["# Dispatch overhead per op call (CPU, tiny tensors)", ""]
    lines += conditions(machine, load_end)
    lines += [f"- calls per block: {args.calls}, 7 blocks"]
    lines += [
        "",
        "| op | backend picked | direct us | table us | resolve per call us | table overhead us | "
        "resolve overhead us |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def cell(d: dict[str, Any]) -> str:
        return fmt_spread(d)

    for r in rows:
        lines.append(
            f"| {r['op']} | {r['backend']} | {cell(r['direct'])} | {cell(r['table'])} | "
            f"{cell(r['resolve_per_call'])} | {r['table_overhead_us']:.2f} | "
            f"{r['resolve_per_call_overhead_us']:.2f} |"
        )
    lines += [
        "",
        "Microseconds per call, median (min–max) of 7 blocks; overheads are the median minus the",
        "direct call's median. The backend function is a no-op here: the kernel's own time comes",
        "on top of every column.",
    ]
    doc = {
        "benchmark": "dispatch_overhead",
        "machine": machine,
        "load_avg_end": load_end,
        "calls_per_block": args.calls,
        "rows": rows,
    }
    write_results(args.out, "dispatch_overhead", doc, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
