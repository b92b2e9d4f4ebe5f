"""Training on a JSON Lines corpus named in `data.files`, interrupted and resumed through the
`checkpoints/latest` pointer, matches an uninterrupted run exactly (deterministic CPU)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from craft.config import load_config
from craft.training.run import train
from tests.training._helpers import REPO, TINY, StopAt, train_losses


def _recipe(tmp_path: Path, corpus: Path) -> Path:
    recipe = tmp_path / "jsonl.toml"
    recipe.write_text(
        f"""
include = ["{REPO / "configs" / "model" / "gpt-debug.toml"}"]

[run]
name = "jsonl"
deterministic = true

[data]
files = ["{corpus}"]
text_field = "body"

[training]
max_steps = 8

[eval]
interval = 4

[checkpoint]
interval = 4
keep_last = 3
""",
        encoding="utf-8",
    )
    return recipe


def test_resume_on_a_jsonl_corpus_is_exact(tmp_path: Path, shakespeare: Path) -> None:
    docs = shakespeare.read_text(encoding="utf-8")[:60_000].split("\n\n")
    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
    recipe = _recipe(tmp_path, corpus)

    def cfg(out: str):
        return load_config(recipe, [*TINY, f"run.output_dir={tmp_path / out}"])

    straight = train(cfg("a"))
    first = train(cfg("b"), callbacks=[StopAt(4)])
    assert first.step == 4
    latest = first.run_dir / "checkpoints" / "latest"  # the pointer file, followed
    resumed = train(cfg("b"), resume=str(latest))
    assert resumed.run_dir == first.run_dir and resumed.step == 8

    a, b = train_losses(straight.run_dir), train_losses(resumed.run_dir)
    assert sorted(a) == list(range(1, 9)) and a == b
    wa = load_file(str(straight.last_checkpoint / "model.safetensors"))
    wb = load_file(str(resumed.last_checkpoint / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # the dataset came from the records: one blank-line separator after each document (char)
    from craft.data.datasets import PreparedDataset
    from craft.data.prepare import default_dataset_dir

    ds = PreparedDataset(default_dataset_dir(cfg("a").data, cfg("a").tokenizer))
    assert ds.meta["records"]["records"] == len(docs)
    assert ds.meta["records"]["text_field"] == "body"
    n = ds.num_tokens("train") + ds.num_tokens("val")
    assert n == sum(len(d) + 2 for d in docs)
