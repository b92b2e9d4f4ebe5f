"""Serving load: throughput and time to first token of `craft serve` for 1, 8 and 32 clients.

    python bench/serve_load.py                         # char_small and char_gpt shapes
    python bench/serve_load.py --quick --out /tmp/serve.json   # a smoke test in seconds

For each model shape (random weights, tinyshakespeare's 65-character vocabulary; serving speed
does not depend on the weights) the script writes an exported model to a temporary directory,
starts `python -m craft serve` on 127.0.0.1 with a free port, and for each client count runs that
many closed-loop clients, each a process of its own with a kept-alive `http.client` connection
(the standard library's: light, because the clients share the server's cores; each client's CPU
time is measured and reported as `clients' CPU`, in cores): each sends `--requests` streaming completions one after another (its own prompt of
`--prompt-chars` characters, temperature 1, a distinct seed per request) and records the time to
the first text chunk (TTFT) and the tokens received. Aggregate tokens/s = all completion tokens /
wall time of the round. Every request is bounded and every round ends by itself; the server is
stopped at the end. Nothing is sent anywhere but 127.0.0.1.

Two arrival patterns (`--arrivals`, both by default), each judged against its own one-client row:

- lockstep: every client starts at once and every request asks for `--max-tokens` tokens (no
  stop sequence), so concurrent requests are admitted together, finish on the same decode step
  and come back together: each round is a series of near-simultaneous arrivals;
- staggered: the clients start at seeded random offsets within one single-client request's
  duration (the shorter of the two warm-up requests; the earliest offset is moved to 0, where the
  round's clock starts), and each request's max_tokens is drawn, seeded per round, client and request,
  uniformly from [max_tokens/2, 3*max_tokens/2] (the same mean), so requests do not all end on
  one step: the traffic a real server sees.

The lock-step lower bound: before any server starts, the script times the server's own prefill
(`DecodeEngine.add_many`) of 1, 8 and 32 prompts of `--prompt-chars` tokens as one forward, in
this process with the server's torch thread count (median of `--prefill-repeats`). With lock-step
arrivals the last of N simultaneous requests cannot get its first token before all N prompts are
prefilled, so its TTFT is at least the one-client TTFT - prefill(1) + prefill(N); the table gives
prefill(N)/prefill(1) and that TTFT bound over the one-client p95 next to the measured ratio.

`--trace` also starts the server with CRAFT_SERVE_TRACE (craft/serving/trace.py) and prints, per
client count, where the time to first token went: client, HTTP, waiting for the model thread,
prefill, sampling, hand-off to the event loop, socket write, and the model work (tokens) a
request waited for.

`--variant NAME:KEY=VALUE[;KEY=VALUE]` (repeatable) starts one server per variant with those
environment variables (e.g. `OMP_WAIT_POLICY=PASSIVE`, or `PYTHONPATH=DIR` for another version of
the code) and alternates the rounds between them, so server settings are compared side by side.

Every client count runs `--repeats` rounds (variants, patterns and counts alternate, so a change
in machine load hits all alike); the tables give the median (min–max) over the rounds. Expected:
8 concurrent clients get >= 3x the aggregate tokens/s of one client, with p95 TTFT under 2x the
single-client p95 (medians), per arrival pattern. Clock, statistics, machine description and
writer are `craft.bench`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from craft.bench.hardware import load_avg, machine_info  # noqa: E402
from craft.bench.report import conditions, write_results  # noqa: E402
from craft.bench.timing import fmt_spread, now, spread  # noqa: E402

# tinyshakespeare's 65 characters
VOCAB = list("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def write_model(recipe: str, out: Path) -> Path:
    import torch

    from craft.config import load_config, to_toml
    from craft.data.tokenizers import CharTokenizer
    from craft.training.builders import build_model
    from craft.training.checkpoint import write_export

    cfg = load_config(REPO / "recipes" / f"{recipe}.toml")
    tok = CharTokenizer(VOCAB)
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    return write_export(
        out / recipe,
        model_state=model.state_dict(),
        config_toml=to_toml(cfg),
        tokenizer=tok,
        step=0,
    )


def server_threads(env: dict[str, str], requested: int | None) -> int:
    """The torch threads a server started with `env` (a variant's) runs its model with: its
    OMP_NUM_THREADS, else `--server-threads`, else what `craft serve` picks on this machine
    (a variant that runs other code with another default should set OMP_NUM_THREADS)."""
    import torch

    from craft.serving.server import model_threads

    if env.get("OMP_NUM_THREADS"):
        return int(env["OMP_NUM_THREADS"])
    return requested or model_threads("cpu") or torch.get_num_threads()


def prefill_bound(
    export: Path, prompt_chars: int, counts: list[int], threads: int, repeats: int
) -> dict[str, Any]:
    """The server's prefill (`DecodeEngine.add_many`) of N prompts of `prompt_chars` tokens, one
    forward, for each N in `counts`: spread over `repeats` alternating repetitions, in ms.

    Run in this process before any server starts, with the server's torch thread count.
    """
    import torch

    from craft.engine import DecodeEngine, Request
    from craft.sampling import SamplingParams
    from craft.training.checkpoint import load_model

    torch.set_num_threads(threads)
    model, tok, _ = load_model(export, device="cpu", dtype=torch.float32)  # as `craft serve`
    engine = DecodeEngine(model, max(counts))
    text = "The quick brown fox jumps over the lazy dog. " * (prompt_chars // 8 + 2)
    prompts = [tok.encode(text[c % 45 : c % 45 + prompt_chars]) for c in range(max(counts))]
    sampling = SamplingParams(temperature=1.0)
    times: dict[int, list[float]] = {n: [] for n in counts}
    for i in range(repeats + 1):  # the first repetition warms up
        for n in counts:
            reqs = [Request(prompts[r], sampling, [None], 8) for r in range(n)]
            t0 = clock()
            rows = engine.add_many(reqs)
            dt = clock() - t0
            for group in rows:
                for row in group:
                    engine.cancel(row)
            if i:
                times[n].append(dt * 1e3)
    return {
        "threads": threads,
        "prompt_tokens": len(prompts[0]),
        "ms": {str(n): spread(v) for n, v in times.items()},
    }


class Server:
    def __init__(
        self,
        export: Path,
        max_batch: int,
        threads: int | None,
        trace: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
        if trace is not None:
            env["CRAFT_SERVE_TRACE"] = str(trace)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        args = ["serve", "--checkpoint", str(export), "--host", "127.0.0.1", "--port", "0"]
        args += ["--max-batch-size", str(max_batch), "--max-queue", "256", "--log-level", "warning"]
        args += ["--model-name", "bench"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "craft", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=export.parent,  # not the repository: `-m` puts the cwd before PYTHONPATH
        )
        line = self.proc.stdout.readline()
        if not line.startswith("serving"):
            self.proc.kill()
            raise SystemExit(f"server did not start: {line}{self.proc.stderr.read()}")
        self.port = int(line.split("http://127.0.0.1:")[1].split()[0])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def clock() -> float:
    """`craft.bench.timing.now` on the CPU: the server's work is timed from the client side."""
    import torch

    return now(torch.device("cpu"))


def one_request(conn: Any, prompt: str, max_tokens: int, seed: int, trace: bool = False) -> dict:
    """One streamed completion over the kept-alive `http.client` connection `conn`."""
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    marks: dict[str, float] = {}
    t0 = clock()
    first = None
    tokens = 0
    rid = None
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    if trace:  # headers and body are written: the route starts on the headers
        marks["written_out"] = clock()
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    while line := r.readline():  # server-sent events, one `data:` line each
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0]["text"] and first is None:
            first = clock() - t0
            rid = chunk.get("id")
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    total = clock() - t0
    ttft = first if first is not None else total
    return {"ttft": ttft, "seconds": total, "tokens": tokens, "id": rid, "t0": t0, **marks}


def client_process(
    c: int,
    port: int,
    prompt: str,
    plan: tuple[float, list[int]],
    args: argparse.Namespace,
    ready: Any,
    start: Any,
    out: Any,
) -> None:
    """One client: connects, says it is ready, and on `start` waits its offset, then sends its
    requests one by one (`plan`: the offset in seconds and each request's max_tokens). Reports
    its results, errors and the CPU seconds it used while sending and reading them."""
    import http.client
    import time

    results: list[dict] = []
    errors: list[str] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.timeout)
    try:
        conn.request("GET", "/health")
        health = conn.getresponse()
        health.read()
        if health.status != 200:
            raise RuntimeError(f"/health: HTTP {health.status}")
        ready.put(c)
        start.wait()
        offset, max_tokens = plan
        if offset > 0:
            time.sleep(offset)
        cpu0 = time.process_time()
        for i, mt in enumerate(max_tokens):
            try:
                seed = 1000 * c + i
                results.append(one_request(conn, prompt, mt, seed, args.trace))
            except Exception as e:  # recorded, and the round goes on
                errors.append(f"{type(e).__name__}: {e}")
                break
        cpu = time.process_time() - cpu0
    finally:
        conn.close()
    out.put((results, errors, cpu))


def plans(
    clients: int, args: argparse.Namespace, arrivals: str, span: float, repeat: int
) -> list[tuple[float, list[int]]]:
    """Each client's start offset (s) and max_tokens per request, for an arrival pattern.

    lockstep: all at 0, all `max_tokens`. staggered: offsets uniform in [0, span] (the earliest
    moved to 0) and max_tokens uniform in [max_tokens/2, 3*max_tokens/2], both seeded by the
    round, the client count, the client and the request, so every variant sees the same traffic.
    """
    if arrivals == "lockstep":
        return [(0.0, [args.max_tokens] * args.requests) for _ in range(clients)]
    lo, hi = max(1, args.max_tokens // 2), args.max_tokens * 3 // 2
    rng = random.Random(f"offsets {repeat} {clients}")
    offsets = [rng.uniform(0.0, span) for _ in range(clients)]
    first = min(offsets)
    return [
        (
            offsets[c] - first,
            [
                random.Random(f"max_tokens {repeat} {clients} {c} {i}").randint(lo, hi)
                for i in range(args.requests)
            ],
        )
        for c in range(clients)
    ]


def run_round(
    port: int,
    clients: int,
    args: argparse.Namespace,
    arrivals: str = "lockstep",
    span: float = 0.0,
    repeat: int = 0,
) -> dict[str, Any]:
    """`clients` closed-loop clients, each a process of its own with a kept-alive connection.

    Separate processes, as separate users would be: the clients share the server's two cores
    but not an interpreter lock, so one client's parsing never holds up another's request.
    The round's clock starts once every client is connected (staggered: the first client starts
    then, the others at their offsets).
    """
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # the clients inherit `args`; nothing is pickled in
    ready, out, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    # Each client its own prompt (the same length): no server-side reuse of a shared prompt.
    text = "The quick brown fox jumps over the lazy dog. " * (args.prompt_chars // 8 + 2)
    prompts = [text[c % 45 : c % 45 + args.prompt_chars] for c in range(clients)]
    plan = plans(clients, args, arrivals, span, repeat)
    procs = [
        ctx.Process(
            target=client_process,
            args=(c, port, prompts[c], plan[c], args, ready, start, out),
            daemon=True,
        )
        for c in range(clients)
    ]
    for p in procs:
        p.start()
    results: list[dict] = []
    errors: list[str] = []
    try:
        for _ in procs:
            ready.get(timeout=args.timeout)
        t0 = clock()
        start.set()
        cpu = 0.0
        for _ in procs:
            res, errs, used = out.get(timeout=args.timeout * args.requests)
            results += res
            errors += errs
            cpu += used
        wall = clock() - t0
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)

    def pct(q: float) -> float:
        return ttfts[min(len(ttfts) - 1, round(q * (len(ttfts) - 1)))] if ttfts else float("nan")

    row = {
        "clients": clients,
        "arrivals": arrivals,
        "requests": len(results),
        "errors": errors,
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(0.5),
        "ttft_p95_s": pct(0.95),
        "per_request_tokens_per_s_median": statistics.median(
            r["tokens"] / max(r["seconds"] - r["ttft"], 1e-9) for r in results
        )
        if results
        else float("nan"),
        "request_s_min": min((r["seconds"] for r in results), default=float("nan")),
        # CPU the load generator itself took from the machine the server runs on
        "clients_cpu_cores": cpu / wall,
    }
    if args.trace:
        row["trace_requests"] = results
    print(
        f"  {arrivals:>9}, {clients:>2} clients: {row['tokens_per_s']:.0f} tokens/s, TTFT p50 "
        f"{row['ttft_p50_s'] * 1e3:.0f} ms p95 {row['ttft_p95_s'] * 1e3:.0f} ms, clients' CPU "
        f"{row['clients_cpu_cores']:.2f} cores" + (f", {len(errors)} errors" if errors else ""),
        flush=True,
    )
    return row


# Where the time to first token goes: consecutive marks of craft/serving/trace.py, between the
# client sending the request ("sent") and reading the first text chunk ("read").
SEGMENTS = (
    ("sent", "written_out", "client builds the request, writes its headers"),
    ("written_out", "enter", "server reads and parses them, event-loop queueing"),
    ("enter", "submit", "body read and validated, prompt tokenized"),
    ("submit", "admit", "waiting for the worker (the step in flight)"),
    ("admit", "prefill", "prefill"),
    ("prefill", "sampled", "prefill to the first token sampled"),
    ("sampled", "handoff", "text decoding, events"),
    ("handoff", "received", "hand-off to the event loop"),
    ("received", "written", "SSE chunk written"),
    ("written", "read", "client reads and parses the chunk"),
)


def ttft_breakdown(trace: Path, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, p95 and tail mean (requests at or over the p90 TTFT) of every segment, in ms."""
    marks = {}
    for line in trace.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        marks[rec["id"]] = rec
    reqs = []
    for rnd in rounds:
        for r in rnd.pop("trace_requests", []):
            m = marks.get(r["id"])
            if m is not None:
                client = {"sent": r["t0"], "read": r["t0"] + r["ttft"]}
                if "written_out" in r:
                    client["written_out"] = r["written_out"]
                reqs.append({**m, **client})
    if not reqs:
        return {}
    ttft = sorted(r["read"] - r["sent"] for r in reqs)
    tail = [r for r in reqs if r["read"] - r["sent"] >= ttft[int(0.9 * (len(ttft) - 1))]]
    out: dict[str, Any] = {"requests": len(reqs), "segments": []}
    for a, b, what in (*SEGMENTS, ("sent", "read", "time to first token")):
        vals = sorted((r[b] - r[a]) * 1e3 for r in reqs if a in r and b in r)
        tail_vals = [(r[b] - r[a]) * 1e3 for r in tail if a in r and b in r]
        if vals:
            out["segments"].append(
                {
                    "segment": what,
                    "median_ms": statistics.median(vals),
                    "p95_ms": vals[round(0.95 * (len(vals) - 1))],
                    "tail_mean_ms": statistics.fmean(tail_vals) if tail_vals else None,
                }
            )
    # Tokens the model processed (prefills and decode rows, all requests') between this request's
    # submission and its first token: the work it waited for, whatever the machine's load.
    work = sorted(r["work_sampled"] - r["work_submit"] for r in reqs if "work_sampled" in r)
    if work:
        out["work_tokens_median"] = statistics.median(work)
        out["work_tokens_p95"] = work[round(0.95 * (len(work) - 1))]
    for k in ("rows_before", "jobs_admitted", "step_rows"):  # batch rows at admission etc.
        vals = [r[k] for r in reqs if k in r]
        if vals:
            out[f"{k}_median"] = statistics.median(vals)
    return out


def print_breakdown(model: str, clients: int, b: dict[str, Any]) -> None:
    print(f"{model}, {clients} clients: where TTFT goes ({b.get('requests', 0)} requests, ms)")
    print(f"  {'segment':<48} {'median':>7} {'p95':>7} {'tail':>7}")
    for s in b.get("segments", []):
        tail = f"{s['tail_mean_ms']:7.1f}" if s["tail_mean_ms"] is not None else "      -"
        print(f"  {s['segment']:<48} {s['median_ms']:7.1f} {s['p95_ms']:7.1f} {tail}")
    extra = {k: v for k, v in b.items() if k.endswith(("_median", "_p95"))}
    if extra:
        print("  " + ", ".join(f"{k} {v}" for k, v in extra.items()))


def summarize(key: tuple[str, str, int], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (min-max) over the rounds of one (variant, arrivals, client count); rounds kept."""
    variant, arrivals, clients = key
    keys = (
        "tokens_per_s",
        "ttft_p50_s",
        "ttft_p95_s",
        "per_request_tokens_per_s_median",
        "clients_cpu_cores",
    )
    row: dict[str, Any] = {
        "variant": variant,
        "arrivals": arrivals,
        "clients": clients,
        "rounds": rounds,
    }
    row["requests"] = sum(r["requests"] for r in rounds)
    row["errors"] = sum(len(r["errors"]) for r in rounds)
    for k in keys:
        vals = [r[k] for r in rounds if k in r and r[k] == r[k]]  # NaN: a round without results
        row[k] = spread(vals) if vals else None
    return row


def _med(row: dict[str, Any], key: str) -> float:
    return float(row[key]["median"]) if row.get(key) else float("nan")


def lockstep_bound(
    bound: dict[str, Any] | None, clients: int, one_client_p95_s: float
) -> tuple[float, float] | None:
    """(prefill(N)/prefill(1), the TTFT bound over the one-client p95) for N = clients.

    The last of N simultaneous arrivals waits at least for all N prompts' prefill, and spends
    the one-client request's time outside the prefill: TTFT >= p95(1) - prefill(1) + prefill(N).
    """
    if not bound or str(clients) not in bound["ms"] or "1" not in bound["ms"]:
        return None
    one = bound["ms"]["1"]["median"] / 1e3
    many = bound["ms"][str(clients)]["median"] / 1e3
    return many / one, (one_client_p95_s - one + many) / one_client_p95_s


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    variants = result.get("variants") or {"default": {}}
    many = len(variants) > 1
    lines = [
        "# Serving load: `craft serve` with 1, 8 and 32 concurrent clients",
        "",
        *conditions(m, result.get("load_avg_end")),
        f"- server torch threads: {result['server_threads'] or 'craft serve default'} ("
        + ", ".join(f"{k}: {v}" for k, v in result.get("model_threads", {}).items())
        + " for the model)",
        *(
            [
                "- servers compared (rounds alternate between them): "
                + "; ".join(
                    f"{name}: {' '.join(f'{k}={v}' for k, v in env.items()) or 'as is'}"
                    for name, env in variants.items()
                )
            ]
            if many
            else []
        ),
        f"- command: `{result['command']}`",
        f"- rounds per row: {result['repeats']}; median (min–max) over the rounds",
        f"- each client: a process of its own with a kept-alive `http.client` connection, "
        f"{result['requests']} streaming requests in a row, prompt "
        f"{result['prompt_chars']} characters, temperature 1, no stop sequence; server "
        f"--max-batch-size {result['max_batch']}; the clients run on the server's machine, and "
        "the CPU they take from it (all clients, in cores: CPU seconds / wall time) is a column",
        "- arrivals `lockstep`: all clients start at once and every request asks for "
        f"max_tokens {result['max_tokens']}, so concurrent requests are admitted together, "
        "finish on the same step and come back together",
        "- arrivals `staggered`: clients start at seeded random offsets within one single-client "
        "request's duration (the warm-up request's: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in result.get("span_s", {}).items())
        + "; the earliest moved to 0), and each request's max_tokens is drawn (seeded per round, "
        f"client and request) uniformly from [{result['max_tokens'] // 2}, "
        f"{result['max_tokens'] * 3 // 2}] (the same mean), so requests do not end on one step",
        "- tokens/s = all completion tokens / wall time of the round; each pattern is judged "
        "against its own one-client row",
        *([f"- note: {result['note']}"] if result.get("note") else []),
    ]
    bounds = result.get("prefill_bound", {})
    if bounds:
        counts = sorted({int(n) for bt in bounds.values() for b in bt.values() for n in b["ms"]})
        lines += [
            "",
            "Prefill of N prompts as one forward (the server's `DecodeEngine.add_many`, "
            "measured in the benchmark's process before the server starts, same torch threads; "
            "median (min–max) of the repetitions, ms). Lock-step lower bound: the last of N "
            "simultaneous requests waits for all N prefills, so its TTFT >= one client's p95 "
            "- prefill(1) + prefill(N).",
            "",
            "| model | threads | prompt tokens | "
            + " | ".join(f"prefill({n}) ms" for n in counts)
            + " | "
            + " | ".join(f"prefill({n})/prefill(1)" for n in counts if n > 1)
            + " |",
            "|---|---:|---:|" + "---:|" * (2 * len(counts) - 1),
        ]
        for model, b in ((m, b) for m, bt in bounds.items() for b in bt.values()):
            one = b["ms"]["1"]["median"]
            lines.append(
                f"| {model} | {b['threads']} | {b['prompt_tokens']} | "
                + " | ".join(fmt_spread(b["ms"][str(n)], ".1f") for n in counts)
                + " | "
                + " | ".join(f"{b['ms'][str(n)]['median'] / one:.2f}" for n in counts if n > 1)
                + " |"
            )
    lines += [
        "",
        f"| model |{' server |' if many else ''} arrivals | clients | requests "
        "| tokens/s (all clients) | x one client | TTFT p50 ms | TTFT p95 ms "
        "| p95 / one client's (per round) | lock-step bound: prefill(N)/prefill(1), TTFT "
        "| per-request tok/s (median) | clients' CPU, cores | expected |",
        f"|---|{'---|' if many else ''}---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, rows in result["models"].items():
        bases = {(r["variant"], r["arrivals"]): r for r in rows if r["clients"] == 1}
        for r in rows:
            base = bases.get((r["variant"], r["arrivals"]))
            if base is None:
                base = r
            speed = _med(r, "tokens_per_s") / _med(base, "tokens_per_s")
            ttft = _med(r, "ttft_p95_s") / _med(base, "ttft_p95_s")
            # The ratio within each round pair (the client counts of a repeat run back to back):
            # its range shows how far the machine's load moved the verdict.
            pairs = [
                a["ttft_p95_s"] / b["ttft_p95_s"]
                for a, b in zip(r["rounds"], base["rounds"], strict=False)
                if a["ttft_p95_s"] == a["ttft_p95_s"] and b["ttft_p95_s"] == b["ttft_p95_s"]
            ]
            ratio = f"{ttft:.2f}"
            if len(pairs) > 1 and r is not base:
                ratio += f" ({min(pairs):.2f}–{max(pairs):.2f})"
            bound = None
            if r["arrivals"] == "lockstep" and r is not base:
                by_threads = bounds.get(model, {})
                b = by_threads.get(str(r.get("model_threads")))
                if b is None and len(by_threads) == 1:
                    b = next(iter(by_threads.values()))
                bound = lockstep_bound(b, r["clients"], _med(base, "ttft_p95_s"))
            verdict = "-"
            if r["clients"] == 8 and base["clients"] == 1:  # the goal is relative to one client
                ok = speed >= 3.0 and ttft < 2.0
                verdict = f"x>=3 and p95<2x: {'yes' if ok else 'NO'}"
                if bound is not None and bound[1] >= 2.0:
                    verdict += " (bound >= 2x)"

            def ms(key: str, r: dict[str, Any] = r) -> str:
                if not r.get(key):
                    return "-"
                return fmt_spread({k: v * 1e3 for k, v in r[key].items() if k != "n"}, ".0f")

            tps = fmt_spread(r["tokens_per_s"], ".0f") if r.get("tokens_per_s") else "-"
            cpu = f"{_med(r, 'clients_cpu_cores'):.2f}" if r.get("clients_cpu_cores") else "-"
            server = f" {r['variant']} |" if many else ""
            lines.append(
                f"| {model} |{server} {r['arrivals']} "
                f"| {r['clients']} | {r['requests']} | {tps} "
                f"| {speed:.2f} | {ms('ttft_p50_s')} | {ms('ttft_p95_s')} | {ratio} "
                f"| {'-' if bound is None else f'{bound[0]:.2f}, {bound[1]:.2f}'} "
                f"| {_med(r, 'per_request_tokens_per_s_median'):.0f} | {cpu} | {verdict} |"
            )
    for b in result.get("ttft_breakdown", []):
        who = f"{b['model']}, {b['clients']} clients, {b['arrivals']} arrivals"
        if many:
            who += f", server {b['variant']}"
        lines += [
            "",
            f"### Where the time to first token goes: {who} (`--trace`)",
            "",
            f"{b.get('requests', 0)} requests, all rounds; tail = mean over the requests at or "
            "over the p90 time to first token. Model work waited for: "
            f"{b.get('work_tokens_median', '-')} tokens (median), "
            f"{b.get('work_tokens_p95', '-')} (p95) run through the model between the "
            "request's submission and its first token.",
            "",
            "| segment | median ms | p95 ms | tail ms |",
            "|---|---:|---:|---:|",
        ]
        for seg in b.get("segments", []):
            tail = seg["tail_mean_ms"]
            lines.append(
                f"| {seg['segment']} | {seg['median_ms']:.1f} | {seg['p95_ms']:.1f} "
                f"| {'-' if tail is None else f'{tail:.1f}'} |"
            )
    return "\n".join([*lines, ""])


ARRIVALS = ("lockstep", "staggered")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`NAME:KEY=VALUE[;KEY=VALUE]` -> (NAME, {KEY: VALUE}); `NAME:` alone: the server as is."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:KEY=VALUE[;...]")
    env = {}
    for item in filter(None, rest.split(";")):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        env[k] = v
    return name, env


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="char_small,char_gpt")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument(
        "--arrivals",
        default="lockstep,staggered",
        help="Arrival patterns, comma-separated: lockstep, staggered (see the module docstring).",
    )
    p.add_argument("--requests", type=int, default=4, help="Requests per client and round.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-chars", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32, help="Server --max-batch-size.")
    p.add_argument("--server-threads", type=int, default=None, help="Server OMP threads.")
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds per request at most.")
    p.add_argument("--repeats", type=int, default=3, help="Rounds per client count.")
    p.add_argument(
        "--prefill-repeats", type=int, default=7, help="Repetitions of the prefill timing."
    )
    p.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        help="NAME:KEY=VALUE[;KEY=VALUE]: a server with these environment variables; several "
        "are compared round by round (default: the server as is).",
    )
    p.add_argument("--quick", action="store_true", help="char_small, 1 and 8 clients, short.")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.json"))
    p.add_argument("--note", default="")
    p.add_argument(
        "--trace",
        action="store_true",
        help="Trace the server (CRAFT_SERVE_TRACE) and print where each client count's time to "
        "first token goes; the breakdown is added to the JSON.",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.recipes, args.clients, args.requests, args.max_tokens = "char_small", "1,8", 2, 16
        args.repeats, args.prefill_repeats = 1, 3
    arrivals = [a for a in args.arrivals.split(",") if a]
    if not arrivals or any(a not in ARRIVALS for a in arrivals):
        p.error(
            f"--arrivals {args.arrivals}: expected a comma-separated subset of lockstep,staggered"
        )
    variants = dict(args.variant) or {"default": {}}
    if len(variants) != len(args.variant or [None]):
        p.error("--variant: the names must differ")
    import torch

    machine = machine_info(torch.device("cpu"))
    models: dict[str, list[dict[str, Any]]] = {}
    breakdowns: list[dict[str, Any]] = []
    bounds: dict[str, dict[str, dict[str, Any]]] = {}  # model -> torch threads -> bound
    spans: dict[str, float] = {}
    counts = [int(c) for c in args.clients.split(",")]
    threads = {name: server_threads(env, args.server_threads) for name, env in variants.items()}
    with tempfile.TemporaryDirectory(prefix="craft-serve-bench-") as tmp:
        for recipe in args.recipes.split(","):
            export = write_model(recipe, Path(tmp))
            # before any server starts: this process alone, with each server's threads
            for t in sorted(set(threads.values())):
                bounds.setdefault(recipe, {})[str(t)] = b = prefill_bound(
                    export, args.prompt_chars, [1, 8, 32], t, args.prefill_repeats
                )
                print(
                    f"{recipe}: prefill of 1/8/32 prompts "
                    + "/".join(f"{v['median']:.1f}" for v in b["ms"].values())
                    + f" ms ({t} threads)",
                    flush=True,
                )
            servers: dict[str, Server] = {}
            traces: dict[str, Path] = {}
            try:
                for name, env in variants.items():
                    if args.trace:
                        traces[name] = Path(tmp) / f"{recipe}.{name}.trace.jsonl"
                    servers[name] = Server(
                        export, args.max_batch, args.server_threads, traces.get(name), env
                    )
                warm = argparse.Namespace(**{**vars(args), "requests": 2, "trace": False})
                for server in servers.values():
                    w = run_round(server.port, 1, warm)
                    spans.setdefault(recipe, w["request_s_min"])  # the first server's
                rounds: dict[tuple[str, str, int], list[dict[str, Any]]] = {
                    (v, a, c): [] for v in variants for a in arrivals for c in counts
                }
                for rep in range(args.repeats):
                    for a in arrivals:
                        for c in counts:
                            for name, server in servers.items():
                                if len(servers) > 1:
                                    print(f"  [{name}]", end="")
                                rounds[(name, a, c)].append(
                                    run_round(server.port, c, args, a, spans[recipe], rep)
                                )
            finally:
                for server in servers.values():
                    server.close()
            for (name, a, c), rs in rounds.items():
                if name in traces:
                    bd = ttft_breakdown(traces[name], rs)
                    breakdowns.append(
                        {"model": recipe, "variant": name, "arrivals": a, "clients": c, **bd}
                    )
                    print_breakdown(f"{recipe} [{name}, {a}]", c, bd)
            models[recipe] = [summarize(k, rs) for k, rs in rounds.items()]
            for row in models[recipe]:
                row["model_threads"] = threads[row["variant"]]
    result = {
        "benchmark": "serve_load",
        "command": shlex.join(["python", "bench/serve_load.py", *(argv or sys.argv[1:])]),
        "machine": machine,
        "load_avg_end": load_avg(),
        "repeats": args.repeats,
        "server_threads": args.server_threads,
        "variants": variants,
        "arrivals": arrivals,
        "span_s": spans,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "prompt_chars": args.prompt_chars,
        "max_batch": args.max_batch,
        "prefill_bound": bounds,
        "model_threads": threads,
        "models": models,
        "note": args.note,  # conditions the machine record cannot show; none when not given
    }
    if breakdowns:
        result["ttft_breakdown"] = breakdowns
    out = Path(args.out)
    paths = write_results(out.parent, out.stem, result, markdown(result))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
