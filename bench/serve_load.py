"""Serving load: throughput and time to first token of `craft serve` for 1, 8 and 32 clients.

    python bench/serve_load.py                         # char_small and char_gpt shapes
    python bench/serve_load.py --quick --out /tmp/serve.json   # a smoke test in seconds

For each model shape (random weights, tinyshakespeare's 65-character vocabulary; serving speed
does not depend on the weights) the script writes an exported model to a temporary directory,
starts `python -m craft serve` on 127.0.0.1 with a free port, and for each client count runs that
many closed-loop clients, each a process of its own with httpx's streaming client and a kept-alive
connection: each sends `--requests` streaming completions one after another (its own prompt of
`--prompt-chars` characters, `--max-tokens` tokens, temperature 1, a distinct seed per request)
and records the time to the first text chunk (TTFT) and the tokens received. Aggregate tokens/s
= all completion tokens / wall time of the round. Every request is bounded and every round ends
by itself; the server is stopped at the end. Nothing is sent anywhere but 127.0.0.1.

`--trace` also starts the server with CRAFT_SERVE_TRACE (craft/serving/trace.py) and prints, per
client count, where the time to first token went: client, HTTP, waiting for the model thread,
prefill, sampling, hand-off to the event loop, socket write, and the model work (tokens) a
request waited for.

Every client count runs `--repeats` rounds (the counts alternate, so a change in machine load hits
all alike); the tables give the median (min–max) over the rounds. Expected: 8 concurrent clients
get >= 3x the aggregate tokens/s of one client, with p95 TTFT under 2x the single-client p95
(medians). Clock, statistics, machine description and writer are `craft.bench`'s.
"""

from __future__ import annotations

import argparse
import json
import os
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


class Server:
    def __init__(
        self, export: Path, max_batch: int, threads: int | None, trace: Path | None = None
    ) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
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


def one_request(
    client: Any, port: int, prompt: str, max_tokens: int, seed: int, trace: bool = False
) -> dict:
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

    def on_http(event: str, info: dict) -> None:  # httpcore's trace extension
        if event == "http11.send_request_headers.complete":  # the route starts on the headers
            marks["written_out"] = clock()

    ext = {"trace": on_http} if trace else None
    t0 = clock()
    first = None
    tokens = 0
    rid = None
    url = f"http://127.0.0.1:{port}/v1/completions"
    with client.stream("POST", url, json=body, extensions=ext) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
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
    c: int, port: int, prompt: str, args: argparse.Namespace, ready: Any, start: Any, out: Any
) -> None:
    """One client: connects, says it is ready, and on `start` sends its requests one by one."""
    import httpx

    results: list[dict] = []
    errors: list[str] = []
    with httpx.Client(timeout=args.timeout) as client:
        client.get(f"http://127.0.0.1:{port}/health").raise_for_status()  # connected
        ready.put(c)
        start.wait()
        for i in range(args.requests):
            try:
                seed = 1000 * c + i
                results.append(one_request(client, port, prompt, args.max_tokens, seed, args.trace))
            except Exception as e:  # recorded, and the round goes on
                errors.append(f"{type(e).__name__}: {e}")
                break
    out.put((results, errors))


def run_round(port: int, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """`clients` closed-loop clients, each a process of its own with a kept-alive connection.

    Separate processes, as separate users would be: the clients share the server's two cores
    but not an interpreter lock, so one client's parsing never holds up another's request.
    The round's clock starts once every client is connected.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # the clients inherit `args`; nothing is pickled in
    ready, out, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    # Each client its own prompt (the same length): no server-side reuse of a shared prompt.
    text = "The quick brown fox jumps over the lazy dog. " * (args.prompt_chars // 8 + 2)
    prompts = [text[c % 45 : c % 45 + args.prompt_chars] for c in range(clients)]
    procs = [
        ctx.Process(
            target=client_process, args=(c, port, prompts[c], args, ready, start, out), daemon=True
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
        for _ in procs:
            res, errs = out.get(timeout=args.timeout * args.requests)
            results += res
            errors += errs
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
    }
    if args.trace:
        row["trace_requests"] = results
    print(
        f"  {clients:>2} clients: {row['tokens_per_s']:.0f} tokens/s, TTFT p50 "
        f"{row['ttft_p50_s'] * 1e3:.0f} ms p95 {row['ttft_p95_s'] * 1e3:.0f} ms"
        + (f", {len(errors)} errors" if errors else ""),
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


def summarize(clients: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (min-max) over the rounds of one client count; the rounds themselves kept."""
    keys = ("tokens_per_s", "ttft_p50_s", "ttft_p95_s", "per_request_tokens_per_s_median")
    row: dict[str, Any] = {"clients": clients, "rounds": rounds}
    row["requests"] = sum(r["requests"] for r in rounds)
    row["errors"] = sum(len(r["errors"]) for r in rounds)
    for k in keys:
        vals = [r[k] for r in rounds if r[k] == r[k]]  # NaN: a round without results
        row[k] = spread(vals) if vals else None
    return row


def _med(row: dict[str, Any], key: str) -> float:
    return float(row[key]["median"]) if row.get(key) else float("nan")


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Serving load: `craft serve` with 1, 8 and 32 concurrent clients",
        "",
        *conditions(m, result.get("load_avg_end")),
        f"- server torch threads: {result['server_threads'] or 'default'}",
        f"- command: `{result['command']}`",
        f"- rounds per client count: {result['repeats']}; median (min–max) over the rounds",
        f"- each client: {result['requests']} streaming requests in a row, prompt "
        f"{result['prompt_chars']} characters, max_tokens {result['max_tokens']}, temperature 1; "
        f"server --max-batch-size {result['max_batch']}",
        *([f"- note: {result['note']}"] if result.get("note") else []),
        "",
        "| model | clients | requests | tokens/s (all clients) | x one client | TTFT p50 ms "
        "| TTFT p95 ms | p95 / one client's (per round) | per-request tok/s (median) | expected |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, rows in result["models"].items():
        base = rows[0]
        for r in rows:
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
            verdict = "-"
            if r["clients"] == 8 and base["clients"] == 1:  # the goal is relative to one client
                ok = speed >= 3.0 and ttft < 2.0
                verdict = f"x>=3 and p95<2x: {'yes' if ok else 'NO'}"

            def ms(key: str, r: dict[str, Any] = r) -> str:
                if not r.get(key):
                    return "-"
                return fmt_spread({k: v * 1e3 for k, v in r[key].items() if k != "n"}, ".0f")

            tps = fmt_spread(r["tokens_per_s"], ".0f") if r.get("tokens_per_s") else "-"
            lines.append(
                f"| {model} | {r['clients']} | {r['requests']} | {tps} "
                f"| {speed:.2f} | {ms('ttft_p50_s')} | {ms('ttft_p95_s')} "
                f"| {ratio} | {_med(r, 'per_request_tokens_per_s_median'):.0f} | {verdict} |"
            )
    for model, counts in result.get("ttft_breakdown", {}).items():
        for clients, b in counts.items():
            lines += [
                "",
                f"### Where the time to first token goes: {model}, {clients} clients (`--trace`)",
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="char_small,char_gpt")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=4, help="Requests per client and round.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-chars", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32, help="Server --max-batch-size.")
    p.add_argument("--server-threads", type=int, default=None, help="Server OMP threads.")
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds per request at most.")
    p.add_argument("--repeats", type=int, default=3, help="Rounds per client count.")
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
        args.repeats = 1
    import torch

    machine = machine_info(torch.device("cpu"))
    models: dict[str, list[dict[str, Any]]] = {}
    breakdowns: dict[str, dict[int, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="craft-serve-bench-") as tmp:
        for recipe in args.recipes.split(","):
            export = write_model(recipe, Path(tmp))
            print(f"{recipe}: serving {export}", flush=True)
            trace = Path(tmp) / f"{recipe}.trace.jsonl" if args.trace else None
            server = Server(export, args.max_batch, args.server_threads, trace)
            try:
                run_round(server.port, 1, argparse.Namespace(**{**vars(args), "requests": 1}))
                counts = [int(c) for c in args.clients.split(",")]
                rounds: dict[int, list[dict[str, Any]]] = {c: [] for c in counts}
                for _ in range(args.repeats):
                    for c in counts:
                        rounds[c].append(run_round(server.port, c, args))
            finally:
                server.close()
            if trace is not None:
                for c, rs in rounds.items():
                    breakdowns.setdefault(recipe, {})[c] = b = ttft_breakdown(trace, rs)
                    print_breakdown(recipe, c, b)
            models[recipe] = [summarize(c, rs) for c, rs in rounds.items()]
    result = {
        "benchmark": "serve_load",
        "command": shlex.join(["python", "bench/serve_load.py", *(argv or sys.argv[1:])]),
        "machine": machine,
        "load_avg_end": load_avg(),
        "repeats": args.repeats,
        "server_threads": args.server_threads,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "prompt_chars": args.prompt_chars,
        "max_batch": args.max_batch,
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
