"""Recipe loading: includes, merge rules, overrides and their types, provenance."""

from __future__ import annotations

from pathlib import Path

import pytest

from craft.config import load_config, load_raw, parse_override
from craft.config.loader import COMMAND_LINE
from craft.errors import ConfigError

GOOD = Path(__file__).parent / "good"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_nested_includes_relative_to_including_file() -> None:
    raw = load_raw(GOOD / "base.toml")
    # frag/model.toml includes frag/nested.toml; the includer wins over what it includes.
    assert raw.data["model"]["n_layer"] == 2
    assert raw.data["model"]["block_size"] == 16
    assert raw.data["logging"]["trackers"] == ["tensorboard"]
    assert raw.data["run"]["name"] == "base"
    assert "nested.toml (included from" in raw.origin("model.block_size")
    assert raw.origin("model.n_layer").startswith(str(Path("tests/config/good/frag/model.toml")))


def test_deep_merge_tables_merge_arrays_replace(tmp_path: Path) -> None:
    write(
        tmp_path / "a.toml",
        "[optimizer]\nlr = 1.0\nbetas = [0.1, 0.2]\n[training]\nmax_steps = 5\n",
    )
    r = write(tmp_path / "r.toml", 'include = ["a.toml"]\n[optimizer]\nbetas = [0.5, 0.6]\n')
    raw = load_raw(r)
    assert raw.data["optimizer"] == {"lr": 1.0, "betas": [0.5, 0.6]}
    assert raw.data["training"] == {"max_steps": 5}


def test_later_include_wins(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", "[run]\nname = 'a'\nseed = 1\n")
    write(tmp_path / "b.toml", "[run]\nname = 'b'\n")
    r = write(tmp_path / "r.toml", 'include = ["a.toml", "b.toml"]\n')
    raw = load_raw(r)
    assert raw.data["run"] == {"name": "b", "seed": 1}
    assert raw.origin("run.name").startswith(str(tmp_path / "b.toml")) or "b.toml" in raw.origin(
        "run.name"
    )


def test_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'include = ["b.toml"]\n')
    write(tmp_path / "b.toml", 'include = ["a.toml"]\n')
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_raw(tmp_path / "a.toml")


def test_self_include_is_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'include = ["a.toml"]\n')
    with pytest.raises(ConfigError, match="include cycle"):
        load_raw(tmp_path / "a.toml")


def test_diamond_include_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", "[run]\nseed = 7\n")
    write(tmp_path / "l.toml", 'include = ["base.toml"]\n')
    write(tmp_path / "r.toml", 'include = ["base.toml"]\n')
    top = write(tmp_path / "top.toml", 'include = ["l.toml", "r.toml"]\n')
    assert load_raw(top).data["run"]["seed"] == 7


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("optimizer.lr=3e-4", "optimizer.lr", 3e-4),
        ("model.type=rnn", "model.type", "rnn"),
        ('data.files=["a.txt","b.txt"]', "data.files", ["a.txt", "b.txt"]),
        ("run.name=test", "run.name", "test"),
        ("training.max_steps=10", "training.max_steps", 10),
        ("training.compile=true", "training.compile", True),
        ("run.name=true-ish", "run.name", "true-ish"),
        ('run.name="42"', "run.name", "42"),
        ("logging.sample_prompt=", "logging.sample_prompt", ""),
        ("+run.seed=3", "run.seed", 3),
        ("optimizer.betas=[0.9, 0.95]", "optimizer.betas", [0.9, 0.95]),
        ("run.name=a=b", "run.name", "a=b"),
    ],
)
def test_override_parsing(text: str, key: str, value: object) -> None:
    k, v = parse_override(text)
    assert k == key
    assert v == value
    assert type(v) is type(value)


def test_overrides_apply_last_with_provenance() -> None:
    raw = load_raw(GOOD / "base.toml", ["model.n_layer=3", "eval.interval=7"])
    assert raw.data["model"]["n_layer"] == 3
    assert raw.data["eval"] == {"interval": 7}
    assert raw.origin("model.n_layer") == COMMAND_LINE
    cfg = load_config(GOOD / "base.toml", ["model.n_layer=3", "optimizer.lr=3e-4"])
    assert cfg.model.n_layer == 3
    assert cfg.optimizer.lr == 3e-4
    assert cfg.optimizer.betas == (0.9, 0.99)


def test_override_switches_component_type() -> None:
    cfg = load_config(GOOD / "frag" / "optim.toml", ["model.type=rnn", "model.cell=gru"])
    assert cfg.model.type == "rnn"
    assert cfg.model.cell == "gru"


SCHED = '[scheduler]\ntype = "wsd"\nwarmup_steps = 5\ndecay_fraction = 0.5\nmin_lr = 3e-4\n'


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_an_override_that_changes_a_type_starts_the_table_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    # the recipe's keys described its wsd schedule: none of them carries over to another type
    r = write(tmp_path / "r.toml", SCHED)
    cfg = load_config(r, [f"scheduler.type={kind}"])
    assert cfg.scheduler == type(cfg.scheduler)(type=kind)  # the new type's defaults
    assert "replaces 'wsd'" in caplog.text and "r.toml" in caplog.text
    for key in ("warmup_steps", "decay_fraction", "min_lr"):
        assert f"scheduler.{key}" in caplog.text  # the dropped keys are named
    # keys given on the command line stay, before or after the type; a table override too
    for overrides in (
        [f"scheduler.type={kind}", "scheduler.warmup_steps=7"],
        ["scheduler.warmup_steps=7", f"scheduler.type={kind}"],
        [f"scheduler={{type='{kind}', warmup_steps=7}}"],
    ):
        cfg = load_config(r, overrides)
        assert cfg.scheduler == type(cfg.scheduler)(type=kind, warmup_steps=7), overrides


def test_the_same_type_or_a_first_type_keeps_the_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = write(tmp_path / "r.toml", SCHED)
    raw = load_raw(r, ["scheduler.type=wsd", "optimizer.type=sgd", "optimizer.lr=0.5"])
    assert raw.data["scheduler"]["min_lr"] == 3e-4 and "r.toml" in raw.origin("scheduler.min_lr")
    assert raw.data["optimizer"] == {"type": "sgd", "lr": 0.5}
    assert "dropped" not in caplog.text


def test_a_type_switch_drops_file_keys_of_nested_tables_and_keeps_command_line_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = write(tmp_path / "r.toml", '[model]\ntype = "gpt"\nn = 1\n[model.extra]\na = 1\nb = 2\n')
    raw = load_raw(r, ["model.extra.b=3", "model.type=rnn"])
    assert raw.data["model"] == {"type": "rnn", "extra": {"b": 3}}
    assert raw.origin("model.extra.b") == raw.origin("model.type") == COMMAND_LINE
    assert "model.n, model.extra.a (set in " in caplog.text
    assert load_raw(r, ["model.type=rnn"]).data["model"] == {"type": "rnn"}  # no empty tables


def test_a_file_that_changes_an_included_type_starts_the_table_afresh(tmp_path: Path) -> None:
    write(tmp_path / "frag.toml", SCHED)
    r = write(tmp_path / "r.toml", 'include = ["frag.toml"]\n[scheduler]\ntype = "cosine"\n')
    raw = load_raw(r)
    assert raw.data["scheduler"] == {"type": "cosine"}
    assert "scheduler.min_lr" not in raw.origins
    assert load_config(r).scheduler.min_lr == 0.0


def test_defaults_and_frozen() -> None:
    cfg = load_config(GOOD / "base.toml")
    assert cfg.run.output_dir == "outputs"
    assert cfg.data.type == "tokens"
    assert cfg.tokenizer.type == "char"
    assert cfg.scheduler.type == "cosine"
    with pytest.raises(Exception):  # noqa: B017  (pydantic raises ValidationError on frozen models)
        cfg.run.seed = 3


def test_unknown_key_in_fragment_names_include_chain(tmp_path: Path) -> None:
    write(tmp_path / "frag.toml", "[training]\nmax_step = 3\n")
    r = write(tmp_path / "r.toml", 'include = ["frag.toml"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(r)
    msg = str(e.value)
    assert "frag.toml (included from" in msg
    assert "training.max_step: unknown key (did you mean 'training.max_steps'?)" in msg


def test_all_recipes_validate() -> None:
    repo = Path(__file__).resolve().parents[2]
    recipes = sorted((repo / "recipes").glob("*.toml"))
    assert len(recipes) >= 5
    for r in recipes:
        load_config(r)


def test_a_table_override_merges_into_the_recipe_table(tmp_path: Path) -> None:
    r = write(
        tmp_path / "r.toml",
        '[optimizer]\ntype = "adamw"\nlr = 1.0\nbetas = [0.8, 0.9]\n[model.extra]\na = 1\nb = 2\n',
    )
    raw = load_raw(r, ["optimizer={lr=0.5}", "model={extra={b=3}}"])
    assert raw.data["optimizer"] == {"type": "adamw", "lr": 0.5, "betas": [0.8, 0.9]}
    assert raw.data["model"] == {"extra": {"a": 1, "b": 3}}
    assert raw.origin("optimizer.lr") == raw.origin("model.extra.b") == COMMAND_LINE
    assert "r.toml" in raw.origin("optimizer.betas")
    cfg = load_config(GOOD / "base.toml", ["optimizer={lr=0.5}"])
    assert cfg.optimizer.lr == 0.5 and cfg.optimizer.betas == (0.9, 0.99)  # betas from the file
