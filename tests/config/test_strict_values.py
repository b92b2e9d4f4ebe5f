"""Values a recipe may not take: wrong types, non-finite numbers, paths in names, unknown
callbacks, bad plugin imports, and keys that say the same thing twice. Each is a ConfigError
naming where it was set."""

from __future__ import annotations

from pathlib import Path

import pytest

from craft.config import from_dict, load_config
from craft.errors import ConfigError
from tests.conftest import REPO

MICRO = REPO / "recipes" / "micro.toml"


def _error(*overrides: str, recipe: Path = MICRO) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, list(overrides))
    return info.value.message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_steps=true", "training.max_steps = true: expected a valid integer"),
        ("training.batch_size=4.0", "training.batch_size = 4.0: expected a valid integer"),
        ('training.max_steps="5"', 'training.max_steps = "5": expected a valid integer'),
        ("run.deterministic=1", "run.deterministic = 1: expected a valid boolean"),
        ("optimizer.lr=true", "optimizer.lr = true: expected a valid number"),
        ("optimizer.lr=inf", "optimizer.lr = Infinity: expected a finite number"),
        ("optimizer.betas=[nan, 0.9]", "optimizer.betas.0 = NaN: expected a finite number"),
        ("optimizer.betas=[0.9, 1.5]", "optimizer.betas: each beta must be in [0, 1)"),
        ("run.seed=18446744073709551616", "run.seed = 18446744073709551616: expected less than"),
    ],
)
def test_numbers_and_booleans_keep_their_type(override: str, message: str) -> None:
    assert f"command line: {message}" in _error(override)


def test_an_int_is_still_a_valid_float() -> None:
    assert load_config(MICRO, ["optimizer.lr=1"]).optimizer.lr == 1.0


@pytest.mark.parametrize("name", ["../../../tmp/x", "/tmp/x", "a/b", "..", ".", "a\\b"])
def test_run_name_is_one_path_component(name: str) -> None:
    assert "is not a single directory name" in _error(f"run.name='{name}'")


def test_unknown_callback_is_a_config_error_and_plugin_callbacks_validate() -> None:
    msg = _error("training.callbacks=['nope']")
    assert "training.callbacks: unknown callback 'nope'" in msg and "metrics_jsonl" in msg
    cfg = load_config(
        MICRO, ["imports=['tests.training.plugins']", "training.callbacks=['test_sleep']"]
    )
    assert cfg.training.callbacks == ["test_sleep"]


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("tests.config.plugins.raising_plugin", "failed while being imported: RuntimeError: this"),
        ("../evil.py", "'../evil.py' is not a module name"),
        ("", "'' is not a module name"),
        ("no_such_module_anywhere", "cannot import module 'no_such_module_anywhere'"),
    ],
)
def test_bad_imports_name_the_file_that_lists_them(
    tmp_path: Path, module: str, message: str
) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'include = ["{MICRO}"]\nimports = ["{module}"]\n')
    msg = _error(recipe=recipe)
    assert msg.startswith(f"{recipe}: imports: ") and message in msg, msg
    msg = _error(f"imports=['{module}']")
    assert msg.startswith("command line: imports: ") and message in msg, msg


def test_stored_config_with_malformed_imports_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="imports = 5: expected a list of strings"):
        from_dict({"imports": 5}, label="ck/config.toml")


def test_utf8_bom_is_accepted_and_utf16_is_named(tmp_path: Path) -> None:
    text = f'include = ["{MICRO}"]\n[training]\nmax_steps = 7\n'
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_config(bom).training.max_steps == 7
    utf16 = tmp_path / "utf16.toml"
    utf16.write_bytes(text.encode("utf-16"))
    assert "UTF-16 byte order mark" in _error(recipe=utf16)


def test_eval_windows_replace_the_deprecated_batches(tmp_path: Path) -> None:
    # micro.toml sets eval.windows; an override of the old key replaces it, and vice versa.
    cfg = load_config(MICRO, ["eval.batches=2"])
    assert (cfg.eval.batches, cfg.eval.windows) == (2, None)
    old = tmp_path / "old.toml"
    old.write_text(f'include = ["{MICRO}"]\n[eval]\nbatches = 3\n')
    assert "set eval.windows or the deprecated eval.batches, not both" in _error(recipe=old)
    assert load_config(old, ["eval.windows=9"]).eval.windows == 9
    assert "not both" in _error("eval.windows=4", "eval.batches=2")
