"""Downloaded checkpoints and exports stay inert: doctored ones (COMPLETE fixed, as a forger would)
are refused with one line, and nothing outside them is read, written or imported."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from craft.config import from_dict, to_toml
from craft.config.components import CharTokenizerConfig
from craft.data.datasets import PreparedDataset
from craft.data.prepare import prepare
from craft.errors import CheckpointError
from craft.training import checkpoint as ckpt
from craft.training.builders import build_model
from tests.security._helpers import Canary, fix_complete, run_craft, tree

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine tiny exported model (GPT, char tokenizer) to copy and doctor."""
    root = tmp_path_factory.mktemp("genuine")
    (root / "text.txt").write_text(TEXT)
    data = root / "data"
    prepare([root / "text.txt"], data, CharTokenizerConfig(), val_fraction=0.2, progress=False)
    cfg = from_dict(
        {
            "model": {"type": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 16},
            "data": {"type": "tokens", "dir": str(data)},
            "tokenizer": {"type": "char"},
        }
    )
    tok = PreparedDataset(data).tokenizer
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    out = root / "export"
    ckpt.write_export(
        out, model_state=model.state_dict(), config_toml=to_toml(cfg), tokenizer=tok, step=3
    )
    return out


@pytest.fixture(params=["load_model", "inspect_model"])
def load(request: pytest.FixtureRequest):
    """Both ways in: loading the model, and checking it without reading its weights (a server)."""
    return getattr(ckpt, request.param)


@pytest.fixture
def evil(export: Path, tmp_path: Path) -> Path:
    """A copy of the export inside this test's own tree, ready to be doctored."""
    path = tmp_path / "downloads" / "evil"
    shutil.copytree(export, path)
    return path


def _edit_config(path: Path, **sections: object) -> None:
    cfg = tomllib.loads((path / "config.toml").read_text())
    for key, value in sections.items():
        cfg[key] = value
    import tomli_w

    (path / "config.toml").write_text(tomli_w.dumps(cfg))
    fix_complete(path)


@pytest.mark.parametrize("named_by", ["dir", "files"])
def test_eval_never_prepares_data_a_checkpoint_names(evil, tmp_path, capsys, named_by) -> None:
    secret = Canary(tmp_path / "private" / "shadow.txt")
    leak = tmp_path / "leak" / "x"
    data = {"type": "tokens", "files": [str(secret.path)]}
    if named_by == "dir":
        data["dir"] = str(leak)
    _edit_config(evil, data=data)
    before = tree(tmp_path)
    res = run_craft(["eval", "--checkpoint", str(evil)], capsys)
    assert res.code == 2, res
    assert "never prepares data" in res.err and "--data" in res.err
    assert len(res.err.strip().splitlines()) == 1
    assert not leak.exists()
    assert secret.untouched()
    assert tree(tmp_path) == before  # nothing written anywhere, the checkpoint included
    home = Path(__import__("os").environ["CRAFT_HOME"]) / "datasets"
    assert not home.exists() or not any(p.name.startswith("files-") for p in home.iterdir())


def test_eval_uses_the_checkpoints_own_prepared_dataset(export, capsys) -> None:
    res = run_craft(["eval", "--checkpoint", str(export), "--json", "--device", "cpu"], capsys)
    assert res.code == 0, res.err
    assert json.loads(res.out)["tokens"] > 0


def test_checkpoint_imports_run_only_with_trust_imports(evil, tmp_path, capsys, monkeypatch):
    here = tmp_path / "workdir"
    here.mkdir()
    probe = here / "craft_probe_mod.py"
    flag = tmp_path / "imported.flag"
    probe.write_text(f"from pathlib import Path\nPath({str(flag)!r}).write_text('ran')\n")
    _edit_config(evil, imports=["craft_probe_mod"])
    monkeypatch.delitem(sys.modules, "craft_probe_mod", raising=False)
    for cmd in (["generate", "--prompt", "a", "--max-new-tokens", "2", "--seed", "1"], ["eval"]):
        res = run_craft([*cmd, "--checkpoint", str(evil)], capsys, cwd=here)
        assert res.code == 2, res
        assert "'craft_probe_mod'" in res.err and "--trust-imports" in res.err
        assert not flag.exists() and "craft_probe_mod" not in sys.modules
    # Opting in imports it, from sys.path only: the working directory is not added.
    res = run_craft(
        ["generate", "--checkpoint", str(evil), "--prompt", "a", "--max-new-tokens", "2",
         "--seed", "1", "--trust-imports"],
        capsys,
        cwd=here,
    )  # fmt: skip
    assert res.code == 2 and "cannot import module 'craft_probe_mod'" in res.err
    assert not flag.exists()
    monkeypatch.syspath_prepend(str(here))
    res = run_craft(
        ["generate", "--checkpoint", str(evil), "--prompt", "a", "--max-new-tokens", "2",
         "--seed", "1", "--trust-imports"],
        capsys,
    )  # fmt: skip
    assert res.code == 0, res.err
    assert flag.read_text() == "ran"
    sys.modules.pop("craft_probe_mod", None)


def test_resume_imports_only_what_the_recipe_imports(evil) -> None:
    _edit_config(evil, imports=["json", "craft_not_in_recipe"])
    with pytest.raises(CheckpointError, match=r"'craft_not_in_recipe'.*recipe's imports"):
        ckpt.read_config(evil, trusted=["json"], hint="add them to the recipe's imports")
    _edit_config(evil, imports=["json"])
    assert ckpt.read_config(evil, trusted=["json"]).imports == ["json"]


def test_config_of_a_huge_model_is_refused_before_building_it(evil, monkeypatch, load) -> None:
    model = {"type": "gpt", "n_layer": 200, "n_head": 64, "d_model": 8192, "block_size": 16}
    _edit_config(evil, model=model)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the weights were checked")

    monkeypatch.setattr("craft.training.builders.build_model", never)
    with pytest.raises(CheckpointError, match=r"holds [\d,]+ parameters, but .* describes"):
        load(evil)


def test_plugin_models_are_compared_on_the_meta_device(evil, monkeypatch, load) -> None:
    from craft.models import flops

    monkeypatch.setattr(flops, "param_counts", lambda cfg, vocab: None)  # as for a plugin model
    load(evil)  # the genuine shapes pass
    _edit_config(evil, model={"type": "gpt", "n_layer": 3, "n_head": 2, "d_model": 16})
    with pytest.raises(CheckpointError, match="do not belong together"):
        load(evil)


@pytest.mark.parametrize("aliases", ["not json", '{"x": "missing"}', "[1, 2]", '{"a": 3}'])
def test_malformed_alias_metadata_is_a_one_line_error(evil, capsys, load, aliases: str) -> None:
    weights = evil / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), {"format": "pt", ckpt.ALIASES_KEY: aliases})
    fix_complete(evil)
    with pytest.raises(CheckpointError, match=r"craft\.aliases"):
        load(evil)
    res = run_craft(["generate", "--checkpoint", str(evil), "--prompt", "a"], capsys)
    assert res.code == 2 and res.err.startswith("error: ") and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1


def test_marker_paths_outside_the_checkpoint_are_never_probed(evil, tmp_path, load) -> None:
    secret = Canary(tmp_path / "private" / "shadow.txt")
    for rel, why in ((str(secret.path), "absolute path"), ("../../private/shadow.txt", "'..'")):
        marker = json.loads((evil / ckpt.MARKER).read_text())
        marker["files"][rel] = secret.path.stat().st_size
        (evil / ckpt.MARKER).write_text(json.dumps(marker))
        assert ckpt.read_marker(evil) is None
        with pytest.raises(CheckpointError, match=f"lists a file that.*{why}"):
            load(evil)
        fix_complete(evil)
    assert secret.untouched()


@pytest.mark.parametrize("part", ["tokenizer", "config.toml", "model.safetensors"])
def test_symlinks_leading_out_of_a_checkpoint_are_refused(
    evil, export, tmp_path, part, load
) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(export, elsewhere)
    target = evil / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.symlink_to(elsewhere / part)
    fix_complete(evil)
    with pytest.raises(CheckpointError, match="points outside"):
        load(evil)


def test_replacing_an_export_keeps_what_craft_did_not_write(export, tmp_path) -> None:
    state = load_file(str(export / "model.safetensors"))
    cfg_text = (export / "config.toml").read_text()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        ckpt.write_export(out, model_state=state, config_toml=cfg_text, tokenizer=None, step=1)
    shutil.rmtree(out)
    ckpt.write_export(out, model_state=state, config_toml=cfg_text, tokenizer=None, step=1)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"did not write \(notes.txt\)"):
        ckpt.write_export(out, model_state=state, config_toml=cfg_text, tokenizer=None, step=2)
    assert (out / "notes.txt").read_text() == "mine" and ckpt.read_marker(out)["step"] == 1
    (out / "notes.txt").unlink()
    ckpt.write_export(out, model_state=state, config_toml=cfg_text, tokenizer=None, step=2)
    assert ckpt.read_marker(out)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left behind


def test_a_planted_staging_name_is_never_followed(export, tmp_path) -> None:
    import os

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / f".model.tmp-{os.getpid()}").symlink_to(victim)  # the old, predictable name
    state = load_file(str(export / "model.safetensors"))
    out = ckpt.write_export(
        run / "model",
        model_state=state,
        config_toml=(export / "config.toml").read_text(),
        tokenizer=None,
        step=1,
    )
    assert ckpt.read_marker(out) is not None and not out.is_symlink()
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]


def test_export_copies_only_the_files_the_marker_lists(evil, tmp_path) -> None:
    secret = Canary(tmp_path / "private" / "shadow.txt")
    (evil / "tokenizer" / "stolen.txt").symlink_to(secret.path)  # not listed in COMPLETE
    out = ckpt.export_model(evil, tmp_path / "exported")
    assert not (out / "tokenizer" / "stolen.txt").exists()
    assert secret.untouched()
    model, _, _ = ckpt.load_model(out)
    assert model.num_params() > 0


def test_a_run_directory_cannot_point_at_a_checkpoint_elsewhere(export, tmp_path, capsys) -> None:
    elsewhere = tmp_path / "elsewhere" / "step_00000009"
    shutil.copytree(export, elsewhere)
    run = tmp_path / "downloads" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_00000009").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="points outside"):
        ckpt.load_model(run)
    res = run_craft(["generate", "--checkpoint", str(run), "--prompt", "a"], capsys)
    assert res.code == 2 and "points outside" in res.err


def test_resume_path_imports_only_what_the_recipe_imports(tmp_path) -> None:
    from craft.training.run import train
    from tests.training._helpers import tiny_config

    first = train(tiny_config(tmp_path, "training.max_steps=2", "imports=['json']"))
    again = tiny_config(tmp_path, "training.max_steps=3")
    with pytest.raises(CheckpointError, match=r"\('json'\).*recipe's imports"):
        train(again, resume=str(first.last_checkpoint))
    assert train(again, resume="auto").step == 3  # your own run, found in your output_dir


def test_inspect_model_reads_no_weights_and_agrees_with_load_model(export, monkeypatch) -> None:
    _, tok, cfg = ckpt.load_model(export)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect_model read weight values or built the model")

    monkeypatch.setattr("craft.training.weights.load_file", never)
    monkeypatch.setattr("craft.training.builders.build_model", never)
    tokenizer, config = ckpt.inspect_model(export)
    assert tokenizer.vocab_size == tok.vocab_size and config == cfg


def test_a_truncated_weights_file_is_refused_from_the_header(evil, load) -> None:
    weights = evil / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    fix_complete(evil)
    with pytest.raises(CheckpointError, match="cannot read model weights"):
        load(evil)


def test_non_finite_weights_are_seen_by_loading_only(evil) -> None:
    """The header check cannot see values: NaN weights pass `inspect_model` (a server then
    reports them from the process that loads the weights) and are refused by `load_model`."""
    weights = evil / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()  # kept: it names the tied weights
    state = {k: v.fill_(float("nan")) for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), meta)
    fix_complete(evil)
    ckpt.inspect_model(evil)
    with pytest.raises(CheckpointError, match="non-finite"):
        ckpt.load_model(evil)
