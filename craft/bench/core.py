"""The benchmark core: implementations, cases, the float64 correctness gate and the run loop.

A benchmark *family* (attention, cross-entropy, ...) says how to build the inputs of one case, how
to compute the float64 reference, and how much work (FLOPs or bytes) a call does. An *Impl* is one
way to compute the op. For every case the runner checks each implementation against the reference
first; only a correct result is timed, so a wrong implementation can never look fast.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from craft.bench.same_kernel import same_kernel
from craft.bench.timing import MemoryMeter, Timing, measure
from craft.errors import ConfigError, KernelError

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

# Family name -> module that defines `FAMILY` and registers its built-in implementations.
FAMILY_MODULES = {
    "attention": "craft.bench.attention",
    "cross_entropy": "craft.bench.cross_entropy",
    "linear_cross_entropy": "craft.bench.linear_cross_entropy",
    "norm": "craft.bench.norm",
}

# Result status values. Only "ok" results carry a time.
OK, WRONG, SKIPPED, FAILED = "ok", "wrong", "skipped", "failed"
COMPILE_OFF = "torch.compile is off (--quick turns it off: compiling outlasts a quick run; --compile turns it on)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------- tolerances

# (relative RMS error, max error relative to max |reference|) an output may have at each dtype.
# The RMS bound catches errors spread over the tensor (wrong scale, missing mask); the looser max
# bound catches a few wrong elements (a bad tile edge) without tripping on rounding outliers.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (4e-3, 3e-2),
    torch.bfloat16: (2e-2, 1e-1),
}
# float32 matmuls on CUDA may run in TF32 (10-bit mantissa, Triton's tl.dot default), which is
# float16-like precision.
_TF32_TOLERANCE = (4e-3, 3e-2)


def tolerance(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(rms, max) relative tolerances of an implementation computing in `dtype` on `device`."""
    if dtype == torch.float32 and device.type == "cuda":
        return _TF32_TOLERANCE
    return _TOLERANCES[dtype]


@dataclass
class Check:
    """Outcome of comparing an implementation's tensors with the float64 reference."""

    ok: bool
    rms_err: float  # worst relative RMS error over the compared tensors
    max_err: float  # worst max error relative to max |reference|
    reason: str | None = None  # why it failed, naming the tensor


def _error_stats(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float, float, bool]:
    """(|diff|_2^2, |ref|_2^2, max|diff|, max|ref|, all finite), in float64 chunks.

    Chunked so that comparing a large gradient never needs two more full-size float64 copies.
    """
    g, r = got.detach().reshape(-1), ref.reshape(-1)
    diff_sq = ref_sq = diff_max = ref_max = 0.0
    for start in range(0, g.numel(), _COMPARE_CHUNK):
        gc = g[start : start + _COMPARE_CHUNK].to(torch.float64)
        rc = r[start : start + _COMPARE_CHUNK].to(torch.float64)
        if not torch.isfinite(gc).all():
            return 0.0, 0.0, 0.0, 0.0, False
        d = gc - rc
        diff_sq += float(d.square().sum())
        ref_sq += float(rc.square().sum())
        diff_max = max(diff_max, float(d.abs().max()))
        ref_max = max(ref_max, float(rc.abs().max()))
    return diff_sq, ref_sq, diff_max, ref_max, True


_COMPARE_CHUNK = 1 << 24


def compare(
    got: Sequence[torch.Tensor | None],
    ref: Sequence[torch.Tensor],
    names: Sequence[str],
    tol: tuple[float, float],
) -> Check:
    """Compare each tensor in `got` with its reference; the worst tensor decides.

    rms err = |got - ref|_2 / |ref|_2; max err = max|got - ref| / max|ref| (absolute when the
    reference is all zeros).
    """
    worst_rms = worst_max = 0.0
    for g, r, name in zip(got, ref, names, strict=True):
        if g is None:
            return Check(False, math.inf, math.inf, f"{name}: no result (None)")
        if tuple(g.shape) != tuple(r.shape):
            return Check(
                False, math.inf, math.inf, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
            )
        diff_sq, ref_sq, diff_max, ref_max, finite = _error_stats(g, r)
        if not finite:
            return Check(False, math.inf, math.inf, f"{name}: non-finite values")
        rms = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)
        mx = diff_max / ref_max if ref_max > 0 else diff_max
        if rms > tol[0] or mx > tol[1]:
            return Check(
                False,
                rms,
                mx,
                f"{name}: rms err {rms:.2e} (tol {tol[0]:.0e}), max err {mx:.2e} (tol {tol[1]:.0e})",
            )
        worst_rms, worst_max = max(worst_rms, rms), max(worst_max, mx)
    return Check(True, worst_rms, worst_max)


# ------------------------------------------------------------------------------ data classes


@dataclass
class Case:
    """One shape of one family, at one dtype, device and mode."""

    family: str
    dims: dict[str, Any]  # shape and flags, e.g. {"batch": 2, "heads": 4, "seq_len": 128, ...}
    device: torch.device
    dtype: torch.dtype
    mode: str

    @property
    def needs_grad(self) -> bool:
        return self.mode != "fwd"

    def label(self, keys: Iterable[str] | None = None) -> str:
        keys = list(self.dims) if keys is None else list(keys)
        return " ".join(f"{k}={_fmt_dim(self.dims[k])}" for k in keys)


def _fmt_dim(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


@dataclass
class Inputs:
    """The positional arguments of an implementation call and what gets gradients."""

    args: tuple[Any, ...]  # passed as fn(*args)
    arg_names: tuple[str, ...]  # names of args, for messages ("q", "k", ...)
    diff: tuple[int, ...]  # indices of args that receive gradients in bwd modes
    grad_out: tuple[torch.Tensor | None, ...]  # upstream gradient of each output (None: scalar)
    out_names: tuple[str, ...]  # names of the outputs ("out", "loss", ...)

    def fresh_grad_out(self) -> list[torch.Tensor | None]:
        """Copies of the upstream gradients (some kernels overwrite them in place)."""
        return [None if g is None else g.clone() for g in self.grad_out]

    def fresh(self, needs_grad: bool) -> tuple[Any, ...]:
        """A private copy of the tensor arguments (an implementation may write into its inputs)."""
        out = []
        for i, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                a = a.detach().clone()
                if needs_grad and i in self.diff:
                    a.requires_grad_(True)
            out.append(a)
        return tuple(out)

    def compared_names(self, needs_grad: bool) -> list[str]:
        grads = [f"grad {self.arg_names[i]}" for i in self.diff] if needs_grad else []
        return [*self.out_names, *grads]


@dataclass(frozen=True)
class Impl:
    """One implementation of a family's op.

    `make(case)` returns the callable `fn(*inputs.args)` (it may compile; a failure there is
    reported as skipped). `available(case, args)` returns None when the implementation can run
    this case on this machine, else the reason it cannot (shown in the "skipped" list).
    """

    name: str
    make: Callable[[Case], Callable[..., Any]]
    available: Callable[[Case, tuple[Any, ...]], str | None] = lambda case, args: None
    description: str = ""
    compiles: bool = False  # a torch.compile implementation (off in --quick runs)
    # Entered around everything the implementation runs (checking, timing, memory), e.g. a config
    # patch it needs.
    context: Callable[[Case], contextlib.AbstractContextManager[Any]] | None = None


@dataclass
class Result:
    """The row of one (case, implementation) pair. Only `status == "ok"` rows carry times."""

    family: str
    impl: str
    dims: dict[str, Any]
    x: int
    group: str
    status: str
    reason: str | None = None
    rms_err: float | None = None
    max_err: float | None = None
    tol: tuple[float, float] | None = None
    median_ms: float | None = None
    iqr_ms: float | None = None
    runs: int | None = None
    work: float | None = None  # FLOPs (compute-bound) or bytes (memory-bound) of one call
    throughput: float | None = None  # TFLOP/s or GB/s
    speedup: float | None = None  # baseline time / this time, same case
    baseline: str | None = None  # the implementation `speedup` is measured against
    same_kernel: bool = False  # runs the baseline's own kernel: no speed-up is claimed
    peak_mem_bytes: int | None = None
    mem_method: str | None = None
    reference: str = "float64"  # dtype of the reference the result was checked against

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tol"] = list(self.tol) if self.tol else None
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()
        }


@dataclass
class Family:
    """A benchmark family: inputs, float64 reference and work of each case."""

    name: str  # registry key, e.g. "cross_entropy"
    title: str  # for tables and plots
    x_key: str  # the swept dim on the plot's x axis
    metric: str  # "TFLOP/s" (work in FLOPs) or "GB/s" (work in bytes)
    cases: Callable[[Settings], list[dict[str, Any]]]
    make_inputs: Callable[[Case, torch.Generator], Inputs]
    reference: Callable[[Case, Inputs, torch.dtype], list[torch.Tensor]]  # outputs (+ grads)
    work: Callable[[Case], float]
    baselines: tuple[str, ...]  # preferred baseline implementations, first ok one wins
    label_keys: tuple[str, ...] = ()  # dims shown in the table's shape column
    group: Callable[[dict[str, Any]], str] | None = None  # one plot line per group (default:
    # the label dims other than x)
    work_note: str = ""  # the formula behind `work`, for the README and JSON
    ref_flops: Callable[[Case], float] | None = None  # cost of the reference, for its dtype
    # bytes a case allocates for its inputs and float64 reference (a lower bound of its peak):
    # sizes that cannot fit are refused before anything is allocated
    memory: Callable[[Case], int] | None = None

    def group_of(self, dims: dict[str, Any]) -> str:
        if self.group is not None:
            return self.group(dims)
        return " ".join(f"{k}={_fmt_dim(dims[k])}" for k in self.label_keys if k != self.x_key)


@dataclass
class Settings:
    """What to run: device, dtype, mode and the shapes to sweep (None: the family default)."""

    device: torch.device
    dtype: torch.dtype
    mode: str = "fwd+bwd"
    causal: bool = True
    quick: bool = False
    batch: list[int] | None = None
    heads: list[int] | None = None
    kv_heads: list[int] | None = None
    seq_lens: list[int] | None = None
    head_dim: list[int] | None = None
    vocab: list[int] | None = None
    hidden: list[int] | None = None
    norm_kinds: list[str] | None = None
    residual: bool = False
    impls: list[str] | None = None  # fnmatch patterns of implementation names to run
    compile: bool | None = None  # torch.compile implementations; default: off in quick mode
    seed: int = 0

    def pick(self, name: str, default: list[Any]) -> list[Any]:
        value = getattr(self, name)
        return list(value) if value else list(default)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("device", "dtype")}
        d["device"] = str(self.device)
        d["dtype"] = dtype_name(self.dtype)
        return d


@dataclass
class FamilyReport:
    family: Family
    settings: Settings
    results: list[Result] = field(default_factory=list)

    def skipped_summary(self) -> list[dict[str, Any]]:
        """Implementations skipped, grouped by reason (usually: the machine lacks something)."""
        seen: dict[tuple[str, str], int] = {}
        for r in self.results:
            if r.status == SKIPPED:
                key = (r.impl, r.reason or "")
                seen[key] = seen.get(key, 0) + 1
        return [{"impl": i, "reason": why, "cases": n} for (i, why), n in seen.items()]

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.family.title,
            "x": self.family.x_key,
            "metric": self.family.metric,
            "work": self.family.work_note,
            "baselines": list(self.family.baselines),
            "results": [r.to_json() for r in self.results],
            "skipped": self.skipped_summary(),
        }


# ------------------------------------------------------------------------------- registries

_IMPLS: dict[str, dict[str, Impl]] = {name: {} for name in FAMILY_MODULES}
_FAMILIES: dict[str, Family] = {}


def family(name: str) -> Family:
    """The family `name` (its module is imported once; it registers its built-in impls)."""
    key = name.replace("-", "_")
    if key not in FAMILY_MODULES:
        raise KernelError(
            f"unknown benchmark {name!r}; expected one of {', '.join(FAMILY_MODULES)}"
        )
    if key not in _FAMILIES:
        _FAMILIES[key] = importlib.import_module(FAMILY_MODULES[key]).FAMILY
    return _FAMILIES[key]


def register_impl(family_name: str, impl: Impl) -> Impl:
    """Add an implementation to a family. Registering the same name twice raises ValueError."""
    key = family_name.replace("-", "_")
    if key not in _IMPLS:
        raise ValueError(f"unknown benchmark family {family_name!r}; known: {', '.join(_IMPLS)}")
    if impl.name in _IMPLS[key]:
        raise ValueError(f"implementation {impl.name!r} of {key} is already registered")
    _IMPLS[key][impl.name] = impl
    return impl


def unregister_impl(family_name: str, name: str) -> None:
    """Remove an implementation (tests use it to clean up)."""
    _IMPLS[family_name.replace("-", "_")].pop(name, None)


def impls(family_name: str) -> list[Impl]:
    """The registered implementations of a family, built-ins first, in registration order."""
    fam = family(family_name)
    return list(_IMPLS[fam.name].values())


# ----------------------------------------------------------------------------- the run loop


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> list[torch.Tensor]:
    out = fn(*args)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _grads(args: tuple[Any, ...], diff: tuple[int, ...]) -> list[torch.Tensor | None]:
    return [args[i].grad for i in diff]


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    line = next((ln.strip() for ln in text if ln.strip()), "")
    msg = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _is_skip(e: BaseException) -> bool:
    """Errors that mean 'cannot run these inputs here' rather than 'broken'."""
    if isinstance(e, (KernelError, NotImplementedError, torch.cuda.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and (
        "No available kernel" in msg or "out of memory" in msg or "not implemented for" in msg
    )


def make_step(
    fn: Callable[..., Any],
    inputs: Inputs,
    mode: str,
    clear_grads: bool,
) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """The timed callable of one mode, and the tensors whose .grad it fills.

    fwd: fn(*args) without autograd state. bwd: the forward runs once here and each call runs the
    backward again (retain_graph). fwd+bwd: forward and backward each call. With `clear_grads`
    the step resets .grad to None itself (CPU timer); do_bench does it outside the timed region.
    """
    args = inputs.fresh(needs_grad=mode != "fwd")
    leaves = [args[i] for i in inputs.diff] if mode != "fwd" else []
    grad_out = inputs.fresh_grad_out()

    def reset() -> None:
        for t in leaves:
            t.grad = None

    if mode == "fwd":

        def step() -> Any:
            return fn(*args)

    elif mode == "bwd":
        outs = _call(fn, args)

        def step() -> Any:
            if clear_grads:
                reset()
            torch.autograd.backward(outs, grad_out, retain_graph=True)

    else:

        def step() -> Any:
            if clear_grads:
                reset()
            torch.autograd.backward(_call(fn, args), grad_out)

    return step, leaves


def check_impl(
    fn: Callable[..., Any], case: Case, inputs: Inputs, ref: list[torch.Tensor]
) -> Check:
    """Run fn once on fresh inputs (forward, and backward in bwd modes) and compare with `ref`."""
    args = inputs.fresh(case.needs_grad)
    outs = _call(fn, args)
    got: list[torch.Tensor | None] = [o.detach() for o in outs]
    if case.needs_grad:
        # Outputs cut off from autograd get no backward; the missing gradients then fail the check.
        pairs = [
            (o, g) for o, g in zip(outs, inputs.fresh_grad_out(), strict=False) if o.requires_grad
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        got += _grads(args, inputs.diff)
    names = inputs.compared_names(case.needs_grad)
    if len(got) != len(ref):
        return Check(False, math.inf, math.inf, f"{len(got)} results, expected {len(ref)}")
    return compare(got, ref, names, tolerance(case.dtype, case.device))


# Above this many reference FLOPs on CUDA the reference runs in float32 without TF32: float64
# matmuls run at a few percent of the bf16 rate, and a float32 reference is still about 1e4 times
# tighter than the bf16 tolerance.
FP64_REF_BUDGET = 2e14


def reference_dtype(fam: Family, case: Case) -> torch.dtype:
    """float64, except for very large matmul-bound references on CUDA (see FP64_REF_BUDGET)."""
    on_cuda = case.device.type == "cuda"
    if on_cuda and fam.ref_flops is not None and fam.ref_flops(case) > FP64_REF_BUDGET:
        return torch.float32
    return torch.float64


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full-precision float32 matmuls while a reference is computed."""
    # The public precision API: the legacy `matmul.allow_tf32` flag raises on torch >= 2.9 once
    # the newer fp32_precision settings are in use.
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def selected(fam: Family, settings: Settings) -> list[Impl]:
    """The implementations the settings ask for (all by default)."""
    from fnmatch import fnmatch

    chosen = impls(fam.name)
    if settings.impls:
        chosen = [i for i in chosen if any(fnmatch(i.name, p) for p in settings.impls)]
    return chosen


def memory_limit(device: torch.device) -> int:
    """Total memory of the device (RAM for the CPU), or 0 when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def check_memory(fam: Family, settings: Settings) -> None:
    """Refuse (ConfigError) a case whose inputs alone exceed the device's memory."""
    if fam.memory is None:
        return
    limit = memory_limit(settings.device)
    if not limit:
        return
    for dims in fam.cases(settings):
        case = Case(fam.name, dims, settings.device, settings.dtype, settings.mode)
        need = fam.memory(case)
        if need > limit:
            raise ConfigError(
                f"{fam.name.replace('_', '-')} {case.label(fam.label_keys)}: needs at least "
                f"{need / 2**30:,.1f} GiB for its inputs and reference, more than the "
                f"{limit / 2**30:,.1f} GiB of {settings.device.type} memory here; choose smaller "
                "sizes"
            )


def run_family(
    fam: Family,
    settings: Settings,
    on_progress: Callable[[str], None] | None = None,
) -> FamilyReport:
    """Check, then time, every selected implementation on every case of `fam`."""
    check_memory(fam, settings)
    report = FamilyReport(fam, settings)
    chosen = selected(fam, settings)
    meter = MemoryMeter(settings.device)
    compile_on = settings.compile if settings.compile is not None else not settings.quick
    for dims in fam.cases(settings):
        case = Case(fam.name, dims, settings.device, settings.dtype, settings.mode)
        gen = torch.Generator(device=settings.device).manual_seed(settings.seed)
        inputs = fam.make_inputs(case, gen)
        ref_dtype = reference_dtype(fam, case)
        with _no_tf32():
            ref = fam.reference(case, inputs, ref_dtype)
        tol = tolerance(case.dtype, case.device)
        case_results = []
        for impl in chosen:
            if on_progress:
                on_progress(f"{fam.name} {case.label(fam.label_keys)} {impl.name}")
            res = Result(
                fam.name,
                impl.name,
                dict(dims),
                int(dims[fam.x_key]),
                fam.group_of(dims),
                SKIPPED,
                tol=tol,
                reference=dtype_name(ref_dtype),
            )
            case_results.append(res)
            _run_one(impl, case, inputs, ref, res, fam, meter, settings.quick, compile_on)
        del ref
        _set_speedups(case_results, fam.baselines, dtype_name(settings.dtype))
        report.results.extend(case_results)
    meter.flush()
    return report


def _run_one(
    impl: Impl,
    case: Case,
    inputs: Inputs,
    ref: list[torch.Tensor],
    res: Result,
    fam: Family,
    meter: MemoryMeter,
    quick: bool,
    compile_on: bool,
) -> None:
    """Fill `res` for one implementation: skipped, failed, wrong, or ok with time and memory."""
    if impl.compiles and not compile_on:
        res.reason = COMPILE_OFF
        return
    try:
        why = impl.available(case, inputs.args)
    except Exception as e:  # an optional dependency failing at import
        why = _first_line(e)
    if why:
        res.reason = why
        return
    ctx = impl.context or (lambda case: contextlib.nullcontext())
    try:
        with ctx(case):
            fn = impl.make(case)
            check = check_impl(fn, case, inputs, ref)
    except Exception as e:
        res.status = SKIPPED if impl.compiles or _is_skip(e) else FAILED
        res.reason = _first_line(e)
        _free(case.device)
        return
    res.rms_err, res.max_err = check.rms_err, check.max_err
    if not check.ok:
        res.status, res.reason = WRONG, check.reason
        return
    on_gpu = case.device.type == "cuda"
    try:
        with ctx(case):
            step, leaves = make_step(fn, inputs, case.mode, clear_grads=not on_gpu)
            timing: Timing = measure(step, case.device, quick=quick, grads=leaves)
    except Exception as e:
        res.status = SKIPPED if impl.compiles or _is_skip(e) else FAILED
        res.reason = f"while timing: {_first_line(e)}"
        _free(case.device)
        return
    res.status = OK
    res.median_ms, res.iqr_ms, res.runs = timing.median_ms, timing.iqr_ms, timing.runs
    res.work = fam.work(case)
    scale = 1e12 if fam.metric == "TFLOP/s" else 1e9
    res.throughput = res.work / (timing.median_ms * 1e-3) / scale

    def step_in_context() -> Any:
        with ctx(case):
            return step()

    meter.request(res, step_in_context if impl.context else step, leaves)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _set_speedups(results: list[Result], baselines: Sequence[str], dtype: str) -> None:
    by_name = {r.impl: r for r in results if r.status == OK}
    base = next((by_name[b] for b in baselines if b in by_name), None)
    if base is None or not base.median_ms:
        return
    for r in by_name.values():
        r.baseline = base.impl
        if same_kernel(r.family, r.impl, base.impl, dtype):
            r.same_kernel = True  # a ratio of one kernel to itself is noise
            continue
        r.speedup = base.median_ms / r.median_ms if r.median_ms else None
