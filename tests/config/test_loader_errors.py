"""The recipe loader in-process: what each bad file or override says (file, key, value), text
encodings, nesting limits, imports, exclusive keys and provenance. (tests/config/test_bad_configs.py
checks the same through the CLI's exit code and output.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from craft.config import load_raw, parse_override
from craft.config.loader import (
    COMMAND_LINE,
    MAX_DEPTH,
    RawConfig,
    apply_overrides,
    deep_merge,
    display_path,
)
from craft.errors import ConfigError


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def error(path: Path | str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_raw(path, overrides or [])
    return e.value.message


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_display_path_is_relative_below_the_working_directory(here: Path) -> None:
    assert display_path(here / "a" / "r.toml") == os.path.join("a", "r.toml")
    outside = here.parent / "elsewhere.toml"
    assert display_path(outside) == str(outside)


def test_origin_of_a_key_its_table_or_its_leaves() -> None:
    raw = RawConfig(origins={"model.n_layer": "r.toml", "optimizer": "cli", "run.a.b": "f.toml"})
    assert raw.origin("model.n_layer") == "r.toml"
    assert raw.origin("optimizer.lr") == "cli"  # set as a whole table
    assert raw.origin("run") == raw.origin("run.a") == "f.toml"  # a leaf below
    assert raw.origin("model.n_head") == raw.origin("training") == "default"


def test_a_utf8_byte_order_mark_is_accepted(here: Path) -> None:
    r = write(here / "r.toml", b"\xef\xbb\xbf[run]\nname = 'bom'\n")
    assert load_raw(r).data == {"run": {"name": "bom"}}


def test_utf16_and_other_non_utf8_files_are_named(here: Path) -> None:
    r = write(here / "r.toml", "[run]\nname = 'x'\n".encode("utf-16"))
    assert error(r) == (
        "r.toml: not UTF-8 text (byte 0); it starts with a UTF-16 byte order mark, save it as UTF-8"
    )
    r = write(here / "l.toml", b"[run]\nname = '\xe9'\n")  # Latin-1
    assert error(r) == "l.toml: not UTF-8 text (byte 14)"
    r = write(here / "x.toml", b"\xfe[run]\n")  # not a BOM: no hint
    assert error(r) == "x.toml: not UTF-8 text (byte 0)"


def test_a_syntax_error_names_file_line_and_column(here: Path) -> None:
    r = write(here / "r.toml", "[run]\nname = 'ok'\nseed = = 3\n")
    msg = error(r)
    assert msg.startswith("r.toml:3:8: TOML syntax error at line 3, column 8: ")
    assert "(at line" not in msg


def test_nesting_is_limited_in_files_and_overrides(here: Path) -> None:
    ok = write(here / "ok.toml", "a = " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")
    assert load_raw(ok).data["a"]  # exactly the limit
    n = MAX_DEPTH + 1
    deep = write(here / "deep.toml", "a = " + "[" * n + "]" * n + "\n")
    assert error(deep) == f"deep.toml: nested more than {MAX_DEPTH} levels deep"
    ok_value = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_override(f"run.x={ok_value}")[0] == "run.x"
    value = "[" * n + "]" * n
    with pytest.raises(ConfigError) as e:
        parse_override(f"run.x={value}")
    text = f"run.x={value}"
    assert e.value.message == (
        f"command line: override {text[:40]!r}: nested more than {MAX_DEPTH} levels deep"
    )


def test_include_and_imports_take_a_string_or_a_list_of_strings(here: Path) -> None:
    write(here / "frag.toml", "imports = 'pkg_a'\n[run]\nseed = 3\n")
    r = write(here / "r.toml", "include = 'frag.toml'\nimports = ['pkg_b', 'pkg_a']\n")
    raw = load_raw(r)
    assert raw.data == {"run": {"seed": 3}}
    assert raw.imports == ["pkg_a", "pkg_b"]  # the include's first, each once
    assert raw.import_origins["pkg_a"] == "frag.toml (included from r.toml)"
    assert raw.import_origins["pkg_b"] == "r.toml"
    apply_overrides(raw, ["imports=['pkg_c', 'pkg_a']"])
    assert raw.imports == ["pkg_a", "pkg_b", "pkg_c"]
    assert raw.import_origins["pkg_c"] == COMMAND_LINE
    assert raw.import_origins["pkg_a"] == "frag.toml (included from r.toml)"
    assert "imports" not in raw.data
    bad = write(here / "bad.toml", "include = 3\n")
    assert error(bad) == "bad.toml: include = 3: expected a list of strings"
    bad = write(here / "bad2.toml", "imports = ['a', 2]\n")
    assert error(bad) == "bad2.toml: imports = ['a', 2]: expected a list of strings"


def test_a_missing_include_names_the_file_and_where_it_looked(here: Path) -> None:
    r = write(here / "sub" / "r.toml", "include = ['frag.toml']\n")
    assert error(r) == (
        f"sub/r.toml: include 'frag.toml' not found (looked for {os.path.join('sub', 'frag.toml')})"
    )
    frag = write(here.parent / f"{here.name}-abs.toml", "[run]\nseed = 9\n")
    r = write(here / "abs.toml", f"include = ['{frag}']\n")  # absolute: used as it is
    assert load_raw(r).data == {"run": {"seed": 9}}


def test_an_error_in_an_included_file_names_the_include_chain(here: Path) -> None:
    write(here / "c.toml", "x = = 1\n")
    write(here / "b.toml", "include = ['c.toml']\n")
    r = write(here / "a.toml", "include = ['b.toml']\n")
    assert error(r).startswith(
        "c.toml (included from b.toml) (included from a.toml):1:5: TOML syntax error"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("run.name", "command line: override 'run.name' is not of the form key=value"),
        ("run..name=x", "command line: override 'run..name=x': 'run..name' is not a dotted key"),
        ("1run=x", "command line: override '1run=x': '1run' is not a dotted key"),
        ("run.tags=[1, ", "command line: override 'run.tags=[1, ': value '[1,' is not valid TOML"),
        ("run.name='x", 'command line: override "run.name=\'x": value "\'x" is not valid TOML'),
    ],
)
def test_bad_overrides_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_override(text)
    assert e.value.message == message


def test_override_keys_and_values_are_trimmed() -> None:
    assert parse_override(" +run.seed = 3 ") == ("run.seed", 3)
    assert parse_override("run.name= a b ") == ("run.name", "a b")
    assert parse_override("X_plugin.XX=1") == ("X_plugin.XX", 1)  # only a leading "+" goes
    assert parse_override("run.name=Xavier") == ("run.name", "Xavier")  # a bare word: a string


def test_an_override_below_a_value_is_an_error(here: Path) -> None:
    r = write(here / "r.toml", "[run]\nname = 'x'\n")
    assert error(r, ["run.name.first=y"]) == (
        "command line: override 'run.name.first=y': run.name is a value, not a table"
    )
    raw = load_raw(r, ["seed=3", "extra.deep.key=1"])  # new top-level keys and tables
    assert raw.data["seed"] == 3 and raw.data["extra"] == {"deep": {"key": 1}}
    assert raw.origins["seed"] == raw.origins["extra.deep.key"] == COMMAND_LINE


def test_an_override_of_an_exclusive_key_replaces_the_files_other_one(here: Path) -> None:
    r = write(here / "r.toml", "[eval]\nbatches = 4\ninterval = 10\n")
    raw = load_raw(r, ["eval.windows=8"])
    assert raw.data["eval"] == {"interval": 10, "windows": 8}
    assert "eval.batches" not in raw.origins
    raw = load_raw(r, ["eval.batches=2"])  # the same key: simply replaced
    assert raw.data["eval"] == {"batches": 2, "interval": 10}
    # both on the command line: both stay (validation says they conflict)
    raw = load_raw(r, ["eval.batches=2", "eval.windows=8"])
    assert raw.data["eval"] == {"batches": 2, "interval": 10, "windows": 8}
    w = write(here / "w.toml", "[eval]\nwindows = 4\n")
    assert load_raw(w, ["eval.batches=3"]).data["eval"] == {"batches": 3}


def test_merging_replaces_and_copies_with_provenance() -> None:
    base: dict = {"opt": {"lr": 1.0, "sched": {"a": 1}}, "x": 1}
    origins = {"opt.lr": "f", "opt.sched.a": "f", "x": "f"}
    over = {"opt": {"sched": 5}, "x": {"y": {"z": [1]}}, "e": {}}
    deep_merge(base, over, origins, "o")
    assert base == {"opt": {"lr": 1.0, "sched": 5}, "x": {"y": {"z": [1]}}, "e": {}}
    assert origins == {"opt.lr": "f", "opt.sched": "o", "x.y.z": "o", "e": "o"}
    over["x"]["y"]["z"].append(2)  # the merged data is a copy: later changes do not leak in
    assert base["x"]["y"]["z"] == [1]
    # per-key origins (a file's) and a prefix
    table: dict = {"lr": 1.0}
    origins = {}
    deep_merge(table, {"lr": 2.0, "b": {"c": 1}}, origins, {"p.lr": "g", "p.b.c": "h"}, "p.")
    assert table == {"lr": 2.0, "b": {"c": 1}} and origins == {"p.lr": "g", "p.b.c": "h"}


def test_a_type_switch_warning_names_the_old_type_and_where_keys_were_set(
    here: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(here / "f.toml", "[scheduler]\ntype = 'wsd'\nmin_lr = 0.1\n")
    r = write(here / "r.toml", "include = ['f.toml']\n[scheduler]\nwarmup_steps = 3\n")
    with caplog.at_level(logging.WARNING, logger="craft.config"):
        raw = load_raw(r, ["scheduler.type=cosine"])
    assert raw.data["scheduler"] == {"type": "cosine"}
    (record,) = caplog.records
    assert record.getMessage() == (
        "command line: scheduler.type = 'cosine' replaces 'wsd' (f.toml (included from r.toml)), "
        "so the keys set for the old type are dropped: scheduler.min_lr (set in f.toml (included "
        "from r.toml)); scheduler.warmup_steps (set in r.toml)"
    )


def test_a_big_endian_utf16_file_gets_the_hint_too(here: Path) -> None:
    r = write(here / "be.toml", b"\xfe\xff" + "[run]\n".encode("utf-16-be"))
    assert error(r) == (
        "be.toml: not UTF-8 text (byte 0); it starts with a UTF-16 byte order mark, save it as UTF-8"
    )


def test_a_recipe_over_the_size_limit_is_refused_naming_it(here: Path) -> None:
    from craft.safety import MAX_TOML_BYTES

    r = here / "big.toml"
    with open(r, "wb") as f:
        f.truncate(MAX_TOML_BYTES + 1)  # sparse: nothing is written
    assert error(r).startswith("big.toml: is ")


def test_a_syntax_error_keeps_the_parsers_reason_without_its_position(here: Path) -> None:
    r = write(here / "r.toml", "[run]\nseed = = 3\n")
    assert error(r) == "r.toml:2:8: TOML syntax error at line 2, column 8: Invalid value"


def test_imports_of_every_include_are_kept(here: Path) -> None:
    write(here / "f1.toml", "imports = ['pkg_a']\n")
    write(here / "f2.toml", "imports = ['pkg_b']\n")
    r = write(here / "r.toml", "include = ['f1.toml', 'f2.toml']\n")
    raw = load_raw(r)
    assert raw.imports == ["pkg_a", "pkg_b"]
    assert raw.recipe_dir == here.resolve()  # where imports are also looked for


def test_a_bad_imports_override_names_the_key_and_the_command_line(here: Path) -> None:
    r = write(here / "r.toml", "[run]\nseed = 1\n")
    assert error(r, ["imports=5"]) == "command line: imports = 5: expected a list of strings"


def test_a_type_switch_between_included_files_names_the_file_that_switched(
    here: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(here / "f1.toml", "[scheduler]\ntype = 'wsd'\nmin_lr = 0.1\n")
    write(here / "f2.toml", "[scheduler]\ntype = 'cosine'\n")
    r = write(here / "r.toml", "include = ['f1.toml', 'f2.toml']\n")
    with caplog.at_level(logging.WARNING, logger="craft.config"):
        raw = load_raw(r)
    assert raw.data["scheduler"] == {"type": "cosine"}
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "f2.toml (included from r.toml): scheduler.type = 'cosine' replaces 'wsd'"
    )
