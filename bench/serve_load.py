"""Serving load: throughput and time to first token of `craft serve` for 1, 8 and 32 clients.

    python bench/serve_load.py                         # char_small and char_gpt shapes
    python bench/serve_load.py --quick --out /tmp/serve.json   # a smoke test in seconds

For each model shape (random weights, tinyshakespeare's 65-character vocabulary; serving speed
does not depend on the weights) the script writes an exported model to a temporary directory,
starts `python -m craft serve` on 127.0.0.1 with a free port, and for each client count runs that
many closed-loop clients: each sends `--requests` streaming completions one after another
(prompt of `--prompt-chars` characters, `--max-tokens` tokens, temperature 1, a distinct seed per
request) and records the time to the first text chunk (TTFT) and the tokens received. Aggregate
tokens/s = all completion tokens / wall time of the round. Every request is bounded and every
round ends by itself; the server is stopped at the end. Nothing is sent anywhere but 127.0.0.1.

Goal: 8 concurrent clients get >= 3x the aggregate tokens/s of one client, with p95 TTFT under
2x the single-client p95.
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
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
    def __init__(self, export: Path, max_batch: int, threads: int | None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
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


def one_request(client: Any, port: int, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return {"ttft": first if first is not None else total, "seconds": total, "tokens": tokens}


def run_round(port: int, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    prompt = ("The quick brown fox jumps over the lazy dog. " * 20)[: args.prompt_chars]

    def client_loop(c: int) -> None:
        with httpx.Client(timeout=args.timeout) as client:
            for i in range(args.requests):
                try:
                    res = one_request(client, port, prompt, args.max_tokens, 1000 * c + i)
                except Exception as e:  # recorded, and the round goes on
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    return
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
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
    print(
        f"  {clients:>2} clients: {row['tokens_per_s']:.0f} tokens/s, TTFT p50 "
        f"{row['ttft_p50_s'] * 1e3:.0f} ms p95 {row['ttft_p95_s'] * 1e3:.0f} ms"
        + (f", {len(errors)} errors" if errors else ""),
        flush=True,
    )
    return row


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Serving load: `craft serve` with 1, 8 and 32 concurrent clients",
        "",
        f"- date: {m['date']}",
        f"- machine: {m['device_name']} ({m['device']}), {m['cpu_count']} CPU cores; "
        f"server torch threads: {result['server_threads'] or 'default'}",
        f"- load average (1 min) before / after: {result['load_before']:.2f} / "
        f"{result['load_after']:.2f}",
        f"- versions: python {m['python']}, torch {m['torch']}, craft {m['craft']}",
        f"- command: `{result['command']}`",
        f"- each client: {result['requests']} streaming requests in a row, prompt "
        f"{result['prompt_chars']} characters, max_tokens {result['max_tokens']}, temperature 1; "
        f"server --max-batch-size {result['max_batch']}",
        f"- note: {result['note']}",
        "",
        "| model | clients | requests | tokens/s (all clients) | x one client | TTFT p50 ms "
        "| TTFT p95 ms | p95 / one client's | per-request tok/s (median) | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, rows in result["models"].items():
        base = rows[0]
        for r in rows:
            speed = r["tokens_per_s"] / base["tokens_per_s"]
            ttft = r["ttft_p95_s"] / base["ttft_p95_s"]
            goal = "-"
            if r["clients"] == 8:
                ok = speed >= 3.0 and ttft < 2.0
                goal = f"x>=3 and p95<2x: {'met' if ok else 'NOT met'}"
            lines.append(
                f"| {model} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.0f} "
                f"| {speed:.2f} | {r['ttft_p50_s'] * 1e3:.0f} | {r['ttft_p95_s'] * 1e3:.0f} "
                f"| {ttft:.2f} | {r['per_request_tokens_per_s_median']:.0f} | {goal} |"
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
    p.add_argument("--quick", action="store_true", help="char_small, 1 and 8 clients, short.")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.json"))
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    if args.quick:
        args.recipes, args.clients, args.requests, args.max_tokens = "char_small", "1,8", 2, 16
    from craft.bench.hardware import machine_info

    load_before = os.getloadavg()[0]
    models: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="craft-serve-bench-") as tmp:
        for recipe in args.recipes.split(","):
            export = write_model(recipe, Path(tmp))
            print(f"{recipe}: serving {export}", flush=True)
            server = Server(export, args.max_batch, args.server_threads)
            try:
                run_round(server.port, 1, argparse.Namespace(**{**vars(args), "requests": 1}))
                models[recipe] = [
                    run_round(server.port, int(c), args) for c in args.clients.split(",")
                ]
            finally:
                server.close()
    import torch

    result = {
        "benchmark": "serve_load",
        "command": shlex.join(["python", "bench/serve_load.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(torch.device("cpu")),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "server_threads": args.server_threads,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "prompt_chars": args.prompt_chars,
        "max_batch": args.max_batch,
        "models": models,
        "note": args.note
        or "Timings on a shared machine are noisy; re-run on a quiet one for final numbers.",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
