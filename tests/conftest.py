"""Test-wide settings: offline data mirror, a private CRAFT_HOME, deterministic CPU threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Subprocesses (CLI tests) import the checkout under test, whichever copy of Craft is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)
# The suite never touches the network: named sources come from the shared mirror.
os.environ.setdefault("CRAFT_DATA_MIRROR", str(SHARED_DATA))
# ... and never asks the Hugging Face Hub (a path that does not exist may read as a Hub id).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests run tiny models, for which one CPU thread is fastest; pytest-xdist runs one worker per core,
# and subprocesses (CLI tests) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS so the thread pool honours it)

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU tensors when there is no GPU.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _craft_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test session gets its own cache so tests never see a user's prepared datasets."""
    home = tmp_path_factory.getbasetemp() / "craft_home"
    home.mkdir(mode=0o700, exist_ok=True)  # private, as Craft requires of its cache
    monkeypatch.setenv("CRAFT_HOME", str(home))


@pytest.fixture
def shakespeare() -> Path:
    path = Path(os.environ["CRAFT_DATA_MIRROR"]) / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"tinyshakespeare mirror not found at {path}")
    return path
