"""The C++ kernel builds: loading a kernel must not change the process's floating-point mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import cpp_build

PROBE = """
import torch
from runtime import cpu_attention, cpu_linear
tiny = torch.tensor([1e-39])  # a float32 denormal
assert (tiny * 1.0).item() != 0.0
assert cpu_attention._cpp_module() is not None
cpu_linear.available()
print((tiny * 1.0).item())
"""


@pytest.mark.skipif(not cpp_build.cpu_has("avx2", "fma", "f16c"), reason="the decode kernel needs AVX2/FMA/F16C")
def test_loading_the_kernels_keeps_denormals(tmp_path):
    """Built with -ffast-math, the kernels must still be linked without crtfastmath.o, whose constructor would
    switch the whole process (PyTorch included) to flush-to-zero on load. A fresh process and kernel cache."""
    env = {**os.environ, "KVQ_KERNEL_CACHE": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) == pytest.approx(1e-39, rel=1e-6)
    assert list(tmp_path.glob("decode_attn_*.so")), "the kernel was not built in the given cache"


def test_attention_build_choice():
    """The INT8 kinds run on the AVX2 build on AMD CPUs with AVX-512 (measured faster there); every other kind,
    vendor or CPU keeps the native build."""
    import torch

    from runtime.cpu_attention import kernel_kind, prefers_avx2

    int8, int8_row = kernel_kind(None, torch.int8), kernel_kind("int8_per_token_head", torch.uint8)
    assert prefers_avx2(int8, "AuthenticAMD", True) and prefers_avx2(int8_row, "AuthenticAMD", True)
    for kv, pool in [("fp16", torch.float16), ("fp8_e4m3", torch.float8_e4m3fn), ("int4_per_token_head", torch.uint8)]:
        assert not prefers_avx2(kernel_kind(kv, pool), "AuthenticAMD", True)
    assert not prefers_avx2(int8, "GenuineIntel", True)
    assert not prefers_avx2(int8, "AuthenticAMD", False)  # no AVX-512: the native build is the AVX2 one


@pytest.mark.skipif(not cpp_build.cpu_has("avx2", "fma", "f16c"), reason="the decode kernel needs AVX2/FMA/F16C")
def test_attention_build_override(monkeypatch):
    """$KVQ_ATTENTION_BUILD picks the build for every kind; an unknown value is an error that names the variable."""
    import torch

    from runtime.cpu_attention import BUILD_ENV, _cpp_module, library_for

    monkeypatch.setenv(BUILD_ENV, "avx2")
    assert library_for("fp16", torch.float16) is _cpp_module(avx512=False, vnni=False)
    monkeypatch.setenv(BUILD_ENV, "native")
    assert library_for("int8", torch.int8) is _cpp_module()
    monkeypatch.setenv(BUILD_ENV, "avx512")
    with pytest.raises(ValueError, match="KVQ_ATTENTION_BUILD='avx512'"):
        library_for("int8", torch.int8)


def test_engine_refuses_an_unknown_attention_build_at_start(tiny_hf, tmp_path, monkeypatch):
    """A mistyped $KVQ_ATTENTION_BUILD stops the engine at construction, not at its first decode step."""
    from rt_workspace import make_workspace

    from runtime.cpu_attention import BUILD_ENV
    from runtime.engine import Engine

    ws = make_workspace(tiny_hf("llama"), tmp_path / "ws", session_len=64)
    monkeypatch.setenv(BUILD_ENV, "avx-2")
    with pytest.raises(ValueError, match="KVQ_ATTENTION_BUILD='avx-2'"):
        Engine(ws, kv_cache_dtype="int8_per_token_head", kv_cache_gib=0.01)
