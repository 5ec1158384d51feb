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
  Bound by reading the weights: 15.7 GB/s at one row. A pass's activations stay within 24 KiB (L1): at K 1536
  (the down projection) 8 rows are two passes of 4 (from L2, 8 rows' loads ran at half the rate: 1.15-1.2x
  for that matrix, 1.05-1.1x for a whole step's at 8-16 rows).
- 17 to MAX_ROWS rows (large decode batches): tiles of 4 activation rows x 3 weight rows (12 accumulators, 3
  weight vectors and one activation vector in registers: 7 loads per 12 multiply-adds), the 1-3 rows left over
  as a pass; 60-100 GFLOP/s on 2 cores.
Measured against F.linear with fp32 weights (`python tools/bench_linear.py`: all 121 matrices of a SmolLM2 step,
2 threads, one process): 3.2-3.8x faster at 1 row, 2.7-3.4x at 8, 1.4-1.5x at 32, 1.2-1.4x at 64 rows.
Prefill-sized calls (more than MAX_ROWS rows) go to PyTorch's GEMM on the weights cast to fp32 for the call
(runtime.cpu_linear.linear): there the activations outgrow the L2 cache this kernel re-reads them from.
"""

from __future__ import annotations

import ctypes
import functools
import re

import torch

from runtime import cpp_build

EXP2_COEFFS = (  # 2^f for |f| <= 1/2, degree 6, highest power first (relative error ~1e-7)
    "1.535336188319500e-4f",
    "1.339887440266574e-3f",
    "9.618437357674640e-3f",
    "5.550332471162809e-2f",
    "2.402264791363012e-1f",
    "6.931472028550421e-1f",
    "1.0f",
)


def with_exp2_poly(source: str) -> str:
    """source with each `EXP2_POLY(bits)` line replaced by the C++ that evaluates p = 2^f (Horner's rule on
    EXP2_COEFFS) in an __m<bits> f: one definition for the AVX2 and AVX-512 exp kernels."""

    def poly(m: re.Match) -> str:
        b = m.group(1)
        fma, set1 = f"_mm{b}_fmadd_ps", f"_mm{b}_set1_ps"
        lines = [f"__m{b} p = {set1}({EXP2_COEFFS[0]});"] + [f"p = {fma}(p, f, {set1}({c}));" for c in EXP2_COEFFS[1:]]
        return "\n".join(m.group(0)[: m.start(1) - m.start(0) - len("EXP2_POLY(")] + ln for ln in lines)

    return re.sub(r"[ ]*EXP2_POLY\((256|512)\)", poly, source)


KERNEL_SRC = r"""
#include <immintrin.h>
#include <math.h>
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

// e^x in fp32 (relative error ~1e-6): 2^(x log2 e) as 2^n * 2^f, |f| <= 1/2, a degree-6 polynomial for 2^f and
// 2^n built in the exponent bits (x clamped to [-87, 88], so n stays in the normal range).
static inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  EXP2_POLY(256)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Up to 8 floats at p (left < 8: the rest zero) / stored back.
static inline __m256i tail_mask(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(left < 8 ? (int)left : 8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline __m256 load8(const float* p, int64_t left) {
  return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(left));
}
static inline void store8(float* p, __m256 v, int64_t left) {
  if (left >= 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, tail_mask(left), v);
}

// RMSNorm of fp32 rows: y = x * (1 / sqrt(mean(x^2) + eps)) * w.
extern "C" void rms_norm_f32(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) {
      const __m256 v = load8(xr + k, n - k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum8(acc) / (float)n + eps));
    for (int64_t k = 0; k < n; k += 8)
      store8(y + r * n + k, _mm256_mul_ps(_mm256_mul_ps(load8(xr + k, n - k), inv), load8(w + k, n - k)), n - k);
  }
}

// The residual add and the next RMSNorm: s = x + r, y = rms_norm(s) * w.
extern "C" void add_rms_norm_f32(const float* x, const float* r, const float* w, float* s, float* y, int64_t rows,
                                 int64_t n, float eps) {
  for (int64_t i = 0; i < rows * n; i += 8)
    store8(s + i, _mm256_add_ps(load8(x + i, rows * n - i), load8(r + i, rows * n - i)), rows * n - i);
  rms_norm_f32(s, w, y, rows, n, eps);
}

// RoPE of the q and k heads of fused qkv rows (N, (H + 2 Hkv) D) fp32 at positions pos (N,): element pairs
// (2i, 2i + 1) times rot[pos] = (cos, sin) pairs (S, D / 2) as the complex product (a c - b s, a s + b c);
// q -> (N, H, D), k -> (N, Hkv, D). Returns -1, or the index of the first position outside the table's S rows
// (then nothing is written).
extern "C" int64_t rope_qk_f32(const float* qkv, const float* rot, const int64_t* pos, float* q, float* k, int64_t N,
                               int64_t H, int64_t Hkv, int64_t D, int64_t S) {
  for (int64_t t = 0; t < N; ++t)
    if (pos[t] < 0 || pos[t] >= S) return t;
  const int64_t width = (H + 2 * Hkv) * D;
  const __m256 sign = _mm256_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1);
  for (int64_t t = 0; t < N; ++t) {
    const float* r = rot + pos[t] * D;  // D / 2 (cos, sin) pairs
    for (int64_t hd = 0; hd < H + Hkv; ++hd) {
      const float* x = qkv + t * width + hd * D;
      float* o = hd < H ? q + (t * H + hd) * D : k + (t * Hkv + hd - H) * D;
      for (int64_t d = 0; d < D; d += 8) {  // 4 pairs: [a, b] * [c, s] -> [a c - b s, b c + a s]
        const __m256 v = load8(x + d, D - d), cs = load8(r + d, D - d);
        const __m256 c = _mm256_moveldup_ps(cs), sn = _mm256_movehdup_ps(cs);  // [c, c], [s, s]
        const __m256 vs = _mm256_mul_ps(_mm256_permute_ps(v, 0xB1), sign);  // [-b, a]
        store8(o + d, _mm256_fmadd_ps(vs, sn, _mm256_mul_ps(v, c)), D - d);
      }
    }
  }
  return -1;
}

extern "C" void linear_f16w(const float* x, const uint16_t* w, float* y, int64_t B, int64_t K, int64_t N);

// SwiGLU then the down projection: rows h (B, 2K) = [gate | up] -> a = silu(gate) * up = gate / (1 + e^-gate) * up,
// y = a @ W.T (W (N, K) fp16).
extern "C" void linear_swiglu_f16w(const float* h, const uint16_t* w, float* y, int64_t B, int64_t K, int64_t N,
                                   float* a) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 g = load8(h + b * 2 * K + k, K - k), u = load8(h + b * 2 * K + K + k, K - k);
      const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
      store8(a + b * K + k, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u), K - k);
    }
  linear_f16w(a, w, y, B, K, N);
}

constexpr int64_t L1_ROWS_BYTES = 24576;  // activation bytes a pass keeps in L1

extern "C" void linear_f16w(const float* x, const uint16_t* w, float* y, int64_t B, int64_t K, int64_t N) {
  const int64_t nb = 48, blocks = (N + nb - 1) / nb;
  // up to 16 rows: equal passes of at most 12 rows whose activations (r x K fp32) fit in 24 KiB of the 32 KiB L1
  // cache, which each pass re-reads for every weight row (K 1536, the down projection: passes of 4 rows; 8 rows'
  // 48 KiB came from L2 at half the rate)
  const int64_t most = 4 * K * 12 <= L1_ROWS_BYTES ? 12 : L1_ROWS_BYTES / (4 * K) > 1 ? L1_ROWS_BYTES / (4 * K) : 1;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t n0 = i * nb, n1 = n0 + nb < N ? n0 + nb : N;
    int64_t b0 = 0;
    if (B > 16)
      for (; b0 + 4 <= B; b0 += 4) tiles<4, 3>(x + b0 * K, w, y + b0 * N, K, n0, n1, N);
    while (b0 < B) {  // passes of up to `most` rows; after the tiles, 1-3 rows
      const int64_t left = B - b0, passes = (left + most - 1) / most, r = (left + passes - 1) / passes;
      pass(x + b0 * K, w, y + b0 * N, r, K, n0, n1, N);
      b0 += r;
    }
  }
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
    lib = cpp_build.load("linear_f16w", with_exp2_poly(KERNEL_SRC), flags, ("avx2", "fma", "f16c"))
    if lib is not None and lib.linear_f16w.argtypes is None:
        cpp_build.declare(lib, decode_op_signatures("f32", "f16w"))
    return lib


def decode_op_signatures(ops: str, linear: str) -> dict[str, tuple]:
    """ctypes (restype, argtypes) of the decode-step kernels, shared by this library (ops "f32", linear "f16w") and
    runtime.cpu_linear's bf16 one ("bf16", "bf16"): rms_norm_<ops>, add_rms_norm_<ops>, rope_qk_<ops>,
    linear_<linear> and linear_swiglu_<linear>."""
    P, N, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    return {
        f"linear_{linear}": (None, [P] * 3 + [N] * 3),
        f"linear_swiglu_{linear}": (None, [P] * 3 + [N] * 3 + [P]),
        f"rms_norm_{ops}": (None, [P] * 3 + [N] * 2 + [F32]),
        f"add_rms_norm_{ops}": (None, [P] * 5 + [N] * 2 + [F32]),
        f"rope_qk_{ops}": (N, [P] * 5 + [N] * 5),
    }


# Rows per call up to which the kernel beats PyTorch's fp32 GEMM on weights cast to fp32 for the call: past ~64
# rows the activations outgrow the L2 cache that every block of weight rows re-reads them from (a 1024-token
# prefill ran at 0.86x PyTorch's speed through the kernel), while the cast costs little next to the GEMM.
MAX_ROWS = 64


def available() -> bool:
    """Can this machine run the kernel (x86-64 with AVX2, FMA and F16C, g++)?"""
    return _library() is not None


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Does the kernel take x @ w.T: up to MAX_ROWS rows of CPU fp32 activations, a contiguous CPU fp16 (N, K)
    matrix, and a build here?"""
    return (
        x.dtype == torch.float32
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and w.dtype == torch.float16
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and w.dim() == 2
        and x.shape[-1] == w.shape[1]
        and w.is_contiguous()
        and available()
    )


def linear_f16w(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) fp32 @ w.T, w (N, K) fp16 contiguous, on the CPU through the kernel (any number of rows; linear()
    sends more than MAX_ROWS to PyTorch) -> (..., N) fp32."""
    ok = x.dtype == torch.float32 and w.dtype == torch.float16 and x.device.type == w.device.type == "cpu"
    if not (ok and w.dim() == 2 and x.shape[-1] == w.shape[1] and w.is_contiguous() and available()):
        raise ValueError(
            "linear_f16w takes CPU fp32 x (..., K) and a contiguous CPU fp16 w (N, K) on an x86-64 CPU with AVX2, "
            f"FMA and F16C; got x {x.dtype} {tuple(x.shape)} {x.device}, w {w.dtype} {tuple(w.shape)} {w.device}"
        )
    return _linear(x, w)


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """linear_f16w once its arguments are known to fit (`takes`; the decode path calls this ~90 times a step)."""
    N, K = w.shape
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)  # in its final shape: a view costs ~4 us a call
    _library().linear_f16w(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // K, K, N)
    return y
