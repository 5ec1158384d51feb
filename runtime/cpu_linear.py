"""y = x @ W.T for a decode step's single row, in bf16, closer to the memory bandwidth (CPUs with AVX512-BF16).

A decode step multiplies one activation row per running sequence by every weight matrix of the model: at
batch 1 that is a matrix-vector product bound by reading the weights (SmolLM2-135M: 270 MB of bf16 per step).
PyTorch's bf16 GEMM reads them at about a third of the machine's bandwidth at this shape (14 GB/s against
~40 GB/s on the 2-core EPYC we measure on); this kernel streams each weight row once (21 GB/s there) and
reuses it for every activation row:

    W (N, K) bf16 row-major (nn.Linear's layout), x (B, K) bf16, y (B, N) bf16
    y[b, n] = round_bf16(sum_k x[b, k] * W[n, k])     products and sums in fp32 (vdpbf16ps), rounded once

Work split: output rows in blocks of 4 over the OpenMP threads; a block's 4 weight rows stay in L1 while they
meet every activation row (4 at a time: 16 fp32 accumulators of 16 lanes). K need not be a multiple of 32
(masked loads). The sum order differs from PyTorch's, so results agree to fp32 rounding before the final bf16
rounding (tests compare against an fp32 matmul of the same bf16 inputs).

`linear(x, w)` uses the kernel for CPU bf16 inputs with at most `MAX_ROWS` rows and `F.linear` otherwise: from
2 rows on, oneDNN's blocked GEMM wins (measured from DRAM with 2 threads: kernel time / PyTorch's 0.67 at 1 row,
1.33 at 2, 2.8 at 8), so this kernel is the batch-1 path.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from runtime import cpp_build

MAX_ROWS = 1  # rows per call up to which the kernel beats PyTorch's bf16 GEMM (from DRAM, 2 threads: 1.5x at 1 row, 0.75x at 2)

KERNEL_SRC = r"""
#include <immintrin.h>
#include <stdint.h>

// R weight rows x BC activation rows, over K in steps of 32 bf16.
template <int R, int BC>
static inline void tile(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n0, int64_t K, int64_t N,
                        int64_t b0) {
  __m512 acc[R][BC];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < BC; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1u);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w + (n0 + r) * K + k);
    for (int b = 0; b < BC; ++b) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + (b0 + b) * K + k);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv, (__m512bh)wv[r]);
    }
  }
  for (int b = 0; b < BC; ++b) {
    alignas(64) float s[16] = {0};
    for (int r = 0; r < R; ++r) s[r] = _mm512_reduce_add_ps(acc[r][b]);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_load_ps(s));  // round to nearest even, as torch
    alignas(32) uint16_t o[16];
    _mm256_store_si256((__m256i*)o, (__m256i)h);
    for (int r = 0; r < R; ++r) y[(b0 + b) * N + n0 + r] = o[r];
  }
}

template <int R>
static inline void rows(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n0, int64_t B, int64_t K,
                        int64_t N) {
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) tile<R, 4>(x, w, y, n0, K, N, b);
  switch (B - b) {
    case 3: tile<R, 3>(x, w, y, n0, K, N, b); break;
    case 2: tile<R, 2>(x, w, y, n0, K, N, b); break;
    case 1: tile<R, 1>(x, w, y, n0, K, N, b); break;
  }
}

extern "C" void linear_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t B, int64_t K, int64_t N) {
  const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t n0 = i * 4, r = N - n0 < 4 ? N - n0 : 4;
    if (r == 4) rows<4>(x, w, y, n0, B, K, N);
    else if (r == 3) rows<3>(x, w, y, n0, B, K, N);
    else if (r == 2) rows<2>(x, w, y, n0, B, K, N);
    else rows<1>(x, w, y, n0, B, K, N);
  }
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
    lib = cpp_build.load("linear_bf16", KERNEL_SRC, flags, ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))
    if lib is not None and lib.linear_bf16.argtypes is None:
        lib.linear_bf16.restype = None
        lib.linear_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    return lib


def available() -> bool:
    """Can this machine run the kernel (x86-64 with AVX512-BF16, g++)?"""
    return _library() is not None


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) bf16 @ w.T, w (N, K) bf16 contiguous, on the CPU through the kernel -> (..., N) bf16."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the bf16 linear kernel needs an x86-64 CPU with AVX512-BF16 and g++ (use linear())")
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError(f"linear_bf16 takes CPU bf16 tensors; got x {x.dtype} {x.device}, w {w.dtype} {w.device}")
    if w.dim() != 2 or x.shape[-1] != w.shape[1] or not w.is_contiguous():
        raise ValueError(f"w must be a contiguous (N, K={x.shape[-1]}) matrix; got {tuple(w.shape)}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.bfloat16)
    lib.linear_bf16(x2.data_ptr(), w.data_ptr(), y.data_ptr(), x2.shape[0], w.shape[1], w.shape[0])
    return y.view(*x.shape[:-1], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T (w in nn.Linear's (out, in) layout): the kernel for a few CPU bf16 rows, else F.linear."""
    if (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and w.is_contiguous()
        and available()
    ):
        return linear_bf16(x, w)
    return F.linear(x, w)
