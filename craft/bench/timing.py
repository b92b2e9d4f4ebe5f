"""Timing and peak memory of one benchmark step, and the clock for longer spans of work.

Timing: on CUDA `triton.testing.do_bench` (CUDA events, L2 flushed between calls, gradients reset
outside the timed region); on the CPU `torch.utils.benchmark.Timer.blocked_autorange`. Both after
a warm-up, and both report the median.

Peak memory: the most bytes the step allocates above what was allocated when it started (inputs
and, in bwd mode, the saved forward graph excluded). On CUDA it is read from the caching
allocator's counters (`torch.cuda.max_memory_allocated`). The CPU has no such counters, and
`tracemalloc` does not see torch's allocator, so on the CPU the step runs once more under
`torch.profiler` with `profile_memory=True`: every allocation and free of torch's CPU allocator is
recorded, and the peak is the maximum of their running sum. These probes are batched into one
profiler session per benchmark family (starting and stopping the profiler costs about a second).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Warm-up calls before timing on the CPU, and the least total time the CPU timer measures for.
CPU_WARMUP = (1, 3)  # (quick, full)
CPU_MIN_RUN_S = (0.02, 0.4)
# do_bench budgets in milliseconds: (warm-up, repetition).
GPU_BUDGET_MS = ((5, 20), (25, 100))

MEM_CUDA = "torch.cuda.max_memory_allocated"
MEM_CPU = "torch.profiler allocator events"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float | None  # spread: interquartile range (CPU) or p75 - p25 (CUDA)
    runs: int | None  # calls measured (CPU); do_bench does not say


def now(device: torch.device) -> float:
    """`time.perf_counter()` once the work queued on `device` has finished: the clock for spans of
    real work (training steps, a generation) where `measure`'s repetitions do not apply."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(
    step: Callable[[], Any],
    device: torch.device,
    *,
    quick: bool = False,
    grads: list[torch.Tensor] | None = None,
) -> Timing:
    """Median time of `step()` after a warm-up."""
    if device.type == "cuda":
        try:
            import triton.testing
        except ImportError:
            return _measure_timer(step, quick, sync_cuda=True)
        warmup, rep = GPU_BUDGET_MS[0 if quick else 1]
        med, p25, p75 = triton.testing.do_bench(
            step,
            warmup=warmup,
            rep=rep,
            grad_to_none=grads or None,
            quantiles=[0.5, 0.25, 0.75],
        )
        return Timing(float(med), float(p75 - p25), None)
    return _measure_timer(step, quick, sync_cuda=False)


def _measure_timer(step: Callable[[], Any], quick: bool, sync_cuda: bool) -> Timing:
    from torch.utils.benchmark import Timer

    for _ in range(CPU_WARMUP[0 if quick else 1]):
        step()
    if sync_cuda:
        torch.cuda.synchronize()
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=CPU_MIN_RUN_S[0 if quick else 1])
    runs = len(m.times) * m.number_per_run
    # A spread of fewer than 4 blocks means nothing (it reads 0): report none.
    iqr = m.iqr * 1e3 if len(m.times) >= 4 else None
    return Timing(m.median * 1e3, iqr, runs)


def per_call_s(
    fn: Callable[[], Any],
    *,
    calls: int = 1,
    blocks: int = 7,
    warmup: int = 1,
    device: torch.device | None = None,
) -> list[float]:
    """Seconds per call of `fn`, one sample per block of `calls` calls, after `warmup` calls.

    The timer for work that `measure`'s autorange does not fit (a whole decode, a fixed number of
    repeats, microsecond calls counted in blocks); the clock is `now(device)`.
    """
    dev = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(blocks):
        t0 = now(dev)
        for _ in range(calls):
            fn()
        samples.append((now(dev) - t0) / calls)
    return samples


def spread(samples: Sequence[float], scale: float = 1.0) -> dict[str, float | int]:
    """Median with min and max of repeated measurements (times `scale`): what results report.

    The median is the figure quoted; min-max shows how far the repeats disagreed.
    """
    if not samples:
        raise ValueError("spread of no samples")
    xs = [x * scale for x in samples]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt_spread(s: dict[str, Any], fmt: str = ".2f", unit: str = "") -> str:
    """`median (min–max)` of a `spread` dict, e.g. "45.3 (43.0–47.9) ms"."""
    text = f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"
    return f"{text} {unit}" if unit else text


# --------------------------------------------------------------------------------- memory


class MemoryMeter:
    """Peak memory of benchmark steps: at once on CUDA, batched into one profiler run on the CPU.

    `request(result, step, leaves)` sets `result.peak_mem_bytes` and `result.mem_method` (on the
    CPU when `flush()` runs).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: list[tuple[Any, Callable[[], Any], list[torch.Tensor]]] = []

    def request(self, result: Any, step: Callable[[], Any], leaves: list[torch.Tensor]) -> None:
        if self.device.type == "cuda":
            result.peak_mem_bytes = cuda_peak(step, leaves)
            result.mem_method = MEM_CUDA
        elif self.device.type == "cpu":
            self._pending.append((result, step, leaves))
        else:
            result.mem_method = f"n/a: no allocator statistics on {self.device.type}"

    def flush(self) -> None:
        """Measure every pending CPU step in one profiler session."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            peaks = cpu_peaks([(step, leaves) for _, step, leaves in pending])
        except Exception as e:  # the profiler is optional machinery; never fail the benchmark
            for result, _, _ in pending:
                result.mem_method = f"n/a: profiler failed ({type(e).__name__}: {e})"
            return
        for (result, _, _), peak in zip(pending, peaks, strict=True):
            result.peak_mem_bytes = peak
            result.mem_method = MEM_CPU if peak is not None else "n/a: no allocator events"


def _reset_grads(leaves: list[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def cuda_peak(step: Callable[[], Any], leaves: list[torch.Tensor]) -> int:
    """Bytes allocated at the peak of one call of `step`, above what was allocated before it."""
    _reset_grads(leaves)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence native writes to stderr (the profiler library logs its start and stop there)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peaks(steps: list[tuple[Callable[[], Any], list[torch.Tensor]]]) -> list[int | None]:
    """Peak CPU-allocator bytes of each step, above what was allocated when it started."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    labels = [f"craft.bench.mem.{i}" for i in range(len(steps))]
    # Quiet for the whole session: the profiler also warns about frees of older blocks.
    with quiet_stderr():
        prof.start()
        try:
            for label, (step, leaves) in zip(labels, steps, strict=True):
                _reset_grads(leaves)
                with record_function(label):
                    out = step()
                    del out
        finally:
            prof.stop()
    events = prof.profiler.kineto_results.events()
    spans = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name() in set(labels)}
    allocs = allocator_events(events)
    return [allocation_peak(allocs, *spans[label]) if label in spans else None for label in labels]


def allocator_events(events: Any) -> list[tuple[int, int]]:
    """(time ns, bytes: + allocated, - freed) of the profiler's allocator records, in order."""
    return sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")


def allocation_peak(
    allocs: list[tuple[int, int]], start: int | None = None, end: int | None = None
) -> int:
    """The highest running sum of `allocs` between `start` and `end` (ns; None: unbounded)."""
    times = [t for t, _ in allocs]
    lo = 0 if start is None else bisect.bisect_left(times, start)
    hi = len(allocs) if end is None else bisect.bisect_right(times, end)
    cur = peak = 0
    for _, nbytes in allocs[lo:hi]:
        cur += nbytes
        peak = max(peak, cur)
    return int(peak)
