"""Choosing the native kernels' ISA level from the CPU's flags and INFERA_CPU_ISA."""
from __future__ import annotations

import platform

import pytest

from infera import kernels
from infera.config import EngineConfig

AVX2_ONLY = frozenset("fpu sse2 avx avx2 fma f16c bmi2".split())  # a Zen 3's flags, in short


@pytest.fixture
def zen3(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("INFERA_CPU_ISA", raising=False)


def test_levels_follow_the_flags(zen3, monkeypatch):
    assert kernels.supported_levels() == ["none", "avx2"]
    assert kernels.cpu_isa() == "avx2" and not kernels.has_bf16_arithmetic()
    assert str(EngineConfig(device="cpu").torch_dtype) == "torch.float32"  # no bf16 arithmetic: float32
    monkeypatch.setenv("INFERA_CPU_ISA", "none")
    assert kernels.cpu_isa() == "none"


def test_forcing_a_missing_or_unknown_level_is_an_error(zen3, monkeypatch):
    monkeypatch.setenv("INFERA_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="supports only none, avx2"):
        kernels.cpu_isa()
    monkeypatch.setenv("INFERA_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="expected one of none, avx2, avx512, amx"):
        kernels.cpu_isa()


def test_bf16_levels_default_to_bfloat16(monkeypatch):
    top = kernels.supported_levels()[-1]
    monkeypatch.setenv("INFERA_CPU_ISA", top)
    expected = "torch.bfloat16" if top in ("avx512", "amx") else "torch.float32"
    assert str(EngineConfig(device="cpu").torch_dtype) == expected


def test_each_module_reports_its_level(ext, isa):
    assert ext.ISA == {"none": "scalar", "avx2": "AVX2+FMA+F16C", "avx512": "AVX-512 VNNI BF16",
                       "amx": "AVX-512 VNNI BF16 AMX"}[isa]
