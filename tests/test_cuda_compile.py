"""Every CUDA kernel variant the runtime can launch compiles through NVRTC for sm_80, sm_89 and sm_90 (no GPU).

The NVRTC log (warnings, and ptxas -v register / spill lines) is printed; a compile error fails the test, and
so does a register spill in a kernel (spills would cost the decode kernel its bandwidth).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cuda import kernels

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
@pytest.mark.parametrize("source", sorted(kernels.SOURCES))
def test_nvrtc_compiles_every_variant(source, arch):
    from runtime.cuda.toolchain import compile_cubin

    expressions = kernels.SOURCES[source]()
    result = compile_cubin(source, arch, expressions)
    print(f"--- NVRTC log {source} {arch} ---\n{result.log}")
    assert result.cubin_bytes > 0
    assert set(result.lowered_names) == set(expressions)
    assert all(name.startswith("_Z") for name in result.lowered_names.values())
    warnings = [line for line in result.log.splitlines() if "warning" in line.lower()]
    assert not [w for w in warnings if "error" in w.lower()]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.log)]
    assert len(spills) == len(expressions), "ptxas -v should report every kernel"
    assert max(spills) == 0, f"register spills in {source} for {arch}: {spills}"


def test_instantiation_lists_cover_the_launchers():
    """The launchers only ever ask for names in these lists: 3 activation dtypes x 7 modes (4 calibrated, 3 online)
    (x 2 head dims, plus the combine pass), and int4_per_token_head's per-channel key kernels (the stash, and the
    completed blocks per activation dtype)."""
    assert len(kernels.write_name_expressions()) == 3 * 7 + 1 + 3
    assert "kv_stash_open_keys" in kernels.write_name_expressions()
    assert "kv_write_channel_keys<__half>" in kernels.write_name_expressions()
    assert len(kernels.attention_name_expressions()) == 3 * 2 * (7 + 1)
    assert "decode_attention<__half, 1, 128>" in kernels.attention_name_expressions()
    assert "kv_write<__nv_bfloat16, 3>" in kernels.write_name_expressions()
    for mode in ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"):
        code = kernels.KV_MODES[mode]
        assert f"kv_write<float, {code}>" in kernels.write_name_expressions()
        assert f"decode_attention<__nv_bfloat16, {code}, 64>" in kernels.attention_name_expressions()


def test_import_runtime_cuda_does_not_import_cupy():
    code = "import sys, runtime, runtime.cuda, runtime.cuda.kernels; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_each_cu_file_opens_with_its_header_comment():
    for name in (*kernels.SOURCES, "kvq_common.cuh", "cuda_host_emulation.h"):
        first = (kernels.CUDA_DIR / name).read_text().splitlines()[0]
        assert first.startswith(f"// {name}:"), name


def _fake_toolkit(root: Path, cccl: bool = True) -> Path:
    (root / "include" / "crt").mkdir(parents=True)
    (root / "include" / "cuda_fp8.h").write_text("")
    (root / "include" / "crt" / "host_defines.h").write_text("")
    if cccl:  # CUDA 13 keeps libcudacxx under include/cccl
        (root / "include" / "cccl" / "nv").mkdir(parents=True)
        (root / "include" / "cccl" / "nv" / "target").write_text("")
    return root


def test_host_headers_come_from_a_cuda_toolkit_without_the_wheels(tmp_path, monkeypatch):
    """A machine with a CUDA toolkit and no NVIDIA pip wheels (the H200 image: CUDA 13, cupy-cuda13x) builds the
    emulation from $CUDA_HOME; without either, the error names each missing header and both fixes."""
    from runtime.cuda import toolchain

    monkeypatch.setattr(toolchain, "_package_dir", lambda module: None)  # no wheels, no CuPy headers
    monkeypatch.setattr(toolchain, "_wheel_include_dirs", lambda: [])
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)  # no nvcc on PATH
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(toolchain, "DEFAULT_TOOLKIT", str(tmp_path / "no-default-toolkit"))
    tk = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(tk))
    assert toolchain.host_include_dirs() == [kernels.CUDA_DIR, tk / "include", tk / "include" / "cccl"]

    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(toolchain.ToolchainError) as err:
        toolchain.host_include_dirs()
    for text in ("cuda_fp8.h", "crt/host_defines.h", "<nv/target>", "CUDA_HOME", 'pip install -e ".[dev]"'):
        assert text in str(err.value)
