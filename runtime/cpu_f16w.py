"""y = x @ W.T with fp32 activations and the workspace's fp16 weights, for CPUs without native bf16 (AVX2 + F16C).

Where the CPU has no bf16 arithmetic the compute dtype is fp32 (runtime.engine.resolve_compute_dtype), and PyTorch's
fp32 GEMM then reads 4 bytes per weight, at a fraction of the memory bandwidth at decode shapes (measured on a
2-core AMD EPYC with AVX2 and ~18 GB/s read bandwidth: the 121 matrices of a SmolLM2-135M decode step take 65 ms
at one row, ~4 GB/s). The workspace stores the weights in fp16, and fp16 -> fp32 is exact, so the model can keep
them in fp16 (half the memory) and convert each weight vector in registers (vcvtph2ps) right before its fp32
multiply-adds: the products and sums are those of an fp32 GEMM on the same weights, in a different order.

    W (N, K) fp16 row-major (nn.Linear's layout), x (B, K) fp32, y (B, N) fp32
    y[b, n] = sum_k x[b, k] * fp32(W[n, k])        fp32 products and sums

Layout (`Panels`, how the model holds its matrices here): panels of 16 weight rows, each stored k-major, so one
panel is one sequential run of memory and a k step's 16 weights are two vectors. The kernel is an outer-product
(broadcast) GEMM: per k, each activation row's x[k] is broadcast against the panel's 16 converted weights, into 2
accumulators per row, no horizontal sums. Threads take panels; a panel meets the rows chunk by chunk of 64 k steps,
in passes of up to 6 rows (12 accumulators), every pass but the first reading the chunk from L1, so the weights
stream from memory once per call, in one run per panel (the first pass prefetches 4 KiB ahead). The chunks' sums
are added in memory: fp32 error of 64-term running sums, not K-term ones. Up to 60 rows' sums per panel at once
(more rows: blocks of 60, each reading the weights again). Replaced a dot-product kernel on the (N, K) layout
(rows of weights against rows of activations, a horizontal sum per output), which it beat in one process,
alternating, on a decode step's 121 matrices (2 threads, weights from memory): 1.05x at 1 row, 1.2-1.3x at 2-4,
1.47x at 8, 1.2-1.5x at 12-64 rows (8 rows: 94 -> 139 GFLOP/s; 1 row: 20.6 GB/s).
Against F.linear with fp32 weights (`python tools/bench_linear.py`: all 121 matrices of a SmolLM2 step, 2 threads,
one process): 3.2x faster at 1 row, 5.5-6.2x at 2-8, 3.7x at 16, 2.7x at 32, 2.0x at 64, 1.2-1.3x at 96-128
(8 rows: 108 GFLOP/s; 1 row: 15.8 GB/s of weights, on a day the machine read 21-23 GB/s). Prefill-sized calls
(more than MAX_ROWS rows) go to PyTorch's GEMM on the weights unpacked to fp32 for the call
(runtime.cpu_linear.linear): from ~200 rows on it is as fast as this kernel, at 512+ rows 1.15-1.25x faster
(MAX_ROWS also caps the decode step's batch).

Two builds of one source: 8-lane AVX2 (a k step's 16 panel weights are two vectors, passes of up to 6 rows) and,
where the CPU has AVX-512 (without native bf16 the compute dtype is fp32 there too: Intel Xeon from Skylake-SP to
Ice Lake), 16-lane AVX-512 (one vector a k step, 32 registers: passes of up to 12 rows, and the first pass of a
chunk always prefetches). Same products; the sums run in another order (other copies of the accumulators along k),
so the two agree to fp32 summation error. Measured on a 2-core Ice Lake Xeon (`python tools/bench_linear.py`, one
process, alternating), AVX-512 time / AVX2's: 0.94 at 1 row, 0.89 at 2, 0.93 at 8 (13.0 ms a step at one row:
20.7 GB/s of weights against ~22 GB/s summing a buffer there), 1.0 from 16 rows on, where both run at ~150 GFLOP/s (with
both cores busy this CPU multiplies-adds as fast with 8 lanes as with 16: a loop of 16-lane FMAs ran at half its
one-core rate on each core, ~180 GFLOP/s in all, 8-lane FMAs at ~200). Whole decode steps gain more than that
(SmolLM2 engines on each build, interleaved step by step in one process, same machine, two runs an hour apart,
the second after the activation copy below): 1.06-1.11x at batch 1 x 1024, 1.07-1.38x at 8 x 2048, 1.06-1.29x at
32 x 1024, for fp16, INT8, FP8 and int8_per_token_head (the attention kernel is AVX-512 there too, and 256-bit code
between 512-bit code ran slower than either alone).

The activations are copied once per call, pass by pass with k outermost, so a pass's broadcasts address one
pointer: with a pointer per row the compiler ran out of general registers and reloaded row pointers from vector
registers every k step. AVX2 build 0.88-0.96x the time at 4-64 rows (Ice Lake, one process, against the previous
source), AVX-512 build unchanged (0.94-1.03x), one row untouched (no copy).
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
#include <vector>

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline __m256 load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// The weights as panels of PANEL = 16 rows: panel p holds W[16 p + j, k] at wp[(p K + k) 16 + j], rows past N zero.
// A panel meets the activation rows chunk by chunk of K_CHUNK k steps; within a chunk, in passes of up to MOST_ROWS
// rows, each pass from the L1 cache but the first (which prefetches the panel PF_AHEAD weights ahead): the weights
// stream from memory once, in one sequential run per panel.
constexpr int PANEL = 16;
constexpr int64_t K_CHUNK = 64;
constexpr int64_t BLOCK_ROWS = 60;  // rows whose sums a panel holds at once (60 x 16 fp32: 3.75 KiB)
constexpr int64_t PF_AHEAD = 2048;  // weights: 4 KiB, 128 k steps

// A k step's PANEL weights as NV vectors of WV floats: one 16-lane vector in the AVX-512 build, two 8-lane ones in
// the AVX2 build. MOST_ROWS per pass: the accumulators (MOST_ROWS NV) and a step's weights fit the registers.
#ifdef __AVX512F__
typedef __m512 wvec;
constexpr int NV = 1, WV = 16;
constexpr int64_t MOST_ROWS = 12;  // per pass: 12 accumulators of 32 registers
static inline wvec wload(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline wvec wbroadcast(const float* p) { return _mm512_set1_ps(*p); }
static inline wvec wfma(wvec a, wvec b, wvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline wvec wadd(wvec a, wvec b) { return _mm512_add_ps(a, b); }
static inline wvec wzero() { return _mm512_setzero_ps(); }
static inline wvec wloadf(const float* p) { return _mm512_loadu_ps(p); }
static inline void wstoref(float* p, wvec v) { _mm512_storeu_ps(p, v); }
#else
typedef __m256 wvec;
constexpr int NV = 2, WV = 8;
constexpr int64_t MOST_ROWS = 6;  // per pass: 12 accumulators of 16 registers
static inline wvec wload(const uint16_t* p) { return load_f16(p); }
static inline wvec wbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline wvec wfma(wvec a, wvec b, wvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline wvec wadd(wvec a, wvec b) { return _mm256_add_ps(a, b); }
static inline wvec wzero() { return _mm256_setzero_ps(); }
static inline wvec wloadf(const float* p) { return _mm256_loadu_ps(p); }
static inline void wstoref(float* p, wvec v) { _mm256_storeu_ps(p, v); }
#endif

// One pass over k in [k0, k1): MR rows x the panel's 16 columns. Per k the panel's 16 weights are converted once
// (NV vectors) and each row's x[k] broadcast against them: NV MR accumulators, KU copies along k where MR rows alone
// would leave too few independent chains for the FMA latency. The chunk's sums are stored to (first chunk) or added
// to acc (MR rows x PANEL): fp32 rounding error grows with the length of a running sum, and one over all of K
// drifted 3e-4 from HF's logits on SmolLM2; chunks keep it at the scale of an 8-lane dot product's.
template <int MR, int KU>
static void panel_pass(const float* x, const uint16_t* wp, float* acc, int64_t k0, int64_t k1,
                       bool prefetch) {
  wvec c[KU][MR][NV];
#pragma GCC unroll 16
  for (int u = 0; u < KU; ++u)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[u][m][v] = wzero();
  int64_t k = k0;
  for (; k + KU <= k1; k += KU) {
    if ((MR >= 3 || NV == 1) && prefetch) _mm_prefetch((const char*)(wp + k * PANEL + PF_AHEAD), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int u = 0; u < KU; ++u) {
      wvec w[NV];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) w[v] = wload(wp + (k + u) * PANEL + v * WV);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const wvec xb = wbroadcast(x + (k + u) * MR + m);
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) c[u][m][v] = wfma(w[v], xb, c[u][m][v]);
      }
    }
  }
  for (; k < k1; ++k) {  // a chunk not a multiple of KU
    wvec w[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) w[v] = wload(wp + k * PANEL + v * WV);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const wvec xb = wbroadcast(x + k * MR + m);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[0][m][v] = wfma(w[v], xb, c[0][m][v]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      wvec a = c[0][m][v];
#pragma GCC unroll 16
      for (int u = 1; u < KU; ++u) a = wadd(a, c[u][m][v]);
      float* out = acc + m * PANEL + v * WV;
      if (k0 > 0) a = wadd(a, wloadf(out));
      wstoref(out, a);
    }
}

// r rows (1..MOST_ROWS) in one pass; KU gives ~8-12 independent accumulator chains (2 FMA ports x 4+ cycles).
static void panel_rows(const float* x, const uint16_t* wp, float* acc, int64_t r, int64_t k0,
                       int64_t k1, bool prefetch) {
  switch (r) {
#ifdef __AVX512F__
    case 1: panel_pass<1, 8>(x, wp, acc, k0, k1, prefetch); break;
    case 2: panel_pass<2, 4>(x, wp, acc, k0, k1, prefetch); break;
    case 3: panel_pass<3, 4>(x, wp, acc, k0, k1, prefetch); break;
    case 4: panel_pass<4, 2>(x, wp, acc, k0, k1, prefetch); break;
    case 5: panel_pass<5, 2>(x, wp, acc, k0, k1, prefetch); break;
    case 6: panel_pass<6, 2>(x, wp, acc, k0, k1, prefetch); break;
    case 7: panel_pass<7, 2>(x, wp, acc, k0, k1, prefetch); break;
    case 8: panel_pass<8, 1>(x, wp, acc, k0, k1, prefetch); break;
    case 9: panel_pass<9, 1>(x, wp, acc, k0, k1, prefetch); break;
    case 10: panel_pass<10, 1>(x, wp, acc, k0, k1, prefetch); break;
    case 11: panel_pass<11, 1>(x, wp, acc, k0, k1, prefetch); break;
    default: panel_pass<12, 1>(x, wp, acc, k0, k1, prefetch); break;
#else
    case 1: panel_pass<1, 6>(x, wp, acc, k0, k1, prefetch); break;
    case 2: panel_pass<2, 2>(x, wp, acc, k0, k1, prefetch); break;
    case 3: panel_pass<3, 2>(x, wp, acc, k0, k1, prefetch); break;
    case 4: panel_pass<4, 1>(x, wp, acc, k0, k1, prefetch); break;
    case 5: panel_pass<5, 1>(x, wp, acc, k0, k1, prefetch); break;
    default: panel_pass<6, 1>(x, wp, acc, k0, k1, prefetch); break;
#endif
  }
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

// The 8 x 8 fp32 block r (row i = r[i]) transposed in registers.
static inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i)
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20), r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
}

// W (N, K) fp32 row-major from its panels, for PyTorch's GEMM on prefill-sized calls: 8 k steps x 8 columns of a
// panel converted (8 vectors) and transposed in registers into 8 rows' runs of 8.
extern "C" void unpack_f16w(const uint16_t* wp, float* out, int64_t K, int64_t N) {
  const int64_t panels = (N + PANEL - 1) / PANEL, K8 = K & ~(int64_t)7;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
  for (int64_t p = 0; p < panels; ++p) {
    const uint16_t* w = wp + p * K * PANEL;
    for (int64_t h = 0; h < PANEL && p * PANEL + h < N; h += 8) {
      const int64_t rows = N - p * PANEL - h < 8 ? N - p * PANEL - h : 8;
      float* o = out + (p * PANEL + h) * K;
      for (int64_t k = 0; k < K8; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load_f16(w + (k + i) * PANEL + h);
        transpose8(r);
        for (int j = 0; j < rows; ++j) _mm256_storeu_ps(o + j * K + k, r[j]);
      }
      for (int64_t k = K8; k < K; ++k)
        for (int j = 0; j < rows; ++j) o[j * K + k] = _cvtsh_ss(w[k * PANEL + h + j]);
    }
  }
}

// f(b0, r, i) for each pass i of a block of `rows` rows: equal passes of up to MOST_ROWS, the rows [b0, b0 + r).
template <class F>
static inline void for_passes(int64_t rows, F f) {
  const int64_t passes = (rows + MOST_ROWS - 1) / MOST_ROWS;
  for (int64_t i = 0, b0 = 0; i < passes; ++i) {
    const int64_t r = (rows - b0 + passes - i - 1) / (passes - i);
    f(b0, r, i);
    b0 += r;
  }
}

// y (B, N) = x (B, K) @ W.T with W as panels (above). Threads take panels; a panel meets blocks of up to
// BLOCK_ROWS rows (one block at decode sizes), each in equal passes of up to MOST_ROWS. x is first copied pass by
// pass with k outermost (a pass of r rows starting at row b: xp[b K + k r + m] = x[b + m, k]), so the r values a
// k step broadcasts are adjacent and every pass addresses them from one pointer (r row pointers would not fit the
// general registers with the panel's: the compiler kept them in vector registers and moved one back per k step).
extern "C" void linear_f16w(const float* x, const uint16_t* wp, float* y, int64_t B, int64_t K, int64_t N) {
  const int64_t panels = (N + PANEL - 1) / PANEL;
  static thread_local std::vector<float> packed;  // the caller's thread: reused across calls
  const float* xp = x;  // one row: already in that order
  if (B > 1) {
    if ((int64_t)packed.size() < B * K) packed.resize(B * K);
    for (int64_t r0 = 0; r0 < B; r0 += BLOCK_ROWS)
      for_passes(B - r0 < BLOCK_ROWS ? B - r0 : BLOCK_ROWS, [&](int64_t b0, int64_t r, int64_t) {
        float* dst = packed.data() + (r0 + b0) * K;
        for (int64_t m = 0; m < r; ++m)
          for (int64_t k = 0; k < K; ++k) dst[k * r + m] = x[(r0 + b0 + m) * K + k];
      });
    xp = packed.data();
  }
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
  for (int64_t p = 0; p < panels; ++p) {
    const uint16_t* w = wp + p * K * PANEL;
    const int64_t cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
    float acc[BLOCK_ROWS * PANEL];
    for (int64_t r0 = 0; r0 < B; r0 += BLOCK_ROWS) {
      const int64_t rows = B - r0 < BLOCK_ROWS ? B - r0 : BLOCK_ROWS;
      for (int64_t k0 = 0; k0 < K; k0 += K_CHUNK)
        for_passes(rows, [&](int64_t b0, int64_t r, int64_t i) {
          panel_rows(xp + (r0 + b0) * K, w, acc + b0 * PANEL, r, k0, k0 + K_CHUNK < K ? k0 + K_CHUNK : K, i == 0);
        });
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t j = 0; j < cols; ++j) y[(r0 + b) * N + p * PANEL + j] = acc[b * PANEL + j];
    }
  }
}
"""


@functools.cache
def _library(avx512: bool | None = None) -> ctypes.CDLL | None:
    """The kernels' library: its AVX-512 build where the CPU has AVX-512 (avx512 None or True), else the AVX2 build
    (also avx512=False, which the tests use to cover both)."""
    flags, cpu = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], ("avx2", "fma", "f16c")
    src = with_exp2_poly(KERNEL_SRC)
    lib = None
    if avx512 is not False:
        lib = cpp_build.load("linear_f16w_avx512", src, [*flags, "-mavx512f"], (*cpu, "avx512f"))
    if lib is None and avx512 is not True:
        lib = cpp_build.load("linear_f16w", src, flags, cpu)
    if lib is not None and lib.linear_f16w.argtypes is None:
        cpp_build.declare(lib, decode_op_signatures("f32", "f16w"))
        cpp_build.declare(lib, {"unpack_f16w": (None, [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2)})
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


# Rows per call up to which the kernel beats PyTorch's fp32 GEMM (`python tools/bench_linear.py --rows
# 64,96,128,192,256`, PyTorch on fp32 copies made beforehand: 2.0x at 64 rows, 1.2-1.3x at 96-128, 1.0-1.07x at
# 192-256; in the model PyTorch's GEMM also pays for unpacking the panels on every call). Also the decode step's
# largest batch.
MAX_ROWS = 128


PANEL = 16  # weight rows per panel: the kernel's constant of the same name


class Panels:
    """An (N, K) fp16 weight matrix in the kernel's layout: ceil(N / PANEL) panels of PANEL rows, each stored with k
    outermost, `data` (P, K, PANEL) fp16 contiguous, data[p, k, j] = W[PANEL p + j, k], rows past N zero. The model
    holds its matrices this way for fp32 compute where the kernel runs (no second copy); `float()` gives the (N, K)
    fp32 matrix PyTorch's GEMM takes for prefill-sized calls. Not a tensor: F.linear on it fails loudly instead of
    multiplying by shuffled weights."""

    dtype = torch.float16

    def __init__(self, data: torch.Tensor, n: int) -> None:
        P, K, width = data.shape
        if data.dtype != torch.float16 or width != PANEL or not data.is_contiguous() or not 0 < n <= P * PANEL:
            raise ValueError(
                f"Panels: data must be contiguous fp16 (P, K, {PANEL}) holding N rows; got "
                f"{data.dtype} {tuple(data.shape)} for N {n}"
            )
        self.data, self.shape = data, (n, K)

    @staticmethod
    def data_shape(n: int, k: int) -> tuple[int, int, int]:
        """The shape of the packed data of an (n, k) matrix."""
        return (-(-n // PANEL), k, PANEL)

    @classmethod
    def pack(cls, w: torch.Tensor, out: torch.Tensor | None = None) -> Panels:
        """w (N, K) fp16, any strides -> its panels, written into `out` (an fp16 tensor of data_shape(N, K), e.g.
        from a runtime.hugepages.Arena: no intermediate copy) or a new tensor; w is unchanged."""
        if w.dtype != torch.float16 or w.dim() != 2:
            raise ValueError(f"Panels.pack takes an fp16 (N, K) matrix; got {w.dtype} {tuple(w.shape)}")
        N, K = w.shape
        shape = cls.data_shape(N, K)
        if out is None:
            out = torch.empty(shape, dtype=torch.float16)
        elif out.shape != shape or out.dtype != torch.float16:
            raise ValueError(f"Panels.pack: out must be fp16 {shape} for {(N, K)}; got {out.dtype} {tuple(out.shape)}")
        full = N // PANEL  # w may be a transposed view: reshape stays a view of it, the copy transposes once
        out[:full].copy_(w[: full * PANEL].reshape(full, PANEL, K).transpose(1, 2))
        if full < shape[0]:  # the last panel's rows, then zeros
            out[full, :, : N - full * PANEL].copy_(w[full * PANEL :].T)
            out[full, :, N - full * PANEL :] = 0
        return cls(out, N)

    def float(self) -> torch.Tensor:
        """The (N, K) fp32 matrix, row-major (a new tensor; exact: fp16 -> fp32): the kernel library's unpacking
        where it runs (as fast as casting an (N, K) fp16 matrix, 3-5x PyTorch's transposing copy below, which
        would cost a prefill ~8 % more than the cast it replaces), else PyTorch."""
        N, K = self.shape
        if self.device.type == "cpu" and (lib := _library()) is not None:
            out = torch.empty(N, K)
            lib.unpack_f16w(self.data.data_ptr(), out.data_ptr(), K, N)
            return out
        out = torch.empty(-(-N // PANEL) * PANEL, K)
        out.view(-1, PANEL, K).copy_(self.data.transpose(1, 2))  # one pass: converts while it transposes
        return out[:N]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def data_ptr(self) -> int:
        return self.data.data_ptr()

    def __repr__(self) -> str:
        return f"Panels(N={self.shape[0]}, K={self.shape[1]}, fp16)"


def available() -> bool:
    """Can this machine run the kernel (x86-64 with AVX2, FMA and F16C, g++)?"""
    return _library() is not None


def takes(x: torch.Tensor, w) -> bool:
    """Does the kernel take x @ w.T: up to MAX_ROWS rows of CPU fp32 activations against a CPU `Panels` matrix, with a
    build here?"""
    return (
        isinstance(w, Panels)
        and x.dtype == torch.float32
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and x.shape[-1] == w.shape[1]
        and available()
    )


def linear_f16w(x: torch.Tensor, w: Panels) -> torch.Tensor:
    """x (..., K) fp32 @ W.T for W (N, K) fp16 held as `Panels`, on the CPU through the kernel (any number of rows;
    runtime.cpu_linear.linear sends more than MAX_ROWS to PyTorch) -> (..., N) fp32."""
    ok = isinstance(w, Panels) and x.dtype == torch.float32 and x.device.type == w.device.type == "cpu"
    if not (ok and x.shape[-1] == w.shape[1] and available()):
        got = f"{w.dtype} {tuple(w.shape)} {w.device}" + ("" if isinstance(w, Panels) else f" {type(w).__name__}")
        raise ValueError(
            "linear_f16w takes CPU fp32 x (..., K) and a CPU fp16 (N, K) matrix as cpu_f16w.Panels (Panels.pack(w)) "
            f"on an x86-64 CPU with AVX2, FMA and F16C; got x {x.dtype} {tuple(x.shape)} {x.device}, w {got}"
        )
    return _linear(x, w)


def _linear(x: torch.Tensor, w: Panels, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """linear_f16w once its arguments are known to fit (`takes`; the decode path calls this ~90 times a step), on
    `lib` (a build from `_library(...)`; None: the one this CPU gets)."""
    N, K = w.shape
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)  # in its final shape: a view costs ~4 us a call
    (lib or _library()).linear_f16w(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // K, K, N)
    return y
