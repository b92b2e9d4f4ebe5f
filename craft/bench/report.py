"""Benchmark output: rich tables, the JSON document and the throughput plot.

Files are written with `craft.fileio`'s atomic writer (a temporary file next to the target, flushed
to disk and renamed), so a JSON or PNG that exists is always complete.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from craft.bench.core import FAILED, OK, SKIPPED, WRONG, FamilyReport, Result, dtype_name
from craft.fileio import atomic_write_bytes

FORMAT = "craft-bench/1"
_STATUS_STYLE = {OK: "green", WRONG: "bold red", FAILED: "bold red", SKIPPED: "yellow"}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def _uniform_skips(report: FamilyReport) -> dict[str, str]:
    """Implementations skipped in every case for the same reason: listed once, not per row."""
    by_impl: dict[str, set[str | None]] = {}
    statuses: dict[str, set[str]] = {}
    for r in report.results:
        by_impl.setdefault(r.impl, set()).add(r.reason)
        statuses.setdefault(r.impl, set()).add(r.status)
    return {
        impl: next(iter(reasons)) or ""
        for impl, reasons in by_impl.items()
        if statuses[impl] == {SKIPPED} and len(reasons) == 1
    }


def family_table(report: FamilyReport, peak_bandwidth: float | None = None) -> Table:
    """One row per (case, implementation); wrong results show their error, never a time.

    The swept size gets its own column; the other dims go in the title when they are the same for
    every case, else in a `shape` column.
    """
    fam, s = report.family, report.settings
    groups = list(dict.fromkeys(r.group for r in report.results))
    title = f"{fam.title} · {s.mode} · {dtype_name(s.dtype)} · {s.device}"
    if len(groups) == 1 and groups[0]:
        title += f" · {groups[0]}"
    table = Table(title=title, title_justify="left")
    if len(groups) > 1:
        table.add_column("shape", no_wrap=True)
    table.add_column(fam.x_key, justify="right", no_wrap=True)
    table.add_column("impl", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("median ms", justify="right", no_wrap=True)
    table.add_column(fam.metric, justify="right", no_wrap=True)
    table.add_column("vs base", justify="right", no_wrap=True)
    table.add_column("peak mem", justify="right", no_wrap=True)
    table.add_column("error / reason", overflow="fold")
    hidden = _uniform_skips(report)
    last = None
    for r in report.results:
        if r.impl in hidden:
            continue
        key = (r.group, r.x)
        if last is not None and key != last:
            table.add_section()
        first = key != last
        last = key
        cells = _row(r, fam.metric, peak_bandwidth)
        lead = [str(r.x) if first else ""]
        if len(groups) > 1:
            lead.insert(0, r.group if first else "")
        table.add_row(*lead, *cells)
    return table


def _row(r: Result, metric: str, peak_bw: float | None) -> list[str | Text]:
    status = Text(r.status.upper() if r.status in (WRONG, FAILED) else r.status)
    status.stylize(_STATUS_STYLE.get(r.status, ""))
    if r.status != OK:
        reason = Text(r.reason or "", style="red" if r.status in (WRONG, FAILED) else "dim")
        return [r.impl, status, "-", "-", "-", "-", reason]
    thr = fmt_num(r.throughput)
    if metric == "GB/s" and peak_bw and r.throughput:
        thr += f" ({100 * r.throughput * 1e9 / peak_bw:.0f}%)"
    ms = fmt_num(r.median_ms)
    if r.iqr_ms is not None and r.median_ms:
        ms += f" ±{100 * r.iqr_ms / 2 / r.median_ms:.0f}%"
    speed = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
    if r.same_kernel:
        speed = "same kernel"
    err = f"rms {r.rms_err:.1e}" if r.rms_err is not None else ""
    if r.reference != "float64":
        err += f" (vs {r.reference})"
    return [r.impl, status, ms, thr, speed, fmt_bytes(r.peak_mem_bytes), err]


def print_report(
    console: Console, report: FamilyReport, peak_bandwidth: float | None = None
) -> None:
    console.print(family_table(report, peak_bandwidth))
    fam = report.family
    console.print(
        f"[dim]{fam.metric}: {fam.work_note}. vs base: speed-up over the first of "
        f"{', '.join(fam.baselines)} that ran ('same kernel': it calls the baseline's own "
        f"function, so no speed-up is claimed). peak mem: most bytes allocated during one call "
        f"above its inputs.[/dim]"
    )
    hidden = _uniform_skips(report)
    if hidden:
        console.print("[yellow]Skipped on this machine:[/yellow]")
        for impl, why in hidden.items():
            console.print(f"  [yellow]{impl}[/yellow]: {why}")
    bad = [r for r in report.results if r.status in (WRONG, FAILED)]
    for r in bad:
        console.print(
            f"[bold red]{r.status.upper()}[/bold red] {r.impl} at "
            f"{' '.join(f'{k}={v}' for k, v in r.dims.items())}: {r.reason} (not timed)"
        )
    console.print()


# ------------------------------------------------------------------------------ files


def write_file(path: Path, data: bytes | str) -> None:
    """Write a result file atomically (`craft.fileio`), creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)


def conditions(machine: dict[str, Any], load_after: list[float] | None = None) -> list[str]:
    """Markdown lines saying where and when a result was measured, and how busy the machine was.

    `machine` is `craft.bench.hardware.machine_info`'s record (its load average is the one at the
    start); `load_after` the load average at the end, when the script took it.
    """
    m = machine
    cores = f"{m.get('cpu_count')} CPU cores, {m.get('torch_threads')} torch threads"
    versions = ", ".join(
        f"{k} {m[k]}" for k in ("python", "torch", "triton", "cuda", "craft") if m.get(k)
    )
    load = m.get("load_avg")
    load_text = "not available" if not load else f"{load[0]:.2f} (1 min) at the start"
    if load_after:
        load_text += f", {load_after[0]:.2f} at the end"
    return [
        f"- machine: {m.get('device_name')} ({m.get('device')}), {cores}; {m.get('platform')}",
        f"- versions: {versions}",
        f"- date: {m.get('date')}",
        f"- load average: {load_text}",
    ]


def write_results(out_dir: Path, stem: str, doc: dict[str, Any], markdown: str) -> list[Path]:
    """`<stem>.json` and `<stem>.md` in `out_dir`, each written atomically; their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    write_json(paths[0], doc)
    write_file(paths[1], markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def document(
    machine: dict[str, Any],
    settings: dict[str, Any],
    reports: list[FamilyReport],
    train: dict[str, Any] | None,
    command: str,
    note: str | None = None,
) -> dict[str, Any]:
    """The JSON document of one `craft bench` run."""
    return {
        "format": FORMAT,
        "command": command,
        "note": note,
        "machine": machine,
        "settings": settings,
        "benchmarks": {r.family.name: r.to_json() for r in reports},
        "train": train,
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """`doc` as indented JSON (NaN and infinity refused: they are not JSON)."""
    write_file(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def write_plot(path: Path, reports: list[FamilyReport], subtitle: str) -> None:
    """Throughput against the swept size (seq len, vocab, hidden), one panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [r for r in reports if any(x.status == OK for x in r.results)] or reports
    n = max(1, len(panels))
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.4 * rows), squeeze=False)
    for ax, report in zip(axes.flat, panels, strict=False):
        _panel(ax, report)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(subtitle, fontsize=10)
    write_figure(path, fig)


def write_figure(path: Path, fig: Any, dpi: int = 110) -> None:
    """Save a matplotlib figure (format from the suffix, PNG by default) atomically; close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    suffix = Path(path).suffix.lstrip(".") or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=suffix, dpi=dpi)
    plt.close(fig)
    write_file(Path(path), buf.getvalue())


def _panel(ax: Any, report: FamilyReport) -> None:
    fam = report.family
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in report.results:
        if r.status == OK and r.throughput is not None:
            lines.setdefault((r.impl, r.group), []).append((r.x, r.throughput))
    groups = {g for _, g in lines}
    xs = sorted({r.x for r in report.results})
    for (impl, group), pts in lines.items():
        pts.sort()
        label = impl if len(groups) == 1 else f"{impl} ({group})"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if len(xs) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(fam.x_key)
    ax.set_ylabel(fam.metric)
    title = fam.title
    if len(groups) == 1:
        title += f" ({next(iter(groups))})"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    bad = sorted({r.impl for r in report.results if r.status in (WRONG, FAILED)})
    if bad:
        ax.text(
            0.01,
            0.01,
            "not plotted (wrong or failed): " + ", ".join(bad),
            transform=ax.transAxes,
            fontsize=7,
            color="red",
        )
    if lines:
        ax.legend(fontsize=7)
