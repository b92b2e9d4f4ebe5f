"""Decode speed: KV-cached generation against recomputing the whole context at every step.

    python bench/decode_speed.py                                  # char_small and char_gpt shapes
    python bench/decode_speed.py --checkpoint outputs/char_gpt/<run>   # a trained model instead
    python bench/decode_speed.py --quick --out /tmp/decode.json   # seconds, for a smoke test

Both ways generate `--new-tokens` tokens (default 500) from a one-token prompt, in the same run,
with the same sampling (temperature 1, fixed seed):
- "kv cache": `craft.generation.iter_tokens` (prefill, then one token per forward; when the cache
  is full the last 3/4 of the context is re-prefilled, see craft/generation.py);
- "recompute": nanoGPT's `generate` loop: crop the sequence to the last `block_size` tokens, run
  the whole window through the model, keep the last position's logits, sample, append.
Decode speed does not depend on the weights, so without --checkpoint each recipe's model is
built with random weights at its configured shape (vocabulary: tinyshakespeare's 65 characters);
the report says which was used. Before timing, greedy decoding is checked to give identical
tokens both ways within the context window.

On a CPU, cached decoding reads every weight once per token (about 43 MB in float32 for char_gpt),
so it is bound by memory bandwidth, while recomputation runs large matrix products bound by
arithmetic: the ratio depends on the machine's balance of the two and on what else is running.
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

from craft.bench.hardware import machine_info  # noqa: E402
from craft.bench.report import write_file, write_json  # noqa: E402
from craft.bench.timing import now  # noqa: E402
from craft.generation import SamplingParams, iter_tokens, sample_next  # noqa: E402

SHAKESPEARE_CHAR_VOCAB = 65


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
        row[f"{label}_seconds"] = ts
        row[f"{label}_tokens_per_s"] = args.new_tokens / min(ts)
        row[f"{label}_tokens_per_s_median"] = args.new_tokens / statistics.median(ts)
        print(f"  {name} {label}: {row[f'{label}_tokens_per_s']:.1f} tokens/s (best)", flush=True)
    row["speedup"] = row["kv_cache_tokens_per_s"] / row["recompute_tokens_per_s"]
    row["speedup_median"] = (
        row["kv_cache_tokens_per_s_median"] / row["recompute_tokens_per_s_median"]
    )
    return row


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Decode speed: KV cache vs recomputing the context (nanoGPT's way)",
        "",
        f"- date: {m['date']}",
        f"- machine: {m['device_name']} ({m['device']}), {m['cpu_count']} CPU cores, "
        f"torch threads {m['torch_threads']}, load average {m.get('load_avg')}",
        f"- versions: python {m['python']}, torch {m['torch']}, craft {m['craft']}",
        f"- command: `{result['command']}`",
        "- prompt: 1 token; sampling: temperature 1, seed 0; the two ways alternate; tokens/s "
        "from the best of the repeats (all times are in the JSON file)",
        "",
        "| model | weights | params | block | new tokens | KV cache tok/s | recompute tok/s "
        "| speed-up (best) | speed-up (median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['params'] / 1e6:.2f}M | {r['block_size']} "
            f"| {r['new_tokens']} | {r['kv_cache_tokens_per_s']:.1f} "
            f"| {r['recompute_tokens_per_s']:.1f} | {r['speedup']:.1f}x "
            f"| {r['speedup_median']:.1f}x |"
        )
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="char_small,char_gpt", help="Recipe shapes to build.")
    p.add_argument("--checkpoint", default=None, help="Benchmark this trained model instead.")
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="Timed runs with the KV cache.")
    p.add_argument("--baseline-repeats", type=int, default=2, help="Timed runs recomputing.")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    p.add_argument("--quick", action="store_true", help="50 tokens, char_small only.")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "decode_speed.json"))
    p.add_argument("--note", default="", help="Conditions worth recording (e.g. machine load).")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.recipes, args.repeats = 50, "char_small", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from craft.generation import resolve_device

    device = resolve_device(args.device)

    models: list[tuple[str, torch.nn.Module, str]] = []
    if args.checkpoint:
        from craft.training.checkpoint import load_model

        model, _, cfg = load_model(args.checkpoint, device=device)
        models.append((cfg.run.name, model, f"checkpoint {args.checkpoint}"))
    else:
        for recipe in args.recipes.split(","):
            model = build_from_recipe(recipe, SHAKESPEARE_CHAR_VOCAB)
            models.append((recipe, model, "random init (recipe shape)"))

    rows = []
    for name, model, source in models:
        print(f"{name}: {source}", flush=True)
        rows.append(bench_model(name, model, source, args, device))
    result = {
        "benchmark": "decode_speed",
        "command": shlex.join(["python", "bench/decode_speed.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(device),
        "rows": rows,
        "note": args.note
        or "Timings on a shared machine are noisy; re-run on a quiet one for final numbers.",
    }
    out = Path(args.out)
    md = out.with_suffix(".md")
    write_json(out, result)
    write_file(md, markdown(result))
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
