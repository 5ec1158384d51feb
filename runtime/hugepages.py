"""Large CPU tensors on transparent huge pages, for the memory a decode step streams through.

A decode step reads every weight matrix and, at long contexts, most of the KV cache. On 4 KiB pages every 4 KiB
of that needs its own TLB entry, and the KV pool's blocks are scattered, so each block starts with a page walk.
Linux backs memory with 2 MiB pages where the process asks for them (madvise(MADV_HUGEPAGE), honoured in the
default "madvise" mode of /sys/kernel/mm/transparent_hugepage/enabled as well as in "always"). Measured on a
2-core AMD EPYC (AVX2, SmolLM2-135M, one process, alternating): the decode step's fp16 weight matrices at one
row 16.0 -> 14.2 ms; INT8 decode attention at 8 x 2048 read from memory 0.81 -> 0.75 ms per layer.

`Arena`: one anonymous mapping, advised before anything touches it, carved into tensors. Fresh anonymous memory
reads as zeros and takes physical memory only where it is written. Where the OS has no MADV_HUGEPAGE, or THP is
off, the same tensors live on ordinary pages; nothing else changes.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20  # x86-64 / arm64 (4 KiB base pages) transparent huge page
ALIGN = 64  # every tensor starts on a cache line


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes a contiguous tensor of this shape and dtype takes in an arena (rounded up to ALIGN)."""
    return _round_up(math.prod(shape) * dtype.itemsize, ALIGN)


class Arena:
    """nbytes of zero-filled CPU memory advised for huge pages, handed out in order by `take` / `hold`. Tensors
    taken keep the mapping alive (they hold its buffer); the arena object itself need not outlive them."""

    def __init__(self, nbytes: int) -> None:
        self.size = _round_up(max(int(nbytes), 1), ALIGN)
        # private: shared anonymous memory is shmem, which THP leaves alone by default; slack to start on 2 MiB
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self._map = mmap.mmap(-1, self.size + HUGE_PAGE, flags=flags) if flags else mmap.mmap(-1, self.size + HUGE_PAGE)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP compiled out: ordinary pages
                pass
        whole = torch.frombuffer(self._map, dtype=torch.uint8)
        skip = -whole.data_ptr() % HUGE_PAGE
        self._buf = whole[skip : skip + self.size]
        self.used = 0

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """The next contiguous zero-filled tensor of this shape and dtype."""
        n = math.prod(shape) * dtype.itemsize
        start, end = self.used, self.used + nbytes(shape, dtype)
        if end > self.size:
            raise ValueError(f"arena of {self.size} bytes has {self.size - start} left; asked for {n}")
        self.used = end
        return self._buf[start : start + n].view(dtype).view(tuple(shape))

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of the CPU tensor t in the arena."""
        return self.take(t.shape, t.dtype).copy_(t)
