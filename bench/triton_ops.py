"""Speed and memory of the Triton kernels against PyTorch's own, measured in the same run.

    python bench/triton_ops.py --out bench/results/triton_ops.json        # on a CUDA machine
    TRITON_INTERPRET=1 python bench/triton_ops.py --dry-run --out /tmp/x  # CPU: plumbing only

Targets checked (H100, bf16):
- attention forward+backward, causal, T=4096, D=128: Triton at least as fast as
  F.scaled_dot_product_attention with the flash backend;
- cross-entropy forward+backward, V=50257, 16k tokens: at least 2x faster than F.cross_entropy
  with at most a third of its peak memory;
- fused linear + cross-entropy, V=128256: under a quarter of the eager peak memory
  (logits = hidden @ W.T, then F.cross_entropy).
Peak memory counts everything allocated from just before the inputs of one call are made.
--dry-run runs every path on tiny shapes on the CPU (Triton interpreter); its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from craft.ops.triton import attention as tri_attention  # noqa: E402
from craft.ops.triton import cross_entropy as tri_ce  # noqa: E402
from craft.ops.triton import linear_cross_entropy as tri_lce  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(
    device: str, setup: Callable[[], Any], run: Callable[[Any], Any], warmup: int, iters: int
) -> dict[str, float | None]:
    """Median milliseconds of `run(setup())` (setup untimed) and the peak bytes of one call."""
    for _ in range(warmup):  # includes autotuning on the first call
        run(setup())
    _sync(device)
    times = []
    for _ in range(iters):
        state = setup()
        _sync(device)
        t0 = time.perf_counter()
        run(state)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        del state
    peak = None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(setup())
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    return {"ms": statistics.median(times), "peak_bytes": peak}


# ------------------------------------------------------------------------------ attention
def _attention_row(
    device: str,
    dtype: torch.dtype,
    shape: tuple[int, int, int, int],
    causal: bool,
    warmup: int,
    iters: int,
) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, t, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (
        torch.randn(b, h, t, d, device=device, dtype=dtype, generator=gen) for _ in range(4)
    )
    for x in (q, k, v):
        x.requires_grad_()
    flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0) * 3.5  # fwd + bwd (bwd = 2.5x fwd)

    def tri(_: Any) -> None:
        out = tri_attention.attention(q, k, v, causal=causal)
        torch.autograd.grad(out, (q, k, v), do)

    def sdpa(_: Any) -> None:
        if device == "cuda":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.autograd.grad(out, (q, k, v), do)

    with torch.no_grad():
        ours = tri_attention.attention(q, k, v, causal=causal).float()
        err = (ours - F.scaled_dot_product_attention(q, k, v, is_causal=causal).float()).abs()
    r_tri = bench(device, lambda: None, tri, warmup, iters)
    r_ref = bench(device, lambda: None, sdpa, warmup, iters)
    target = t == 4096 and d == 128 and causal
    return {
        "op": "attention fwd+bwd",
        "shape": f"B{b} H{h} T{t} D{d} {'causal' if causal else 'full'}",
        "triton_ms": r_tri["ms"],
        "baseline": "sdpa.flash" if device == "cuda" else "sdpa",
        "baseline_ms": r_ref["ms"],
        "triton_tflops": flops / r_tri["ms"] / 1e9,
        "baseline_tflops": flops / r_ref["ms"] / 1e9,
        "max_abs_diff_vs_baseline": err.max().item(),
        "target": "triton_ms <= baseline_ms" if target else None,
        "met": r_tri["ms"] <= r_ref["ms"] if target else None,
    }


def bench_attention(
    device: str, dtype: torch.dtype, dry: bool, warmup: int, iters: int
) -> list[dict]:
    shapes = (
        [(1, 2, 64, 16)] if dry else [(4, 16, 4096, 128), (2, 16, 8192, 128), (4, 16, 4096, 64)]
    )
    return [
        _attention_row(device, dtype, shape, causal, warmup, iters)
        for shape in shapes
        for causal in (True, False)
    ]


# ------------------------------------------------------------------------------ cross-entropy
def bench_cross_entropy(
    device: str, dtype: torch.dtype, dry: bool, warmup: int, iters: int
) -> list[dict]:
    n, v = (64, 1000) if dry else (16384, 50257)
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(n, v, device=device, dtype=dtype, generator=gen)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)

    bias = torch.zeros(v, device=device, dtype=dtype, requires_grad=True)

    # The logits are an intermediate of the graph (an output layer's result, like the model's
    # (B, T, V) logits viewed as (N, V)), so the Triton kernel writes the gradient over them
    # instead of allocating one; a leaf or a view of one would be left intact.
    def setup() -> torch.Tensor:
        return base + bias  # (N, V), a fresh non-leaf

    def tri(x: torch.Tensor) -> None:
        torch.autograd.grad(tri_ce.cross_entropy(x.view(n, v), targets), bias)

    def ref(x: torch.Tensor) -> None:
        torch.autograd.grad(F.cross_entropy(x.view(n, v), targets), bias)

    with torch.no_grad():
        err = abs(
            tri_ce.cross_entropy(base, targets).item()
            - F.cross_entropy(base.float(), targets).item()
        )
    r_tri = bench(device, setup, tri, warmup, iters)
    r_ref = bench(device, setup, ref, warmup, iters)
    mem_ok = None
    if r_tri["peak_bytes"] is not None and r_ref["peak_bytes"]:
        mem_ok = r_tri["peak_bytes"] <= r_ref["peak_bytes"] / 3
    return [
        {
            "op": "cross_entropy fwd+bwd",
            "shape": f"N{n} V{v}",
            "triton_ms": r_tri["ms"],
            "baseline": "F.cross_entropy",
            "baseline_ms": r_ref["ms"],
            "triton_peak_bytes": r_tri["peak_bytes"],
            "baseline_peak_bytes": r_ref["peak_bytes"],
            "max_abs_diff_vs_baseline": err,
            "target": "2x faster and <= 1/3 peak memory",
            "met": (r_ref["ms"] >= 2 * r_tri["ms"] and bool(mem_ok))
            if mem_ok is not None
            else None,
        }
    ]


# ------------------------------------------------------------------------ linear + cross-entropy
def bench_linear_cross_entropy(
    device: str, dtype: torch.dtype, dry: bool, warmup: int, iters: int
) -> list[dict]:
    n, c, v = (48, 32, 500) if dry else (8192, 2048, 128256)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, c, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (
        torch.randn(v, c, device=device, dtype=dtype, generator=gen) * c**-0.5
    ).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)

    def tri(_: Any) -> None:
        torch.autograd.grad(tri_lce.linear_cross_entropy(hidden, weight, targets), (hidden, weight))

    def ref(_: Any) -> None:
        logits = hidden @ weight.t()  # (N, V)
        torch.autograd.grad(F.cross_entropy(logits, targets), (hidden, weight))

    with torch.no_grad():
        err = abs(
            tri_lce.linear_cross_entropy(hidden, weight, targets).item()
            - F.cross_entropy((hidden @ weight.t()).float(), targets).item()
        )
    r_tri = bench(device, lambda: None, tri, warmup, iters)
    r_ref = bench(device, lambda: None, ref, warmup, iters)
    met = None
    if r_tri["peak_bytes"] is not None and r_ref["peak_bytes"]:
        met = r_tri["peak_bytes"] < r_ref["peak_bytes"] / 4
    return [
        {
            "op": "linear_cross_entropy fwd+bwd",
            "shape": f"N{n} C{c} V{v}",
            "triton_ms": r_tri["ms"],
            "baseline": "matmul + F.cross_entropy",
            "baseline_ms": r_ref["ms"],
            "triton_peak_bytes": r_tri["peak_bytes"],
            "baseline_peak_bytes": r_ref["peak_bytes"],
            "max_abs_diff_vs_baseline": err,
            "target": "< 1/4 of eager peak memory",
            "met": met,
        }
    ]


def environment(device: str) -> dict[str, Any]:
    import triton

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def _fmt_bytes(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write the results to.")
    p.add_argument("--dry-run", action="store_true", help="Tiny shapes on CPU (interpreter).")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", default="attention,cross_entropy,linear_cross_entropy")
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    warmup, iters = (1, 2) if args.dry_run else (3, 10)
    runners = {
        "attention": bench_attention,
        "cross_entropy": bench_cross_entropy,
        "linear_cross_entropy": bench_linear_cross_entropy,
    }
    torch.manual_seed(0)
    rows: list[dict] = []
    for op in args.ops.split(","):
        rows += runners[op](device, dtype, args.dry_run, warmup, iters)
        if device == "cuda":
            torch.cuda.empty_cache()
    result = {
        "environment": environment(device),
        "dtype": args.dtype,
        "dry_run": args.dry_run,
        "note": "dry run: CPU interpreter, timings meaningless" if args.dry_run else "",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(
        f"{'op':<30} {'shape':<28} {'triton':>10} {'baseline':>10} {'TFLOP/s':>15} {'peak mem':>21} target"
    )
    for r in rows:
        tfl = f"{r['triton_tflops']:.0f}/{r['baseline_tflops']:.0f}" if "triton_tflops" in r else ""
        mem = (
            f"{_fmt_bytes(r['triton_peak_bytes'])}/{_fmt_bytes(r['baseline_peak_bytes'])}"
            if "triton_peak_bytes" in r
            else ""
        )
        met = {True: "MET", False: "MISSED", None: "-"}[r["met"]]
        print(
            f"{r['op']:<30} {r['shape']:<28} {r['triton_ms']:>8.2f}ms {r['baseline_ms']:>8.2f}ms "
            f"{tfl:>15} {mem:>21} {met}"
        )
    if not all(math.isfinite(r["max_abs_diff_vs_baseline"]) for r in rows):
        print("error: a Triton result is not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
