"""The guards of craft/safety.py on their own: paths, bounded reads, printing, private caches."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from craft.errors import CraftError, DataError
from craft.paths import cache_dir
from craft.safety import (
    _private_group,
    check_output_location,
    inside,
    owned_entries,
    printable,
    private_dir,
    read_bytes_bounded,
    read_json_bounded,
    remove_owned,
    staging_dir,
)
from tests.security._helpers import Canary


@pytest.mark.parametrize(
    "rel, why",
    [
        ("/etc/passwd", "absolute"),
        ("../outside.txt", "leaves its directory"),
        ("a/../../outside.txt", "leaves its directory"),
        ("~/x", "absolute"),
        ("C:\\x", "absolute"),
        ("", "not a file name"),
        (7, "not a file name"),
        ("a\x00b", "not a file name"),
    ],
)
def test_inside_refuses_names_that_leave_the_directory(tmp_path: Path, rel: object, why: str):
    with pytest.raises(DataError, match=why):
        inside(tmp_path, rel, what="meta.json", error=DataError)


def test_inside_follows_symlinks_only_within(tmp_path: Path) -> None:
    base, outside = tmp_path / "base", tmp_path / "outside"
    (base / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("x")
    (base / "sub" / "f").write_text("y")
    (base / "in_link").symlink_to(base / "sub")
    (base / "out_link").symlink_to(outside)
    (base / "out_file").symlink_to(outside / "secret")
    assert inside(base, "in_link/f", what="x") == base / "in_link" / "f"
    assert inside(base, "sub/f", what="x") == base / "sub" / "f"
    for rel in ("out_link/secret", "out_file"):
        with pytest.raises(CraftError, match="points outside"):
            inside(base, rel, what="x")


def test_bounded_read_refuses_fifo_device_and_oversized_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block forever without O_NONBLOCK
    with pytest.raises(CraftError, match="is a FIFO"):
        read_bytes_bounded(fifo, 100, what="x")
    with pytest.raises(CraftError, match="is a device"):
        read_bytes_bounded(Path("/dev/zero"), 100, what="x")
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(8 << 30)  # 8 GiB of nothing: refused by its size, never read
    with pytest.raises(CraftError, match="more than"):
        read_bytes_bounded(sparse, 1 << 20, what="x")
    with pytest.raises(CraftError, match="is a directory"):
        read_bytes_bounded(tmp_path, 100, what="x")
    small = tmp_path / "small"
    small.write_bytes(b"0123")
    assert read_bytes_bounded(small, 4, what="x") == b"0123"
    with pytest.raises(CraftError, match="more than"):
        read_bytes_bounded(small, 3, what="x")


def test_json_nesting_is_an_error_not_a_recursion_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CraftError, match="not valid JSON"):
        read_json_bounded(deep, what="deep.json")


def test_printable_escapes_terminal_controls() -> None:
    evil = "name\x1b]0;owned\x07\x1b]52;c;ZXZpbA==\x07\x9b2J\u202eok\r"
    shown = printable(evil, newlines=False)
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in shown)
    assert "\u202e" not in shown
    assert shown.startswith("name\\x1b]0;owned\\x07")
    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable("a\nb", newlines=False) == "a\\x0ab"


def test_private_dir_refuses_what_others_can_write(tmp_path: Path, monkeypatch) -> None:
    made = private_dir(tmp_path / "a" / "b", what="cache")
    assert stat.S_IMODE(made.stat().st_mode) & 0o077 == 0
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(CraftError, match="can be written by other users"):
        private_dir(shared, what="cache")
    os.chmod(shared, 0o775)
    if _private_group(os.getgid()):  # umask 002 with a user-private group: nobody else writes
        private_dir(shared, what="cache")
    if hasattr(os, "chown") and os.getuid() == 0:
        os.chown(shared, -1, 65534)  # a group other users are in
        with pytest.raises(CraftError, match="chmod go-w"):
            private_dir(shared, what="cache")
        os.chown(shared, -1, os.getgid())
    # CRAFT_HOME itself and every level below it are checked
    os.chmod(shared, 0o777)
    monkeypatch.setenv("CRAFT_HOME", str(shared))
    with pytest.raises(DataError, match="other users"):
        cache_dir("datasets", error=DataError)
    os.chmod(shared, 0o755)
    planted = shared / "torch_extensions"
    planted.mkdir()
    os.chmod(planted, 0o777)
    with pytest.raises(CraftError, match="other users"):
        cache_dir("torch_extensions", "craft_norm_0123")
    assert not (planted / "craft_norm_0123").exists()


def test_staging_dirs_are_unpredictable_and_exclusive(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / ".out.training-").symlink_to(victim)
    a, b = staging_dir(tmp_path, ".out.training-"), staging_dir(tmp_path, ".out.training-")
    assert a != b and not a.is_symlink() and a.parent == tmp_path
    assert list(victim.iterdir()) == []


def test_output_location_rules(tmp_path: Path, monkeypatch) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    corpus = project / "corpus.txt"
    corpus.write_text("text")
    monkeypatch.chdir(project / "src")
    for out in (project / "src", project, tmp_path):  # the working directory or a parent of it
        with pytest.raises(CraftError, match="working directory"):
            check_output_location(out, option="-o")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for out in (project, project / "src" / ".."):
        with pytest.raises(CraftError, match="holds the input"):
            check_output_location(out, option="-o", inputs=[corpus])
    link = tmp_path / "link"
    link.symlink_to(project)
    with pytest.raises(CraftError, match="symbolic link"):
        check_output_location(link, option="-o")
    check_output_location(tmp_path / "fresh", option="-o", inputs=[corpus])  # fine


def test_owned_entries_and_remove_owned(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("1")
    (d / "b").write_text("2")
    assert owned_entries(d, {"a", "b", "c"}, option="-o", what="x") == ["a", "b"]
    (d / "notes.txt").write_text("mine")
    with pytest.raises(CraftError, match=r"did not write \(notes.txt\)"):
        owned_entries(d, {"a", "b"}, option="-o", what="x")
    (d / "notes.txt").unlink()
    (d / "c").mkdir()
    with pytest.raises(CraftError, match="is a directory"):
        owned_entries(d, {"a", "b", "c"}, option="-o", what="x")
    (d / "c").rmdir()
    canary = Canary(tmp_path / "outside.txt")
    (d / "c").symlink_to(canary.path)
    with pytest.raises(CraftError, match="symlink"):
        owned_entries(d, {"a", "b", "c"}, option="-o", what="x")
    (d / "c").unlink()
    (d / "late.txt").write_text("appeared meanwhile")
    assert remove_owned(d, ["a", "b"]) is False  # the stranger's file and the directory stay
    assert sorted(p.name for p in d.iterdir()) == ["late.txt"]
    assert canary.untouched()
