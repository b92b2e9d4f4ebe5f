"""`training.precision = "auto"`: the rule, the CPU feature detection, and what a run records."""

from __future__ import annotations

from pathlib import Path

import pytest

from craft.config import load_config, to_toml
from craft.training import precision as P

AMX = frozenset({"fpu", "avx512f", "amx_tile", "amx_bf16"})
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})
PLAIN_AVX512 = frozenset({"fpu", "avx2", "avx512f"})


@pytest.mark.parametrize(
    ("device", "width", "cuda_bf16", "flags", "expected"),
    [
        ("cuda", 128, True, PLAIN_AVX512, "bf16"),  # CUDA with bf16: any width
        ("cuda", 4096, False, AMX, "no"),  # pre-Ampere: fp16 stays opt-in
        ("cpu", 384, False, AMX, "bf16"),
        ("cpu", P.CPU_BF16_MIN_WIDTH, False, AVX512_BF16, "bf16"),  # the threshold itself
        ("cpu", P.CPU_BF16_MIN_WIDTH - 1, False, AMX, "no"),  # too narrow to gain
        ("cpu", None, False, AMX, "no"),  # width unknown (not a GPT): no guess
        ("cpu", 4096, False, PLAIN_AVX512, "no"),  # bf16 emulated through fp32: never pays
        ("cpu", 4096, False, frozenset(), "no"),  # no /proc/cpuinfo
        ("mps", 4096, False, AMX, "no"),  # not measured there
    ],
)
def test_auto_rule(device, width, cuda_bf16, flags, expected) -> None:
    choice = P.resolve_precision(device, width, cuda_bf16=cuda_bf16, flags=flags)
    assert choice.precision == expected
    assert choice.reason  # always says why


def test_cpu_flags_read_from_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\n")
    real = Path

    def fake_path(p: str) -> Path:
        return info if p == "/proc/cpuinfo" else real(p)

    monkeypatch.setattr(P, "Path", fake_path)
    assert P.cpu_bf16_features() == ["amx_bf16"]
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert P.cpu_bf16_features() == []


@pytest.mark.parametrize("explicit", ["no", "fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(explicit: str) -> None:
    cfg = load_config("recipes/char_small.toml", [f"training.precision={explicit}"])
    out, choice = P.apply_auto_precision(cfg)
    assert choice is None and out is cfg and out.training.precision == explicit
    assert P.accelerate_precision(explicit) == ("no" if explicit == "fp32" else explicit)


def test_auto_is_the_default_and_resolves_per_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("recipes/char_gpt.toml", ["run.cpu=true"])  # 384 wide
    assert cfg.training.precision == "auto"
    monkeypatch.setattr(P, "cpu_flags", lambda: AMX)
    out, choice = P.apply_auto_precision(cfg)
    assert out.training.precision == "bf16" and "amx_bf16" in choice.reason
    assert 'precision_auto = "CPU with amx_bf16' in to_toml(out)
    monkeypatch.setattr(P, "cpu_flags", lambda: PLAIN_AVX512)
    out, choice = P.apply_auto_precision(cfg)
    assert out.training.precision == "no" and "without native bf16" in choice.reason
