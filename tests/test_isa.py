"""Choosing the native kernels' ISA level from the CPU's flags and INFERA_CPU_ISA."""
from __future__ import annotations

import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from infera import kernels
from infera.kernels import build_lock, cpu_isa
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


def test_a_build_killed_midway_does_not_hang_the_next_start():
    """torch waits forever on the lock file a killed build leaves; loading clears it instead."""
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = Path(_get_build_directory(f"infera_cpu_{cpu_isa()}", verbose=False))
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "lock").touch()
    code = "from infera.kernels import load_cpu_extension; assert load_cpu_extension() is not None"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    assert not (build_dir / "lock").exists()


def test_builders_take_turns(tmp_path):
    events: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        with build_lock(tmp_path):
            events.append("first in")
            holding.set()
            release.wait(30)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(30)
    def enter_second() -> None:
        with build_lock(tmp_path):
            events.append("second in")

    second = threading.Thread(target=enter_second)
    second.start()
    second.join(0.5)
    assert second.is_alive() and events == ["first in"]  # the second builder waits for the first
    release.set()
    thread.join(30)
    second.join(30)
    assert events == ["first in", "first out", "second in"]
