"""Backend choice: once per model and input signature, logged once, no process-wide switch.

Every op call used to sort the backends and run their `supports` checks (~20 times per forward of
a small GPT). A model now holds a `craft.ops.Kernels` table: the first call with a new input
signature resolves the backend, later calls go straight to it, and two models in one process can
use different backends.
"""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch

import craft.ops as ops
from craft.config.components import GPTConfig
from craft.errors import KernelError
from craft.models.gpt import GPT
from craft.ops.registry import backends

CFG = GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=8, mlp_hidden=32)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 13, (2, 8), generator=g), torch.randint(0, 13, (2, 8), generator=g)


@pytest.fixture
def resolve_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every slow-path resolution (the sort and the `supports` checks) made through craft.ops."""
    calls: list[str] = []
    real = ops.resolve

    def counting(op: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(op)
        return real(op, *args, **kwargs)

    monkeypatch.setattr(ops, "resolve", counting)
    return calls


def test_backends_are_resolved_once_per_signature_not_per_call(resolve_calls: list[str]) -> None:
    torch.manual_seed(0)
    model = GPT(CFG, 13, kernels={})  # its own table: every op on auto, nothing resolved yet
    x, y = _batch()
    model(x, y)[1].backward()
    first = len(resolve_calls)
    assert sorted(set(resolve_calls)) == ["attention", "cross_entropy", "norm"]
    assert first <= 4  # attention, the norm with and without a residual, the loss
    for seed in range(3):
        x, y = _batch(seed)
        model(x, y)[1].backward()
    assert len(resolve_calls) == first, "later forwards must not resolve backends again"
    model.double()(*_batch())  # a new signature (float64) is resolved once more
    assert len(resolve_calls) > first


def test_two_models_in_one_process_use_their_own_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran: list[str] = []
    for name in ("eager", "torch"):
        b = backends("attention")[name]

        def spy(*args, _fn=b.fn, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            ran.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(b, "fn", spy)
    torch.manual_seed(0)
    a = GPT(CFG, 13, kernels={"attention": "eager"})
    torch.manual_seed(0)
    b = GPT(CFG, 13, kernels={"attention": "torch"})
    x, y = _batch()
    with torch.no_grad():
        for model, want in ((a, "eager"), (b, "torch"), (a, "eager")):
            ran.clear()
            model(x, y)
            assert ran == [want] * CFG.n_layer
        # the process default (module-level functions, models built without a table) is apart
        with ops.use_backends(attention="eager"):
            ran.clear()
            b(x, y)
            assert ran == ["torch"] * CFG.n_layer
        torch.testing.assert_close(a(x, y)[1], b(x, y)[1], atol=1e-5, rtol=1e-5)


def test_choice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = GPT(CFG, 13, kernels={"cross_entropy": "eager"})
    x, y = _batch()
    with caplog.at_level(logging.INFO, logger="craft.ops"):
        model(x, y)
        model(x, y)
    lines = [r.getMessage() for r in caplog.records if r.name == "craft.ops"]
    assert sum("ops.cross_entropy: selected backend 'eager'" in m for m in lines) <= 1
    assert all(lines.count(m) == 1 for m in lines), lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="craft.ops"):
        GPT(CFG, 13, kernels={"cross_entropy": "eager"})(x, y)  # a second model: nothing new
    assert not [r for r in caplog.records if r.name == "craft.ops"]


def test_models_without_a_table_follow_the_process_default() -> None:
    torch.manual_seed(0)
    model = GPT(CFG, 13)
    assert model.kernels is ops.DEFAULT
    x, y = _batch()
    with torch.no_grad(), ops.use_backends(attention="eager", norm="eager"):
        eager_loss = model(x, y)[1]
    with torch.no_grad():
        torch.testing.assert_close(model(x, y)[1], eager_loss, atol=1e-5, rtol=1e-5)
    assert ops.selected("attention") == "auto"


def test_bad_names_and_unrunnable_selections_are_kernel_errors() -> None:
    with pytest.raises(KernelError, match="no such backend"):
        ops.Kernels({"norm": "nope"})
    table = ops.Kernels(norm="cuda")
    with pytest.raises(KernelError, match=r"kernels\.norm = 'cuda' cannot run"):
        table.norm(torch.randn(2, 8), torch.ones(8))


def test_copies_share_the_table_and_pickles_rebuild_it() -> None:
    model = GPT(CFG, 13, kernels={"attention": "eager"})
    assert copy.deepcopy(model).kernels is model.kernels
    table = pickle.loads(pickle.dumps(model.kernels))
    assert table.names == model.kernels.names and table is not model.kernels


def test_auto_is_described_as_an_order_of_preference() -> None:
    text = ops.describe_auto()
    assert "order of preference" in text and "fastest" not in text
    assert text.index("triton") < text.index("cuda") < text.index("torch") < text.index("eager")
