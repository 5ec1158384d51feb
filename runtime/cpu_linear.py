"""y = x @ W.T for a decode step's few rows, in bf16, closer to the memory bandwidth (CPUs with AVX512-BF16).

A decode step multiplies one activation row per running sequence by every weight matrix of the model: at
small batches that is bound by reading the weights (SmolLM2-135M: 270 MB of bf16 per step). PyTorch's bf16
GEMM reads them at about a third of the machine's bandwidth at these shapes (12-14 GB/s against ~35-40 GB/s
summing a buffer on the 2-core EPYC we measure on). This kernel streams the weights once per 8 activation rows:

    W (N, K) bf16 row-major (nn.Linear's layout), x (B, K) bf16, y (B, N) bf16
    y[b, n] = round_bf16(sum_k x[b, k] * W[n, k])     products and sums in fp32 (vdpbf16ps), rounded once

Work split: each thread takes a contiguous range of weight rows and reads it row after row, one sequential
stream per thread (which the hardware prefetcher follows best: 4 weight rows read interleaved, the previous
design, reached 18 GB/s at one row against 25 GB/s now; software prefetching only slowed it), each weight row
meeting up to 12 activation rows held in L1 (2 fp32 accumulators of 16 lanes per row up to 8 rows, 1 from 9;
more rows in passes of 8). K need not be a multiple of
32 (masked loads). The sum order differs from PyTorch's, so results agree to fp32 rounding before the final
bf16 rounding (tests compare against an fp32 matmul of the same bf16 inputs).

`linear(x, w)` uses the kernel for CPU bf16 inputs with at most `MAX_ROWS` rows and `F.linear` otherwise.
Measured at SmolLM2's decode shapes (all 121 matrices of a step, 2 threads, interleaved in one process),
kernel time / PyTorch's: 0.46 at 1 row, 0.63 at 4, 0.68 at 8, 0.76 at 11, 0.88 at 12, 0.82 at 16, 0.94 at 22,
1.01 at 24, 1.12 at 32. Past one row the kernel is bound by its dot-product chains, not by memory.

On CPUs with AMX-BF16 (Intel Xeon from Sapphire Rapids on; Linux grants the tile state on request) the same
function runs on the tiles: one tdpbf16ps multiplies 16 weight rows x 32 k by 32 k x up to 16 activation rows,
so up to 32 rows (two tile halves) cost one pass over the weights at the memory's speed, and `max_rows()` is
MAX_ROWS_AMX (the decode step's largest batch in bf16 too). Weights stay in nn.Linear's layout (the tiles
compute y.T = W x.T: 16 weight rows are 16 tile rows at stride 2K); K not a multiple of 32 and the last N % 16
weight rows take the AVX512-BF16 path. Same sums in fp32, rounded once. Measured on a 2-core Xeon with AMX at
the same shapes (`python tools/bench_linear.py --bf16`), tile kernel time / AVX512-BF16 kernel's / PyTorch's:
0.81 / 0.51 at 1 row, 0.54 / 0.54 at 8, 0.34 / 0.57 at 16, 0.25 / 0.66 at 32, 0.23 / 0.84 at 64, 0.20 / 0.96 at
128 (~13.6 ms a step from 1 to 8 rows: 20 GB/s against ~23 GB/s summing a buffer there).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from runtime import cpp_build, cpu_f16w

# rows per call up to which the kernel beats PyTorch's bf16 GEMM (see the module docstring), without and with AMX
MAX_ROWS, MAX_ROWS_AMX = 16, 128

KERNEL_SRC = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <vector>

static inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
extern "C" void rms_norm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t rows, int64_t n, float eps);

// BR activation rows (1..8) against all N weight rows: each thread streams its contiguous range of weight rows
// once, row after row (one sequential stream per thread, which the hardware prefetcher follows best), and
// meets every activation row with the weight vectors in registers: 2 accumulators along k per activation row.
template <int BR>
static void rows(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t K, int64_t N, int64_t ldy) {
  constexpr int A = BR <= 8 ? 2 : 1;  // accumulators along k per activation row (registers: BR * A + 2 <= 32)
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* wr = w + n * K;
    __m512 a[BR][A];
    for (int b = 0; b < BR; ++b)
      for (int j = 0; j < A; ++j) a[b][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k), w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);
      for (int b = 0; b < BR; ++b) {
        a[b][0] = _mm512_dpbf16_ps(a[b][0], (__m512bh)_mm512_loadu_si512(x + b * K + k), w0);
        a[b][A - 1] = _mm512_dpbf16_ps(a[b][A - 1], (__m512bh)_mm512_loadu_si512(x + b * K + k + 32), w1);
      }
    }
    for (; k < K; k += 32) {  // K need not be a multiple of 64 (or 32: masked loads)
      const __mmask32 m = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1u);
      const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, wr + k);
      for (int b = 0; b < BR; ++b)
        a[b][0] = _mm512_dpbf16_ps(a[b][0], (__m512bh)_mm512_maskz_loadu_epi16(m, x + b * K + k), w0);
    }
    alignas(64) float s[16] = {0};
    for (int b = 0; b < BR; ++b) s[b] = _mm512_reduce_add_ps(A == 2 ? _mm512_add_ps(a[b][0], a[b][A - 1]) : a[b][0]);
    alignas(32) uint16_t o[16];
    _mm256_store_si256((__m256i*)o, (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(s)));  // nearest even, as torch
    for (int b = 0; b < BR; ++b) y[b * ldy + n] = o[b];
  }
}

// RMSNorm of bf16 rows: y = round_bf16((x * (1 / sqrt(mean(x^2) + eps))) * w), all in fp32 (F.rms_norm's order).

extern "C" void rms_norm_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for schedule(static) if (rows * n >= (1 << 18))
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * n;
    uint16_t* yr = y + r * n;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 m = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1u);
      const __m512 v = load_bf16(xr + k, m);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)n + eps);
    const __m512 vi = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 m = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1u);
      const __m512 o = _mm512_mul_ps(_mm512_mul_ps(load_bf16(xr + k, m), vi), load_bf16(w + k, m));
      _mm256_mask_storeu_epi16(yr + k, m, (__m256i)_mm512_cvtneps_pbh(o));
    }
  }
}

// Up to 12 activation rows in one pass over the weights (2 accumulators per row up to 8, 1 from 9 on: 32
// registers), more in passes of 8 (measured at SmolLM2's shapes: 16 rows in one pass with 1 accumulator were
// slower than two passes of 8 with 2; 9-12 rows in one pass faster than two). y rows have stride ldy.
static void linear_dpbf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t B, int64_t K, int64_t N,
                        int64_t ldy) {
  for (int64_t b0 = 0; b0 < B;) {
    const int64_t left = B - b0, r = left <= 12 ? left : 8;
    const uint16_t* xb = x + b0 * K;
    uint16_t* yb = y + b0 * ldy;
    switch (r) {
#define KVQ_ROWS(n) case n: rows<n>(xb, w, yb, K, N, ldy); break;
      KVQ_ROWS(1) KVQ_ROWS(2) KVQ_ROWS(3) KVQ_ROWS(4) KVQ_ROWS(5) KVQ_ROWS(6) KVQ_ROWS(7) KVQ_ROWS(8)
      KVQ_ROWS(9) KVQ_ROWS(10) KVQ_ROWS(11) KVQ_ROWS(12)
#undef KVQ_ROWS
    }
    b0 += r;
  }
}

#ifdef __AMX_BF16__
// AMX (Intel Xeon from Sapphire Rapids on): one tile multiply (tdpbf16ps) adds a 16 x 32 bf16 block times a
// 32 x 16 one into 16 x 16 fp32 sums, 16x a vdpbf16ps's work, so the weights stream at the memory bandwidth at
// any batch up to 32 rows instead of being bound by the dot-product chains past one row. The weights are read
// in nn.Linear's layout as they are: the tiles compute y.T = W x.T, A = 16 weight rows x 32 k (64-byte rows at
// stride 2K, straight from W), B = x.T in the pair layout tdpbf16ps wants (x packed once per call: (K/2, M, 2)),
// C = 16 weight rows x M activation rows of fp32 sums, rounded once to bf16 when stored (as `rows` does).
// Tiles 0-3: C (two groups of 16 weight rows x two halves of up to 16 activation rows), 4-5: A, 6-7: B.
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static bool amx_granted = false;  // the kernel asked Linux for the tile state (arch_prctl), once per process

extern "C" int amx_request(void) {
  amx_granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return amx_granted;
}

// C tile `t` (16 weight rows x m activation rows, fp32; idx = lane * m) -> y[0..m) rows, 16 bf16 each at stride
// ldy (a macro: the tile number must be a constant).
#define KVQ_STORE_C(t, m, idx, yp)                                                                           \
  {                                                                                                          \
    _tile_stored(t, buf, 4 * (m));                                                                           \
    for (int i = 0; i < (m); ++i)                                                                            \
      _mm256_storeu_si256((__m256i*)((yp) + i * ldy),                                                        \
                          (__m256i)_mm512_cvtneps_pbh(_mm512_i32gather_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(i)), buf, 4))); \
  }

// y[0..M) (M <= 32; y rows at stride ldy) = x W.T for the weight rows [0, N16), N16 a multiple of 16, K of 32;
// xp: x packed (K/2, M1, 2) for rows 0..M1-1 then (K/2, M2, 2) for the rest (M1 = min(M, 16), M2 = M - M1).
static void amx_pass(const uint16_t* xp, const uint16_t* w, uint16_t* y, int M, int64_t K, int64_t N16,
                     int64_t ldy) {
  const int M1 = M < 16 ? M : 16, M2 = M - M1;
  const uint16_t* xp2 = xp + K * M1;
#pragma omp parallel if (N16 * K >= (1 << 16))
  {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; ++t) c.rows[t] = 16;
    c.colsb[0] = c.colsb[1] = c.colsb[6] = 4 * M1;
    c.colsb[2] = c.colsb[3] = c.colsb[7] = 4 * (M2 > 0 ? M2 : 1);
    c.colsb[4] = c.colsb[5] = 64;
    _tile_loadconfig(&c);
    alignas(64) float buf[16 * 16];
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i idx1 = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(M1));  // C's rows for each half
    const __m512i idx2 = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(M2 > 0 ? M2 : 1));
    const int64_t pairs = N16 / 32;  // blocks of 32 weight rows; an odd 16 at the end
#pragma omp for schedule(static)
    for (int64_t b = 0; b < pairs + (N16 % 32 != 0); ++b) {
      const int64_t n = 32 * b;
      const uint16_t* wb = w + n * K;
      const bool two = b < pairs;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < K; k += 32) {
        _tile_loadd(4, wb + k, 2 * K);
        _tile_loadd(6, xp + k * M1, 4 * M1);
        _tile_dpbf16ps(0, 4, 6);
        if (two) {
          _tile_loadd(5, wb + 16 * K + k, 2 * K);
          _tile_dpbf16ps(1, 5, 6);
        }
        if (M2 > 0) {
          _tile_loadd(7, xp2 + k * M2, 4 * M2);
          _tile_dpbf16ps(2, 4, 7);
          if (two) _tile_dpbf16ps(3, 5, 7);
        }
      }
      KVQ_STORE_C(0, M1, idx1, y + n)
      if (two) KVQ_STORE_C(1, M1, idx1, y + n + 16)
      if (M2 > 0) {
        KVQ_STORE_C(2, M2, idx2, y + 16 * ldy + n)
        if (two) KVQ_STORE_C(3, M2, idx2, y + 16 * ldy + n + 16)
      }
    }
    _tile_release();
  }
}
#undef KVQ_STORE_C

// x W.T on the tiles in passes of up to 32 activation rows; the last N % 16 weight rows (and any K not a multiple
// of 32) through linear_dpbf16.
static bool linear_amx(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t B, int64_t K, int64_t N) {
  if (!amx_granted || K % 32 != 0 || N < 16) return false;
  const int64_t N16 = N / 16 * 16;
  static thread_local std::vector<uint32_t> packed;  // x's bf16 pairs, reused from call to call (~90 a step)
  packed.resize((size_t)16 * K);
  for (int64_t b0 = 0; b0 < B; b0 += 32) {
    const int M = B - b0 < 32 ? (int)(B - b0) : 32, M1 = M < 16 ? M : 16;
    const uint32_t* xs = (const uint32_t*)(x + b0 * K);  // bf16 pairs (x[m, 2p], x[m, 2p + 1])
    uint32_t* xq = packed.data();
    for (const int m0 : {0, M1}) {  // each half (K/2, rows, 2): rows [0, M1), then [M1, M)
      const int rows = m0 == 0 ? M1 : M - M1;
      for (int64_t p = 0; p < K / 2; ++p)
        for (int m = 0; m < rows; ++m) xq[p * rows + m] = xs[(m0 + m) * (K / 2) + p];
      xq += K / 2 * rows;
    }
    amx_pass((const uint16_t*)packed.data(), w, y + b0 * N, M, K, N16, N);
    if (N16 < N) linear_dpbf16(x + b0 * K, w + N16 * K, y + b0 * N + N16, M, K, N - N16, N);
  }
  return true;
}
#endif

extern "C" void linear_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t B, int64_t K, int64_t N) {
#ifdef __AMX_BF16__
  if (linear_amx(x, w, y, B, K, N)) return;
#endif
  linear_dpbf16(x, w, y, B, K, N, N);
}

static inline void store_bf16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));  // nearest even, as torch
}
static inline __mmask16 tail16(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

// e^x in fp32 (relative error ~1e-6 over the range used here): 2^(x log2 e) as 2^n * 2^f, |f| <= 1/2, with a
// degree-6 polynomial for 2^f and vscalefps for 2^n.
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  EXP2_POLY(512)
  return _mm512_scalef_ps(p, n);
}

// SwiGLU then the down projection: rows h (B, 2K) = [gate | up] -> a = round(round(silu(gate)) * up) (the two
// bf16 roundings of F.silu(gate) * up), y = a @ W.T (W (N, K)).
extern "C" void linear_swiglu_bf16(const uint16_t* h, const uint16_t* w, uint16_t* y, int64_t B, int64_t K,
                                   int64_t N, uint16_t* a) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = tail16(K - k);
      const __m512 g = load_bf16(h + b * 2 * K + k, m), u = load_bf16(h + b * 2 * K + K + k, m);
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      const __m512 sr = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(silu));  // F.silu's bf16 result
      store_bf16(a + b * K + k, _mm512_mul_ps(sr, u), m);
    }
  linear_bf16(a, w, y, B, K, N);
}

// The residual add and the next RMSNorm: s = round(x + r) (torch's bf16 add), y = rms_norm(s) * w.
extern "C" void add_rms_norm_bf16(const uint16_t* x, const uint16_t* r, const uint16_t* w, uint16_t* s,
                                  uint16_t* y, int64_t rows, int64_t n, float eps) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 m = tail16(n - k);
      store_bf16(s + i * n + k, _mm512_add_ps(load_bf16(x + i * n + k, m), load_bf16(r + i * n + k, m)), m);
    }
  rms_norm_bf16(s, w, y, rows, n, eps);
}

// RoPE of the q and k heads of fused qkv rows (N, (H + 2 Hkv) D) bf16 at positions pos (N,): element pairs
// (2i, 2i + 1) times rot[pos] = (cos, sin) pairs (S, D / 2) fp32, in fp32 as the complex product
// (a c - b s, a s + b c), rounded to bf16; q -> (N, H, D), k -> (N, Hkv, D). Returns -1, or the index of the
// first position outside the table's S rows (then nothing is written).
extern "C" int64_t rope_qk_bf16(const uint16_t* qkv, const float* rot, const int64_t* pos, uint16_t* q, uint16_t* k,
                                int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t S) {
  for (int64_t t = 0; t < N; ++t)
    if (pos[t] < 0 || pos[t] >= S) return t;
  const int64_t width = (H + 2 * Hkv) * D;
  const __m512i swap = _mm512_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  const __m512 sign = _mm512_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1);
  for (int64_t t = 0; t < N; ++t) {
    const float* r = rot + pos[t] * D;  // D / 2 (cos, sin) pairs
    for (int64_t hd = 0; hd < H + Hkv; ++hd) {
      const uint16_t* x = qkv + t * width + hd * D;
      uint16_t* o = hd < H ? q + (t * H + hd) * D : k + (t * Hkv + hd - H) * D;
      for (int64_t d = 0; d < D; d += 16) {  // 8 pairs: [a, b] * [c, s] -> [a c - b s, b c + a s]
        const __mmask16 m = tail16(D - d);
        const __m512 v = load_bf16(x + d, m), cs = _mm512_maskz_loadu_ps(m, r + d);
        const __m512 c = _mm512_moveldup_ps(cs), sn = _mm512_movehdup_ps(cs);  // [c, c], [s, s]
        const __m512 vs = _mm512_mul_ps(_mm512_permutexvar_ps(swap, v), sign);  // [-b, a]
        store_bf16(o + d, _mm512_fmadd_ps(vs, sn, _mm512_mul_ps(v, c)), m);
      }
    }
  }
  return -1;
}
"""


@functools.cache
def _library(amx: bool | None = None) -> ctypes.CDLL | None:
    """The kernels' library: built with AMX tiles where the CPU has AMX-BF16 and Linux grants the tile state
    (amx None or True), else the AVX512-BF16 build (also amx=False, which the tests use to cover both)."""
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
    cpu = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
    src = cpu_f16w.with_exp2_poly(KERNEL_SRC)
    lib = None
    if amx is not False and cpp_build.cpu_has("amx_bf16", "amx_tile"):
        lib = cpp_build.load("linear_bf16_amx", src, [*flags, "-mamx-tile", "-mamx-bf16"], (*cpu, "amx_bf16"))
        if lib is not None and not lib.amx_request():
            lib = None  # a kernel without the tile state (Linux < 5.16) would fault on the first tile load
        if lib is not None:
            lib.max_rows = MAX_ROWS_AMX
    if lib is None and amx is not True:
        lib = cpp_build.load("linear_bf16", src, flags, cpu)
        if lib is not None:
            lib.max_rows = MAX_ROWS
    if lib is not None and lib.linear_bf16.argtypes is None:
        cpp_build.declare(lib, cpu_f16w.decode_op_signatures("bf16", "bf16"))
    return lib


def max_rows() -> int:
    """Rows per call up to which `linear` and `swiglu_linear` take the kernel (the decode step's largest batch in
    bf16): MAX_ROWS_AMX with AMX tiles, else MAX_ROWS."""
    lib = _library()
    return MAX_ROWS if lib is None else lib.max_rows


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
    return _linear_bf16(lib, x, w)


def _linear_bf16(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """linear_bf16 once its arguments are known to fit (the decode path calls this ~90 times a step)."""
    N, K = w.shape
    x2 = x.reshape(-1, K).contiguous()
    y = torch.empty(x2.shape[0], N, dtype=torch.bfloat16)
    lib.linear_bf16(x2.data_ptr(), w.data_ptr(), y.data_ptr(), x2.shape[0], K, N)
    return y.view(*x.shape[:-1], N)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T (w in nn.Linear's (out, in) layout): the kernel for a few CPU bf16 rows; fp32 rows against fp16
    weights packed as cpu_f16w.Panels (how the model holds them for fp32 compute where that kernel runs) through
    that kernel, or (prefill-sized calls) PyTorch's GEMM on them unpacked to fp32; F.linear otherwise."""
    if isinstance(w, cpu_f16w.Panels):
        return cpu_f16w._linear(x, w) if cpu_f16w.takes(x, w) else F.linear(x, w.float().to(x.dtype))
    if w.dtype == torch.float16 and x.dtype == torch.float32:
        return F.linear(x, w.float())
    if (
        x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and w.dim() == 2
        and x.shape[-1] == w.shape[1]
        and w.is_contiguous()
        and (lib := _library()) is not None
        and x.numel() <= lib.max_rows * x.shape[-1]
    ):
        return _linear_bf16(lib, x, w)
    return F.linear(x, w)


def _fused(name: str, *tensors: torch.Tensor):
    """The C++ op `name` for these CPU tensors of one dtype: the bf16 kernels above (AVX512-BF16) for bf16, the
    fp32 ones of runtime.cpu_f16w (AVX2) for fp32; None where none runs."""
    dtype = tensors[0].dtype
    if any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
        return None
    lib = _library() if dtype == torch.bfloat16 else cpu_f16w._library() if dtype == torch.float32 else None
    return None if lib is None else getattr(lib, f"{name}_{'bf16' if dtype == torch.bfloat16 else 'f32'}")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, w.shape, w, eps) over the last dim; for CPU bf16 / fp32 through a kernel (one op instead of
    PyTorch's ~10 for bf16 on the CPU: ~60 us a call at a decode step's single row, x61 calls a step), with the
    same arithmetic in fp32 (bf16: rounded once), so results agree with PyTorch's to fp32 summation order."""
    if w.dim() == 1 and x.shape[-1] == w.shape[0] and (op := _fused("rms_norm", x, w)) is not None:
        x, n = x.contiguous(), x.shape[-1]
        y = torch.empty(x.shape, dtype=x.dtype)  # in its final shape: a view costs as much as the kernel here
        op(x.data_ptr(), w.contiguous().data_ptr(), y.data_ptr(), x.numel() // n, n, eps)
        return y
    return F.rms_norm(x, w.shape, w, eps)


def swiglu_linear(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(F.silu(gate) * up) @ w.T for h = [gate | up] (..., 2K), w (N, K): one kernel call for a few CPU bf16 rows
    (the activation with F.silu's and the product's bf16 roundings, then the linear kernel) or for fp32 rows
    against fp16 cpu_f16w.Panels (fp32 activation, then runtime.cpu_f16w's kernel), else PyTorch."""
    N, K = w.shape
    if h.shape[-1] == 2 * K and (isinstance(w, cpu_f16w.Panels) or w.is_contiguous()):
        if cpu_f16w.takes(h[..., :K], w):
            op, dtype = cpu_f16w._library().linear_swiglu_f16w, torch.float32
        elif isinstance(w, cpu_f16w.Panels):
            op = None
        elif h.dtype == torch.bfloat16 and h.numel() <= max_rows() * 2 * K and (op := _fused("linear_swiglu", h, w)):
            dtype = torch.bfloat16
        else:
            op = None
        if op is not None:
            h = h.contiguous()
            B = h.numel() // (2 * K)
            act = torch.empty(B, K, dtype=dtype)
            y = torch.empty((*h.shape[:-1], N), dtype=dtype)
            op(h.data_ptr(), w.data_ptr(), y.data_ptr(), B, K, N, act.data_ptr())
            return y
    gate, up = h.chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: (s, rms_norm(s) * w) with s = x + r (new tensors; x is not modified);
    one kernel call for CPU bf16 (the same roundings as the two PyTorch operations) or fp32, else PyTorch."""
    if x.shape == r.shape and w.dim() == 1 and x.shape[-1] == w.shape[0] and (op := _fused("add_rms_norm", x, r, w)):
        x, r, n = x.contiguous(), r.contiguous(), x.shape[-1]
        s, y = torch.empty(x.shape, dtype=x.dtype), torch.empty(x.shape, dtype=x.dtype)
        op(x.data_ptr(), r.data_ptr(), w.contiguous().data_ptr(), s.data_ptr(), y.data_ptr(), x.numel() // n, n, eps)
        return s, y
    s = x + r
    return s, rms_norm(s, w, eps)


def rope_qk(qkv: torch.Tensor, rot: torch.Tensor, pos: torch.Tensor, H: int, Hkv: int, D: int):
    """RoPE of the q and k heads of fused qkv rows (N, (H + 2 Hkv) D) CPU bf16 or fp32 -> q (N, H, D),
    k (N, Hkv, D) in that dtype, with rot (S, D / 2) complex64 and positions pos (N,): pairs (2i, 2i + 1) as
    complex numbers times rot[pos], in fp32 (bf16: rounded once; the caller's PyTorch path does the same with
    complex tensors). None where no kernel takes these tensors."""
    N = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (H + 2 * Hkv) * D or rot.dtype != torch.complex64:
        return None
    if (op := _fused("rope_qk", qkv)) is None:
        return None
    qkv = qkv.contiguous()
    table = torch.view_as_real(rot.contiguous())  # (S, D / 2, 2) fp32: (cos, sin) pairs
    pos = pos.to(torch.int64).contiguous()
    q = torch.empty(N, H, D, dtype=qkv.dtype)
    k = torch.empty(N, Hkv, D, dtype=qkv.dtype)
    S = table.shape[0]
    bad = op(qkv.data_ptr(), table.data_ptr(), pos.data_ptr(), q.data_ptr(), k.data_ptr(), N, H, Hkv, D, S)
    if bad >= 0:  # checked in the kernel: no tensor operations per layer for it
        raise ValueError(f"rope_qk: positions outside [0, {S}) (the rotation table): pos[{bad}] = {int(pos[bad])}")
    return q, k
