"""Named sources: mirror, cache, download with sha256 check, and the offline error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from craft.data import sources
from craft.data.sources import download, resolve_source
from craft.errors import DataError


def test_mirror_is_used_and_verified(shakespeare: Path) -> None:
    assert resolve_source("tinyshakespeare") == shakespeare


def test_mirror_without_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CRAFT_DATA_MIRROR", str(tmp_path))
    with pytest.raises(DataError, match=r"tinyshakespeare/input\.txt not found"):
        resolve_source("tinyshakespeare")


def test_mirror_with_wrong_content(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("not shakespeare")
    monkeypatch.setenv("CRAFT_DATA_MIRROR", str(tmp_path))
    with pytest.raises(DataError, match="does not match the expected 86c4e6aa"):
        resolve_source("tinyshakespeare")


def test_unknown_source() -> None:
    with pytest.raises(
        DataError, match="unknown named source 'nope'; known sources: tinyshakespeare"
    ):
        resolve_source("nope")


def test_offline_without_mirror_names_both_ways_out(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CRAFT_DATA_MIRROR")
    monkeypatch.setenv("CRAFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CRAFT_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        resolve_source("tinyshakespeare")
    msg = e.value.message
    assert "CRAFT_DATA_MIRROR=DIR" in msg and "DIR/tinyshakespeare/input.txt" in msg
    assert str(tmp_path / "home" / "sources" / "tinyshakespeare" / "input.txt") in msg


def test_download_into_cache_and_reuse(tmp_path: Path, monkeypatch, shakespeare: Path) -> None:
    """A file:// URL exercises the real download path (temp file, sha256, rename) offline."""
    monkeypatch.delenv("CRAFT_DATA_MIRROR")
    monkeypatch.setenv("CRAFT_HOME", str(tmp_path / "home"))
    src = sources.SOURCES["tinyshakespeare"]
    monkeypatch.setitem(
        sources.SOURCES,
        "tinyshakespeare",
        sources.NamedSource(src.name, shakespeare.as_uri(), src.sha256, src.filename, ""),
    )
    path = resolve_source("tinyshakespeare")
    assert path == tmp_path / "home" / "sources" / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == shakespeare.read_bytes()
    monkeypatch.setenv("CRAFT_OFFLINE", "1")  # cached now: no network needed
    assert resolve_source("tinyshakespeare") == path


def test_download_checks_sha256_and_leaves_nothing(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("payload")
    dest = tmp_path / "cache" / "file.txt"
    with pytest.raises(DataError, match="does not match the expected"):
        download(f.as_uri(), dest, "0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    good = hashlib.sha256(b"payload").hexdigest()
    assert download(f.as_uri(), dest, good).read_text() == "payload"


def test_download_failure_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="failed"):
        download((tmp_path / "absent").as_uri(), tmp_path / "x", "0" * 64)
