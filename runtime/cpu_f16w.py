"""y = x @ W.T with fp32 activations and the workspace's fp16 weights, for CPUs without native bf16 (AVX2 + F16C).

Where the CPU has no bf16 arithmetic the compute dtype is fp32 (runtime.engine.resolve_compute_dtype), and PyTorch's
fp32 GEMM then reads 4 bytes per weight, at a fraction of the memory bandwidth at decode shapes (measured on a
2-core AMD EPYC with AVX2 and ~18 GB/s read bandwidth: the 121 matrices of a SmolLM2-135M decode step take 65 ms
at one row, ~4 GB/s). The workspace stores the weights in fp16, and fp16 -> fp32 is exact, so the model can keep
them in fp16 (half the memory) and convert each weight vector in registers (vcvtph2ps) right before its fp32
multiply-adds: the products and sums are those of an fp32 GEMM on the same weights, in a different order.

    W (N, K) fp16 row-major (nn.Linear's layout), x (B, K) fp32, y (B, N) fp32
    y[b, n] = sum_k x[b, k] * fp32(W[n, k])        fp32 products and sums

Work split: threads take blocks of 48 weight rows; within a block every pass of activation rows meets the
block's rows while they sit in the L2 cache, so the weights are read from memory once per call.
- up to 16 rows (decode): passes of up to 12 rows, each weight row streamed once per pass with its vectors
  converted once and met by every row of the pass (1-4 accumulators along k per row, 16 registers in all).
  Bound by reading the weights: 15.7 GB/s at one row.
- more rows (prefill, large batches): tiles of 4 activation rows x 3 weight rows (12 accumulators, 3 weight
  vectors and one activation vector in registers: 7 loads per 12 multiply-adds), the 1-3 rows left over as a
  pass. ~100-115 GFLOP/s on 2 cores, at or above PyTorch's fp32 GEMM.
Measured against F.linear with fp32 weights (all 121 matrices of a SmolLM2 step, 2 threads, one process):
3.2-3.8x faster at 1 row, 2.7-3.4x at 8, 1.5x at 32, 1.2-1.4x at 64-256 rows.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from runtime import cpp_build

KERNEL_SRC = r"""
#include <immintrin.h>
#include <stdint.h>

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline __m256 load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// BR activation rows x (BR, K) against weight rows [n0, n1): A accumulators along k per activation row
// (BR * A accumulators + A weight vectors <= 16 registers).
template <int BR, int A>
static void rows(const float* x, const uint16_t* w, float* y, int64_t K, int64_t n0, int64_t n1, int64_t ldy) {
  const int64_t K8 = K & ~(int64_t)7;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m256 a[BR][A];
    for (int b = 0; b < BR; ++b)
      for (int j = 0; j < A; ++j) a[b][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * A <= K8; k += 8 * A) {
      __m256 wv[A];
      for (int j = 0; j < A; ++j) wv[j] = load_f16(wr + k + 8 * j);
      for (int b = 0; b < BR; ++b)
        for (int j = 0; j < A; ++j) a[b][j] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(x + b * K + k + 8 * j), a[b][j]);
    }
    for (; k < K8; k += 8) {
      const __m256 wv = load_f16(wr + k);
      for (int b = 0; b < BR; ++b) a[b][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * K + k), a[b][0]);
    }
    float s[BR];
    for (int b = 0; b < BR; ++b) {
      __m256 t = a[b][0];
      for (int j = 1; j < A; ++j) t = _mm256_add_ps(t, a[b][j]);
      s[b] = hsum8(t);
    }
    for (; k < K; ++k) {  // K not a multiple of 8
      const float wk = _cvtsh_ss(wr[k]);
      for (int b = 0; b < BR; ++b) s[b] += wk * x[b * K + k];
    }
    for (int b = 0; b < BR; ++b) y[b * ldy + n] = s[b];
  }
}

// One pass of r (1..12) activation rows over weight rows [n0, n1).
static void pass(const float* x, const uint16_t* w, float* y, int64_t r, int64_t K, int64_t n0, int64_t n1,
                 int64_t ldy) {
  switch (r) {
    case 1: rows<1, 4>(x, w, y, K, n0, n1, ldy); break;
    case 2: rows<2, 4>(x, w, y, K, n0, n1, ldy); break;
    case 3: rows<3, 2>(x, w, y, K, n0, n1, ldy); break;
    case 4: rows<4, 2>(x, w, y, K, n0, n1, ldy); break;
    case 5: rows<5, 2>(x, w, y, K, n0, n1, ldy); break;
    case 6: rows<6, 2>(x, w, y, K, n0, n1, ldy); break;
    case 7: rows<7, 1>(x, w, y, K, n0, n1, ldy); break;
    case 8: rows<8, 1>(x, w, y, K, n0, n1, ldy); break;
    case 9: rows<9, 1>(x, w, y, K, n0, n1, ldy); break;
    case 10: rows<10, 1>(x, w, y, K, n0, n1, ldy); break;
    case 11: rows<11, 1>(x, w, y, K, n0, n1, ldy); break;
    default: rows<12, 1>(x, w, y, K, n0, n1, ldy); break;
  }
}

// MR activation rows x NR weight rows per tile: MR * NR accumulators, NR weight vectors and one activation vector
// in registers; weight rows left over (fewer than NR) as a pass.
template <int MR, int NR>
static void tiles(const float* x, const uint16_t* w, float* y, int64_t K, int64_t n0, int64_t n1, int64_t ldy) {
  const int64_t K8 = K & ~(int64_t)7;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    __m256 a[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) a[m][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = load_f16(w + (n + j) * K + k);
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        for (int j = 0; j < NR; ++j) a[m][j] = _mm256_fmadd_ps(wv[j], xv, a[m][j]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) {
        float s = hsum8(a[m][j]);
        for (int64_t k = K8; k < K; ++k) s += _cvtsh_ss(w[(n + j) * K + k]) * x[m * K + k];
        y[m * ldy + n + j] = s;
      }
  }
  if (n < n1) pass(x, w, y, MR, K, n, n1, ldy);
}

extern "C" void linear_f16w(const float* x, const uint16_t* w, float* y, int64_t B, int64_t K, int64_t N) {
  const int64_t nb = 48, blocks = (N + nb - 1) / nb;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t n0 = i * nb, n1 = n0 + nb < N ? n0 + nb : N;
    int64_t b0 = 0;
    if (B > 16)
      for (; b0 + 4 <= B; b0 += 4) tiles<4, 3>(x + b0 * K, w, y + b0 * N, K, n0, n1, N);
    while (b0 < B) {  // up to 16 rows: passes of 12 (13-16 as two halves); after the tiles, 1-3 rows
      const int64_t left = B - b0, r = left <= 12 ? left : (left + 1) / 2;
      pass(x + b0 * K, w, y + b0 * N, r, K, n0, n1, N);
      b0 += r;
    }
  }
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
    lib = cpp_build.load("linear_f16w", KERNEL_SRC, flags, ("avx2", "fma", "f16c"))
    if lib is not None and lib.linear_f16w.argtypes is None:
        lib.linear_f16w.restype = None
        lib.linear_f16w.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    return lib


def available() -> bool:
    """Can this machine run the kernel (x86-64 with AVX2, FMA and F16C, g++)?"""
    return _library() is not None


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Does the kernel take x @ w.T: CPU fp32 activations, a contiguous CPU fp16 (N, K) matrix, and a build here?"""
    return (
        x.dtype == torch.float32
        and w.dtype == torch.float16
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and w.dim() == 2
        and x.shape[-1] == w.shape[1]
        and w.is_contiguous()
        and available()
    )


def linear_f16w(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) fp32 @ w.T, w (N, K) fp16 contiguous, on the CPU through the kernel -> (..., N) fp32."""
    if not takes(x, w):
        raise ValueError(
            "linear_f16w takes CPU fp32 x (..., K) and a contiguous CPU fp16 w (N, K) on an x86-64 CPU with AVX2, "
            f"FMA and F16C; got x {x.dtype} {tuple(x.shape)} {x.device}, w {w.dtype} {tuple(w.shape)} {w.device}"
        )
    N, K = w.shape
    x2 = x.reshape(-1, K).contiguous()
    y = torch.empty(x2.shape[0], N, dtype=torch.float32)
    _library().linear_f16w(x2.data_ptr(), w.data_ptr(), y.data_ptr(), x2.shape[0], K, N)
    return y.view(*x.shape[:-1], N)
