"""bench/README.md's generated results section: index of every file, craft bench summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craft.bench.summary import END, START, render, update_readme


def _doc() -> dict:
    def row(impl: str, x: int, thr: float, status: str = "ok", baseline: str | None = "torch"):
        return {
            "impl": impl,
            "x": x,
            "group": "tokens=64",
            "status": status,
            "throughput": thr if status == "ok" else None,
            "baseline": baseline if status == "ok" else None,
        }

    return {
        "format": "craft-bench/1",
        "machine": {"device_name": "Test CPU", "date": "2026-01-02T03:04:05Z"},
        "settings": {"dtype": "float32", "mode": "fwd+bwd"},
        "benchmarks": {
            "cross_entropy": {
                "x": "vocab",
                "metric": "GB/s",
                "results": [
                    row("torch", 128, 1.0),
                    row("craft.torch", 128, 0.5),
                    row("torch", 512, 2.0),
                    row("craft.torch", 512, 3.0),
                    row("craft.eager", 512, 1.5),
                    row("bad", 512, 0.0, status="wrong"),
                ],
            }
        },
        "train": {
            "device_name": "Test CPU",
            "recipe": "micro",
            "params": 1234,
            "tokens_per_s": 5000.0,
            "ms_per_step": 12.5,
            "mfu": None,
            "peak_mem_bytes": 3 * 2**20,
        },
    }


def test_render_indexes_every_file_and_summarises_craft_bench(tmp_path: Path) -> None:
    (tmp_path / "cpu.json").write_text(json.dumps(_doc()))
    (tmp_path / "decode.md").write_text("# Decode speed: KV cache\n\nrows\n")
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "data_prep", "date": "2026-02"}))
    (tmp_path / "cpu.png").write_bytes(b"\x89PNG")
    text = render(tmp_path)
    assert "| [decode.md](results/decode.md) | Decode speed: KV cache |" in text
    assert "| [other.json](results/other.json) | data_prep |" in text
    assert "craft bench: cross_entropy + train | Test CPU | 2026-01-02 |" in text
    assert "| 2026-01-02 | not recorded |" in text  # no load average in the file
    # largest vocab: craft.torch calls F.cross_entropy on float32 logits, the baseline's own
    # kernel: no speed-up claimed from it; craft.eager 1.5 GB/s against torch 2.0 -> 0.75x
    (kernel,) = [ln for ln in text.splitlines() if ln.startswith("| cpu.json | Test CPU | cross")]
    assert "vocab=512 tokens=64" in kernel and "craft.eager 1.50" in kernel
    assert "torch 2.00" in kernel and "0.75x" in kernel and "1.50x" not in kernel
    assert kernel.endswith("| craft.torch | bad |")
    assert "| cpu.json | Test CPU | micro | 1,234 | 5,000 | 12.50 | n/a | 3.0 MiB |" in text


def test_update_readme_replaces_only_the_marked_section(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu.json").write_text(json.dumps(_doc()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nintro\n\n{START}\nold\n{END}\n\nafter\n")
    update_readme(readme, results)
    text = readme.read_text()
    assert text.startswith("# Bench\n\nintro\n") and text.endswith(f"{END}\n\nafter\n")
    assert "old" not in text and "cpu.json" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, results)


def test_same_kernel_only_where_the_call_is_the_same(tmp_path: Path) -> None:
    doc = _doc()
    doc["settings"]["dtype"] = "bfloat16"  # Craft upcasts: a different computation, a real ratio
    doc["machine"]["load_avg"] = [0.42, 0.5, 0.6]
    (tmp_path / "bf16.json").write_text(json.dumps(doc))
    text = render(tmp_path)
    (kernel,) = [ln for ln in text.splitlines() if ln.startswith("| bf16.json | Test CPU | cross")]
    assert "craft.torch 3.00" in kernel and "1.50x" in kernel and kernel.endswith("| - | bad |")
    assert "| 2026-01-02 | 0.42 |" in text


def test_headlines_of_the_scripts_come_from_their_results(tmp_path: Path) -> None:
    ms = {"craft": {"median": 40.0}, "plain": {"median": 50.0}}
    (tmp_path / "tt.json").write_text(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "repeats": 5,
                "throughput": {
                    **{k: {"ms_per_step": v} for k, v in ms.items()},
                    "craft_over_plain": 1.25,
                },
                "full": {"val_loss": 1.7012, "steps": 2000, "wall_s": 90.0},
            }
        )
    )
    (tmp_path / "ttt.json").write_text(
        json.dumps(
            {
                "benchmark": "time_to_target",
                "target": 1.886,
                "repeats": 3,
                "craft_over_plain": 0.45,
                "variants": {
                    "craft": {"time_to_target_s": {"median": 45.0}},
                    "plain": {"time_to_target_s": {"median": 100.0}},
                },
            }
        )
    )
    (tmp_path / "bound.json").write_text(
        json.dumps(
            {
                "benchmark": "time_to_target",
                "target": 1.886,
                "repeats": 3,
                "plain_max_steps": 3000,
                "craft_over_plain_at_most": 0.38,
                "variants": {"craft": {"time_to_target_s": {"median": 45.0}}, "plain": {}},
            }
        )
    )
    (tmp_path / "sweep.json").write_text(
        json.dumps(
            {
                "benchmark": "schedule_sweep",
                "target": 1.886,
                "schedules": {"lr 0.002": {"reached_step": 850}, "lr 0.01": {"reached_step": None}},
            }
        )
    )
    text = render(tmp_path)
    assert "the plain loop did not reach it in 3000 steps: ratio at most 0.38 |" in text
    assert "| steps to val loss 1.886: lr 0.002: 850, lr 0.01: not reached |" in text
    assert (
        "| tt.json | Craft 40.0 vs plain loop 50.0 ms/step (medians of 5 runs): Craft / plain "
        "tokens/s 1.250; full run: val loss 1.7012 at step 2000 in 1.5 min |"
    ) in text
    assert "| ttt.json | to val loss 1.886: Craft 45.0 s vs plain loop 100.0 s" in text
    assert "ratio 0.45 |" in text
