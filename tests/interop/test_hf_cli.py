"""The whole loop through the CLI: HF directory -> generate / fine-tune (init_from) / resume ->
export -> transformers; and bad input, each a one-line error with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from craft.config import from_dict, to_toml
from craft.data.tokenizers import (
    BytesTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)
from craft.models.gpt import GPT
from craft.training.checkpoint import load_model, write_export
from tests.interop import hf_models

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "finetune_gpt2_shakespeare.toml"
PROMPT = "ROMEO:"


def _one_line_error(res, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def _pipeline_text(directory: Path, prompt: str, n: int) -> str:
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(directory), device="cpu")
    return pipe(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]


def _craft_export(
    tmp: Path, tokenizer, tokenizer_cfg: dict, mute: list[int] | None = None, **model
) -> Path:
    """A Craft export directory holding a random GPT for `tokenizer`; the output rows of the
    `mute` ids are zero, so greedy decoding never picks them."""
    torch.manual_seed(0)
    cfg = from_dict(
        {
            "model": {
                "type": "gpt",
                "n_layer": 2,
                "n_head": 4,
                "d_model": 32,
                "block_size": 48,
                **model,
            },
            "tokenizer": tokenizer_cfg,
        }
    )
    net = GPT(cfg.model, tokenizer.vocab_size)
    with torch.no_grad():
        for p in net.parameters():  # larger weights: less flat logits, no near-ties
            p.mul_(4.0)
        if mute:
            net.lm_head.weight[mute] = 0.0
    return write_export(
        tmp / "craft_model",
        model_state=net.state_dict(),
        config_toml=to_toml(cfg),
        tokenizer=tokenizer,
        step=0,
    )


LLAMA_LIKE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)


@pytest.mark.parametrize("kind", ["char", "bytes", "sentencepiece", "bpe"])
def test_pipeline_output_equals_craft_generate(
    craft_cli, text, bpe, tmp_path: Path, kind: str
) -> None:
    mute: list[int] = []
    if kind == "char":
        tok, tcfg, model = CharTokenizer.from_texts([text]), {"type": "char"}, {"mlp": "gelu"}
    elif kind == "bytes":
        tok, tcfg, model = BytesTokenizer(), {"type": "bytes"}, {"mlp": "gelu_tanh"}
    elif kind == "sentencepiece":
        tok = SentencePieceTokenizer.train([text[:200_000]], vocab_size=400)
        # Byte pieces that do not form valid UTF-8 decode differently (documented in
        # craft/interop/hf_tokenizer.py): this random model is kept from emitting byte pieces.
        mute = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
        tcfg, model = {"type": "sentencepiece"}, {**LLAMA_LIKE, "tie_embeddings": False}
    else:
        hf_models.save_tokenizer(bpe, tmp_path / "bpe")
        tok = load_tokenizer(tmp_path / "bpe")
        tcfg, model = {"type": "hf", "path": str(tmp_path / "bpe")}, LLAMA_LIKE
    src = _craft_export(tmp_path, tok, tcfg, mute, **model)
    res = craft_cli(
        "generate", "--checkpoint", str(src), "--prompt", PROMPT, "--temperature", "0",
        "--max-new-tokens", "30", "--no-stream",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    res_export = craft_cli("export", str(src), "--format", "hf", "--output", str(tmp_path / "hf"))
    assert res_export.returncode == 0, res_export.stderr
    # The marker (ignored by transformers) says Craft wrote it, so `--force` may replace it.
    assert json.loads((tmp_path / "hf" / "COMPLETE").read_text())["kind"] == "export-hf"
    assert res.stdout == _pipeline_text(tmp_path / "hf", PROMPT, 30) + "\n"
    assert len(res.stdout) > len(PROMPT) + 1


@pytest.mark.slow
def test_finetune_resume_export_loop(craft_cli, zoo, tmp_path: Path) -> None:
    """init_from a tiny HF GPT-2, 20 steps on tinyshakespeare: validation loss falls; --resume
    auto continues the fine-tune run; its HF export loads in transformers."""
    from craft.data.prepare import default_dataset_dir
    from craft.evaluation import evaluate_checkpoint

    out = tmp_path / "runs"
    args = [
        f"model.init_from={zoo['gpt2']}",
        "training.precision=no",
        "training.grad_accum_steps=1",
        "training.batch_size=8",
        "optimizer.lr=2e-3",
        "eval.interval=20",
        "eval.batches=4",
        "checkpoint.interval=10",
        "logging.progress=plain",
        "logging.plot=false",
        f"run.output_dir={out}",
    ]
    env = {**os.environ, "CRAFT_DEBUG": "0", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "craft", "train", str(RECIPE), *args, "training.max_steps=20"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "initialised the weights from" in res.stdout + res.stderr
    (run,) = (out / "finetune_gpt2_shakespeare").iterdir()
    _, _, cfg = load_model(run)
    assert cfg.model.init_from == str(zoo["gpt2"]) and cfg.model.n_layer == 2
    assert cfg.tokenizer.type == "hf"
    data = default_dataset_dir(cfg.data, cfg.tokenizer)
    # craft eval takes the HF directory as --checkpoint (it records no dataset: --data is needed)
    no_data = craft_cli("eval", "--checkpoint", str(zoo["gpt2"]), "--device", "cpu")
    _one_line_error(no_data, "records no dataset", "--data")
    res_before = craft_cli(
        "eval", "--checkpoint", str(zoo["gpt2"]), "--data", str(data), "--max-batches", "6",
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert res_before.returncode == 0, res_before.stderr
    before = json.loads(res_before.stdout)
    after = evaluate_checkpoint(run, data=data, max_batches=6, device="cpu", progress=False)
    assert after.window == before["window"] == 64
    assert after.loss < before["loss"] - 0.05

    resumed = craft_cli("train", str(RECIPE), *args, "training.max_steps=25", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "resuming from" in log and "initialised the weights" not in log
    state = json.loads((run / "checkpoints" / "step_00000025" / "trainer_state.json").read_text())
    assert state["step"] == 25

    exported = craft_cli("export", str(run), "--output", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    model, _, _ = load_model(run)
    idx = torch.randint(0, model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=0)


def test_init_from_fills_the_model_section_and_guards_shapes(craft_cli, zoo) -> None:
    shown = craft_cli("config", "show", str(RECIPE), f"model.init_from={zoo['gpt2']}")
    assert shown.returncode == 0, shown.stderr
    assert 'mlp = "gelu_tanh"' in shown.stdout and "n_layer = 2" in shown.stdout
    assert "block_size = 64" in shown.stdout and 'type = "hf"' in shown.stdout
    # a shorter context is fine (learned positions are cropped), dropout too
    ok = craft_cli(
        "config", "show", str(RECIPE), f"model.init_from={zoo['gpt2']}", "model.block_size=32",
        "model.dropout=0.1",
    )  # fmt: skip
    assert ok.returncode == 0 and "block_size = 32" in ok.stdout, ok.stderr
    bad = craft_cli(
        "config", "show", str(RECIPE), f"model.init_from={zoo['gpt2']}", "model.n_layer=3"
    )
    _one_line_error(bad, "changes the shapes of pretrained weights", "blocks.2.", "model.n_layer")
    fewer_kv = craft_cli(
        "config", "validate", str(RECIPE), f"model.init_from={zoo['llama']}", "model.n_kv_head=1"
    )
    _one_line_error(fewer_kv, "blocks.0.attn.c_attn.weight (64, 32) -> (48, 32)", "model.n_kv_head")


# ------------------------------------------------------------------------------- bad input


@pytest.fixture
def gpt2_copy(zoo, tmp_path: Path) -> Path:
    return Path(shutil.copytree(zoo["gpt2"], tmp_path / "model"))


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


def _generate(craft_cli, d: Path | str):
    return craft_cli("generate", "--checkpoint", str(d), "--prompt", "a", "--max-new-tokens", "3")


def test_unsupported_model_type(craft_cli, gpt2_copy: Path) -> None:
    _edit_config(gpt2_copy, model_type="qwen2")
    _one_line_error(_generate(craft_cli, gpt2_copy), "model_type 'qwen2' is not supported")


def test_missing_config_json(craft_cli, gpt2_copy: Path) -> None:
    (gpt2_copy / "config.json").unlink()
    _one_line_error(_generate(craft_cli, gpt2_copy), "no config.json")


def test_pickle_only_directory_is_refused(craft_cli, gpt2_copy: Path) -> None:
    (gpt2_copy / "model.safetensors").rename(gpt2_copy / "pytorch_model.bin")
    _one_line_error(_generate(craft_cli, gpt2_copy), "pytorch_model.bin", "never", "safetensors")


def test_sharded_index_naming_a_missing_shard(craft_cli, zoo, tmp_path: Path) -> None:
    d = Path(shutil.copytree(zoo["llama"], tmp_path / "m"))
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    _one_line_error(_generate(craft_cli, d), shard.name, "missing")


def test_index_naming_a_file_outside_the_directory(craft_cli, zoo, tmp_path: Path) -> None:
    d = Path(shutil.copytree(zoo["llama"], tmp_path / "m"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line_error(_generate(craft_cli, d), "'../outside.safetensors'")


def test_symlink_leaving_the_directory(craft_cli, gpt2_copy: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (gpt2_copy / "tokenizer.json").unlink()
    (gpt2_copy / "tokenizer.json").symlink_to(secret)
    _one_line_error(_generate(craft_cli, gpt2_copy), "outside", "refusing")


def test_tensor_of_the_wrong_shape(craft_cli, gpt2_copy: Path) -> None:
    _edit_config(gpt2_copy, n_inner=64)
    _one_line_error(
        _generate(craft_cli, gpt2_copy), "mlp.c_fc.weight has shape [32, 128]", "[32, 64]"
    )


def test_truncated_weights(craft_cli, gpt2_copy: Path) -> None:
    path = gpt2_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _one_line_error(_generate(craft_cli, gpt2_copy), "damaged")


def test_inspect_model_reads_an_hf_directory_as_loading_does(zoo, tmp_path, monkeypatch) -> None:
    """What `craft serve` checks in its own process: tokenizer, config, the weight headers of
    every shard; no weight read, no model built."""
    from craft.errors import CheckpointError
    from craft.training.checkpoint import inspect_model

    d = Path(shutil.copytree(zoo["llama"], tmp_path / "m"))
    _, tok, cfg = load_model(d)
    monkeypatch.setattr("craft.interop.hf.empty_gpt", None)  # building would fail
    tokenizer, config = inspect_model(d)
    assert config == cfg and tokenizer.vocab_size == tok.vocab_size
    index = json.loads((d / "model.safetensors.index.json").read_text())
    (d / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(CheckpointError, match="which is missing from"):
        inspect_model(d)


def test_tokenizer_larger_than_the_embedding(craft_cli, text, gpt2_copy: Path) -> None:
    hf_models.save_tokenizer(hf_models.train_bpe(text[:100_000], 400), gpt2_copy)
    _one_line_error(_generate(craft_cli, gpt2_copy), "400 ids", "embedding of 300 rows")


def test_hub_id_while_offline(craft_cli) -> None:
    res = _generate(craft_cli, "someorg/no-such-model")
    _one_line_error(res, "someorg/no-such-model", "offline")


def test_init_from_bad_source_writes_nothing(craft_cli, gpt2_copy: Path, tmp_path: Path) -> None:
    (gpt2_copy / "model.safetensors").rename(gpt2_copy / "pytorch_model.bin")
    out = tmp_path / "runs"
    res = craft_cli(
        "train", str(RECIPE), f"model.init_from={gpt2_copy}", f"run.output_dir={out}",
        "training.precision=no",
    )  # fmt: skip
    _one_line_error(res, "pytorch_model.bin")
    assert not out.exists()


def test_export_refuses_a_non_empty_directory(craft_cli, zoo, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(craft_cli("export", str(zoo["gpt2"]), "--output", str(out)), "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --force replaces only what Craft wrote: a file of the user's is never deleted.
    forced = craft_cli("export", str(zoo["gpt2"]), "--output", str(out), "--force")
    _one_line_error(forced, "no COMPLETE marker of Craft's")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert craft_cli("export", str(zoo["gpt2"]), "--output", str(out)).returncode == 0  # empty
    assert (out / "config.json").exists()
    again = craft_cli("export", str(zoo["gpt2"]), "--output", str(out), "--force")
    assert again.returncode == 0 and (out / "config.json").exists()


def test_export_of_a_model_hf_cannot_express(craft_cli, tmp_path: Path) -> None:
    src = _craft_export(tmp_path, BytesTokenizer(), {"type": "bytes"}, norm="rmsnorm")
    res = craft_cli("export", str(src), "--output", str(tmp_path / "out"))
    _one_line_error(res, "no Hugging Face equivalent", "model.norm = layernorm")
    assert not (tmp_path / "out").exists()


def test_hub_cache_snapshot_is_read_offline(zoo, tmp_path: Path, monkeypatch) -> None:
    """A model in the standard HF cache layout (snapshot files linking into blobs/) loads by id."""
    cache = tmp_path / "cache"
    repo = cache / "models--testorg--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in zoo["gpt2"].iterdir():
        blob = repo / "blobs" / f.name
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _, tok, cfg = load_model("testorg/tiny")
    assert cfg.model.n_layer == 2 and tok.type == "hf"
    # a snapshot link that leaves the repository's cache folder is refused
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(zoo["gpt2"] / "tokenizer.json")
    from craft.errors import CraftError

    with pytest.raises(CraftError, match="outside"):
        load_model("testorg/tiny")
