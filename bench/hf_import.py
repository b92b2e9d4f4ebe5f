"""Wall time and peak RSS of importing a GPT-2-124M-shaped Hugging Face checkpoint into Craft.

The checkpoint (random weights, float32, 497.8 MB of tensors) is written once by transformers,
unsharded (`model.safetensors`) and sharded (`max_shard_size=100MB`, 5 shards + index). Every
measurement runs in a fresh child process, so its peak RSS (ru_maxrss) is its own; the child
first imports everything (torch, craft, safetensors) and builds a tiny model, so that code loaded
on first use is in place, and records its RSS; then it loads, so
"added" = peak RSS - RSS before the load. Expected: added <= 1.3 x the weights' size (no second full
copy of the weights held at any moment). Side by side, in the same run:

- craft: `craft.interop.hf.load_pretrained(DIR)` -> a Craft GPT (reads each tensor straight into
  the preallocated model, `craft/interop/safetensors_reader.py`);
- safe_open copy: the plain approach with the safetensors library (open each file with
  `safe_open`, copy every tensor into a preallocated model of the same size);
- transformers: `AutoModelForCausalLM.from_pretrained(DIR)` (its own model class, for reference;
  a different code base, not the same kernel).

    python bench/hf_import.py [--repeats 3] [--work DIR]

Writes bench/results/hf_import.json and .md (medians with min-max; machine, versions, date and
the load average are recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

CHILD = r"""
import json, resource, sys
import torch, safetensors, safetensors.torch
import craft.interop.hf as hf
from craft.bench.timing import now
from craft.models.gpt import GPT
from craft.config.components import GPTConfig
method, path = sys.argv[1], sys.argv[2]
if method == "transformers":
    import transformers
def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
# Warm up: construct a tiny model so that code loaded on first use (op backends, their libraries)
# is counted before the load, not as part of it.
hf.empty_gpt(GPTConfig(n_layer=1, n_head=1, d_model=8, block_size=8), 16)
before = rss_kb()
t0 = now(torch.device("cpu"))
if method == "craft":
    model, tok, cfg = hf.load_pretrained(path)
elif method == "safe_open":
    from pathlib import Path
    from safetensors import safe_open
    pre = hf.open_pretrained(path)
    model = hf.empty_gpt(GPTConfig(**pre.values), pre.values["vocab_size"])
    want = {p.hf: (name, p) for name, parts in hf.weight_layout(model.config, model.vocab_size, pre.family).items() for p in parts}
    params = model.state_dict()
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                key = hf._canonical(k, pre.family)
                if key not in want:
                    continue
                name, part = want[key]
                src = st.get_tensor(k)
                src = src.t() if part.transpose else src[: part.shape[0]]
                params[name].copy_(src)
                del src
elif method == "transformers":
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
elapsed = now(torch.device("cpu")) - t0
n = sum(p.numel() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"wall_s": elapsed, "rss_before_kb": before, "peak_rss_kb": peak, "params": n}))
"""


def _write_checkpoints(work: Path) -> dict[str, Path]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = {"unsharded": work / "gpt2-124m", "sharded": work / "gpt2-124m-sharded"}
    if all((p / "config.json").exists() for p in out.values()):
        return out
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())  # 124M: 12 x 12 x 768, vocab 50257, context 1024
    model.save_pretrained(str(out["unsharded"]), safe_serialization=True)
    model.save_pretrained(str(out["sharded"]), safe_serialization=True, max_shard_size="100MB")
    return out


def _weights_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _run(method: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(path)],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        raise SystemExit(f"{method} on {path} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    """`craft.bench.hardware.machine_info` plus the versions the import depends on."""
    import safetensors
    import torch

    from craft.bench.hardware import machine_info

    return {
        **machine_info(torch.device("cpu")),
        "safetensors": safetensors.__version__,
        "transformers": _version("transformers"),
    }


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _summary(runs: list[dict], weights: int) -> dict:
    added = [(r["peak_rss_kb"] - r["rss_before_kb"]) * 1024 for r in runs]
    walls = [r["wall_s"] for r in runs]
    peaks = [r["peak_rss_kb"] * 1024 for r in runs]

    from craft.bench.timing import spread as stat

    return {
        "wall_s": stat(walls),
        "peak_rss_bytes": stat(peaks),
        "added_rss_bytes": stat(added),
        "added_over_weights": stat([a / weights for a in added]),
        "runs": runs,
    }


def _markdown(doc: dict) -> str:
    from craft.bench.report import conditions
    from craft.bench.timing import fmt_spread

    m = doc["machine"]
    lines = [
        "# Import of a GPT-2-124M-shaped HF checkpoint (random weights, float32)",
        "",
        *conditions(m, doc.get("load_avg_end")),
        f"- also: safetensors {m['safetensors']}, transformers {m['transformers']}",
        f"- command: `python bench/hf_import.py --repeats {doc['repeats']}`",
        "",
        "Each run is a fresh process; *added* = peak RSS minus RSS after the imports, before the "
        "load. Expected: added <= 1.3 x the weights' size. Medians of "
        f"{doc['repeats']} runs with min-max.",
        "",
        "| checkpoint | method | wall (s) | added RSS (MB) | added / weights | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ck, info in doc["checkpoints"].items():
        for method, s in info["methods"].items():
            w, a, r, p = (
                s["wall_s"],
                s["added_rss_bytes"],
                s["added_over_weights"],
                s["peak_rss_bytes"],
            )
            mb = {k: v / 1e6 for k, v in a.items() if k != "n"}
            lines.append(
                f"| {ck} ({info['files']} file{'s' if info['files'] > 1 else ''}, "
                f"{info['weights_bytes'] / 1e6:.1f} MB) | {method} | "
                f"{fmt_spread(w)} | {fmt_spread(mb, '.0f')} | {fmt_spread(r)} | "
                f"{p['median'] / 1e6:.0f} |"
            )
    lines += [
        "",
        "craft = `craft.interop.hf.load_pretrained` (tensors read straight into the model); "
        "safe_open copy = the same model filled from `safetensors.safe_open` views (the pages "
        "of the memory map stay resident until the file is closed, so a single-file checkpoint "
        "is held twice at the end); transformers = `AutoModelForCausalLM.from_pretrained`, its "
        "own GPT-2 class (a different code base, shown for reference). Its added RSS counts only the "
        "pages the load touched: its parameters stay backed by the mapped file until first used, "
        "so that figure is not the memory of a model whose weights have all been read.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Runs per method and checkpoint.")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="Where to keep the checkpoints (default: a temp dir).",
    )
    parser.add_argument(
        "--methods", default="craft,safe_open,transformers", help="Comma-separated methods."
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "hf_import", help="Result path without suffix."
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    machine = _machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        dirs = _write_checkpoints(work)
        doc: dict = {
            "benchmark": "hf_import",
            "machine": machine,
            "repeats": args.repeats,
            "checkpoints": {},
        }
        for name, d in dirs.items():
            weights = _weights_bytes(d)
            info = {
                "weights_bytes": weights,
                "files": len(list(d.glob("*.safetensors"))),
                "methods": {},
            }
            methods = args.methods.split(",")
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            for _ in range(args.repeats):  # methods alternate: load changes hit all alike
                for method in methods:
                    runs[method].append(_run(method, d))
            for method in methods:
                info["methods"][method] = _summary(runs[method], weights)
                s = info["methods"][method]
                print(
                    f"{name:10s} {method:12s} wall {s['wall_s']['median']:.2f}s  added RSS "
                    f"{s['added_rss_bytes']['median'] / 1e6:.0f} MB = "
                    f"{s['added_over_weights']['median']:.2f} x weights",
                    flush=True,
                )
            doc["checkpoints"][name] = info
    from craft.bench.hardware import load_avg
    from craft.bench.report import write_results

    doc["load_avg_end"] = load_avg()
    paths = write_results(args.output.parent, args.output.name, doc, _markdown(doc))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
