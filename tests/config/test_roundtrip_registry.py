"""`config show` round trip, the JSON schema, registry rules and plugins."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from craft.config import build_schema, from_dict, load_config, registry, to_dict, to_toml
from tests.config.test_bad_configs import run_cli

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_show_round_trip(recipe: Path, tmp_path: Path) -> None:
    cfg = load_config(
        recipe, ["run.seed=5", "model.vocab_size=99"] if "rnn" not in recipe.name else []
    )
    out = tmp_path / "resolved.toml"
    out.write_text(to_toml(cfg))
    again = load_config(out)
    assert again == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_show_cli_round_trip(tmp_path: Path) -> None:
    res = run_cli(
        "config", "show", "recipes/char_small.toml", "training.max_steps=77", "run.name=x"
    )
    assert res.returncode == 0, res.stderr
    out = tmp_path / "shown.toml"
    out.write_text(res.stdout)
    assert load_config(out) == load_config(
        REPO / "recipes/char_small.toml", ["training.max_steps=77", "run.name=x"]
    )


def test_schema_cli_is_json_schema() -> None:
    res = run_cli("config", "schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    props = schema["properties"]
    for section in (
        "run",
        "model",
        "data",
        "tokenizer",
        "optimizer",
        "scheduler",
        "training",
        "eval",
        "checkpoint",
        "logging",
        "kernels",
    ):
        assert section in props
    assert schema.get("additionalProperties") is False
    text = json.dumps(schema)
    assert "Peak learning rate." in text  # field descriptions reach editors


def test_every_field_is_documented() -> None:
    def walk(cls: type[BaseModel]) -> None:
        for name, f in cls.model_fields.items():
            if name == "type":
                continue
            assert f.description, f"{cls.__name__}.{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann)

    from craft.config.schema import FIXED_SECTIONS

    for cls in FIXED_SECTIONS.values():
        walk(cls)
    for kind in ("model", "data", "tokenizer", "optimizer", "scheduler"):
        for comp in registry.components(kind):
            if comp.config_cls is not None and comp.config_cls.__module__.startswith("craft."):
                walk(comp.config_cls)


def test_registry_refuses_duplicates() -> None:
    class DupConfig(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        type: str = "gpt"

    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register("model", "gpt", config=DupConfig, builder=lambda c, v: None)


def test_registry_checks_type_tag() -> None:
    class Untagged(BaseModel):
        x: int = 1

    with pytest.raises(registry.RegistryError, match="needs a field"):
        registry.register("model", "untagged_model", config=Untagged, builder=lambda c, v: None)
    assert "untagged_model" not in registry.names("model")


def test_builtin_builders_resolve() -> None:
    """Every built-in registration points at a real builder (catches a renamed function)."""
    missing = []
    for kind in ("model", "data", "tokenizer", "optimizer", "scheduler"):
        for comp in registry.components(kind):
            try:
                comp.build_fn()
            except (ImportError, AttributeError) as e:
                missing.append(f"{kind}:{comp.name}: {e}")
    assert not missing, missing


def test_plugin_model_validates_and_builds() -> None:
    cfg = load_config(REPO / "tests/config/plugins/bigram.toml")
    assert cfg.model.type == "bigram"
    assert cfg.model.block_size == 8
    assert cfg.imports == ["tests.config.plugins.bigram_plugin"]
    model = registry.build("model", cfg.model, 11)
    assert model.table.num_embeddings == 11
    assert "bigram" in registry.names("model")
    # The resolved config keeps its imports, so it loads again in a fresh process.
    assert "tests.config.plugins.bigram_plugin" in to_toml(cfg)


def test_plugin_cli_validation_and_errors(tmp_path: Path) -> None:
    res = run_cli("config", "show", "tests/config/plugins/bigram.toml", "model.block_size=4")
    assert res.returncode == 0, res.stderr
    assert 'type = "bigram"' in res.stdout
    res = run_cli("config", "validate", "tests/config/plugins/bigram.toml", "model.n_head=2")
    assert res.returncode == 2
    assert "model.n_head: unknown key for model type 'bigram'" in res.stderr
    # Without the import the type is unknown, and the message lists what is registered.
    res = run_cli("config", "validate", "recipes/micro.toml", "model.type=bigram")
    assert res.returncode == 2
    assert "unknown model type" in res.stderr


def test_config_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, craft.config as c; c.load_config('recipes/char_small.toml'); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_schema_includes_registered_types() -> None:
    schema = build_schema().model_json_schema()
    text = json.dumps(schema)
    for name in ("gpt", "rnn", "adamw", "cosine", "wsd", "sentencepiece", "random"):
        assert f'"{name}"' in text
