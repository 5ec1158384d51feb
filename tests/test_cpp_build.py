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
