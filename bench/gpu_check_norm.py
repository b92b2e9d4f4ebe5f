"""GPU check of the compiled CUDA norm kernels: correctness against float64, speed against torch.

    python bench/gpu_check_norm.py [--out DIR] [--quick]

1. Correctness: hidden sizes 64 ... 8192 (odd ones too) x float32/float16/bfloat16 x LayerNorm /
   RMSNorm, with and without a fused residual, forward and backward; and the autocast cases of a
   GPT block (a bf16/fp16 branch on an fp32 residual stream, an fp32 input normalised into the
   autocast dtype). Each error is measured against a float64 reference and must stay within 2x
   (+ a small slack) of the error torch's own F.layer_norm / F.rms_norm makes in the same dtype.
2. Speed: forward and forward+backward against torch (and the Triton norm when registered), as
   time, effective GB/s (minimal bytes moved / time) and the share of the card's bandwidth.
   Targets: LayerNorm and RMSNorm bf16 16384 x 4096 forward+backward >= 1.5x F.layer_norm /
   F.rms_norm. The autocast case (bf16 branch + fp32 residual) is timed at that shape too.

Writes norm_check.json and norm_check.md to --out (default bench/results); the summary table is
printed last. Exit status 1 when a correctness check fails.
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

from craft.bench.hardware import machine_info, peak_for  # noqa: E402
from craft.bench.report import conditions, write_results  # noqa: E402
from craft.bench.timing import measure  # noqa: E402
from craft.ops import cuda as cuda_backend  # noqa: E402
from craft.ops import torch_backend  # noqa: E402
from craft.ops.registry import backends  # noqa: E402

SIZES = (64, 100, 127, 768, 1000, 1024, 2048, 3000, 4096, 4097, 5120, 8191, 8192)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SPEED_SHAPES = ((16384, 4096), (16384, 1024), (8192, 8192), (65536, 768), (4096, 12288))
TARGETS = (
    ("layernorm", torch.bfloat16, (16384, 4096), 1.5),
    ("rmsnorm", torch.bfloat16, (16384, 4096), 1.5),
)
# (autocast dtype, residual): with a residual the branch x has the autocast dtype and the residual
# stream is fp32 (ln_2 of a GPT block); without one an fp32 x is normalised into it (ln_1, ln_f).
MIXED = ((torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False))

NormFn = Callable[..., Any]


def peak_bandwidth(name: str) -> float | None:
    """The card's memory bandwidth in GB/s (`craft.bench.hardware`'s table; None if unknown)."""
    peak = peak_for(name)
    return None if peak is None else peak.bandwidth / 1e9


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write), a practical ceiling."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a))
    return 2 * a.numel() / (ms * 1e-3) / 1e9


def time_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds of fn(): `craft.bench.timing.measure` (do_bench on CUDA)."""
    return measure(fn, torch.device("cuda")).median_ms


# ------------------------------------------------------------------------------ correctness


def reference(x, w, b, kind, eps, res, dy, ds):  # type: ignore[no-untyped-def]
    """float64 outputs and gradients (x, w, b, res) of sum(y * dy) + sum(s * ds)."""
    leaves = [None if t is None else t.double().requires_grad_(True) for t in (x, w, b, res)]
    x64, w64, b64, r64 = leaves
    out = torch_backend.norm(x64, w64, b64, kind, eps, r64)
    y, s = (out, None) if r64 is None else out
    loss = (y * dy.double()).sum() + (0 if s is None else (s * ds.double()).sum())
    loss.backward()
    return y.detach(), [None if t is None else t.grad for t in leaves]


def run(fn: NormFn, x, w, b, kind, eps, res, dy, ds):  # type: ignore[no-untyped-def]
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, b, res)
    ]
    out = fn(leaves[0], leaves[1], leaves[2], kind, eps, leaves[3])
    y, s = (out, None) if leaves[3] is None else out
    grads_of = [t for t in leaves if t is not None]
    outs, gouts = [y], [dy]
    if s is not None:
        outs.append(s)
        gouts.append(ds)
    got = torch.autograd.grad(outs, grads_of, gouts)
    it = iter(got)
    return y.detach(), [None if t is None else next(it) for t in leaves]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def rnd(
    g: torch.Generator, dtype: torch.dtype, *shape: int, scale: float = 1.0, shift: float = 0.0
) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda", generator=g) * scale + shift).to(dtype)


def compare_case(x, w, b, kind, res, dy, ds, autocast=None):  # type: ignore[no-untyped-def]
    """Relative errors {quantity: (cuda, torch)} against float64, and whether both backends gave
    every output and gradient the same dtype (y in the autocast dtype under autocast)."""
    ref_y, ref_g = reference(x, w, b, kind, 1e-5, res, dy, ds)
    with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y, grads = run(cuda_backend.norm, x, w, b, kind, 1e-5, res, dy, ds)
        ty, tgrads = run(torch_backend.norm, x, w, b, kind, 1e-5, res, dy, ds)
    errs = {"y": (rel_err(y, ref_y), rel_err(ty, ref_y))}
    for name, gc, gt, gr in zip("xwbr", grads, tgrads, ref_g, strict=True):
        if gr is not None:
            errs[f"d{name}"] = (rel_err(gc, gr), rel_err(gt, gr))
    same = y.dtype == ty.dtype and (autocast is None or y.dtype == autocast)
    same = same and all(
        gc is None or gc.dtype == gt.dtype for gc, gt in zip(grads, tgrads, strict=True)
    )
    return errs, same


def correctness(quick: bool) -> list[dict[str, Any]]:
    rows_out = []
    sizes = SIZES[::3] if quick else SIZES
    configs = [("layernorm", True, True, False), ("layernorm", True, True, True),
               ("rmsnorm", True, False, False), ("rmsnorm", True, False, True)]  # fmt: skip
    for dtype in DTYPES:
        for cols in sizes:
            for kind, has_w, has_b, fused in configs:
                g = torch.Generator(device="cuda").manual_seed(cols)
                rows = 257

                x = rnd(g, dtype, rows, cols, scale=2.0, shift=0.5)
                res = rnd(g, dtype, rows, cols) if fused else None
                w = (
                    (torch.rand(cols, device="cuda", generator=g) + 0.5).to(dtype)
                    if has_w
                    else None
                )
                b = rnd(g, dtype, cols, scale=0.1) if has_b else None
                dy, ds = rnd(g, dtype, rows, cols), rnd(g, dtype, rows, cols)
                errs, _ = compare_case(x, w, b, kind, res, dy, ds)
                ok = all(c <= 2 * t + SLACK[dtype] for c, t in errs.values())
                rows_out.append({
                    "dtype": str(dtype).removeprefix("torch."), "cols": cols, "kind": kind,
                    "residual": fused, "ok": ok,
                    "errors": {k: {"cuda": c, "torch": t} for k, (c, t) in errs.items()},
                })  # fmt: skip
    for half, fused in MIXED:
        for cols in sizes:
            for kind in ("layernorm", "rmsnorm"):
                g = torch.Generator(device="cuda").manual_seed(cols)
                rows = 257
                x = rnd(g, half if fused else torch.float32, rows, cols, scale=2.0, shift=0.5)
                res = rnd(g, torch.float32, rows, cols, scale=3.0) if fused else None
                w = torch.rand(cols, device="cuda", generator=g) + 0.5
                b = rnd(g, torch.float32, cols, scale=0.1) if kind == "layernorm" else None
                dy, ds = rnd(g, half, rows, cols), rnd(g, torch.float32, rows, cols)
                errs, same_dtypes = compare_case(x, w, b, kind, res, dy, ds, half)
                ok = same_dtypes and all(c <= 2 * t + SLACK[half] for c, t in errs.values())
                label = f"{str(half).removeprefix('torch.')} autocast, " + (
                    "branch + fp32 residual" if fused else "fp32 input"
                )
                rows_out.append({
                    "dtype": label, "cols": cols, "kind": kind, "residual": fused, "ok": ok,
                    "errors": {k: {"cuda": c, "torch": t} for k, (c, t) in errs.items()},
                })  # fmt: skip
    return rows_out


# ------------------------------------------------------------------------------------ speed


def speed_case(fn: NormFn, x, w, b, kind, res, dy, ds, autocast=None) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(forward ms, forward+backward ms), under autocast to `autocast` when given."""
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, b, res)
    ]
    inputs = [t for t in leaves if t is not None]

    def call() -> Any:
        with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return fn(leaves[0], leaves[1], leaves[2], kind, 1e-5, leaves[3])

    def fwd() -> Any:
        with torch.no_grad():
            return call()

    def fwd_bwd() -> Any:
        out = call()
        if leaves[3] is None:
            return torch.autograd.grad(out, inputs, dy)
        return torch.autograd.grad(out, inputs, (dy, ds))

    return time_ms(fwd), time_ms(fwd_bwd)


def time_row(
    row: dict[str, Any],
    candidates: dict[str, NormFn],
    tensors: tuple[Any, ...],
    kind: str,
    nbytes: tuple[int, int],
    peak: float | None,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Time every candidate on `tensors` (x, w, b, res, dy, ds); GB/s from the minimal bytes
    (forward, backward) in `nbytes`; speed-ups over torch."""
    x, w, b, res, dy, ds = tensors
    fwd_bytes, bwd_bytes = nbytes
    for name, fn in candidates.items():
        try:
            f_ms, fb_ms = speed_case(fn, x, w, b, kind, res, dy, ds, autocast)
        except Exception as e:  # a backend that rejects these inputs
            row[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        fb_gbps = (fwd_bytes + bwd_bytes) / (fb_ms * 1e-3) / 1e9
        row[name] = {
            "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "fwd_gbps": fwd_bytes / (f_ms * 1e-3) / 1e9,
            "fwd_bwd_gbps": fb_gbps,
            "fwd_bwd_pct_peak": None if peak is None else 100 * fb_gbps / peak,
        }  # fmt: skip
    base = row.get("torch", {})
    for name in candidates:
        r = row.get(name, {})
        if "fwd_ms" in r and "fwd_ms" in base:
            r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"]
            r["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return row


def speed(quick: bool, peak: float | None) -> list[dict[str, Any]]:
    candidates: dict[str, NormFn] = {"torch": torch_backend.norm, "cuda": cuda_backend.norm}
    triton = backends("norm").get("triton")
    if triton is not None and triton.unavailable_reason() is None:
        candidates["triton"] = triton.fn
    shapes = SPEED_SHAPES[:1] if quick else SPEED_SHAPES
    out = []
    for rows, cols in shapes:
        dtypes = DTYPES if (rows, cols) == TARGETS[0][2] else (torch.bfloat16,)
        for dtype in dtypes:
            for kind, has_b, fused in (("layernorm", True, False), ("rmsnorm", False, False),
                                       ("layernorm", True, True), ("rmsnorm", False, True)):  # fmt: skip
                x = torch.randn(rows, cols, device="cuda", dtype=dtype)
                res = torch.randn_like(x) if fused else None
                w = torch.rand(cols, device="cuda", dtype=dtype) + 0.5
                b = torch.randn(cols, device="cuda", dtype=dtype) * 0.1 if has_b else None
                dy, ds = torch.randn_like(x), torch.randn_like(x)
                n = x.numel() * x.element_size()
                # minimal traffic: fwd reads x (+res), writes y (+s); bwd reads dy, s (+ds), writes dx
                row: dict[str, Any] = {"shape": [rows, cols], "dtype": str(dtype).removeprefix("torch."),
                                       "kind": kind, "residual": fused}  # fmt: skip
                nbytes = (n * (2 + 2 * fused), n * (3 + fused))
                out.append(time_row(row, candidates, (x, w, b, res, dy, ds), kind, nbytes, peak))
                del x, res, dy, ds
        if (rows, cols) == TARGETS[0][2]:  # the autocast case of a GPT block at the target shape
            for kind, has_b in (("layernorm", True), ("rmsnorm", False)):
                x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
                res = torch.randn(rows, cols, device="cuda")
                w = torch.rand(cols, device="cuda") + 0.5
                b = torch.randn(cols, device="cuda") * 0.1 if has_b else None
                dy, ds = torch.randn_like(x), torch.randn_like(res)
                n = x.numel()
                # fwd: x bf16 + res fp32 read, y bf16 + s fp32 written; bwd: dy bf16, s fp32,
                # ds fp32 read, d res fp32 + d branch bf16 written
                nbytes = (n * (2 + 4 + 2 + 4), n * (2 + 4 + 4 + 4 + 2))
                row = {"shape": [rows, cols], "dtype": "bf16 autocast, fp32 residual",
                       "kind": kind, "residual": True}  # fmt: skip
                tensors = (x, w, b, res, dy, ds)
                out.append(time_row(row, candidates, tensors, kind, nbytes, peak, torch.bfloat16))
                del x, res, dy, ds, tensors
    return out


# ---------------------------------------------------------------------------------- report


def markdown(
    meta: dict[str, Any], checks: list[dict[str, Any]], timings: list[dict[str, Any]]
) -> str:
    lines = [f"# CUDA norm kernels on {meta['device_name']}", ""]
    lines += conditions(meta)
    lines += [f"- {k}: {meta.get(k)}" for k in ("sms", "peak_gbps", "copy_gbps", "target")]
    bad = [c for c in checks if not c["ok"]]
    lines += ["", f"## Correctness: {len(checks) - len(bad)}/{len(checks)} cases pass", ""]
    lines += ["Worst relative error (cuda vs torch, both against float64) per dtype:", ""]
    lines += ["| dtype | quantity | cuda | torch |", "|---|---|---|---|"]
    for dtype in sorted({c["dtype"] for c in checks}):
        for q in ("y", "dx", "dw", "db", "dr"):
            pairs = [c["errors"][q] for c in checks if c["dtype"] == dtype and q in c["errors"]]
            if pairs:
                lines.append(f"| {dtype} | {q} | {max(p['cuda'] for p in pairs):.2e} | "
                             f"{max(p['torch'] for p in pairs):.2e} |")  # fmt: skip
    for c in bad:
        lines.append(
            f"- FAIL {c['dtype']} {c['cols']} {c['kind']} residual={c['residual']}: {c['errors']}"
        )
    lines += ["", "## Speed (median ms of do_bench; GB/s = minimal bytes / time)", ""]
    names = [n for n in ("torch", "cuda", "triton") if any(n in t for t in timings)]
    head = (
        "| shape | dtype | op | "
        + " | ".join(f"{n} fwd ms | {n} fwd+bwd ms | {n} fwd+bwd GB/s" for n in names)
        + " | cuda fwd+bwd speedup |"
    )
    lines += [head, "|" + "---|" * (3 + 3 * len(names) + 1)]
    for t in timings:
        op = t["kind"] + (" +res" if t["residual"] else "")
        cells = []
        for n in names:
            r = t.get(n, {})
            if "fwd_ms" in r:
                cells += [
                    f"{r['fwd_ms']:.3f}",
                    f"{r['fwd_bwd_ms']:.3f}",
                    f"{r['fwd_bwd_gbps']:.0f}",
                ]
            else:
                cells += ["-", "-", "-"]
        sp = t.get("cuda", {}).get("fwd_bwd_speedup")
        lines.append(f"| {t['shape'][0]}x{t['shape'][1]} | {t['dtype']} | {op} | "
                     + " | ".join(cells) + f" | {'-' if sp is None else f'{sp:.2f}x'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def target_result(timings: list[dict[str, Any]]) -> str:
    """One line per target: the cuda fwd+bwd speed-up over torch at the target shape."""
    lines = []
    for kind, dtype, shape, want in TARGETS:
        sp = None
        for t in timings:
            if (
                t["kind"] == kind
                and not t["residual"]
                and t["dtype"] == str(dtype).removeprefix("torch.")
                and tuple(t["shape"]) == shape
            ):
                sp = t.get("cuda", {}).get("fwd_bwd_speedup")
        base = "F.layer_norm" if kind == "layernorm" else "F.rms_norm"
        what = f"target {kind} {shape[0]}x{shape[1]} bf16 fwd+bwd >= {want}x {base}"
        if sp is None:
            lines.append(f"{what}: not measured")
        else:
            lines.append(f"{what}: {sp:.2f}x ({'MET' if sp >= want else 'NOT MET'})")
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and shapes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check_norm: no CUDA device; nothing to check")
        return 0
    reason = cuda_backend.available()
    if reason is not None:
        print(f"gpu_check_norm: the cuda norm backend is not available: {reason}")
        return 1
    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(props.name)
    meta = {
        **machine_info(torch.device("cuda")),
        "sms": props.multi_processor_count,
        "peak_gbps": peak,
        "copy_gbps": round(copy_bandwidth()),
    }
    checks = correctness(args.quick)
    timings = speed(args.quick, peak)
    meta["target"] = target_result(timings)
    report = markdown(meta, checks, timings)
    doc = {"benchmark": "gpu_check_norm", "meta": meta, "correctness": checks, "speed": timings}
    write_results(args.out, "norm_check", doc, report)
    print(report)
    print(meta["target"])
    failed = sum(not c["ok"] for c in checks)
    print(f"correctness: {len(checks) - failed}/{len(checks)} pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
