"""Decode attention straight from the paged (possibly quantized) KV pool, without a full-precision copy.

Layout (the engine's paged cache): per layer, K and V pools `(num_blocks, H_kv, block_size, D)` contiguous in
the storage dtype (fp16 | int8 | float8_e4m3fn | float8_e5m2). Token t of sequence b lives in block
`block_tables[b, t // block_size]`, row `t % block_size`; one query token per sequence attends over its
positions [0, lengths[b]). Only those rows are ever read: rows past the length and the padding entries of
the block table (any value) are not touched, so a pool holding stale or non-finite data from freed sequences
cannot leak into the result. A sequence of length 0 gets a zero output.

The cache's per-head affine map x^ = scale * stored + zp is folded into the arithmetic instead of being
applied to the cache:
    scores = softmax_scale * (k_scale * (q . k_stored) + k_zp * sum(q))
    out    = v_scale * (p @ v_stored) + v_zp            (the softmax weights p sum to 1)
so each step reads 1 byte per INT8/FP8 element (2 for fp16).

Three functions with one signature:
    decode_attention(q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp, v_scale, v_zp, softmax_scale)
  q (B, H, D) in the compute dtype, pools as above, block_tables (B, max_blocks) int32 or int64, lengths (B,),
  parameters (H_kv,) fp32; returns (B, H, D) in q's dtype. H must be a multiple of H_kv (GQA).
  - `decode_attention_torch`: the PyTorch reference (any device), online softmax over chunks of positions
    gathered through the block table;
  - `decode_attention_cpp`: a C++/OpenMP kernel (AVX2, built once under ~/.cache/kvq/kernels) that reads the
    pool in place; work is split over (sequence, KV head, context chunk) and the chunks' partial softmax
    results are merged (split-K), so a single long sequence keeps every core busy;
  - `decode_attention`: the C++ kernel where it builds and applies, else the reference.
Invalid arguments (shapes, lengths beyond the block table, block ids outside the pool) raise ValueError.
"""

from __future__ import annotations

import torch

CHUNK = 512  # positions per step of the reference's online softmax


def check_paged_args(q, k_pool, v_pool, block_tables, lengths, params) -> None:
    """Raise ValueError unless the shapes follow the paged layout (values are checked by each implementation)."""
    if q.dim() != 3 or k_pool.dim() != 4:
        raise ValueError(
            f"q must be (B, H, D) and k_pool (num_blocks, H_kv, block_size, D); got {q.shape}, {k_pool.shape}"
        )
    B, H, D = q.shape
    _, Hkv, block_size, Dk = k_pool.shape
    if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype:
        raise ValueError(
            f"v_pool {v_pool.dtype} {tuple(v_pool.shape)} must match k_pool {k_pool.dtype} {tuple(k_pool.shape)}"
        )
    if Dk != D or Hkv < 1 or H % Hkv or block_size < 1:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the pool {tuple(k_pool.shape)} "
            "(same D, H a multiple of H_kv, block_size >= 1)"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"block_tables must be (B={B}, max_blocks) int32/int64; got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be (B={B},) int32/int64; got {lengths.dtype} {tuple(lengths.shape)}")
    for name, p in zip(("k_scale", "k_zp", "v_scale", "v_zp"), params, strict=True):
        if p.shape != (Hkv,):
            raise ValueError(f"{name} must be (H_kv={Hkv},); got {tuple(p.shape)}")


def _check_values(block_tables: torch.Tensor, lengths: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """Lengths within the block table, and every block a length reaches inside the pool (padding is ignored)."""
    capacity = block_tables.shape[1] * block_size
    bad = (lengths < 0) | (lengths > capacity)
    if bad.any():
        b = int(bad.nonzero()[0])
        raise ValueError(f"lengths[{b}] = {int(lengths[b])} is outside [0, {capacity}] (max_blocks * block_size)")
    cols = torch.arange(block_tables.shape[1], device=block_tables.device)
    used = cols.view(1, -1) * block_size < lengths.view(-1, 1)  # (B, max_blocks): blocks holding valid rows
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bad.any():
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_tables[{b}, {j}] = {int(block_tables[b, j])} is outside the pool [0, {num_blocks})")


def decode_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    k_scale: torch.Tensor,
    k_zp: torch.Tensor,
    v_scale: torch.Tensor,
    v_zp: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """q (B, H, D); pools (num_blocks, H_kv, block_size, D); block_tables (B, max_blocks); lengths (B,) -> (B, H, D)."""
    check_paged_args(q, k_pool, v_pool, block_tables, lengths, (k_scale, k_zp, v_scale, v_zp))
    B, H, D = q.shape
    num_blocks, Hkv, block_size, _ = k_pool.shape
    dev = q.device
    lengths = lengths.to(device=dev, dtype=torch.int64)
    block_tables = block_tables.to(device=dev, dtype=torch.int64)
    _check_values(block_tables, lengths, num_blocks, block_size)
    out = torch.zeros(B, H, D, dtype=q.dtype, device=dev)  # empty sequences keep the zero output
    live = (lengths > 0).nonzero().flatten()
    if live.numel() == 0:
        return out
    q, block_tables, lengths = q[live], block_tables[live], lengths[live]
    n = live.numel()
    G = H // Hkv
    cdt = torch.float32 if q.dtype == torch.float32 else q.dtype
    qg = q.to(cdt).view(n, Hkv, G, D)  # query heads grouped by their KV head
    q_sum = qg.float().sum(-1)  # (n, H_kv, G)
    ks = (k_scale * softmax_scale).to(dev).view(1, Hkv, 1, 1)
    kz = (q_sum * (k_zp * softmax_scale).to(dev).view(1, Hkv, 1)).unsqueeze(-1)  # (n, H_kv, G, 1)
    m = torch.full((n, Hkv, G), float("-inf"), device=dev)
    den = torch.zeros_like(m)
    acc = torch.zeros(n, Hkv, G, D, device=dev)
    max_len = int(lengths.max())
    for s in range(0, max_len, CHUNK):
        pos = torch.arange(s, min(s + CHUNK, max_len), device=dev).view(1, -1)  # (1, c)
        invalid = pos >= lengths.view(-1, 1)  # (n, c)
        # Invalid positions read position 0 of their own sequence instead (a valid row; its score is masked),
        # so neither rows past the length nor padding block-table entries are touched.
        pos = pos.masked_fill(invalid, 0)
        pages = block_tables.gather(1, pos // block_size)  # (n, c)
        rows = pos % block_size
        kc = k_pool[pages, :, rows].to(cdt).transpose(1, 2)  # (n, H_kv, c, D)
        sc = torch.matmul(qg, kc.transpose(-1, -2)).float() * ks + kz  # (n, H_kv, G, c)
        sc.masked_fill_(invalid.view(n, 1, 1, -1), float("-inf"))
        m_new = torch.maximum(m, sc.amax(-1))  # finite: position 0 is valid in the first chunk
        p = torch.exp(sc - m_new.unsqueeze(-1))
        corr = torch.exp(m - m_new)
        den = den * corr + p.sum(-1)
        vc = v_pool[pages, :, rows].to(cdt).transpose(1, 2)  # (n, H_kv, c, D)
        acc = acc * corr.unsqueeze(-1) + torch.matmul(p.to(cdt), vc).float()
        m = m_new
    res = acc / den.unsqueeze(-1) * v_scale.to(dev).view(1, Hkv, 1, 1) + v_zp.to(dev).view(1, Hkv, 1, 1)
    out[live] = res.view(n, H, D).to(q.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# C++ kernel. Work items are (sequence, KV head, chunk of positions): each item converts its cached rows to
# fp32 8 at a time into an L1 scratch block, reused by the G query heads of that KV head (8 scores reduced
# together), takes the softmax over its chunk (expf vectorized: -ffast-math lets GCC call libmvec), and
# accumulates p * v rows with the output row in registers (head size 64 or 128, fixed at compile time). Each
# item leaves its partial result (running max m, softmax sum l, unnormalised p @ v) per query head; a second
# loop in the same parallel region merges the chunks of each (sequence, KV head) (split-K):
#     M = max_c m_c,  out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c,  then * v_scale + v_zp.
# Row addresses come from the block table: the element offset of position t for KV head h is
#     ((block_tables[b, t / block_size] * H_kv + h) * block_size + t % block_size) * D,
# computed once per item for its rows by a cursor (no division per row) and shared by the K and V passes.
# Conversions, 8 lanes per instruction:
#   int8:  cvtepi8_epi32 -> cvtepi32_ps
#   fp16:  F16C cvtph_ps
#   e5m2:  the byte is the high byte of an fp16 (same exponent bias 15): bits << 8 -> cvtph_ps
#   e4m3:  bits (s eeee mmm) -> fp16 bits s<<15 | (eeee mmm)<<7 is the same value * 2^-8 for normals
#          and subnormals alike (bias 7 vs 15); the 2^8 is folded into the scale.
KERNEL_SRC = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <float.h>
#include <vector>

template <int kind>
static inline __m256 load8(const void* base, int64_t i) {
  if (kind == 1) {  // int8
    __m128i b = _mm_loadl_epi64((const __m128i*)((const int8_t*)base + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
  if (kind == 0) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)base + i)));
  __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)((const uint8_t*)base + i)));
  if (kind == 3) return _mm256_cvtph_ps(_mm_slli_epi16(w, 8));  // e5m2
  __m128i sign = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8);
  __m128i mag = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7F)), 7);
  return _mm256_cvtph_ps(_mm_or_si128(sign, mag));  // e4m3 * 2^-8
}

// Sum each of a0..a7 across its 8 lanes: returns [sum(a0), ..., sum(a7)].
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit half
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// One work item with head size D known at compile time: the n rows at element offsets off[0..n) (n >= 1) of
// one KV head, attended by its G query heads. qx: G rows of D + 1 floats (q, then sum(q)); sc: G * n scratch.
// Writes acc (G, D) = sum_t p_t v_t unnormalised and ml (G, 2) = (max score, sum_t p_t).
template <int kind, int D>
static void attend_chunk(const float* qx, int G, const void* kc, const void* vc, const int64_t* off, int64_t n,
                         float kscale, float kzero, float* sc, float* acc, float* ml) {
  alignas(32) float blk[8 * D];
  for (int64_t t0 = 0; t0 < n; t0 += 8) {
    const int r = n - t0 < 8 ? (int)(n - t0) : 8;
    for (int j = 0; j < 8; ++j)  // rows past the chunk repeat its last row; their scores are dropped
      for (int d = 0; d < D; d += 8)
        _mm256_store_ps(blk + j * D + d, load8<kind>(kc, off[t0 + (j < r ? j : r - 1)] + d));
    for (int g = 0; g < G; ++g) {
      const float* qg = qx + g * (D + 1);
      __m256 a[8];
      for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
      for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qg + d);
        for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_load_ps(blk + j * D + d), a[j]);
      }
      alignas(32) float s8[8];
      _mm256_store_ps(s8, hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
      for (int j = 0; j < r; ++j) sc[g * n + t0 + j] = s8[j] * kscale + kzero * qg[D];  // qg[D]: sum(q)
    }
  }
  for (int g = 0; g < G; ++g) {  // softmax numerators over the chunk (expf vectorized through libmvec)
    float* s = sc + g * n;
    float m = -FLT_MAX;  // -ffast-math assumes no infinities; scores are finite
    for (int64_t t = 0; t < n; ++t) m = s[t] > m ? s[t] : m;
    float l = 0;
    for (int64_t t = 0; t < n; ++t) { s[t] = expf(s[t] - m); l += s[t]; }
    ml[2 * g] = m;
    ml[2 * g + 1] = l;
  }
  for (int i = 0; i < G * D; ++i) acc[i] = 0.0f;
  for (int64_t t0 = 0; t0 < n; t0 += 8) {
    const int r = n - t0 < 8 ? (int)(n - t0) : 8;
    for (int j = 0; j < r; ++j)
      for (int d = 0; d < D; d += 8) _mm256_store_ps(blk + j * D + d, load8<kind>(vc, off[t0 + j] + d));
    for (int g = 0; g < G; ++g) {
      __m256 o[D / 8];
      for (int d = 0; d < D / 8; ++d) o[d] = _mm256_loadu_ps(acc + g * D + d * 8);
      for (int j = 0; j < r; ++j) {
        const __m256 p = _mm256_set1_ps(sc[g * n + t0 + j]);
        for (int d = 0; d < D / 8; ++d) o[d] = _mm256_fmadd_ps(p, _mm256_load_ps(blk + j * D + d * 8), o[d]);
      }
      for (int d = 0; d < D / 8; ++d) _mm256_storeu_ps(acc + g * D + d * 8, o[d]);
    }
  }
}

struct Item { int b, h; int64_t start, n; };  // positions [start, start + n) of sequence b, KV head h

template <int kind, int D>
static void decode_attn_t(const float* q, const void* kc, const void* vc, const int64_t* tables,
                          const int64_t* lengths, const float* ks, const float* kz, const float* vs,
                          const float* vz, float softmax_scale, int B, int H, int Hkv, int64_t block_size,
                          int64_t max_blocks, int64_t chunk, int parallel, float* out) {
  const int G = H / Hkv;
  const float unit = kind == 2 ? 256.0f : 1.0f;  // e4m3 rows are read as value * 2^-8
  // Items (b, chunk, h) in order; first[b]: index of sequence b's first item (item of chunk c, head h is
  // first[b] + c * Hkv + h).
  std::vector<Item> items;
  std::vector<int64_t> first(B + 1);
  for (int b = 0; b < B; ++b) {
    first[b] = (int64_t)items.size();
    for (int64_t s = 0; s < lengths[b]; s += chunk)
      for (int h = 0; h < Hkv; ++h) items.push_back({b, h, s, lengths[b] - s < chunk ? lengths[b] - s : chunk});
  }
  first[B] = (int64_t)items.size();
  const int64_t num_items = (int64_t)items.size();
  std::vector<float> part_acc((size_t)num_items * G * D), part_ml((size_t)num_items * G * 2);
  const int64_t page_stride = Hkv * block_size * D;  // elements per pool block
#pragma omp parallel if (parallel)
  {
    std::vector<float> qx((size_t)G * (D + 1)), sc;  // per thread, reused across its items
    std::vector<int64_t> off;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) {
      const Item it = items[i];
      for (int g = 0; g < G; ++g) {  // q rows of this KV head's group, each followed by sum(q)
        const float* qrow = q + ((int64_t)it.b * H + (int64_t)it.h * G + g) * D;
        float s = 0;
        for (int d = 0; d < D; ++d) s += (qx[g * (D + 1) + d] = qrow[d]);
        qx[g * (D + 1) + D] = s;
      }
      // Cursor over (block-table column, row in block): one offset per position, no division per row.
      off.resize(it.n);
      const int64_t* table = tables + it.b * max_blocks;
      int64_t col = it.start / block_size, row = it.start % block_size;
      for (int64_t t = 0; t < it.n; ++t) {
        off[t] = table[col] * page_stride + ((int64_t)it.h * block_size + row) * D;
        if (++row == block_size) { row = 0; ++col; }
      }
      sc.resize((size_t)G * it.n);
      attend_chunk<kind, D>(qx.data(), G, kc, vc, off.data(), it.n, ks[it.h] * unit * softmax_scale,
                            kz[it.h] * softmax_scale, sc.data(), part_acc.data() + i * G * D,
                            part_ml.data() + i * G * 2);
    }
    // Split-K merge, one (sequence, KV head) per iteration; a sequence without items (length 0) gets zeros.
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < (int64_t)B * Hkv; ++bh) {
      const int b = (int)(bh / Hkv), h = (int)(bh % Hkv);
      const int64_t chunks = (first[b + 1] - first[b]) / Hkv;
      const float vscale = vs[h] * unit, vzero = vz[h];
      for (int g = 0; g < G; ++g) {
        float* o = out + ((int64_t)b * H + (int64_t)h * G + g) * D;
        float mx = -FLT_MAX;
        for (int64_t c = 0; c < chunks; ++c) {
          const float mc = part_ml[((first[b] + c * Hkv + h) * G + g) * 2];
          mx = mc > mx ? mc : mx;
        }
        float l = 0;
        for (int d = 0; d < D; ++d) o[d] = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t k = (first[b] + c * Hkv + h) * G + g;
          const float w = expf(part_ml[2 * k] - mx);
          l += w * part_ml[2 * k + 1];
          for (int d = 0; d < D; ++d) o[d] += w * part_acc[k * D + d];
        }
        if (chunks > 0)
          for (int d = 0; d < D; ++d) o[d] = o[d] / l * vscale + vzero;
      }
    }
  }
}

// Returns 0, or 1 (err = {b, length}) for a length outside [0, max_blocks * block_size], or 2
// (err = {b, column, block id}) for a block a length reaches that lies outside [0, num_blocks).
// chunk <= 0: chosen here (whole sequences when they alone give every thread several items).
extern "C" int decode_attn(const float* q, const void* kc, const void* vc, const int64_t* tables,
                           const int64_t* lengths, const float* ks, const float* kz, const float* vs,
                           const float* vz, float softmax_scale, int B, int H, int Hkv, int64_t num_blocks,
                           int64_t block_size, int64_t max_blocks, int D, int kind, int64_t chunk,
                           int64_t parallel_min, float* out, int64_t* err) {
  int64_t total = 0, longest = 0;
  for (int b = 0; b < B; ++b) {
    const int64_t L = lengths[b];
    if (L < 0 || L > max_blocks * block_size) { err[0] = b; err[1] = L; return 1; }
    for (int64_t j = 0; j * block_size < L; ++j) {
      const int64_t page = tables[b * max_blocks + j];
      if (page < 0 || page >= num_blocks) { err[0] = b; err[1] = j; err[2] = page; return 2; }
    }
    total += L;
    longest = L > longest ? L : longest;
  }
  const int parallel = total * Hkv >= parallel_min;
  if (chunk <= 0) {
    // ~8 items per thread over the (token, KV head) rows, never below 256 positions per item; serially,
    // whole sequences (no merge work).
    const int64_t threads = parallel ? omp_get_max_threads() : 1;
    chunk = threads == 1 ? longest : (total * Hkv + 8 * threads - 1) / (8 * threads);
    chunk = chunk < 256 ? 256 : (chunk + 63) / 64 * 64;
  }
  auto* f = kind == 0 ? (D == 64 ? decode_attn_t<0, 64> : decode_attn_t<0, 128>)
          : kind == 1 ? (D == 64 ? decode_attn_t<1, 64> : decode_attn_t<1, 128>)
          : kind == 2 ? (D == 64 ? decode_attn_t<2, 64> : decode_attn_t<2, 128>)
                      : (D == 64 ? decode_attn_t<3, 64> : decode_attn_t<3, 128>);
  f(q, kc, vc, tables, lengths, ks, kz, vs, vz, softmax_scale, B, H, Hkv, block_size, max_blocks, chunk, parallel,
    out);
  return 0;
}
"""
# Below this many (token, KV head) rows the work is too small to repay waking the OpenMP threads.
PARALLEL_MIN = 2048
KINDS = {torch.float16: 0, torch.int8: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}


def _cpp_module():
    """The kernel library (built once, see runtime.cpp_build), or None where it cannot run."""
    import ctypes

    from runtime import cpp_build

    flags = ["-O3", "-ffast-math", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
    lib = cpp_build.load("decode_attn", KERNEL_SRC, flags, ("avx2", "fma", "f16c"))
    if lib is not None and lib.decode_attn.argtypes is None:
        lib.decode_attn.restype = ctypes.c_int
        lib.decode_attn.argtypes = (
            [ctypes.c_void_p] * 9
            + [ctypes.c_float]
            + [ctypes.c_int] * 3
            + [ctypes.c_int64] * 3
            + [ctypes.c_int] * 2
            + [ctypes.c_int64] * 2
            + [ctypes.c_void_p] * 2
        )
    return lib


def decode_attention_cpp(
    q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp, v_scale, v_zp, softmax_scale, *, chunk: int = 0
):
    """Same contract as decode_attention_torch, through the C++ kernel (caller checks availability).

    chunk: positions per work item (0: chosen by the kernel from the work size and the thread count); tests
    pass a small one to exercise the split-K merge on short sequences.
    """
    lib = _cpp_module()
    check_paged_args(q, k_pool, v_pool, block_tables, lengths, (k_scale, k_zp, v_scale, v_zp))
    B, H, D = q.shape
    num_blocks, Hkv, block_size, _ = k_pool.shape
    if D not in (64, 128) or not (k_pool.is_contiguous() and v_pool.is_contiguous()) or k_pool.dtype not in KINDS:
        raise ValueError(
            f"the C++ decode kernel takes contiguous fp16/int8/fp8 pools with head size 64 or 128; got D={D}, "
            f"{k_pool.dtype} (use decode_attention, which falls back to torch)"
        )
    tensors = (q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp, v_scale, v_zp)
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the C++ decode kernel takes CPU tensors only (runtime.cuda has the GPU kernels)")
    qf = q.to(torch.float32).contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    tables = block_tables.to(torch.int64).contiguous()
    lengths64 = lengths.to(torch.int64).contiguous()
    params = [p.to(torch.float32).contiguous() for p in (k_scale, k_zp, v_scale, v_zp)]
    err = torch.zeros(3, dtype=torch.int64)
    rc = lib.decode_attn(
        qf.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        tables.data_ptr(),
        lengths64.data_ptr(),
        *(p.data_ptr() for p in params),
        float(softmax_scale),
        B,
        H,
        Hkv,
        num_blocks,
        block_size,
        tables.shape[1],
        D,
        KINDS[k_pool.dtype],
        chunk,
        PARALLEL_MIN,
        out.data_ptr(),
        err.data_ptr(),
    )
    b, x, page = err.tolist()
    if rc == 1:
        raise ValueError(f"lengths[{b}] = {x} is outside [0, {tables.shape[1] * block_size}] (max_blocks * block_size)")
    if rc == 2:
        raise ValueError(f"block_tables[{b}, {x}] = {page} is outside the pool [0, {num_blocks})")
    return out.to(q.dtype)


def cpp_usable(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """The kernel handles contiguous CPU pools of every storage dtype with head size 64 or 128."""
    ok = not q.is_cuda and k_pool.is_contiguous() and k_pool.dtype in KINDS and q.shape[-1] in (64, 128)
    return ok and _cpp_module() is not None


def decode_attention(q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp, v_scale, v_zp, softmax_scale):
    """The fastest available implementation (C++ kernel if it builds, else the torch one); same contract."""
    impl = decode_attention_cpp if cpp_usable(q, k_pool) else decode_attention_torch
    return impl(q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp, v_scale, v_zp, softmax_scale)
