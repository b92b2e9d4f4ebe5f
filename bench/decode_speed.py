"""Decode speed: `craft generate` against a bare cached-forward loop and the weight-streaming floor.

    python bench/decode_speed.py --threads 1        # char_small and char_gpt, fp32 and bf16, batch 1 and 8
    python bench/decode_speed.py --checkpoint outputs/char_gpt/<run>   # a trained model instead
    python bench/decode_speed.py --quick --out /tmp/decode.json        # seconds, for a smoke test

Part 1, the floor table: for every model, dtype and batch size, four ways decode the same number
of tokens per sequence (the window minus the 1-token prompt, so no context refill happens), in
the same run, alternating so that a change in machine load hits all alike:
- "generate": `craft.generation.generate` with `num_samples` = batch, temperature 1: exactly what
  `craft generate --num-samples B` runs after loading (sampling, text decoding, streaming order);
- "compiled": the same with `compile=True` (`craft generate --compile`): every step runs the
  `torch.compile`d fixed-shape step (attention over the cache up to the longest row under a
  mask, weights frozen into the graph as constants, on the CPU Inductor's C++ wrapper, and
  for bf16/fp16 Inductor's C++ GEMM template for the weight products instead of oneDNN's:
  `craft.engine.COMPILE_SETTINGS`, `CPU_COMPILE_SETTINGS` and
  `CPU_LOW_PRECISION_COMPILE_SETTINGS`). Every call compiles
  anew (an engine compiles its own copy of the step), so its speed is timed after the compile:
  from sample 0's second token (the first compiled forward, compile included, is done) to
  its last, scaled to the same number of steps as the other ways. Its compile time (`compile s`) is
  the median over the calls of the first compiled step's wall time (Inductor's on-disk cache may
  shorten it on a machine that compiled the same graph before); `--no-compiled` skips it;
- "bare": a loop of `model(x, cache=cache)` over a (B, 1) input, nothing else (no sampling);
- "floor": a loop of only the weight matrix products of one token step (every 2-d weight but the
  embeddings, the output layer included, each applied to a (B, C) input) with torch's eager
  matmul (`F.linear`): the time that matmul takes to stream the weights, which no eager decoder
  of this model can beat. A compiled step whose products run another kernel (the C++ GEMM
  template in bf16 on a CPU) can come under it: a ratio below 1 means a faster matmul kernel, not
  a step cheaper than its weight products.
Expected at char_gpt shape: generate >= 0.9x the bare loop's tokens/s, and generate's time per
step <= 1.5x the floor's, in fp32 and bf16, at batch 1 and 8. The table says for each of the
eager and the compiled generate which of the two it meets (the bare loop is always the eager one).

Part 2, recompute vs cache: `--new-tokens` tokens (default 500, so the cache refills) from a
1-token prompt at batch 1 in fp32, KV-cached (`iter_tokens`) against nanoGPT's loop that
recomputes the cropped context at every step. Greedy decoding is first checked to give identical
tokens both ways within the window. Expected: a speed-up of at least 5x for char_gpt.

Decode speed does not depend on the weights, so without --checkpoint each recipe's model is
built with random weights at its configured shape (vocabulary: tinyshakespeare's 65 characters).
On a CPU, a decode step at batch 1 reads every weight once (about 43 MB in fp32 for char_gpt), so
it is bound by memory bandwidth plus per-op overhead; bf16 halves the bytes, and pays off only
where the CPU multiplies bf16 natively (AMX-BF16 / AVX512-BF16: the report records the flags).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from craft.bench.hardware import load_avg, machine_info  # noqa: E402
from craft.bench.report import conditions, write_results  # noqa: E402
from craft.bench.timing import fmt_spread, now, spread  # noqa: E402
from craft.generation import SamplingParams, generate, iter_tokens, sample_next  # noqa: E402

SHAKESPEARE_CHAR_VOCAB = 65
EXPECTED_SPEEDUP = {"char_gpt": 5.0}
EXPECTED_RATIOS = {"char_gpt": {"generate_vs_bare": 0.9, "generate_vs_floor": 1.5}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_from_recipe(recipe: str, vocab_size: int) -> torch.nn.Module:
    from craft.config import load_config
    from craft.training.builders import build_model

    cfg = load_config(REPO / "recipes" / f"{recipe}.toml")
    torch.manual_seed(0)
    return build_model(cfg, vocab_size)


@torch.no_grad()
def decode_recompute(
    model: torch.nn.Module, idx: torch.Tensor, new_tokens: int, gen: torch.Generator
) -> torch.Tensor:
    """nanoGPT's sampling loop: the whole (cropped) context through the model at every step."""
    block = model.block_size
    for _ in range(new_tokens):
        idx_cond = idx if block is None or idx.size(1) <= block else idx[:, -block:]
        logits, _ = model(idx_cond)
        idx_next = sample_next(logits[:, -1, :], temperature=1.0, generator=gen)  # (B,)
        idx = torch.cat((idx, idx_next[:, None]), dim=1)
    return idx


def decode_cached(
    model: torch.nn.Module, idx: torch.Tensor, new_tokens: int, gen: torch.Generator
) -> torch.Tensor:
    steps = list(iter_tokens(model, idx, max_new_tokens=new_tokens, generator=gen))
    return torch.cat([idx, torch.stack(steps, dim=1)], dim=1)


def check_same_greedy(model: torch.nn.Module, idx: torch.Tensor) -> int:
    """Greedy tokens of both ways agree over the context window; returns how many were compared."""
    n = min(64, (model.block_size or 65) - idx.shape[1])
    greedy = SamplingParams(temperature=0.0)
    cached = torch.stack(list(iter_tokens(model, idx, max_new_tokens=n, sampling=greedy)), 1)
    ref = torch.stack(
        list(iter_tokens(model, idx, max_new_tokens=n, sampling=greedy, use_cache=False)), 1
    )
    if not torch.equal(cached, ref):
        raise SystemExit("KV-cached greedy decoding disagrees with full recomputation")
    return n


def time_once(fn: Any, model: torch.nn.Module, new_tokens: int, device: torch.device) -> float:
    idx = torch.zeros((1, 1), dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = now(device)
    out = fn(model, idx, new_tokens, gen)
    elapsed = now(device) - t0
    assert out.shape == (1, 1 + new_tokens)
    return elapsed


def bench_model(
    name: str, model: torch.nn.Module, source: str, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    model.to(device).eval()
    compared = check_same_greedy(model, torch.zeros((1, 1), dtype=torch.long, device=device))
    time_once(decode_cached, model, min(args.new_tokens, 20), device)  # warm-up
    row: dict[str, Any] = {
        "model": name,
        "weights": source,
        "params": sum(p.numel() for p in model.parameters()),
        "block_size": model.block_size,
        "new_tokens": args.new_tokens,
        "greedy_tokens_checked_equal": compared,
    }
    # The two ways alternate, so that a change in machine load hits both alike.
    ways = {"kv_cache": decode_cached, "recompute": decode_recompute}
    times: dict[str, list[float]] = {label: [] for label in ways}
    for rep in range(max(args.repeats, args.baseline_repeats)):
        for label, fn in ways.items():
            if rep < (args.repeats if label == "kv_cache" else args.baseline_repeats):
                times[label].append(time_once(fn, model, args.new_tokens, device))
    for label, ts in times.items():
        row[label] = _stats(ts, args.new_tokens)
        med = row[label]["tokens_per_s"]["median"]
        print(f"  {name} {label}: {med:.1f} tokens/s (median)", flush=True)
    row["speedup"] = statistics.median(times["recompute"]) / statistics.median(times["kv_cache"])
    expected = EXPECTED_SPEEDUP.get(name)
    if expected is not None:
        row["expected_speedup"] = expected
        row["as_expected"] = row["speedup"] >= expected
    return row


# ------------------------------------------------------------------------- part 1: floor table


class _Chars:
    """A 65-symbol character tokenizer for random-weight models (generate needs text decoding)."""

    def __new__(cls, vocab: int) -> Any:
        from craft.data.tokenizers import CharTokenizer

        chars = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # 65
        return CharTokenizer(list(chars[:vocab]))


def way_generate(model: torch.nn.Module, tok: Any, batch: int, steps: int) -> float:
    device = next(model.parameters()).device
    t0 = now(device)
    texts = generate(
        model, tok, "\n", max_new_tokens=steps, temperature=1.0, seed=0, num_samples=batch
    )
    elapsed = now(device) - t0
    assert len(texts) == batch
    return elapsed


COMPILE_SECONDS: list[float] = []  # the first compiled step of each compiled call


def way_compiled(model: torch.nn.Module, tok: Any, batch: int, steps: int) -> float:
    """Seconds for `steps` steps at the compiled step's speed, timed after the compile."""
    device = next(model.parameters()).device
    marks: list[float] = []  # when each token of sample 0 (streamed live) arrives

    def on_text(i: int, piece: str) -> None:
        if i == 0:
            marks.append(now(device))

    t0 = now(device)
    texts = generate(
        model,
        tok,
        "\n",
        max_new_tokens=steps,
        temperature=1.0,
        seed=0,
        num_samples=batch,
        on_text=on_text,
        compile=True,
    )
    assert len(texts) == batch and len(marks) == steps >= 3, (len(marks), steps)
    # a step hands its tokens on after its forward: marks[0] follows the prefill and the first
    # compiled forward (the compile), and each later mark one more compiled step
    COMPILE_SECONDS.append(marks[0] - t0)
    return (marks[-1] - marks[1]) / (steps - 2) * steps


@torch.no_grad()
def way_bare(model: torch.nn.Module, tok: Any, batch: int, steps: int) -> float:
    device = next(model.parameters()).device
    t0 = now(device)
    cache = model.new_cache(batch)
    x = torch.zeros((batch, 1), dtype=torch.long, device=device)
    for _ in range(steps):
        model(x, cache=cache)
    return now(device) - t0


def weight_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The 2-d weights one token step multiplies by (embedding tables excluded, output layer in)."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        if p.dim() == 2 and not name.startswith(("wte", "wpe")) and id(p) not in seen:
            out.append(p)
            seen.add(id(p))
    head = getattr(model, "lm_head", None)
    if head is not None and id(head.weight) not in seen:
        out.append(head.weight)  # tied to the embedding: still one product per step
    return out


@torch.no_grad()
def way_floor(model: torch.nn.Module, tok: Any, batch: int, steps: int) -> float:
    weights = weight_matrices(model)
    w0 = weights[0]
    inputs = {
        w.shape[1]: torch.randn(batch, w.shape[1], dtype=w0.dtype, device=w0.device)
        for w in weights
    }
    t0 = now(w0.device)
    for _ in range(steps):
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
    return now(w0.device) - t0


def _stats(ts: list[float], tokens: int) -> dict[str, Any]:
    """Every repeat's seconds, and tokens/s as median (min-max) over the repeats."""
    return {"seconds": ts, "tokens_per_s": spread([tokens / t for t in ts])}


def bench_floor(
    name: str, model: torch.nn.Module, tok: Any, dtype: str, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    model = model.to(DTYPES[dtype]).eval()
    steps = min(args.floor_tokens, (model.block_size or 1 << 30) - 1)
    ways = {"generate": way_generate, "bare": way_bare, "floor": way_floor}
    compile_s = None
    if args.compiled:
        ways["compiled"] = way_compiled
        torch._dynamo.reset()  # a fresh compile for this model, dtype and batch
    for label, fn in ways.items():  # warm-up (a compiled call times itself after its compile)
        if label != "compiled":
            fn(model, tok, batch, min(steps, 8))
    times: dict[str, list[float]] = {k: [] for k in ways}
    COMPILE_SECONDS.clear()
    for _ in range(args.repeats):
        for label, fn in ways.items():
            times[label].append(fn(model, tok, batch, steps))
    if args.compiled:
        compile_s = statistics.median(COMPILE_SECONDS)
    row: dict[str, Any] = {
        "model": name,
        "dtype": dtype,
        "batch": batch,
        "steps": steps,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes_per_step": sum(w.numel() * w.element_size() for w in weight_matrices(model)),
    }
    for label, ts in times.items():
        row[label] = _stats(ts, steps * batch)
    med = {k: statistics.median(ts) for k, ts in times.items()}
    row["generate_vs_bare"] = med["bare"] / med["generate"]  # tokens/s ratio
    row["generate_vs_floor"] = med["generate"] / med["floor"]  # time ratio
    row["bare_vs_floor"] = med["bare"] / med["floor"]
    if "compiled" in med:
        row["compile_s"] = compile_s
        row["compiled_vs_bare"] = med["bare"] / med["compiled"]  # tokens/s ratio
        row["compiled_vs_floor"] = med["compiled"] / med["floor"]  # time ratio
        row["compiled_vs_generate"] = med["generate"] / med["compiled"]  # speed-up of compiling
    expected = EXPECTED_RATIOS.get(name)
    if expected:
        row["expected"] = expected
        row["meets"] = {
            way: {
                "vs_bare": row[f"{way}_vs_bare"] >= expected["generate_vs_bare"],
                "vs_floor": row[f"{way}_vs_floor"] <= expected["generate_vs_floor"],
            }
            for way in ("generate", "compiled")
            if f"{way}_vs_bare" in row
        }
        row["as_expected"] = any(all(m.values()) for m in row["meets"].values())
    line = (
        f"  {name} {dtype} batch {batch}: generate {_med(row, 'generate'):.0f}, "
        f"bare {_med(row, 'bare'):.0f}, floor {_med(row, 'floor'):.0f}"
    )
    if "compiled" in med:
        line += f", compiled {_med(row, 'compiled'):.0f}"
    line += (
        f" tokens/s (medians); generate/bare {row['generate_vs_bare']:.2f}, generate time / "
        f"floor {row['generate_vs_floor']:.2f}"
    )
    if "compiled" in med:
        line += (
            f"; compiled/bare {row['compiled_vs_bare']:.2f}, compiled time / floor "
            f"{row['compiled_vs_floor']:.2f}, compile {compile_s:.1f} s"
        )
    print(line, flush=True)
    return row


def _med(row: dict[str, Any], way: str) -> float:
    return float(row[way]["tokens_per_s"]["median"])


def floor_markdown(rows: list[dict[str, Any]]) -> list[str]:
    compiled = any("compiled" in r for r in rows)
    lines = [
        "## Part 1: `craft generate` vs a bare cached-forward loop vs the weight-streaming floor",
        "",
        "Tokens/s summed over the batch: median (min–max) of the repeats. `gen/bare`: generate's "
        "tokens/s over the bare loop's (expected >= 0.9); `gen/floor`: generate's time per step "
        "over the floor's (expected <= 1.5); `bare/floor` the same for the bare (eager) loop.",
    ]
    if compiled:
        lines += [
            "`compiled`: `generate(compile=True)` (`craft generate --compile`), timed after its "
            "compile (every call compiles anew; see the script's docstring); `cmp/bare` and "
            "`cmp/floor` as above for it (against the same eager bare loop), `cmp/gen` its "
            "speed-up over the eager generate, `compile s` the median wall time of a call's "
            "first compiled step, compile included. "
            "`meets`: which way meets which goal (bare: tokens/s >= 0.9x the bare loop; floor: "
            "time per step <= 1.5x the floor).",
        ]
    head = "| model | dtype | batch | steps | generate tok/s | bare tok/s | floor tok/s "
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if compiled:
        head += "| compiled tok/s "
        rule += "---:|"
    head += "| gen/bare | gen/floor | bare/floor "
    rule += "---:|---:|---:|"
    if compiled:
        head += "| cmp/bare | cmp/floor | cmp/gen | compile s "
        rule += "---:|---:|---:|---:|"
    lines += ["", head + "| meets |", rule + "---|"]

    def cell(s: dict[str, Any]) -> str:
        return fmt_spread(s["tokens_per_s"], ".0f")

    for r in rows:
        line = (
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['steps']} | {cell(r['generate'])} "
            f"| {cell(r['bare'])} | {cell(r['floor'])} "
        )
        if compiled:
            line += f"| {cell(r['compiled'])} " if "compiled" in r else "| - "
        line += (
            f"| {r['generate_vs_bare']:.2f} | {r['generate_vs_floor']:.2f} "
            f"| {r['bare_vs_floor']:.2f} "
        )
        if compiled and "compiled" in r:
            line += (
                f"| {r['compiled_vs_bare']:.2f} | {r['compiled_vs_floor']:.2f} "
                f"| {r['compiled_vs_generate']:.2f} | {r['compile_s']:.1f} "
            )
        elif compiled:
            line += "| - | - | - | - "
        lines.append(line + f"| {_meets(r)} |")
    return [*lines, ""]


def _meets(row: dict[str, Any]) -> str:
    """E.g. "generate: bare yes, floor NO; compiled: bare yes, floor yes" ("-": no goal)."""
    if "meets" not in row:
        return "-"
    return "; ".join(
        f"{way}: bare {'yes' if m['vs_bare'] else 'NO'}, floor {'yes' if m['vs_floor'] else 'NO'}"
        for way, m in row["meets"].items()
    )


# ----------------------------------------------------------------------- part 2: recompute vs cache


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Decode speed",
        "",
        *conditions(m, result.get("load_avg_end")),
        f"- CPU: torch capability {m.get('cpu_capability')}, native bf16: "
        f"{', '.join(m.get('cpu_bf16') or []) or 'none (no AMX-BF16 / AVX512-BF16)'}",
        f"- command: `{result['command']}`",
        *([f"- note: {result['note']}"] if result.get("note") else []),
        "",
    ]
    if result.get("floor_rows"):
        lines += floor_markdown(result["floor_rows"])
    if result.get("rows"):
        lines += [
            "## Part 2: KV cache vs recomputing the context (nanoGPT's way)",
            "",
            "Batch 1, float32, prompt 1 token, temperature 1, seed 0; the two ways alternate; "
            "tokens/s median (min–max) of the repeats (all times are in the JSON file); the "
            "speed-up is the ratio of the median times.",
            "",
            "| model | weights | params | block | new tokens | KV cache tok/s | recompute tok/s "
            "| speed-up | expected |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
    for r in result.get("rows", []):
        verdict = (
            f">= {r['expected_speedup']:.0f}x: {'yes' if r['as_expected'] else 'NO'}"
            if "expected_speedup" in r
            else "-"
        )
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['params'] / 1e6:.2f}M | {r['block_size']} "
            f"| {r['new_tokens']} | {fmt_spread(r['kv_cache']['tokens_per_s'], '.1f')} "
            f"| {fmt_spread(r['recompute']['tokens_per_s'], '.1f')} | {r['speedup']:.1f}x "
            f"| {verdict} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="char_small,char_gpt", help="Recipe shapes to build.")
    p.add_argument("--checkpoint", default=None, help="Benchmark this trained model instead.")
    p.add_argument("--dtypes", default="float32,bfloat16", help="Part 1 dtypes.")
    p.add_argument("--batches", default="1,8", help="Part 1 batch sizes.")
    p.add_argument("--floor-tokens", type=int, default=255, help="Part 1 steps (capped by window).")
    p.add_argument("--repeats", type=int, default=5, help="Timed runs of each way.")
    p.add_argument("--new-tokens", type=int, default=500, help="Part 2 tokens.")
    p.add_argument("--baseline-repeats", type=int, default=2, help="Part 2 runs recomputing.")
    p.add_argument("--skip-recompute", action="store_true", help="Part 1 only.")
    p.add_argument(
        "--no-compiled",
        dest="compiled",
        action="store_false",
        help="Part 1 without the torch.compile'd generate (no compile time).",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    p.add_argument("--quick", action="store_true", help="char_small, few tokens, one repeat.")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "decode_speed.json"))
    p.add_argument("--note", default="", help="Conditions worth recording (e.g. machine load).")
    args = p.parse_args(argv)
    if args.quick:
        args.recipes, args.repeats, args.baseline_repeats = "char_small", 1, 1
        args.new_tokens, args.floor_tokens = 50, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    from craft.generation import resolve_device

    device = resolve_device(args.device)
    machine = machine_info(device)

    models: list[tuple[str, torch.nn.Module, str, Any]] = []
    if args.checkpoint:
        from craft.training.checkpoint import load_model

        model, tok, cfg = load_model(args.checkpoint, device=device)
        models.append((cfg.run.name, model, f"checkpoint {args.checkpoint}", tok))
    else:
        for recipe in args.recipes.split(","):
            model = build_from_recipe(recipe, SHAKESPEARE_CHAR_VOCAB).to(device)
            tok = _Chars(SHAKESPEARE_CHAR_VOCAB)
            models.append((recipe, model, "random init (recipe shape)", tok))

    floor_rows = []
    for name, model, _, tok in models:
        for dtype in args.dtypes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                floor_rows.append(bench_floor(name, model, tok, dtype, batch, args))
    rows = []
    if not args.skip_recompute:
        part2 = argparse.Namespace(**{**vars(args), "repeats": max(1, min(args.repeats, 3))})
        for name, model, source, _ in models:
            print(f"{name}: {source}", flush=True)
            rows.append(bench_model(name, model.float(), source, part2, device))
    result = {
        "benchmark": "decode_speed",
        "command": shlex.join(["python", "bench/decode_speed.py", *(argv or sys.argv[1:])]),
        "machine": machine,
        "load_avg_end": load_avg(),
        "floor_rows": floor_rows,
        "rows": rows,
        "note": args.note,  # conditions the machine record cannot show; none when not given
    }
    out = Path(args.out)
    paths = write_results(out.parent, out.stem, result, markdown(result))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
