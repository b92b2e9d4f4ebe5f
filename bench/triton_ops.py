"""Triton kernels against the advantage they are built for, measured with `craft bench`.

    python bench/triton_ops.py --out bench/results/triton_ops.json        # on a CUDA machine
    python bench/triton_ops.py --dry-run --out /tmp/triton_ops.json      # CPU: plumbing only

Each check runs a `craft bench` family at its shapes (`craft.bench.run_family`: every result is
compared with a float64 reference before it is timed, a wrong one is never timed) and judges the
Triton backend (`craft.triton`) against PyTorch's own path, forward+backward, bf16 by default:
- attention, causal, T=4096, D=128 (B=4, H=16): at least as fast as `sdpa.flash`
  (the other shapes are reported without a check);
- cross-entropy, 16384 tokens x V=50257: at least 2x faster than `torch` (F.cross_entropy), and
  at most a third of its peak memory when the logits are an intermediate of the graph, as a
  model's output layer makes them (the kernel then writes the gradient over them);
- linear + cross-entropy, 8192 tokens, C=2048, V=128256: under a quarter of the peak memory of
  `eager` (logits = hidden @ W.T, then F.cross_entropy).
Peak memory is what one call allocates above what was allocated before it
(`craft.bench.timing.cuda_peak`). Each check prints one line ending in MET, MISSED or `-` (not
measured here, e.g. no CUDA: the Triton implementations are then skipped, as in `craft bench`).
Writes `--out` (JSON) and the same table as Markdown next to it. Exit status 1 when an
implementation gave a wrong result or failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from craft.bench import OK, Result, Settings, family, machine_info, run_family  # noqa: E402
from craft.bench.report import fmt_bytes, write_file, write_json  # noqa: E402
from craft.bench.timing import cuda_peak  # noqa: E402

TRITON = "craft.triton"
# (batch, heads, seq_len, head_dim); the first is the checked one. Dry run: tiny shapes.
ATTENTION = [(4, 16, 4096, 128), (2, 16, 8192, 128), (4, 16, 4096, 64)]
CE = (16384, 50257)  # tokens, vocab
LCE = (8192, 2048, 128256)  # tokens, hidden, vocab
DRY = {"attention": [(1, 2, 64, 16)], "ce": (64, 1000), "lce": (48, 32, 500)}


def _run(
    name: str, settings: Settings, baseline: str
) -> tuple[Result | None, Result | None, list[Result]]:
    """(Triton result, baseline result, all results) of one family case."""
    report = run_family(family(name), settings)
    by_impl = {r.impl: r for r in report.results}
    return by_impl.get(TRITON), by_impl.get(baseline), report.results


def _settings(
    device: torch.device, dtype: torch.dtype, impls: list[str], **shapes: Any
) -> Settings:
    return Settings(
        device=device, dtype=dtype, mode="fwd+bwd", impls=impls, compile=False, **shapes
    )


def _row(
    check: str,
    shape: str,
    tri: Result | None,
    base: Result | None,
    baseline: str,
    target: str | None,
    judge: Callable[[Result, Result], bool] | None,
    results: list[Result],
    **extra: Any,
) -> dict[str, Any]:
    both = tri is not None and base is not None and tri.status == OK and base.status == OK
    met = judge(tri, base) if (judge is not None and both) else None  # type: ignore[arg-type]
    why = None
    if not both:
        why = "; ".join(
            f"{r.impl}: {r.status} ({r.reason})" for r in (tri, base) if r and r.status != OK
        )
    return {
        "check": check,
        "shape": shape,
        "baseline": baseline,
        "triton_ms": tri.median_ms if tri else None,
        "baseline_ms": base.median_ms if base else None,
        "speedup": tri.speedup if tri else None,
        "triton_peak_bytes": tri.peak_mem_bytes if tri else None,
        "baseline_peak_bytes": base.peak_mem_bytes if base else None,
        **extra,
        "target": target,
        "met": met,
        "not_measured": why,
        "results": [r.to_json() for r in results],
    }


def check_attention(device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict[str, Any]]:
    baseline = "sdpa.flash"
    rows = []
    for i, (b, h, t, d) in enumerate(DRY["attention"] if dry else ATTENTION):
        for causal in (True, False):
            shape = {"batch": [b], "heads": [h], "seq_lens": [t], "head_dim": [d]}
            s = _settings(device, dtype, [TRITON, baseline], causal=causal, **shape)
            tri, base, results = _run("attention", s, baseline)
            checked = i == 0 and causal
            rows.append(
                _row(
                    "attention fwd+bwd",
                    f"B{b} H{h} T{t} D{d} {'causal' if causal else 'full'}",
                    tri,
                    base,
                    baseline,
                    "triton_ms <= baseline_ms" if checked else None,
                    (lambda x, y: x.median_ms <= y.median_ms) if checked else None,
                    results,
                    triton_tflops=tri.throughput if tri else None,
                    baseline_tflops=base.throughput if base else None,
                )
            )
    return rows


def _intermediate_logits_peaks(n: int, v: int, dtype: torch.dtype) -> dict[str, int]:
    """Peak bytes of one forward+backward of each loss on logits made inside the call (a
    model's output: a non-leaf the Triton kernel may overwrite with the gradient)."""
    from craft.ops.triton.cross_entropy import cross_entropy as triton_ce

    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(n, v, device="cuda", dtype=dtype, generator=gen)  # (N, V)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)  # (N,)
    bias = torch.zeros(v, device="cuda", dtype=dtype, requires_grad=True)
    peaks = {}
    for name, loss in ((TRITON, triton_ce), ("torch", F.cross_entropy)):

        def step(loss: Callable[..., torch.Tensor] = loss) -> Any:
            return torch.autograd.grad(loss(base + bias, targets), bias)  # logits: a non-leaf

        step()  # warm-up (autotuning)
        peaks[name] = cuda_peak(step, [])
    return peaks


def check_cross_entropy(device: torch.device, dtype: torch.dtype, dry: bool) -> dict[str, Any]:
    n, v = DRY["ce"] if dry else CE
    s = _settings(device, dtype, [TRITON, "torch"], batch=[1], seq_lens=[n], vocab=[v])
    tri, base, results = _run("cross_entropy", s, "torch")
    peaks = _intermediate_logits_peaks(n, v, dtype) if device.type == "cuda" else {}

    def judge(x: Result, y: Result) -> bool:
        faster = y.median_ms >= 2 * x.median_ms
        return faster and bool(peaks) and peaks[TRITON] <= peaks["torch"] / 3

    return _row(
        "cross_entropy fwd+bwd",
        f"N{n} V{v}",
        tri,
        base,
        "torch",
        "2x faster and <= 1/3 peak memory (logits an intermediate)",
        judge,
        results,
        triton_peak_bytes_intermediate=peaks.get(TRITON),
        baseline_peak_bytes_intermediate=peaks.get("torch"),
    )


def check_linear_cross_entropy(
    device: torch.device, dtype: torch.dtype, dry: bool
) -> dict[str, Any]:
    n, c, v = DRY["lce"] if dry else LCE
    s = _settings(device, dtype, [TRITON, "eager"], batch=[1], seq_lens=[n], hidden=[c], vocab=[v])
    tri, base, results = _run("linear_cross_entropy", s, "eager")

    def judge(x: Result, y: Result) -> bool:
        return (
            x.peak_mem_bytes is not None
            and bool(y.peak_mem_bytes)
            and (x.peak_mem_bytes < y.peak_mem_bytes / 4)
        )

    return _row(
        "linear_cross_entropy fwd+bwd",
        f"N{n} C{c} V{v}",
        tri,
        base,
        "eager",
        "< 1/4 of eager peak memory",
        judge,
        results,
    )


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}ms"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per check: op, shape, times, peak memory (intermediate logits when measured)."""
    out = [
        f"{'op':<30} {'shape':<28} {'triton':>10} {'baseline':>10} {'peak mem':>21} result",
    ]
    for r in rows:
        tp = r.get("triton_peak_bytes_intermediate", r["triton_peak_bytes"])
        bp = r.get("baseline_peak_bytes_intermediate", r["baseline_peak_bytes"])
        mem = f"{fmt_bytes(tp)}/{fmt_bytes(bp)}"
        out.append(
            f"{r['check']:<30} {r['shape']:<28} {_fmt_ms(r['triton_ms']):>10} "
            f"{_fmt_ms(r['baseline_ms']):>10} {mem:>21} {_verdict(r)}"
        )
    return out


def _verdict(row: dict[str, Any]) -> str:
    return {True: "MET", False: "MISSED", None: "-"}[row["met"]]


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# Triton kernels on {m['device_name']}",
        "",
        f"- date: {m['date']}; torch {m['torch']}, triton {m['triton']}, load {m['load_avg']}",
        f"- command: `{doc['command']}`; dtype {doc['dtype']}",
        "",
        "| check | shape | triton | baseline | peak mem (triton/baseline) | target | result |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in doc["checks"]:
        tp = r.get("triton_peak_bytes_intermediate", r["triton_peak_bytes"])
        bp = r.get("baseline_peak_bytes_intermediate", r["baseline_peak_bytes"])
        result = _verdict(r) if r["not_measured"] is None else f"not measured: {r['not_measured']}"
        lines.append(
            f"| {r['check']} | {r['shape']} | {_fmt_ms(r['triton_ms'])} | "
            f"{_fmt_ms(r['baseline_ms'])} ({r['baseline']}) | {fmt_bytes(tp)} / {fmt_bytes(bp)} "
            f"| {r['target'] or '-'} | {result} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write the results to.")
    p.add_argument("--dry-run", action="store_true", help="Tiny shapes on the CPU.")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", default="attention,cross_entropy,linear_cross_entropy")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    checks = {
        "attention": check_attention,
        "cross_entropy": lambda *a: [check_cross_entropy(*a)],
        "linear_cross_entropy": lambda *a: [check_linear_cross_entropy(*a)],
    }
    rows: list[dict[str, Any]] = []
    for op in args.ops.split(","):
        rows += checks[op](device, dtype, args.dry_run)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    doc = {
        "machine": machine_info(device),
        "command": shlex.join(["python", "bench/triton_ops.py", *(argv or sys.argv[1:])]),
        "dtype": args.dtype,
        "dry_run": args.dry_run,
        "checks": rows,
    }
    write_json(args.out, doc)
    write_file(args.out.with_suffix(".md"), markdown(doc))
    print("\n".join(table(rows)))
    bad = [
        f"{x['impl']} at {r['shape']}: {x['reason']}"
        for r in rows
        for x in r["results"]
        if x["status"] in ("wrong", "failed")
    ]
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
