"""Throughput (MB/s) and peak memory of `craft data prepare` on tinyshakespeare repeated to ~100 MB.

Runs every configuration in a fresh child process so that its peak RSS is its own: the main
process (reader, writer, tokenizer) via RUSAGE_SELF and the encoding workers via RUSAGE_CHILDREN.
Configurations: char, sentencepiece (a 2000-piece BPE model trained once beforehand, so that
encoding alone is timed) and bytes, each with 1 worker vs all cores, and a nanoGPT-style in-memory char baseline
(read everything, encode to a Python list, convert) for the memory comparison.

    python bench/prepare_throughput.py [--size-mb 100] [--skip-naive]

Writes bench/results/prepare_throughput.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"


def _shakespeare() -> Path:
    mirror = os.environ.get("CRAFT_DATA_MIRROR") or str(REPO.parent / "shared" / "data")
    os.environ.setdefault("CRAFT_DATA_MIRROR", mirror)
    from craft.data.sources import resolve_source

    return resolve_source("tinyshakespeare")


def _make_input(dest: Path, size_mb: float) -> int:
    """tinyshakespeare repeated until the file holds at least `size_mb` MB."""
    block = _shakespeare().read_bytes()
    target = int(size_mb * 1e6)
    with open(dest, "wb") as f:
        written = 0
        while written < target:
            f.write(block)
            written += len(block)
    return written


def _usage() -> dict:
    """Peak RSS in kB of the main process and of the largest worker (Linux reports ru_maxrss in
    kB), and CPU seconds (user + system) of the process and its workers together."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "main_rss_kb": me.ru_maxrss,
        "worker_rss_kb": kids.ru_maxrss,
        "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
    }


# ----------------------------------------------------------------------------- child processes


def child_prepare(args: argparse.Namespace) -> dict:
    from craft.config.components import (
        BytesTokenizerConfig,
        CharTokenizerConfig,
        SentencePieceTokenizerConfig,
    )
    from craft.data.prepare import prepare

    cfg = {
        "char": CharTokenizerConfig(),
        "bytes": BytesTokenizerConfig(),
        "sentencepiece": SentencePieceTokenizerConfig(model=args.model),
    }[args.tokenizer]
    start = time.perf_counter()
    meta = prepare([args.input], args.out, cfg, workers=args.workers, progress=False)
    seconds = time.perf_counter() - start
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    return {"seconds": seconds, "tokens": tokens, **_usage()}


def child_naive(args: argparse.Namespace) -> dict:
    """The in-memory way: whole text in RAM, a Python list of ids, then an array."""
    import numpy as np

    start = time.perf_counter()
    text = Path(args.input).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = [stoi[c] for c in text]
    n = len(ids)
    split = n - int(n * 0.1)
    arr = np.array(ids, dtype=np.uint16)
    arr[:split].tofile(Path(args.out) / "train.bin")
    arr[split:].tofile(Path(args.out) / "val.bin")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": n, **_usage()}


def child_train(args: argparse.Namespace) -> dict:
    from craft.data.progress import quiet
    from craft.data.tokenizers import SentencePieceTokenizer

    start = time.perf_counter()
    with quiet():
        tok = SentencePieceTokenizer.train(
            [_shakespeare().read_text(encoding="utf-8")], vocab_size=2000, model_type="bpe"
        )
    tok.save(args.out)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **_usage()}


# ------------------------------------------------------------------------------------- driver


def _burn(n: int) -> float:
    total = 0
    for i in range(n):
        total += i
    return float(total)


def _available_speedup(cores: int, n: int = 10_000_000) -> float:
    """How much faster `cores` busy processes finish `cores` units of work than one process
    does them in sequence: `cores` on an idle machine, ~1 when other jobs hold all but one core."""
    import multiprocessing as mp

    start = time.perf_counter()
    _burn(n)
    one = time.perf_counter() - start
    with mp.get_context("spawn").Pool(cores) as pool:
        pool.map(_burn, [1] * cores)  # start-up outside the timing
        start = time.perf_counter()
        pool.map(_burn, [n] * cores)
        parallel = time.perf_counter() - start
    return cores * one / parallel


def _run_child(*argv: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    """`craft.bench.hardware.machine_info` (run in a child process) plus the cores this process may use and the versions
    of the encoding libraries."""
    import numpy
    import sentencepiece
    import torch

    from craft.bench.hardware import machine_info

    return {
        **machine_info(torch.device("cpu")),
        "cores": len(os.sched_getaffinity(0)),
        "numpy": numpy.__version__,
        "sentencepiece": sentencepiece.__version__,
        "loadavg_start": os.getloadavg()[0],
    }


def describe_machine() -> dict:
    """`_machine()` from a child process: importing torch here would raise the peak RSS that
    every later child inherits (Linux keeps the high-water mark across fork and exec)."""
    return _run_child("machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--skip-naive", action="store_true", help="Skip the in-memory baseline.")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--child", choices=["prepare", "naive", "train", "machine"], help=argparse.SUPPRESS
    )
    parser.add_argument("--input")
    parser.add_argument("--out")
    parser.add_argument("--tokenizer")
    parser.add_argument("--model")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()

    if args.child:
        fn = {
            "prepare": child_prepare,
            "naive": child_naive,
            "train": child_train,
            "machine": lambda _: _machine(),
        }[args.child]
        print(json.dumps(fn(args)))
        return

    machine = describe_machine()
    all_cores = machine["cores"]
    machine["available_speedup"] = _available_speedup(all_cores)
    rows = []
    with tempfile.TemporaryDirectory(prefix="craft-bench-") as td:
        tmp = Path(td)
        text = tmp / "input.txt"
        size = _make_input(text, args.size_mb)
        print(f"input: {size / 1e6:.1f} MB of tinyshakespeare, {all_cores} cores", flush=True)
        trained = _run_child("train", "--out", str(tmp / "sp"))
        print(f"sentencepiece bpe 2000 trained on 1.1 MB in {trained['seconds']:.1f}s", flush=True)
        configs = [(tok, w) for tok in ("char", "sentencepiece", "bytes") for w in (1, all_cores)]
        for i, (tok, workers) in enumerate(configs):
            out = tmp / f"ds{i}"
            res = _run_child(
                "prepare", "--input", str(text), "--out", str(out), "--tokenizer", tok,
                "--model", str(tmp / "sp" / "tokenizer.model"), "--workers", str(workers),
            )  # fmt: skip
            rows.append(
                {"method": "craft data prepare", "tokenizer": tok, "workers": workers, **res}
            )
            print(rows[-1], flush=True)
            import shutil

            shutil.rmtree(out)
        if not args.skip_naive:
            out = tmp / "naive"
            out.mkdir()
            res = _run_child("naive", "--input", str(text), "--out", str(out))
            rows.append({"method": "in-memory baseline", "tokenizer": "char", "workers": 1, **res})
            print(rows[-1], flush=True)
    machine["loadavg_end"] = os.getloadavg()[0]
    for r in rows:
        r["mb_per_s"] = size / 1e6 / r["seconds"]
    _write(args.results, machine, size, trained, rows)


def _write(results: Path, machine: dict, size: int, trained: dict, rows: list[dict]) -> None:
    from craft.bench.report import write_file, write_json

    payload = {"machine": machine, "input_bytes": size, "sp_training": trained, "runs": rows}
    write_json(results / "prepare_throughput.json", payload)
    lines = [
        "# Dataset preparation throughput",
        "",
        f"`python bench/prepare_throughput.py` on {machine['date']}: {size / 1e6:.1f} MB "
        "(tinyshakespeare repeated), each configuration in a fresh process.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['platform']}; Python "
        f"{machine['python']}, numpy {machine['numpy']}, sentencepiece {machine['sentencepiece']}, "
        f"craft {machine['craft']}.",
        f"Load average (1 min) {machine['loadavg_start']:.1f} at the start and "
        f"{machine['loadavg_end']:.1f} at the end; {machine['cores']} busy processes ran "
        f"{machine['available_speedup']:.2f}x faster than one (calibration at the start; "
        f"{machine['cores']}x on an idle machine). CPU seconds (process + workers) are less "
        "sensitive to machine load than wall-clock seconds.",
        "",
        "| method | tokenizer | workers | seconds | MB/s | CPU s | MB per CPU s | tokens "
        "| peak RSS main (MB) | peak RSS per worker (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        worker = f"{r['worker_rss_kb'] / 1024:.0f}" if r["workers"] > 1 else "-"
        lines.append(
            f"| {r['method']} | {r['tokenizer']} | {r['workers']} | {r['seconds']:.1f} | "
            f"{r['mb_per_s']:.1f} | {r['cpu_s']:.1f} | {size / 1e6 / r['cpu_s']:.1f} | "
            f"{r['tokens']:,} | {r['main_rss_kb'] / 1024:.0f} | {worker} |"
        )
    lines += [
        "",
        f"SentencePiece BPE (2000 pieces) trained on the 1.1 MB original beforehand in "
        f"{trained['seconds']:.1f}s (peak RSS {trained['main_rss_kb'] / 1024:.0f} MB); the "
        "sentencepiece rows time encoding with that model.",
        "",
        "Reading the table: `MB per CPU s` counts the CPU time of the process and its workers, "
        "so it shows the cost of each method independently of how busy the machine was. char "
        "and bytes encode with a table lookup / UTF-8 copy that is cheaper than sending text "
        "to another process, which is why `craft data prepare` encodes them in-process unless "
        "`--workers` is given; sentencepiece encoding is CPU-bound in the library and is spread "
        "over all cores by default. Peak RSS stays flat whatever the input size (chunks of "
        "1 MiB, at most 2 per worker in flight), while the in-memory baseline holds the whole "
        "text and a Python list of ids.",
        "",
    ]
    write_file(results / "prepare_throughput.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
