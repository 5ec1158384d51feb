"""Compilers for the .cu files: NVRTC (cubin for a given sm_XX, no GPU needed) and g++ (CPU emulation library).

Include directories come from pip wheels (docs/formats.md §7): `nvidia-cuda-runtime-cu12` include/ (cuda_fp16.h,
cuda_fp8.h, ...), `nvidia-cuda-nvcc-cu12` include/ (crt/host_defines.h, needed when those headers are
compiled by g++), and CuPy's bundled libcudacxx (<nv/target>, same reason); the CUDA 13 wheels' nvidia/cu13/include
and an installed CUDA toolkit ($CUDA_HOME, $CUDA_PATH, nvcc's, /usr/local/cuda) serve where those are missing.
NVRTC itself is the `nvidia-cuda-nvrtc-cu12` library, reached through cupy_backends (which loads it without a
driver).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from runtime.cuda.kernels import CUDA_DIR, load_source

ARCHS = ("sm_80", "sm_89", "sm_90")
HOST_SOURCES = ("host_launch.cpp", "cuda_host_emulation.h", "kvq_common.cuh", "kv_write.cu", "decode_attention.cu")
HOST_FLAGS = (
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-Wall",
    "-Wno-unknown-pragmas",
)


DEFAULT_TOOLKIT = "/usr/local/cuda"


class ToolchainError(RuntimeError):
    """A compiler or header the CUDA tests need is missing or failed; the message says which and how to fix it."""


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a parent package is missing
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _wheel_include_dirs() -> list[Path]:
    """include/ folders of NVIDIA's pip wheels: the CUDA 12 layout (nvidia/cuda_runtime/include,
    nvidia/cuda_nvcc/include) and the CUDA 13 one (every component in nvidia/cu13/include)."""
    dirs = [d / "include" for d in map(_package_dir, ("nvidia.cuda_runtime", "nvidia.cuda_nvcc")) if d]
    nvidia = importlib.util.find_spec("nvidia")
    for root in (nvidia.submodule_search_locations or []) if nvidia else []:
        dirs.append(Path(root) / "cu13" / "include")
    return [d for d in dirs if d.is_dir()]


def _toolkit_include_dirs() -> list[Path]:
    """include/ (and include/cccl, where CUDA 13 keeps libcudacxx) of an installed CUDA toolkit: $CUDA_HOME,
    $CUDA_PATH, the one nvcc on PATH belongs to, /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    roots += [str(Path(nvcc).resolve().parents[1]) if nvcc else None, DEFAULT_TOOLKIT]
    dirs = []
    for root in filter(None, roots):
        dirs += [Path(root) / "include", Path(root) / "include" / "cccl"]
    return [d for d in dirs if d.is_dir()]


def cuda_include_dir() -> Path | None:
    """The pip wheels' include/ holding cuda_fp16.h / cuda_fp8.h (CUDA 12 or 13 layout), or None when neither
    is installed (NVRTC through CuPy then uses the toolkit CuPy finds)."""
    return next((d for d in _wheel_include_dirs() if (d / "cuda_fp8.h").is_file()), None)


# What g++ needs to compile cuda_fp16.h / cuda_fp8.h as host code: the headers themselves, crt/host_defines.h
# (nvcc's) and libcudacxx's <nv/target>.
HOST_HEADERS = {
    "cuda_fp8.h": "cuda_fp16.h / cuda_fp8.h (pip: nvidia-cuda-runtime-cu12)",
    "crt/host_defines.h": "crt/host_defines.h (pip: nvidia-cuda-nvcc-cu12)",
    "nv/target": "libcudacxx's <nv/target> (CuPy bundles it)",
}


def host_include_dirs() -> list[Path]:
    """The header dirs g++ needs to compile cuda_fp16.h / cuda_fp8.h as host code, plus runtime/cuda. Each header
    is taken from the pip wheels first, else from CuPy (libcudacxx), else from a CUDA toolkit."""
    cupy = _package_dir("cupy")
    cupy_cccl = [cupy / "_core/include/cupy/_cccl/libcudacxx"] if cupy else []
    candidates = [*_wheel_include_dirs(), *cupy_cccl, *_toolkit_include_dirs()]
    found, missing = [], []
    for header, what in HOST_HEADERS.items():
        where = next((d for d in candidates if (d / header).exists()), None)
        if where is None:
            missing.append(what)
        elif where not in found:
            found.append(where)
    if missing:
        raise ToolchainError(
            f'runtime/cuda: missing {", ".join(missing)}; install the wheels (pip install -e ".[dev]") or point '
            "CUDA_HOME at a CUDA toolkit"
        )
    return [CUDA_DIR, *found]


def nvrtc_options(arch: str | None = None) -> list[str]:
    """NVRTC flags shared by CuPy (GPU) and the compile test: C++17, the wheel's CUDA headers if present."""
    options = ["--std=c++17"]
    if arch:
        options.append(f"--gpu-architecture={arch}")
    inc = cuda_include_dir()
    if inc is not None:
        options.append(f"-I{inc}")
    return options


@dataclass(frozen=True)
class CubinResult:
    arch: str
    cubin_bytes: int
    log: str  # NVRTC log: warnings (and ptxas -v register / spill lines)
    lowered_names: dict[str, str]  # name expression -> mangled kernel name


def compile_cubin(name: str, arch: str, name_expressions: list[str]) -> CubinResult:
    """Compile one .cu file to cubin for `arch` through NVRTC; raise ToolchainError with the log on failure."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(load_source(name), name, [], [])
    try:
        for expr in name_expressions:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, [*nvrtc_options(arch), "--ptxas-options=-v"])
        except nvrtc.NVRTCError as exc:
            raise ToolchainError(f"NVRTC failed on {name} for {arch}: {exc}\n{nvrtc.getProgramLog(prog)}") from exc
        lowered = {expr: nvrtc.getLoweredName(prog, expr) for expr in name_expressions}
        return CubinResult(arch, len(nvrtc.getCUBIN(prog)), nvrtc.getProgramLog(prog), lowered)
    finally:
        nvrtc.destroyProgram(prog)


def host_cache_dir() -> Path:
    return Path(os.environ.get("KVQ_CACHE", Path.home() / ".cache" / "kvq")) / "cuda_host"


def build_host_library() -> ctypes.CDLL:
    """Compile host_launch.cpp (the kernels under cuda_host_emulation.h) with g++, cached by source hash."""
    includes = host_include_dirs()
    digest = hashlib.sha256()
    for part in (*HOST_SOURCES, *HOST_FLAGS, *map(str, includes)):
        path = CUDA_DIR / part
        digest.update(path.read_bytes() if path.is_file() else part.encode())
    out = host_cache_dir() / f"libkvq_host_{digest.hexdigest()[:16]}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", *HOST_FLAGS, *(f"-I{d}" for d in includes), str(CUDA_DIR / "host_launch.cpp"), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolchainError(f"g++ failed building the CUDA host emulation:\n{' '.join(cmd)}\n{proc.stderr}")
        if proc.stderr.strip():
            print(f"g++ warnings (host emulation):\n{proc.stderr}")
        tmp.replace(out)  # atomic: a concurrent test run never loads a half-written library
    return ctypes.CDLL(str(out))
