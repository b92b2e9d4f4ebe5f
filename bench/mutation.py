"""Mutation testing of the code that guards users' data and numbers (run it through bench/mutation.sh).

For each module below, mutmut (pinned in bench/mutation-requirements.txt) plants one small bug at a
time (an operator, a constant, a removed call argument, ...) and runs the tests that reach the
mutated function; a mutant survives when they all still pass. Each module is mapped to the few
test files that cover it, so a full run fits on a 2-core machine.

Survivors that cannot change behaviour (equivalent mutants) are matched against
bench/mutation_equivalents.toml, each with its reason; the score is killed / (all - equivalent).
Text of log records and of raised errors is not mutated (it is not data or numbers); the
conditions that decide whether to raise are.

Results: bench/results/mutation.json and .md (per module: counts, score, wall time and the
machine's load; every survivor with its diff and, when matched, the reason it is accepted).
Running some modules keeps the last result of the others.

    bench/mutation.sh                      # every default module
    bench/mutation.sh fileio checkpoint    # some of them
    bench/mutation.sh --list               # the module map
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".mutation"
RESULTS = REPO / "bench" / "results"
EQUIVALENTS = REPO / "bench" / "mutation_equivalents.toml"
# What the tests need besides craft/ and tests/ (recipes include configs/ fragments).
ALSO_COPY = ["recipes", "configs", "pyproject.toml"]
# Lines whose expressions are not mutated: log records and the text of raised errors.
NO_MUTATE = [
    r"^\s*(log|logger|logging\.getLogger\([^)]*\))\.(debug|info|warning|error|exception)\(",
    r"^\s*raise \w+\(",
]
# Imported by the fork server's warm-up (`-p` loads them as plugins), so each mutant's forked
# test run does not pay for them again: the kernel backends import torch._dynamo on the first
# model call (seconds on a CPU).
PRELOAD = ["-p", "craft.ops.triton"]
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}
UNDETECTED = {"survived", "no tests", "suspicious"}


@dataclass(frozen=True)
class Module:
    """A source file, the functions of it to mutate (all when empty) and the tests that cover it."""

    path: str
    tests: list[str]
    functions: list[str] = field(default_factory=list)  # "name" or "Class.method" globs
    default: bool = True  # part of a plain `bench/mutation.sh` run


MODULES: dict[str, Module] = {
    "fileio": Module("craft/fileio.py", ["tests/test_fileio.py"]),
    # checkpoints: the public API and trainer-state files; the directory format (marker,
    # commit, prune); the weights file (tied weights, shapes); finding checkpoints and runs
    "checkpoint": Module(
        "craft/training/checkpoint.py",
        [
            "tests/training/test_checkpoint_io.py",
            "tests/training/test_trainer_regressions.py",
            "tests/training/test_trainer.py",
        ],
    ),
    "checkpoint_dirs": Module(
        "craft/training/checkpoint_dirs.py",
        [
            "tests/training/test_checkpoint_io.py",
            "tests/training/test_latest_pointer.py",
            "tests/training/test_run_safety.py",
        ],
    ),
    "weights": Module(
        "craft/training/weights.py",
        [
            "tests/training/test_checkpoint_io.py",
            "tests/training/test_trainer_regressions.py",
            "tests/training/test_run_safety.py",
            "tests/security/test_untrusted_checkpoints.py",
        ],
    ),
    "checkpoint_search": Module(
        "craft/training/checkpoint_search.py",
        [
            "tests/training/test_checkpoint_search.py",
            "tests/training/test_checkpoint_io.py",
            "tests/training/test_latest_pointer.py",
        ],
    ),
    "state": Module("craft/training/state.py", ["tests/training/test_checkpoint_io.py"]),
    "state_io": Module(
        "craft/training/state_io.py",
        ["tests/training/test_rng_state_io.py", "tests/training/test_checkpoint_io.py"],
    ),
    "rng": Module(
        "craft/training/rng.py",
        ["tests/training/test_rng_state_io.py", "tests/training/test_checkpoint_io.py"],
    ),
    "datasets": Module(
        "craft/data/datasets.py",
        ["tests/data/test_datasets.py"],
        [
            "batch_generator",
            "_to_batch",
            "TokenSource.*",
            "RandomSource.*",
            "TrainBatches.*",
            "EvalBatches.*",
            "DataModule.[!_]*",
            "DataModule.__init__",
            "open_prepared",
            "build_random",
        ],
    ),
    # the training step (forward/backward, clip, non-finite guard, optimizer, schedule) and the
    # token weights of its micro-batches
    "step": Module(
        "craft/training/step.py",
        [
            "tests/training/test_training_numerics.py",
            "tests/training/test_accumulation.py",
            "tests/training/test_host_syncs.py",
        ],
    ),
    "accumulation": Module(
        "craft/training/accumulation.py", ["tests/training/test_accumulation.py"]
    ),
    "schedulers": Module(
        "craft/training/schedulers.py", ["tests/training/test_schedulers_optim.py"]
    ),
    # logits -> tokens (craft/generation.py re-exports these)
    "sampling": Module(
        "craft/sampling.py",
        ["tests/generation/test_sampling.py"],
        ["SamplingParams.*", "filter_logits", "sample_next", "sample_rows", "_sample_rows"],
    ),
    # in-process tests only (tests/config/test_bad_configs.py runs the CLI: seconds per test)
    "loader": Module(
        "craft/config/loader.py",
        [
            "tests/config/test_loader.py",
            "tests/config/test_loader_errors.py",
            "tests/config/test_strict_values.py",
        ],
    ),
    # the loss ops' argument checks and reductions
    "eager": Module(
        "craft/ops/eager.py",
        ["tests/ops/test_eager_torch.py"],
        ["check_loss_args", "reduce_loss", "cross_entropy", "linear_cross_entropy"],
    ),
    "torch_backend": Module(
        "craft/ops/torch_backend.py",
        ["tests/ops/test_eager_torch.py"],
        ["cross_entropy", "_fused_pass", "_LinearCrossEntropy.*", "linear_cross_entropy"],
    ),
}


def _dotted(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def mutant_globs(name: str) -> list[str]:
    """mutmut mutant-name globs of a module's functions (`pkg.mod.x_fn__mutmut_*`)."""
    mod = MODULES[name]
    prefix = _dotted(mod.path)
    out = []
    for fn in mod.functions or ["*"]:
        if fn == "*":
            out.append(f"{prefix}.x*__mutmut_*")
        elif "." in fn:
            cls, meth = fn.split(".", 1)
            out.append(f"{prefix}.xǁ{cls}ǁ{meth}__mutmut_*")
        else:
            out.append(f"{prefix}.x_{fn}__mutmut_*")
    return out


def function_of(mutant: str, module_path: str) -> str:
    """`craft.fileio.x_fsync_dir__mutmut_6` -> `fsync_dir`; methods -> `Class.method`."""
    local = mutant[len(_dotted(module_path)) + 1 :]
    local = re.sub(r"__mutmut_\d+$", "", local)
    if local.startswith("xǁ"):
        cls, _, meth = local[2:].partition("ǁ")
        return f"{cls}.{meth}"
    return local.removeprefix("x_")


def setup_cfg(mod: Module) -> str:
    def lines(key: str, values: list[str]) -> str:
        return f"{key} =\n" + "".join(f"    {v}\n" for v in values)

    return (
        "[mutmut]\n"
        "source_paths = craft\n"
        + lines("only_mutate", [mod.path])
        + lines("also_copy", ALSO_COPY)
        + lines("pytest_add_cli_args_test_selection", mod.tests)
        + lines(
            "pytest_add_cli_args",
            ["-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:benchmark", *PRELOAD],
        )
        + lines("do_not_mutate_patterns", NO_MUTATE)
        # torch is not fork-safe once used: fork the workers from a clean server process
        + "process_isolation = forkserver\n"
        + "use_git_change_detection = false\n"
    )


def run_module(
    name: str, mutmut: Path, jobs: int, env: dict[str, str], recheck: list[str] | None = None
) -> dict[str, Any]:
    """Run every mutant of `name` in a fresh work directory, or only the mutants in `recheck`
    (the survivors of the last run, against the current tests) in the existing one."""
    mod = MODULES[name]
    work = WORK / name
    if recheck is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for entry in ["craft", "tests", *ALSO_COPY]:
            (work / entry).symlink_to(REPO / entry)
        (work / "setup.cfg").write_text(setup_cfg(mod))
    elif not (work / "mutants").is_dir():
        raise SystemExit(f"--recheck {name}: no earlier run in {work}; run the module first")
    load_before = load_avg()
    t0 = clock()
    log = work / ("mutmut.log" if recheck is None else "mutmut-recheck.log")
    with open(log, "w") as out:
        proc = subprocess.run(
            [str(mutmut), "run", "--max-children", str(jobs), *(recheck or mutant_globs(name))],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    wall = clock() - t0
    load_after = load_avg()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"mutmut failed on {name} (exit {proc.returncode}); {log}:\n{tail}")
    statuses = read_statuses(mutmut, work, env, name)
    survivors = []
    for mutant, status in sorted(statuses.items()):
        if status in DETECTED or status in ("not checked", "skipped"):
            continue
        diff = subprocess.run(
            [str(mutmut), "show", mutant], cwd=work, env=env, capture_output=True, text=True,
            check=False,
        ).stdout  # fmt: skip
        removed, added = diff_lines(diff)
        survivors.append(
            {
                "mutant": mutant,
                "function": function_of(mutant, mod.path),
                "status": status,
                "from": removed,
                "to": added,
            }
        )
    return {
        "path": mod.path,
        "functions": mod.functions or ["*"],
        "tests": mod.tests,
        "statuses": statuses,
        "survivors": survivors,
        "wall_s": round(wall, 1),
        "load_before": load_before,
        "load_after": load_after,
    }


def read_statuses(mutmut: Path, work: Path, env: dict[str, str], name: str) -> dict[str, str]:
    """mutant -> status, for the mutants of the module's selected functions."""
    out = subprocess.run(
        [str(mutmut), "results", "--all", "true"], cwd=work, env=env, capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    globs = mutant_globs(name)
    statuses = {}
    for line in out.splitlines():
        mutant, sep, status = line.strip().rpartition(": ")
        if sep and any(fnmatch.fnmatchcase(mutant, g) for g in globs):
            statuses[mutant] = status
    return statuses


def diff_lines(diff: str) -> tuple[list[str], list[str]]:
    """The removed and added lines of a `mutmut show` diff, stripped."""
    removed, added = [], []
    for line in diff.splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("-"):
            removed.append(line[1:].strip())
        elif line.startswith("+"):
            added.append(line[1:].strip())
    return removed, added


# ------------------------------------------------------------------------------ equivalents


def load_equivalents() -> list[dict[str, Any]]:
    return tomllib.loads(EQUIVALENTS.read_text(encoding="utf-8")).get("mutant", [])


def _matches(entry: dict[str, Any], module: str, s: dict[str, Any]) -> bool:
    """An entry names a module, optionally a function glob, and the changed line before/after
    (exact, stripped) or regexes `from_re` / `to_re` searched in them."""
    if entry.get("module") not in (None, module):
        return False
    if "function" in entry and not fnmatch.fnmatchcase(s["function"], entry["function"]):
        return False
    before, after = "\n".join(s["from"]), "\n".join(s["to"])
    if "from" in entry and entry["from"] != before:
        return False
    if "to" in entry and entry["to"] != after:
        return False
    if "from_re" in entry and not re.search(entry["from_re"], before):
        return False
    return not ("to_re" in entry and not re.search(entry["to_re"], after))


def classify(results: dict[str, Any], equivalents: list[dict[str, Any]]) -> None:
    """Add verdicts (equivalent / accepted / open) and the score to each module's result."""
    for module, r in results.items():
        for s in r["survivors"]:
            hit = next((e for e in equivalents if _matches(e, module, s)), None)
            s["verdict"] = hit.get("verdict", "equivalent") if hit else "open"
            s["reason"] = hit["reason"] if hit else ""
        counts: dict[str, int] = {}
        for status in r["statuses"].values():
            counts[status] = counts.get(status, 0) + 1
        total = sum(v for k, v in counts.items() if k in DETECTED | UNDETECTED)
        killed = sum(v for k, v in counts.items() if k in DETECTED)
        equivalent = sum(1 for s in r["survivors"] if s["verdict"] == "equivalent")
        r["counts"] = counts
        r["total"], r["killed"], r["equivalent"] = total, killed, equivalent
        r["score"] = round(killed / (total - equivalent), 4) if total > equivalent else None


# ------------------------------------------------------------------------------ report


def _bench() -> Any:
    """craft.bench's shared clock, machine description and writer (craft from this checkout)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import craft.bench as bench
    import craft.bench.hardware
    import craft.bench.report
    import craft.bench.timing  # noqa: F401

    return bench


def clock() -> float:
    import torch

    return _bench().timing.now(torch.device("cpu"))


def load_avg() -> list[float]:
    return _bench().hardware.load_avg() or [float("nan")] * 3


def write_report(doc: dict[str, Any]) -> None:
    write_file = _bench().report.write_file
    write_file(RESULTS / "mutation.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "# Mutation testing",
        "",
        "One small bug at a time (mutmut) in the code that guards data and numbers; a mutant is",
        "killed when a test of the module's test files fails. Score = killed / (mutants -",
        "equivalent). Produced by `bench/mutation.sh`; see `bench/mutation.py` for the module map.",
        "",
        "| module | functions | mutants | killed | equivalent | open or accepted | score | wall | load (1-min avg, start → end) | run |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, r in doc["modules"].items():
        undetected = r["total"] - r["killed"] - r["equivalent"]
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f}%"
        fns = "all" if r["functions"] == ["*"] else ", ".join(r["functions"])
        lines.append(
            f"| {name} (`{r['path']}`) | {fns} | {r['total']} | {r['killed']} | "
            f"{r['equivalent']} | {undetected} | {score} | {r['wall_s'] / 60:.1f} min | "
            f"{r['load_before'][0]} → {r['load_after'][0]} | {r['date']} |"
        )
    lines += [
        "",
        "Open: not yet killed and not accepted. A recheck reruns a module's open survivors after",
        "tests were added (tests only add kills).",
        "",
    ]
    for name, r in doc["modules"].items():
        if r.get("note"):
            lines.append(f"- {name}: {r['note']}")
        for c in r.get("rechecks", []):
            lines.append(
                f"- {name}: recheck of {c['mutants']} survivors on {c['date']}, "
                f"{c['wall_s'] / 60:.1f} min, load {c['load_before'][0]} → {c['load_after'][0]}"
            )
    machine = doc.get("machine")
    if isinstance(machine, dict):  # craft.bench.hardware.machine_info
        lines += ["", *_bench().report.conditions(machine), f"- also: {doc['versions']}", ""]
    else:
        lines += ["", f"Machine: {machine}. Versions: {doc['versions']}.", ""]
    for name, r in doc["modules"].items():
        if not r["survivors"]:
            continue
        lines += [f"## {name}: survivors", "", f"Tests: {', '.join(r['tests'])}", ""]
        for s in r["survivors"]:
            change = "; ".join(f"`{a}` → `{b}`" for a, b in _pairs(s["from"], s["to"]))
            why = s["reason"] or "not yet killed"
            lines.append(f"- **{s['verdict']}** `{s['function']}` ({s['status']}): {change}. {why}")
        lines.append("")
    write_file(RESULTS / "mutation.md", "\n".join(lines))


def _pairs(a: list[str], b: list[str]) -> list[tuple[str, str]]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else "", b[i] if i < len(b) else "") for i in range(n)]


def _versions() -> str:
    from importlib.metadata import version

    import torch

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, mutmut {version('mutmut')}"
    )


def _save(doc: dict[str, Any], updated: set[str] | None = None) -> None:
    """Write the results; with `updated`, only those modules replace what is on disk now (so
    runs of other modules at the same time keep theirs)."""
    path = RESULTS / "mutation.json"
    if updated is not None and path.exists():
        on_disk = json.loads(path.read_text())
        doc["modules"] = {**on_disk["modules"], **{n: doc["modules"][n] for n in updated}}
    doc["modules"] = {n: doc["modules"][n] for n in MODULES if n in doc["modules"]}
    classify(doc["modules"], load_equivalents())
    write_report(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("modules", nargs="*", help="modules to run (default: every default module)")
    ap.add_argument(
        "--jobs", type=int, default=int(os.environ.get("CRAFT_MUTATION_CHILDREN", "2")),
        help="mutants tested at once (default: $CRAFT_MUTATION_CHILDREN, else 2)",
    )  # fmt: skip
    ap.add_argument("--list", action="store_true", help="print the module map and exit")
    ap.add_argument(
        "--recheck", action="store_true", help="run only the last run's open survivors of the "
        "modules again, against the current tests (after adding tests)",
    )  # fmt: skip
    ap.add_argument(
        "--report-only", action="store_true", help="re-classify the last results (after editing "
        "the equivalents file) without running anything",
    )  # fmt: skip
    args = ap.parse_args()
    if args.list:
        for name, m in MODULES.items():
            fns = ", ".join(m.functions) or "all functions"
            print(f"{name:14} {m.path} [{fns}]{'' if m.default else ' (by name only)'}")
            print(f"{'':14} tests: {' '.join(m.tests)}")
        return
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        raise SystemExit(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    previous = RESULTS / "mutation.json"
    doc = json.loads(previous.read_text()) if previous.exists() else {"modules": {}}
    mutmut = Path(sys.executable).parent / "mutmut"
    if not args.report_only:
        names = args.modules or [n for n, m in MODULES.items() if m.default]
        env = {
            **os.environ,
            "PYTHONPATH": "",
            "OMP_NUM_THREADS": "1",
            "CRAFT_DATA_MIRROR": os.environ.get(
                "CRAFT_DATA_MIRROR", str(REPO.parent / "shared" / "data")
            ),
        }
        done: set[str] = set()
        for name in names:
            print(f"mutation testing {name} ({MODULES[name].path}) ...", flush=True)
            recheck = None
            if args.recheck:
                last = doc["modules"].get(name, {}).get("survivors", [])
                recheck = [s["mutant"] for s in last if s.get("verdict") != "equivalent"]
                if not recheck:
                    print("  no open survivors", flush=True)
                    continue
            r = run_module(name, mutmut, args.jobs, env, recheck)
            now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
            if recheck is not None:  # the full run's time and load stay; the recheck is noted
                full = doc["modules"][name]
                if "note" in full:
                    r["note"] = full["note"]
                r["rechecks"] = [
                    *full.get("rechecks", []),
                    {"date": now, "mutants": len(recheck), "wall_s": r["wall_s"],
                     "load_before": r["load_before"], "load_after": r["load_after"]},
                ]  # fmt: skip
                for key in ("wall_s", "load_before", "load_after", "date"):
                    r[key] = full[key]
            else:
                r["date"] = now
            doc["modules"][name] = r
            import torch

            doc["machine"] = _bench().hardware.machine_info(torch.device("cpu"))
            doc["versions"] = _versions()
            done.add(name)
            _save(doc, done)  # after every module, so an interrupted run keeps what it finished
            print(f"  {len(r['statuses'])} mutants, {r['wall_s'] / 60:.1f} min", flush=True)
    _save(doc, set() if not args.report_only else None)
    for name, r in doc["modules"].items():
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f}%"
        opened = sum(1 for s in r["survivors"] if s["verdict"] == "open")
        print(
            f"{name:14} {score:>7}  ({r['killed']}/{r['total'] - r['equivalent']}, {opened} open)"
        )


if __name__ == "__main__":
    main()
