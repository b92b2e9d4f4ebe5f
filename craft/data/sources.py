"""Named text sources: downloaded once into the cache and verified by sha256.

`resolve_source(name)` returns a local path. Lookup order:
1. `$CRAFT_DATA_MIRROR/<name>/<file>` when CRAFT_DATA_MIRROR is set (offline machines);
2. `<CRAFT_HOME>/sources/<name>/<file>` when already downloaded;
3. a download from the source's public URL (skipped when CRAFT_OFFLINE=1).
Every file is checked against the expected sha256 before it is used.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from craft.data.progress import ByteProgress
from craft.errors import DataError
from craft.fileio import exclusive_temp_file, fsync_dir, sha256_file
from craft.paths import cache_dir, sources_dir

MIRROR_ENV = "CRAFT_DATA_MIRROR"
OFFLINE_ENV = "CRAFT_OFFLINE"
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class NamedSource:
    name: str
    url: str
    sha256: str
    filename: str
    description: str


SOURCES: dict[str, NamedSource] = {
    s.name: s
    for s in [
        NamedSource(
            name="tinyshakespeare",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            filename="input.txt",
            description="40,000 lines of Shakespeare (1.1 MB), the char-rnn corpus",
        )
    ]
}


def is_source(name: str) -> bool:
    return name in SOURCES


def get_source(name: str) -> NamedSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(
            f"unknown named source {name!r}; known sources: {', '.join(sorted(SOURCES))}"
        ) from None


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0", "false", "False")


def _check(path: Path, src: NamedSource) -> None:
    digest = sha256_file(path)
    if digest != src.sha256:
        raise DataError(
            f"{path}: sha256 {digest} does not match the expected {src.sha256} of source "
            f"{src.name!r}; delete the file or fix the mirror"
        )


def resolve_source(name: str) -> Path:
    """A verified local copy of the named source (mirror, cache, or a fresh download)."""
    src = get_source(name)
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        path = Path(mirror).expanduser() / src.name / src.filename
        if not path.is_file():
            raise DataError(
                f"{MIRROR_ENV}={mirror}: {path} not found; put source {src.name!r} there or "
                f"unset {MIRROR_ENV} to download it"
            )
        _check(path, src)
        return path
    cached = sources_dir() / src.name / src.filename
    if cached.is_file():
        _check(cached, src)
        return cached
    if _offline():
        raise DataError(_offline_message(src, cached, f"{OFFLINE_ENV} is set"))
    cache_dir("sources", src.name, error=DataError)  # created private; refused if others can write
    return download(src.url, cached, src.sha256, name=src.name)


def _offline_message(src: NamedSource, cached: Path, why: str) -> str:
    return (
        f"source {src.name!r} is not cached and cannot be downloaded ({why}); either set "
        f"{MIRROR_ENV}=DIR with the file at DIR/{src.name}/{src.filename}, or download "
        f"{src.url} to {cached}"
    )


def download(url: str, dest: Path, sha256: str, name: str = "") -> Path:
    """Download `url` to `dest` through a temporary file, verify sha256, then rename into place."""
    label = name or dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = exclusive_temp_file(dest, "download")
    h = hashlib.sha256()
    try:
        with (
            os.fdopen(fd, "wb") as f,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp,
        ):
            total = resp.headers.get("Content-Length")
            with ByteProgress(f"downloading {label}", int(total) if total else None) as bar:
                while block := resp.read(1 << 16):
                    f.write(block)
                    h.update(block)
                    bar.advance(len(block))
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != sha256:
            raise DataError(
                f"download of {label} from {url}: sha256 {h.hexdigest()} does not match the "
                f"expected {sha256}"
            )
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        src = SOURCES.get(name)
        if src is not None:
            raise DataError(_offline_message(src, dest, f"download failed: {reason}")) from None
        raise DataError(f"download of {label} from {url} failed: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def describe_sources() -> list[tuple[str, str]]:
    return [(s.name, s.description) for s in SOURCES.values()]


__all__ = ["SOURCES", "NamedSource", "download", "get_source", "is_source", "resolve_source"]
