"""GPU check of the compiled CUDA norm kernels: correctness against float64, speed against torch.

    python bench/gpu_check_norm.py [--out DIR] [--quick]

1. Correctness: hidden sizes 64 ... 8192 (odd ones too) x float32/float16/bfloat16 x LayerNorm /
   RMSNorm, with and without a fused residual, forward and backward. Each error is measured against
   a float64 reference and must stay within 2x (+ a small slack) of the error torch's own
   F.layer_norm / F.rms_norm makes in the same dtype.
2. Speed: `craft bench norm` (craft.bench.run_family: timed with craft.bench's timer after its
   float64 check) of the cuda backend against F.layer_norm / F.rms_norm (and the Triton norm
   when registered), forward and forward+backward: time, effective GB/s (minimal bytes moved /
   time) and the share of the card's bandwidth (craft.bench.hardware's table).
   Target: LayerNorm bf16 16384 x 4096 forward+backward >= 1.5x F.layer_norm.

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

from craft.bench import OK, Settings, family, machine_info, run_family  # noqa: E402
from craft.bench.hardware import peak_for  # noqa: E402
from craft.bench.report import write_file, write_json  # noqa: E402
from craft.bench.timing import measure  # noqa: E402
from craft.ops import cuda as cuda_backend  # noqa: E402
from craft.ops import torch_backend  # noqa: E402

SIZES = (64, 100, 127, 768, 1000, 1024, 2048, 3000, 4096, 4097, 5120, 8191, 8192)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SPEED_SHAPES = ((16384, 4096), (16384, 1024), (8192, 8192), (65536, 768), (4096, 12288))
TARGET = ("layernorm", torch.bfloat16, (16384, 4096), 1.5)

NormFn = Callable[..., Any]


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write), a practical ceiling."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = measure(lambda: b.copy_(a), a.device).median_ms
    return 2 * a.numel() / (ms * 1e-3) / 1e9


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
                ref_y, ref_g = reference(x, w, b, kind, 1e-5, res, dy, ds)
                y, grads = run(cuda_backend.norm, x, w, b, kind, 1e-5, res, dy, ds)
                ty, tgrads = run(torch_backend.norm, x, w, b, kind, 1e-5, res, dy, ds)
                errs = {"y": (rel_err(y, ref_y), rel_err(ty, ref_y))}
                for name, gc, gt, gr in zip("xwbr", grads, tgrads, ref_g, strict=True):
                    if gr is not None:
                        errs[f"d{name}"] = (rel_err(gc, gr), rel_err(gt, gr))
                ok = all(c <= 2 * t + SLACK[dtype] for c, t in errs.values())
                rows_out.append({
                    "dtype": str(dtype).removeprefix("torch."), "cols": cols, "kind": kind,
                    "residual": fused, "ok": ok,
                    "errors": {k: {"cuda": c, "torch": t} for k, (c, t) in errs.items()},
                })  # fmt: skip
    return rows_out


# ------------------------------------------------------------------------------------ speed


# Implementations of `craft bench norm` in the speed table, under the names the table uses.
IMPLS = {"torch": "torch", "cuda": "craft.cuda", "triton": "craft.triton"}


def _timings(
    rows: int, cols: int, dtype: torch.dtype, residual: bool, device: torch.device
) -> dict[tuple, Any]:
    """{(kind, mode, impl): Result} of `craft bench norm` at one shape, dtype and residual."""
    out = {}
    for mode in ("fwd", "fwd+bwd"):
        settings = Settings(
            device=device,
            dtype=dtype,
            mode=mode,
            batch=[1],
            seq_lens=[rows],
            hidden=[cols],
            norm_kinds=["layernorm", "rmsnorm"],
            residual=residual,
            impls=list(IMPLS.values()),
            compile=False,
        )
        for r in run_family(family("norm"), settings).results:
            out[(r.dims["kind"], mode, r.impl)] = r
    return out


def speed(
    quick: bool, peak: float | None, device: torch.device = torch.device("cuda")
) -> list[dict[str, Any]]:
    shapes = SPEED_SHAPES[:1] if quick else SPEED_SHAPES
    out = []
    for rows, cols in shapes:
        dtypes = DTYPES if (rows, cols) == TARGET[2] else (torch.bfloat16,)
        for dtype in dtypes:
            for residual in (False, True):
                timings = _timings(rows, cols, dtype, residual, device)
                for kind in ("layernorm", "rmsnorm"):
                    row: dict[str, Any] = {"shape": [rows, cols], "dtype": str(dtype).removeprefix("torch."),
                                           "kind": kind, "residual": residual}  # fmt: skip
                    for name, impl in IMPLS.items():
                        f, fb = (
                            timings.get((kind, "fwd", impl)),
                            timings.get((kind, "fwd+bwd", impl)),
                        )
                        if f is None or fb is None:
                            continue  # not registered here (e.g. no Triton norm)
                        if f.status != OK or fb.status != OK:
                            bad = f if f.status != OK else fb
                            row[name] = {"error": f"{bad.status}: {bad.reason}"}
                            continue
                        row[name] = {
                            "fwd_ms": f.median_ms, "fwd_bwd_ms": fb.median_ms,
                            "fwd_gbps": f.throughput, "fwd_bwd_gbps": fb.throughput,
                            "fwd_bwd_pct_peak": None if peak is None else 100 * fb.throughput / peak,
                        }  # fmt: skip
                    base = row.get("torch", {})
                    for name in IMPLS:
                        r = row.get(name, {})
                        if "fwd_ms" in r and "fwd_ms" in base:
                            r["fwd_speedup"] = base["fwd_ms"] / r["fwd_ms"]
                            r["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
                    out.append(row)
    return out


# ---------------------------------------------------------------------------------- report


def markdown(
    meta: dict[str, Any], checks: list[dict[str, Any]], timings: list[dict[str, Any]]
) -> str:
    lines = [f"# CUDA norm kernels on {meta['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
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
    lines += ["", "## Speed (median ms; GB/s = minimal bytes / time)", ""]
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
    kind, dtype, shape, want = TARGET
    for t in timings:
        if (
            t["kind"] == kind
            and not t["residual"]
            and t["dtype"] == str(dtype).removeprefix("torch.")
            and tuple(t["shape"]) == shape
        ):
            sp = t.get("cuda", {}).get("fwd_bwd_speedup")
            if sp is None:
                return "target: not measured"
            verdict = "MET" if sp >= want else "NOT MET"
            return f"target {kind} {shape[0]}x{shape[1]} bf16 fwd+bwd >= {want}x F.layer_norm: {sp:.2f}x ({verdict})"
    return "target: not measured"


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
    machine = machine_info(torch.device("cuda"))
    found = peak_for(machine["device_name"])
    peak = found.bandwidth / 1e9 if found else None
    props = torch.cuda.get_device_properties(0)
    meta = {
        "device": machine["device_name"],
        "sms": props.multi_processor_count,
        "peak_gbps": peak,
        "copy_gbps": round(copy_bandwidth()),
        **{k: machine[k] for k in ("torch", "cuda", "triton", "python", "date", "load_avg")},
    }
    checks = correctness(args.quick)
    timings = speed(args.quick, peak)
    meta["target"] = target_result(timings)
    write_json(
        args.out / "norm_check.json", {"meta": meta, "correctness": checks, "speed": timings}
    )
    report = markdown(meta, checks, timings)
    write_file(args.out / "norm_check.md", report)
    print(report)
    print(meta["target"])
    failed = sum(not c["ok"] for c in checks)
    print(f"correctness: {len(checks) - failed}/{len(checks)} pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
