"""Build a C++ kernel once into a shared library cached by source hash, and load it with ctypes.

The CPU kernels (runtime.cpu_attention, runtime.cpu_linear) are C++ sources compiled by g++ at first use, into
`~/.cache/kvq/kernels` (or $KVQ_KERNEL_CACHE) under a name that hashes the source and the flags, so an edited
kernel is rebuilt and concurrent builders race harmlessly (each writes its own temporary file, then an atomic
rename). Compiling and linking are separate steps: linking with -ffast-math would add GCC's crtfastmath.o,
whose constructor switches the whole process to flush-to-zero / denormals-are-zero the moment the library
loads, silently changing PyTorch's arithmetic everywhere else; kernels that want FTZ set it around their
own work. Where the machine cannot build or run a kernel (not x86-64, a CPU without the instruction sets the
flags assume, no g++, a failed build, or $KVQ_NO_CPP_KERNEL set) `load` returns None and callers use PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

_loaded: dict[str, ctypes.CDLL | None] = {}


def cpu_has(*flags: str) -> bool:
    """Does this CPU advertise all `flags` in /proc/cpuinfo (Linux)? False when it cannot tell."""
    return set(flags) <= _cpu_flags()


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor_id from /proc/cpuinfo (AuthenticAMD, GenuineIntel, ...); "" when it cannot tell."""
    return _cpuinfo("vendor_id")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read once per process."""
    return frozenset(_cpuinfo("flags").split())


def _cpuinfo(key: str) -> str:
    """The value of the first `key` line of /proc/cpuinfo (Linux); "" when there is none or no such file."""
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((ln for ln in fh if ln.startswith(key)), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def load(name: str, source: str, flags: list[str], cpu_flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """The library built from `source` with g++ `flags` (memoised per name), or None where it cannot run here."""
    if name in _loaded:
        return _loaded[name]
    _loaded[name] = None
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("KVQ_NO_CPP_KERNEL"):
        return None
    if not cpu_has(*cpu_flags):
        return None
    if shutil.which("g++") is None:
        warnings.warn(f"g++ not found: the {name} kernel is replaced by the slower torch path", stacklevel=3)
        return None
    flags = [*flags, "-fPIC"]
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("KVQ_KERNEL_CACHE", Path.home() / ".cache" / "kvq" / "kernels"))
    so = out_dir / f"{name}_{digest}.so"
    if not so.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        src = out_dir / f"{name}_{digest}.{os.getpid()}.cpp"
        obj = src.with_suffix(".o")
        src.write_text(source)
        tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
        link = ["-shared", *(f for f in flags if f == "-fopenmp")]  # no -ffast-math: see the module docstring
        proc = subprocess.run(["g++", *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        if proc.returncode == 0:
            proc = subprocess.run(["g++", *link, str(obj), "-o", str(tmp)], capture_output=True, text=True)
        src.unlink()
        obj.unlink(missing_ok=True)
        if proc.returncode != 0:
            warnings.warn(f"building the C++ {name} kernel failed, using the torch path:\n{proc.stderr}", stacklevel=3)
            return None
        os.replace(tmp, so)  # atomic: concurrent builders race harmlessly
    _loaded[name] = ctypes.CDLL(str(so))
    return _loaded[name]


def declare(lib: ctypes.CDLL, signatures: dict[str, tuple]) -> None:
    """Set the return and argument types of lib's functions from {name: (restype, argtypes)}."""
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
