"""Throughput (MB/s) and peak memory of `craft data prepare` on the same corpus as a `.txt` file, as
JSON Lines (plain and gzip) and as Parquet.

The corpus is tinyshakespeare cut into documents at blank lines and repeated until the document
text reaches `--size-mb` (default 200 MB). The text file holds every document followed by a blank
line, which is exactly the separator the char tokenizer gets between records, so all formats
give the same token stream (checked). The JSON Lines files hold `{"text": ...}` per line; the
Parquet file is written by pyarrow with its defaults (snappy) in row groups of one pass over the
documents. Every run is a fresh child process preparing with the char tokenizer in-process (so the
numbers are the cost of reading each format, not of encoding), timed end to end, its peak RSS
from /proc/self/status (VmHWM). Runs are interleaved across formats, `--repeats` times each.

    python bench/prepare_formats.py [--size-mb 200] [--repeats 3] [--formats txt,jsonl,jsonl.gz,parquet]

Writes bench/results/prepare_formats.md and .json. The generated files live in a temporary
directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
FORMATS = ("txt", "jsonl", "jsonl.gz", "parquet")
SEPARATOR = "\n\n"  # the char tokenizer's separator between records

sys.path.insert(0, str(BENCH))
from prepare_throughput import _available_speedup, _shakespeare, describe_machine  # noqa: E402


def _documents() -> list[str]:
    text = _shakespeare().read_text(encoding="utf-8")
    return [d for d in text.split("\n\n") if d]


def make_corpus(tmp: Path, size_mb: float, formats: list[str]) -> dict:
    """Write the corpus in every format; returns document count, text bytes and file sizes."""
    docs = _documents()
    block_text = "".join(d + SEPARATOR for d in docs).encode("utf-8")
    block_json = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    repeats = max(1, round(size_mb * 1e6 / len(block_text)))
    files = {}
    if "txt" in formats:
        with open(tmp / "corpus.txt", "wb") as f:
            for _ in range(repeats):
                f.write(block_text)
        files["txt"] = tmp / "corpus.txt"
    if "jsonl" in formats:
        with open(tmp / "corpus.jsonl", "wb") as f:
            for _ in range(repeats):
                f.write(block_json)
        files["jsonl"] = tmp / "corpus.jsonl"
    if "jsonl.gz" in formats:
        with gzip.open(tmp / "corpus.jsonl.gz", "wb", compresslevel=6) as f:
            for _ in range(repeats):
                f.write(block_json)
        files["jsonl.gz"] = tmp / "corpus.jsonl.gz"
    if "parquet" in formats:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"text": docs})
        with pq.ParquetWriter(tmp / "corpus.parquet", table.schema) as w:
            for _ in range(repeats):
                w.write_table(table)
        files["parquet"] = tmp / "corpus.parquet"
    return {
        "documents": len(docs) * repeats,
        "text_bytes": len(block_text) * repeats,
        "files": {k: {"path": str(v), "bytes": v.stat().st_size} for k, v in files.items()},
    }


# ----------------------------------------------------------------------------- child process


def child(args: argparse.Namespace) -> dict:
    import resource

    from craft.config.components import CharTokenizerConfig
    from craft.data.prepare import prepare

    # time.perf_counter, not craft.bench.timing.now: importing torch here would count in the
    # child's peak RSS, and nothing runs on a device that `now` would wait for.
    start = time.perf_counter()
    meta = prepare([args.input], args.out, CharTokenizerConfig(), workers=1, progress=False)
    seconds = time.perf_counter() - start
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": seconds,
        "cpu_s": me.ru_utime + me.ru_stime,
        "rss_kb": _peak_rss_kb(),
        "tokens": meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"],
    }


def _peak_rss_kb() -> int:
    """This process's own peak RSS (VmHWM). ru_maxrss would also count the parent's RSS at the
    fork, which Linux carries over the exec into the child's figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise SystemExit("no VmHWM in /proc/self/status (this benchmark reads Linux's peak RSS)")


def _run_child(path: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--input", str(path), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"prepare {path.name} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="Document text to generate.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise SystemExit(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
    import pyarrow

    machine = describe_machine()
    machine["pyarrow"] = pyarrow.__version__
    machine["available_speedup"] = _available_speedup(machine["cores"])
    runs: dict[str, list[dict]] = {f: [] for f in formats}
    with tempfile.TemporaryDirectory(prefix="craft-bench-formats-") as td:
        tmp = Path(td)
        start = time.perf_counter()
        corpus = make_corpus(tmp, args.size_mb, formats)
        corpus["write_seconds"] = time.perf_counter() - start
        print(
            f"corpus: {corpus['documents']:,} documents, {corpus['text_bytes'] / 1e6:.1f} MB of "
            f"text, written in {corpus['write_seconds']:.0f}s",
            flush=True,
        )
        for i in range(args.repeats):
            for fmt in formats:
                out = tmp / f"ds-{fmt}-{i}"
                res = _run_child(Path(corpus["files"][fmt]["path"]), out)
                runs[fmt].append(res)
                print(f"{fmt:<9} run {i + 1}: {res}", flush=True)
                import shutil

                shutil.rmtree(out)
    from craft.bench.hardware import load_avg  # the children have run: torch may load now

    machine["load_avg_end"] = load_avg()
    tokens = {r["tokens"] for rs in runs.values() for r in rs}
    if len(tokens) != 1:
        raise SystemExit(f"formats gave different token counts: {sorted(tokens)}")
    _write(args.results, machine, corpus, runs, args)


def _write(
    results: Path, machine: dict, corpus: dict, runs: dict, args: argparse.Namespace
) -> None:
    # Imported only now: torch (which craft.bench imports) in this process before the children
    # ran would have counted in their peak RSS.
    from craft.bench.report import write_results
    from craft.bench.timing import spread as _summary

    text_mb = corpus["text_bytes"] / 1e6
    rows = {}
    for fmt, rs in runs.items():
        rows[fmt] = {
            "file_bytes": corpus["files"][fmt]["bytes"],
            "seconds": _summary([r["seconds"] for r in rs]),
            "text_mb_per_s": _summary([text_mb / r["seconds"] for r in rs]),
            "cpu_s": _summary([r["cpu_s"] for r in rs]),
            "text_mb_per_cpu_s": _summary([text_mb / r["cpu_s"] for r in rs]),
            "peak_rss_mb": _summary([r["rss_kb"] / 1024 for r in rs]),
            "tokens": rs[0]["tokens"],
            "runs": rs,
        }
    command = f"python bench/prepare_formats.py --size-mb {args.size_mb:g} --repeats {args.repeats}"
    payload = {
        "benchmark": "prepare_formats",
        "command": command,
        "repeats": args.repeats,
        "machine": machine,
        "corpus": corpus,
        "formats": rows,
    }
    text = render(payload)
    write_results(results, "prepare_formats", payload, text)
    print(text)


def _cell(s: dict, digits: int = 1) -> str:
    from craft.bench.timing import fmt_spread

    return fmt_spread(s, f".{digits}f")


def render(payload: dict) -> str:
    """The Markdown report of a results JSON."""
    from craft.bench.report import conditions

    machine, corpus, rows = payload["machine"], payload["corpus"], payload["formats"]
    text_mb = corpus["text_bytes"] / 1e6
    base = rows.get("txt")
    lines = [
        "# Dataset preparation from text, JSON Lines and Parquet",
        "",
        f"`{payload['command']}` on {machine['date']}: {corpus['documents']:,} documents "
        f"({text_mb:.1f} MB of text: tinyshakespeare cut at blank lines, repeated), the same "
        "text in every format, char tokenizer in-process, each run a fresh process; medians of "
        f"{payload['repeats']} interleaved runs with min–max.",
        "",
        *conditions(machine, machine.get("load_avg_end")),
        f"- also: numpy {machine['numpy']}, pyarrow {machine['pyarrow']}; "
        f"{machine['cores']} busy processes ran {machine['available_speedup']:.2f}x faster than "
        f"one ({machine['cores']}x on an idle machine). On a loaded machine wall-clock seconds "
        "mostly measure the wait for a core; compare the CPU columns.",
        "",
        "| input | file MB | seconds | text MB/s | CPU s | text MB per CPU s | CPU vs .txt "
        "| peak RSS (MB) | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, r in rows.items():
        ratio = f"{r['cpu_s']['median'] / base['cpu_s']['median']:.2f}x" if base else "-"
        lines.append(
            f"| .{fmt} | {r['file_bytes'] / 1e6:.1f} | {_cell(r['seconds'])} | "
            f"{_cell(r['text_mb_per_s'])} | {_cell(r['cpu_s'])} | "
            f"{_cell(r['text_mb_per_cpu_s'])} | {ratio} | {_cell(r['peak_rss_mb'], 0)} | "
            f"{r['tokens']:,} |"
        )
    lines += [
        "",
        "`text MB/s` and `text MB per CPU s` count document text (the same in every row, so "
        "rows compare directly); `CPU s` is the child's user + system time. Every format gives "
        "the same tokens. Preparation reads the input twice (once to learn the char "
        "vocabulary, once to encode), so reading costs count double here. Peak RSS is the "
        "child's own high-water mark (VmHWM): Python, numpy, 1 MiB chunks, and for Parquet the "
        "pyarrow libraries and one batch of 1024 rows; the corpus is never held in memory, so "
        "it is bounded by the chunk and batch sizes, not by the corpus size.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
