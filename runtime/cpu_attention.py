"""Decode attention straight from the paged (possibly quantized) KV pool, without a full-precision copy.

Layout (the engine's paged cache): per layer, K and V pools `(num_blocks, H_kv, block_size, D)` contiguous in
the storage dtype (fp16 | int8 | float8_e4m3fn | float8_e5m2; online modes: uint8 codes | float8_e4m3fn, or
`(..., D / 2)` uint8 packed INT4, with `(num_blocks, H_kv, block_size, 2)` fp16 (scale, zero) parameter pools). Token t of sequence b lives in block
`block_tables[b, t // block_size]`, row `t % block_size`; one query token per sequence attends over its
positions [0, lengths[b]). Only those rows are ever read: rows past the length and the padding entries of
the block table (any value) are not touched, so a pool holding stale or non-finite data from freed sequences
cannot leak into the result. A sequence of length 0 gets a zero output.

The cache's per-head affine map x^ = scale * stored + zp is folded into the arithmetic instead of being
applied to the cache:
    scores = softmax_scale * (k_scale * (q . k_stored) + k_zp * sum(q))
    out    = v_scale * (p @ v_stored) + v_zp            (the softmax weights p sum to 1)
so each step reads 1 byte per INT8/FP8 element (2 for fp16). The online per-token-head modes
(`runtime.quant`, kv_dtype int8_per_token_head | fp8_per_token_head | int4_per_token_head) carry one
(scale_t, zero_t) per cached row t in k_param / v_param, folded the same way row by row:
    score_t = softmax_scale * (k_scale_t * (q . k_code_t) + k_zero_t * sum(q))
    out     = (sum_t (p_t v_scale_t) v_code_t + sum_t p_t v_zero_t) / sum_t p_t
so each step reads 1 byte (INT4: half a byte) per element plus 4 bytes per row. int4_per_token_head keys are
per channel within a block instead (`runtime.kv_cache`: k_param (num_blocks, H_kv, 2, D) = (scale row, zero row)
for full blocks; the open last block's rows are int8 rows, the second half of them in the helper block one
block-table column on, which the table must then hold): full rows read x^ = code * scale_c + zero_c, open rows
fold their own (scale, zero) as above. Rotation (if any) is the caller's: q and the pools are already in the
rotated basis.

Three functions with one signature:
    decode_attention(q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp, v_scale, v_zp, softmax_scale,
                     *, kv_dtype=None, k_param=None, v_param=None)
  q (B, H, D) in the compute dtype, pools as above, block_tables (B, max_blocks) int32 or int64, lengths (B,),
  static parameters (H_kv,) fp32; returns (B, H, D) in q's dtype. H must be a multiple of H_kv (GQA).
  kv_dtype names the format (needed for the online modes, whose k_scale..v_zp are None and whose per-row
  parameters are k_param / v_param; None = a static mode told apart by the pool dtype).
  - `decode_attention_torch`: the PyTorch reference (any device), online softmax over chunks of positions
    gathered through the block table;
  - `decode_attention_cpp`: a C++/OpenMP kernel (16-lane AVX-512 where the CPU has it, else 8-lane AVX2; built
    once under ~/.cache/kvq/kernels by runtime.cpp_build) that reads the
    pool in place; work is split over (sequence, KV head, context chunk) and the chunks' partial softmax
    results are merged (split-K), so a single long sequence keeps every core busy. On CPUs with AVX512-VNNI
    the integer caches (int8, int8_per_token_head, int4_per_token_head) multiply their codes as int16 with
    q and the softmax weights split into two int16 parts each (vpdpwssd), as exact as the fp32 arithmetic of
    the other kinds; bf16 q is read and the output written in bf16 directly;
  - `decode_attention`: the C++ kernel where it builds and applies, else the reference.
Invalid arguments (shapes, lengths beyond the block table, block ids outside the pool) raise ValueError.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from runtime import quant
from runtime.kv_cache import gather_channel_keys

CHUNK = 512  # positions per step of the reference's online softmax


def check_paged_args(q, k_pool, v_pool, block_tables, lengths, params, kv_dtype=None, row_params=(None, None)):
    """Raise ValueError unless the shapes follow the paged layout (values are checked by each implementation).

    params: (k_scale, k_zp, v_scale, v_zp), each (H_kv,) for static modes, all None for online ones;
    row_params: (k_param, v_param), each (num_blocks, H_kv, block_size, 2) fp16 for online modes.
    """
    if q.dim() != 3 or k_pool.dim() != 4:
        raise ValueError(
            f"q must be (B, H, D) and k_pool (num_blocks, H_kv, block_size, D); got {q.shape}, {k_pool.shape}"
        )
    B, H, D = q.shape
    online = kv_dtype is not None and quant.is_online(kv_dtype)
    _, Hkv, block_size, width = k_pool.shape
    if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype:
        raise ValueError(
            f"v_pool {v_pool.dtype} {tuple(v_pool.shape)} must match k_pool {k_pool.dtype} {tuple(k_pool.shape)}"
        )
    want = quant.row_width(kv_dtype, D)  # INT4 rows are D / 2 packed bytes
    if width != want or Hkv < 1 or H % Hkv or block_size < 1:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the {kv_dtype or k_pool.dtype} pool {tuple(k_pool.shape)} "
            f"(rows of {want}, H a multiple of H_kv, block_size >= 1)"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"block_tables must be (B={B}, max_blocks) int32/int64; got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be (B={B},) int32/int64; got {lengths.dtype} {tuple(lengths.shape)}")
    if online:
        if k_pool.dtype != quant.ONLINE_STORAGE[kv_dtype]:
            raise ValueError(f"{kv_dtype} pools are {quant.ONLINE_STORAGE[kv_dtype]}; got {k_pool.dtype}")
        pshape = (*k_pool.shape[:3], 2)
        kshape = (*k_pool.shape[:2], 2, D) if quant.channel_keys(kv_dtype) else pshape
        for name, p, want_shape in zip(("k_param", "v_param"), row_params, (kshape, pshape), strict=True):
            if p is None or p.shape != want_shape or p.dtype != quant.PARAM_DTYPE:
                got = None if p is None else (p.dtype, tuple(p.shape))
                what = "per channel" if want_shape is kshape and kshape != pshape else "per row"
                raise ValueError(f"{kv_dtype}: {name} must be {want_shape} float16 (scale, zero) {what}; got {got}")
        if quant.channel_keys(kv_dtype) and not quant.channel_block_fits(block_size, D):
            raise ValueError(f"{kv_dtype} needs an even block_size <= 2 * D = {2 * D}; got {block_size}")
        return
    for name, p in zip(("k_scale", "k_zp", "v_scale", "v_zp"), params, strict=True):
        if p is None or p.shape != (Hkv,):
            raise ValueError(f"{name} must be (H_kv={Hkv},); got {None if p is None else tuple(p.shape)}")


def _check_values(
    block_tables: torch.Tensor, lengths: torch.Tensor, num_blocks: int, block_size: int, helper: bool = False
) -> None:
    """Lengths within the block table, and every block a length reaches inside the pool (padding is ignored).
    helper (per-channel keys): an open block past its first half also reaches the next column."""
    capacity = block_tables.shape[1] * block_size
    reach = lengths + torch.where(lengths % block_size > block_size // 2, block_size, 0) if helper else lengths
    bad = (lengths < 0) | (reach > capacity)
    if bad.any():
        b = int(bad.nonzero()[0])
        more = " and the open block's helper" if helper else ""
        raise ValueError(f"lengths[{b}] = {int(lengths[b])} is outside [0, {capacity}] (max_blocks * block_size{more})")
    cols = torch.arange(block_tables.shape[1], device=block_tables.device)
    used = cols.view(1, -1) * block_size < reach.view(-1, 1)  # (B, max_blocks): blocks holding valid rows
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
    *,
    kv_dtype: str | None = None,
    k_param: torch.Tensor | None = None,
    v_param: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, H, D); pools (num_blocks, H_kv, block_size, D); block_tables (B, max_blocks); lengths (B,) -> (B, H, D).

    Online modes: each gathered chunk of rows is dequantized with its own (scale, zero) (`quant.dequantize_online`,
    the format's definition) and attended with unit static parameters.
    """
    params = (k_scale, k_zp, v_scale, v_zp)
    check_paged_args(q, k_pool, v_pool, block_tables, lengths, params, kv_dtype, (k_param, v_param))
    online = kv_dtype is not None and quant.is_online(kv_dtype)
    B, H, D = q.shape
    num_blocks, Hkv, block_size, _ = k_pool.shape
    dev = q.device
    lengths = lengths.to(device=dev, dtype=torch.int64)
    block_tables = block_tables.to(device=dev, dtype=torch.int64)
    channel_keys = quant.channel_keys(kv_dtype)
    _check_values(block_tables, lengths, num_blocks, block_size, channel_keys)
    out = torch.zeros(B, H, D, dtype=q.dtype, device=dev)  # empty sequences keep the zero output
    live = (lengths > 0).nonzero().flatten()
    if live.numel() == 0:
        return out
    q, block_tables, lengths = q[live], block_tables[live], lengths[live]
    n = live.numel()
    G = H // Hkv
    cdt = torch.float32 if q.dtype == torch.float32 else q.dtype
    if online:  # per-row parameters are applied when a chunk is gathered; the static map is the identity
        k_scale = v_scale = torch.ones(Hkv)
        k_zp = v_zp = torch.zeros(Hkv)

    def gather(pool: torch.Tensor, param: torch.Tensor | None, pages, rows) -> torch.Tensor:
        x = pool[pages, :, rows]  # (n, c, H_kv, D or D / 2)
        if online:
            x = quant.dequantize_online(x, param[pages, :, rows], kv_dtype)
        return x.to(cdt).transpose(1, 2)  # (n, H_kv, c, D)

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
        if channel_keys:
            kc = gather_channel_keys(k_pool, k_param, block_tables, lengths, pos).to(cdt).transpose(1, 2)
        else:
            kc = gather(k_pool, k_param, pages, rows)  # (n, H_kv, c, D)
        sc = torch.matmul(qg, kc.transpose(-1, -2)).float() * ks + kz  # (n, H_kv, G, c)
        sc.masked_fill_(invalid.view(n, 1, 1, -1), float("-inf"))
        m_new = torch.maximum(m, sc.amax(-1))  # finite: position 0 is valid in the first chunk
        p = torch.exp(sc - m_new.unsqueeze(-1))
        corr = torch.exp(m - m_new)
        den = den * corr + p.sum(-1)
        vc = gather(v_pool, v_param, pages, rows)
        acc = acc * corr.unsqueeze(-1) + torch.matmul(p.to(cdt), vc).float()
        m = m_new
    res = acc / den.unsqueeze(-1) * v_scale.to(dev).view(1, Hkv, 1, 1) + v_zp.to(dev).view(1, Hkv, 1, 1)
    out[live] = res.view(n, H, D).to(q.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# C++ kernel. Work items are (sequence, KV head, chunk of positions): each item converts its cached rows to
# fp32 W at a time (W = 16 lanes with AVX-512, 8 with AVX2: see below) into an L1 scratch block, reused by the G query heads
# of that KV head (W scores reduced together by one transpose-add tree), takes the softmax over its chunk (expf vectorized: -ffast-math lets GCC call libmvec), and
# accumulates p * v rows with the output row in registers (head size 64 or 128, fixed at compile time). Each
# item leaves its partial result (running max m, softmax sum l, unnormalised p @ v) per query head; a second
# loop in the same parallel region merges the chunks of each (sequence, KV head) (split-K):
#     M = max_c m_c,  out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c,  then * v_scale + v_zp.
# Row addresses come from the block table: the element offset of position t for KV head h is
#     ((block_tables[b, t / block_size] * H_kv + h) * block_size + t % block_size) * D,
# computed once per item for its rows by a cursor (no division per row) and shared by the K and V passes.
# Each thread runs with flush-to-zero / denormals-are-zero set while it works (restored after).
# Conversions, W lanes per instruction (shown for 8; the 16-lane forms widen the same way):
#   int8:  cvtepi8_epi32 -> cvtepi32_ps
#   fp16:  F16C cvtph_ps
#   e5m2:  the byte is the high byte of an fp16 (same exponent bias 15): bits << 8 -> cvtph_ps
#   e4m3:  bits (s eeee mmm) -> fp16 bits s<<15 | (eeee mmm)<<7 is the same value * 2^-8 for normals
#          and subnormals alike (bias 7 vs 15); the 2^8 is folded into the scale. AVX-512: (byte << 8)
#          shifted right arithmetically by one (s lands in bits 15 and 14) with bit 14 cleared; AVX2: the byte
#          sign-extended to 16 bits and shifted left by 7 (s lands in bits 15 and 14), bit 14 cleared: one
#          shift fewer (FP8 attention 1.04-1.06x from memory at 8 x 2048, the same bits).
#   uint8 codes (int8_per_token_head): cvtepu8_epi32 -> cvtepi32_ps
#   int4 (int4_per_token_head): 4 bytes hold 8 codes (8 bytes 16), element 2i the low nibble of byte i, 2i + 1
#          its high one. AVX-512: lo = w & 0x0F, hi = (w >> 4) & 0x0F per byte, unpacklo_epi8(lo, hi) interleaves
#          them into element order -> cvtepu8_epi32. AVX2: the 4 bytes as one word in every lane, lane j shifted
#          left by 28 - 4j (sllv) and right by 28 -> cvtepi32_ps.
# Online kinds (4 int8, 5 e4m3, 6 int4 per token head) read each row's fp16 (scale, zero) (F16C cvtsh_ss) from the
# parameter pool at row index off / D (the data pool's element offset in the unpacked layout, D a power of two:
# a shift), and fold them per row: the K pass scores s_t = softmax_scale * (scale_t * (q . code_t) + zero_t *
# sum(q)); the V pass converts each row as scale_t * code_t, accumulates p_t times it and adds sum_t p_t zero_t to
# every output element of the chunk, so the partial result is already sum_t p_t x^_t and the merge applies no
# affine map. The per-row values stay in registers (rows_params, vlane, store_first): a float read back from a
# vector just stored stalls on store forwarding (on AMD Zen 3 storing the 8 scores of a group with one vector
# store instead of 8 scalar copies made the whole kernel 1.2-1.4x faster).
# Kind 6 keys are per channel within full blocks: the cursor gives each row either kofs = -1 and kpar = its block's
# (scale row, zero row) (the K pass converts code * scale_c + zero_c, one FMA per element, into the scratch block),
# or, in the open last block, the byte offset kofs of its int8 row (block or helper, half-block layout) and kpar =
# its (scale, zero) pair, folded like kind 4.
# On AVX2 (8 lanes, 16 vector registers) every kind but 6 skips the scratch block, whose stores and reloads were the
# K pass's busiest port: k_group_regs converts 4 rows at a time into registers and uses each for up to 3 query heads
# (12 accumulators, one hadd tree per 4 rows), and v_rows_regs keeps 32 output dimensions of up to 3 heads in
# registers while each row is converted once per 32 dimensions; the online kinds fold their row scales into the
# softmax weights first (w_t = p_t scale_t) and add sum_t p_t zero_t at the end. Kind 6 keys keep the scratch block
# (their per-channel FMA on conversion). One process, 8 x 2048, cache-resident: 1.06-1.38x per kind.
KERNEL_SRC = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <float.h>
#include <vector>

// Vectors of W floats: AVX-512 (W = 16) where the kernel is built with it, else AVX2 (W = 8). One source; the
// build picks the flags by CPU (runtime.cpu_attention._cpp_module).
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KVQ_W 16
typedef __m512 vec;
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vloada(const float* p) { return _mm512_load_ps(p); }
static inline void vstorea(float* p, vec v) { _mm512_store_ps(p, v); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vset1(float x) { return _mm512_set1_ps(x); }
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec from_i8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }
static inline vec from_u8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
static inline vec from_h16(__m256i h) { return _mm512_cvtph_ps(h); }
// W stored values of `kind` from element i of a row, as floats (codes / fp16 / fp8 values; e4m3 * 2^-8).
template <int kind>
static inline vec loadw(const void* base, int64_t i) {
  const uint8_t* p = (const uint8_t*)base;
  if (kind == 0) return from_h16(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i)));
  if (kind == 1) return from_i8(_mm_loadu_si128((const __m128i*)(p + i)));
  if (kind == 4) return from_u8(_mm_loadu_si128((const __m128i*)(p + i)));
  if (kind == 6) {  // packed nibbles: elements i..i+15 are bytes i/2..i/2+7, element 2j low nibble
    const __m128i b = _mm_loadl_epi64((const __m128i*)(p + i / 2)), m = _mm_set1_epi8(0x0F);
    return from_u8(_mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m)));
  }
  const __m256i w = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(p + i))), 8);
  if (kind == 3) return from_h16(w);  // e5m2 (kinds 2 and 5: e4m3)
  // e4m3: s eeee mmm in the high byte; an arithmetic shift by one copies s into bit 14, which is then cleared
  return from_h16(_mm256_and_si256(_mm256_srai_epi16(w, 1), _mm256_set1_epi16((short)0xBFFF)));
}
// [sum(a[0]), ..., sum(a[15])]: a transpose-and-add tree (45 instructions for 16 rows).
static inline vec hsumw(const vec* a) {
  vec x[8], y[4], z[2];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = a[2j], b = a[2j+1]
    x[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: the 4 rows 4j..4j+3, each summed over that lane
    y[j] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * j], x[2 * j + 1], 0x44), _mm512_shuffle_ps(x[2 * j], x[2 * j + 1], 0xEE));
  for (int j = 0; j < 2; ++j)
    z[j] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * j], y[2 * j + 1], 0x88), _mm512_shuffle_f32x4(y[2 * j], y[2 * j + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}
// Lane j of v in every lane (from the register: no store and reload).
static inline vec vlane(vec v, int j) { return _mm512_permutexvar_ps(_mm512_set1_epi32(j), v); }
// The first r (1..16) lanes of v into p[0..r) / from p[0..r) (lanes past r read as 0), with no access past p + r.
static inline void store_first(float* p, vec v, int r) {
  if (r == 16) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, (__mmask16)((1u << r) - 1), v);
}
static inline vec load_first(const float* p, int r) {
  return r == 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << r) - 1), p);
}
#else
#define KVQ_W 8
typedef __m256 vec;
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vloada(const float* p) { return _mm256_load_ps(p); }
static inline void vstorea(float* p, vec v) { _mm256_store_ps(p, v); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vset1(float x) { return _mm256_set1_ps(x); }
static inline vec vzero() { return _mm256_setzero_ps(); }
template <int kind>
static inline vec loadw(const void* base, int64_t i) {
  const uint8_t* p = (const uint8_t*)base;
  if (kind == 0) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)base + i)));
  if (kind == 1) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + i))));
  if (kind == 4) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + i))));
  if (kind == 6) {  // packed nibbles: elements i..i+7 are bits 4j.. of the 4 bytes from i / 2 (i >= 0: a shift)
    int32_t w;
    __builtin_memcpy(&w, p + (i >> 1), 4);
    // each lane shifts its nibble to the top, a logical shift brings it down: 2 operations on the broadcast word.
    // The shift counts are a memory operand: as a register they would be the 17th live vector in the K and V
    // passes, and GCC spills an accumulator there instead (a store and reload on each row's dependency chain;
    // 1.35-1.4x slower int4 attention on the AVX2 EPYC)
    alignas(32) static const int32_t shifts[8] = {28, 24, 20, 16, 12, 8, 4, 0};
    __m256i x;
    asm("vpsllvd %1, %2, %0" : "=x"(x) : "m"(*(const __m256i*)shifts), "x"(_mm256_set1_epi32(w)));
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 28));
  }
  if (kind == 3) return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(p + i))), 8));
  const __m128i w = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(p + i))), 7);
  return _mm256_cvtph_ps(_mm_and_si128(w, _mm_set1_epi16((short)0xBFFF)));
}
// [sum(a[0]), ..., sum(a[7])].
static inline vec hsumw(const vec* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // per 128-bit half
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
static inline vec vlane(vec v, int j) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)); }
static inline float hsum8(vec v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
static inline __m256i first_mask(int r) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
static inline void store_first(float* p, vec v, int r) {
  if (r == 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, first_mask(r), v);
}
static inline vec load_first(const float* p, int r) { return r == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_mask(r)); }
#endif
constexpr int W = KVQ_W;

// Row t's (scale, zero) for the online kinds: fp16 pair at row index off / D of the parameter pool.
template <int D>
static inline void row_params(const uint16_t* param, int64_t off, float* scale, float* zero) {
  const uint16_t* p = param + off / D * 2;
  *scale = _cvtsh_ss(p[0]);
  *zero = _cvtsh_ss(p[1]);
}

// The (scale, zero) of the n rows at element offsets off[0..n) (1 <= n <= W) as the first n lanes of *scale,
// *zero (lanes past n: 0), in registers: one vector load and deinterleave where the W (16 or 8) rows are
// consecutive in memory, off[j] = off[0] + j D (then their pairs are too: a row's pair is at row index off / D).
// Callers use the vectors as they are or lane by lane (vlane): storing them and reading single floats back would
// stall on store forwarding (a narrow load from a wide store in flight costs ~10+ cycles on AMD Zen).
template <int D>
static inline void rows_params(const uint16_t* param, const int64_t* off, int n, vec* scale, vec* zero) {
#if KVQ_W == 16
  const __m512i step = _mm512_setr_epi64(0, D, 2 * D, 3 * D, 4 * D, 5 * D, 6 * D, 7 * D);
  const __m512i o0 = _mm512_add_epi64(_mm512_set1_epi64(off[0]), step);
  if (n == 16 && !(_mm512_cmpneq_epi64_mask(_mm512_loadu_si512(off), o0) |
                   _mm512_cmpneq_epi64_mask(_mm512_loadu_si512(off + 8), _mm512_add_epi64(o0, _mm512_set1_epi64(8 * D))))) {
    const uint16_t* p = param + off[0] / D * 2;
    const vec a = from_h16(_mm256_loadu_si256((const __m256i*)p)), b = from_h16(_mm256_loadu_si256((const __m256i*)(p + 16)));
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    *scale = _mm512_permutex2var_ps(a, even, b);
    *zero = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
    return;
  }
#else
  const __m256i step = _mm256_setr_epi64x(0, D, 2 * D, 3 * D), o0 = _mm256_add_epi64(_mm256_set1_epi64x(off[0]), step);
  if (n == 8 && _mm256_movemask_epi8(_mm256_and_si256(
                    _mm256_cmpeq_epi64(_mm256_loadu_si256((const __m256i*)off), o0),
                    _mm256_cmpeq_epi64(_mm256_loadu_si256((const __m256i*)(off + 4)),
                                       _mm256_add_epi64(o0, _mm256_set1_epi64x(4 * D))))) == -1) {
    const uint16_t* p = param + off[0] / D * 2;  // 8 (scale, zero) pairs: s0 z0 s1 z1 ... s7 z7
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)));
    // per 128-bit lane: [s0 s1 s4 s5 | s2 s3 s6 s7] (and the zeros alike), then the 64-bit pairs in order
    const __m256 sc = _mm256_shuffle_ps(a, b, 0x88), ze = _mm256_shuffle_ps(a, b, 0xDD);
    *scale = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(sc), 0xD8));
    *zero = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ze), 0xD8));
    return;
  }
#endif
  alignas(64) float s[W] = {0}, z[W] = {0};  // rows not consecutive (a chunk's end)
  for (int j = 0; j < n; ++j) row_params<D>(param, off[j], s + j, z + j);
  *scale = vloada(s), *zero = vloada(z);
}
// The same into arrays: scale[0..W), zero[0..W) (entries past n: 0).
template <int D>
static inline void rows_params(const uint16_t* param, const int64_t* off, int n, float* scale, float* zero) {
  vec s, z;
  rows_params<D>(param, off, n, &s, &z);
  vstore(scale, s), vstore(zero, z);
}

// Software prefetch of the rows [t0, t1) (clipped to n) of a pool, and of their (scale, zero) pairs (online
// kinds, p != null): the blocks of a sequence are scattered over the pool, and the hardware prefetchers stop at
// each block's end (a new page), so without it every block starts with a full memory latency; PF rows ahead
// (~one block) keep the loads in flight. Into L2 (T1), not L1: on Zen 4 prefetches to L1 hold its few miss
// buffers for a memory latency each and stall the demand loads behind them; to L2, reading scattered 4 KiB runs
// went from 20 to 29 GB/s (2 threads, no arithmetic) and the kernel's decode attention 1.1-1.3x faster (fp16,
// int8; 8 x 2048, 30 layers' pools). Kind 6 prefetches per-row (V) addresses; its open key rows are few.
// The K pass prefetches the V rows too (same rows, same distance; not their parameters), so the V pass finds its
// rows in L2 instead of starting from memory after the K pass: the memory stream keeps going while the K pass
// computes (8 x 2048 and 32 x 1024, 30 layers' pools, 2-core Xeon: fp16 1.09-1.12x, FP8 1.03-1.04x, INT8
// 1.03-1.06x, the online kinds 1.05-1.11x on the AVX-512 build; 1.09-1.14x on the AVX2 one; prefetching the online
// kinds' V parameters there as well lost 2-8 %). The V pass keeps its own prefetches (parameters included) for
// rows that L2 dropped in between (long chunks).
constexpr int64_t PF = 64;
template <int kind, int D>
static inline void prefetch_rows(const void* base, const uint16_t* p, const int64_t* off, int64_t t0, int64_t t1,
                                 int64_t n) {
  constexpr int64_t bytes = kind == 0 ? 2 * D : kind == 6 ? D / 2 : D;  // per row
  for (int64_t t = t0; t < t1 && t < n; ++t) {
    const char* r = (const char*)base + (kind == 0 ? off[t] * 2 : kind == 6 ? off[t] / 2 : off[t]);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(r + b, _MM_HINT_T1);
    if (p != nullptr && (t == t0 || (off[t] / D) % 16 == 0)) _mm_prefetch((const char*)(p + off[t] / D * 2), _MM_HINT_T0);
  }
}

// Scores of the rows t0 .. t0 + min(W, n - t0) - 1 of a work item for its G query heads into sc (G, n), through
// fp32: the W rows are converted into an L1 block (row-major) that the G heads reuse; each head keeps W
// accumulators (one per row) and one transpose-add tree turns them into W scores. Static kinds: score = dot *
// kscale + kzero * sum(q). Online kinds (>= 4): kscale, kzero multiply each row's own (scale, zero) from kp.
// Kind 6 (per-channel keys): full rows x^ = code * scale_c + zero_c (their block's (scale, zero) rows are kept
// converted in cs / cz, for the block at kp + *cpar), open rows int8 per row.
template <int kind, int D>
static inline void k_group_f32(const float* qx, int G, const void* kc, const uint16_t* kp, const int64_t* off,
                               const int64_t* kofs, const int64_t* kpar, int64_t n, int64_t t0, float kscale,
                               float kzero, float* cs, float* cz, int64_t* cpar, float* sc) {
  constexpr bool online = kind >= 4;
  alignas(64) float blk[W * D];
  alignas(64) float rs[W], rz[W];  // kind 6: the rows' score multipliers when some are open rows (see `open`)
  const int r = n - t0 < W ? (int)(n - t0) : W;
  bool open = false;  // kind 6: some row of this group is an open (per-row int8) one
  for (int j = 0; j < W; ++j) {  // rows past the chunk repeat its last row; their scores are dropped
    const int64_t t = t0 + (j < r ? j : r - 1), o = off[t];
    if (kind == 6) {
      const uint16_t* pc = kp + kpar[t];
      if (kofs[t] >= 0) {
        for (int d = 0; d < D; d += W) vstorea(blk + j * D + d, loadw<4>(kc, kofs[t] + d));
        rs[j] = kscale * _cvtsh_ss(pc[0]), rz[j] = kzero * _cvtsh_ss(pc[1]);
        open = true;
      } else {
        if (kpar[t] != *cpar) {
          for (int d = 0; d < D; d += W) vstorea(cs + d, loadw<0>(pc, d)), vstorea(cz + d, loadw<0>(pc + D, d));
          *cpar = kpar[t];
        }
        for (int d = 0; d < D; d += W)
          vstorea(blk + j * D + d, vfma(loadw<6>(kc, o + d), vloada(cs + d), vloada(cz + d)));
        rs[j] = kscale, rz[j] = 0.0f;
      }
      continue;
    }
    for (int d = 0; d < D; d += W) vstorea(blk + j * D + d, loadw<kind>(kc, o + d));
  }
  // per row: score = dot * vrs + vrz * sum(q), in registers (kind 6's open rows: through rs / rz)
  vec vrs = vset1(kscale), vrz = vset1(kind == 6 ? 0.0f : kzero);
  if (kind == 6 && open) vrs = vloada(rs), vrz = vloada(rz);
  if (online && kind != 6) {
    rows_params<D>(kp, off + t0, r, &vrs, &vrz);
    vrs = vrs * vset1(kscale), vrz = vrz * vset1(kzero);
  }
  for (int g = 0; g < G; ++g) {
    const float* qg = qx + g * (D + 1);
    vec a[W];
    for (int j = 0; j < W; ++j) a[j] = vzero();
    for (int d = 0; d < D; d += W) {
      const vec qv = vload(qg + d);
      for (int j = 0; j < W; ++j) a[j] = vfma(qv, vloada(blk + j * D + d), a[j]);
    }
    store_first(sc + g * n + t0, vfma(hsumw(a), vrs, vrz * vset1(qg[D])), r);  // qg[D]: sum(q)
  }
}

#if KVQ_W == 8
// AVX2 (16 vector registers): the rows are converted into registers and used there by GB <= 3 query heads at once,
// with no scratch block (its stores and reloads were the K pass's busiest port). K: 4 rows x GB heads of partial
// dot products (12 accumulators at GB = 3), each 4 reduced by one hadd tree to 4 scores; the 8 rows of a group
// (t0 .. t0 + 7, past n repeating the last row) make one vector of scores per head:
// score = dot * vrs + vrz * sum(q), stored for the first r rows.
template <int kind, int D, int GB>
static inline void k_group_regs(const float* qx, int g0, const void* kc, const int64_t* off, int64_t n, int64_t t0,
                                vec vrs, vec vrz, float* sc) {
  const int r = n - t0 < 8 ? (int)(n - t0) : 8;
  __m128 lo[GB];  // per head: the scores of rows 0..3
  for (int h = 0; h < 2; ++h) {
    int64_t o[4];
    for (int j = 0; j < 4; ++j) o[j] = off[t0 + (4 * h + j < r ? 4 * h + j : r - 1)];
    vec a[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < 4; ++j) a[g][j] = vzero();
    for (int d = 0; d < D; d += 8) {
      vec q[GB];
      for (int g = 0; g < GB; ++g) q[g] = vload(qx + (g0 + g) * (D + 1) + d);
      for (int j = 0; j < 4; ++j) {
        const vec x = loadw<kind>(kc, o[j] + d);
        for (int g = 0; g < GB; ++g) a[g][j] = vfma(q[g], x, a[g][j]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      // per 128-bit half: [sum of row 0's lanes there, row 1, row 2, row 3]; the halves added give the 4 dots
      const vec u = _mm256_hadd_ps(_mm256_hadd_ps(a[g][0], a[g][1]), _mm256_hadd_ps(a[g][2], a[g][3]));
      const __m128 s = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
      if (h == 0) {
        lo[g] = s;
        continue;
      }
      const float* qg = qx + (g0 + g) * (D + 1);
      const vec dots = _mm256_insertf128_ps(_mm256_castps128_ps256(lo[g]), s, 1);
      store_first(sc + (int64_t)(g0 + g) * n + t0, vfma(dots, vrs, vrz * vset1(qg[D])), r);  // qg[D]: sum(q)
    }
  }
}

// V: acc rows g0 .. g0 + GB - 1 (G, D) = sum_t w_t v_t over the n rows, w_t = sc[g, t]; 32 dimensions at a time
// (GB x 4 accumulators), each row converted once per 32 dimensions.
// The first pass (g0 = 0, d0 = 0) prefetches PF rows ahead.
template <int kind, int D, int GB>
static inline void v_rows_regs(const float* sc, int64_t n, int g0, const void* vc, const int64_t* off, float* acc) {
  for (int d0 = 0; d0 < D; d0 += 32) {
    vec o[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int k = 0; k < 4; ++k) o[g][k] = vzero();
    for (int64_t t = 0; t < n; ++t) {
      if (g0 == 0 && d0 == 0 && t % 8 == 0) prefetch_rows<kind, D>(vc, nullptr, off, t + PF, t + PF + 8, n);
      vec p[GB];
      for (int g = 0; g < GB; ++g) p[g] = vset1(sc[(int64_t)(g0 + g) * n + t]);
      for (int k = 0; k < 4; ++k) {
        const vec x = loadw<kind>(vc, off[t] + d0 + 8 * k);
        for (int g = 0; g < GB; ++g) o[g][k] = vfma(p[g], x, o[g][k]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int k = 0; k < 4; ++k) vstore(acc + (g0 + g) * D + d0 + 8 * k, o[g][k]);
  }
}
#endif

// Softmax numerators over the chunk in place (expf vectorized through libmvec); ml (G, 2) = (max, sum).
static inline void softmax_chunk(float* sc, int G, int64_t n, float* ml) {
  for (int g = 0; g < G; ++g) {
    float* s = sc + g * n;
    float m = -FLT_MAX;  // -ffast-math assumes no infinities; scores are finite
    for (int64_t t = 0; t < n; ++t) m = s[t] > m ? s[t] : m;
    float l = 0;
    for (int64_t t = 0; t < n; ++t) { s[t] = expf(s[t] - m); l += s[t]; }
    ml[2 * g] = m;
    ml[2 * g + 1] = l;
  }
}

// One work item with head size D known at compile time: the n rows at element offsets off[0..n) (n >= 1) of
// one KV head, attended by its G query heads. qx: G rows of D + 1 floats (q, then sum(q)); sc: G * n scratch.
// Writes acc (G, D) = sum_t p_t v_t unnormalised (online: sum_t p_t x^_t) and ml (G, 2) = (max score, sum_t p_t).
// K pass: k_group_f32. V pass: rows are converted once and accumulated into the G output rows held in registers.
template <int kind, int D>
static void attend_chunk(const float* qx, int G, const void* kc, const void* vc, const uint16_t* kp,
                         const uint16_t* vp, const int64_t* off, const int64_t* kofs, const int64_t* kpar,
                         int64_t n, float kscale, float kzero, float vunit, float* sc, float* acc, float* ml) {
  constexpr bool online = kind >= 4;
  alignas(64) float blk[W * D];
  alignas(64) float cs[D], cz[D];
  int64_t cpar = -1;
  const uint16_t* kpp = online && kind != 6 ? kp : nullptr;
  prefetch_rows<kind, D>(kc, kpp, off, 0, PF, n);
  prefetch_rows<kind, D>(vc, nullptr, off, 0, PF, n);  // V rows during the K pass: see prefetch_rows
  for (int64_t t0 = 0; t0 < n; t0 += W) {
    prefetch_rows<kind, D>(kc, kpp, off, t0 + PF, t0 + PF + W, n);
    prefetch_rows<kind, D>(vc, nullptr, off, t0 + PF, t0 + PF + W, n);
#if KVQ_W == 8
    if constexpr (kind != 6) {
      vec vrs = vset1(kscale), vrz = vset1(kzero);
      if (online) {
        rows_params<D>(kp, off + t0, n - t0 < W ? (int)(n - t0) : W, &vrs, &vrz);
        vrs = vrs * vset1(kscale), vrz = vrz * vset1(kzero);
      }
      for (int g0 = 0; g0 < G; g0 += 3) {
        if (G - g0 >= 3) k_group_regs<kind, D, 3>(qx, g0, kc, off, n, t0, vrs, vrz, sc);
        else if (G - g0 == 2) k_group_regs<kind, D, 2>(qx, g0, kc, off, n, t0, vrs, vrz, sc);
        else k_group_regs<kind, D, 1>(qx, g0, kc, off, n, t0, vrs, vrz, sc);
      }
      continue;
    }
#endif
    k_group_f32<kind, D>(qx, G, kc, kp, off, kofs, kpar, n, t0, kscale, kzero, cs, cz, &cpar, sc);
  }
  prefetch_rows<kind, D>(vc, online ? vp : nullptr, off, 0, PF, n);
  softmax_chunk(sc, G, n, ml);
#if KVQ_W == 8
  {
    // online: fold each row's scale into its weights (w_t = p_t scale_t) and sum p_t zero_t per head first
    float zs[64];  // G <= 64, checked by the caller
    for (int g = 0; g < G; ++g) zs[g] = 0.0f;
    if (online)
      for (int64_t t0 = 0; t0 < n; t0 += W) {
        const int r = n - t0 < W ? (int)(n - t0) : W;
        vec vs, vz;
        rows_params<D>(vp, off + t0, r, &vs, &vz);
        vs = vs * vset1(vunit);
        for (int g = 0; g < G; ++g) {
          const vec pg = load_first(sc + g * n + t0, r);
          zs[g] += hsum8(pg * vz);
          store_first(sc + g * n + t0, pg * vs, r);
        }
      }
    for (int g0 = 0; g0 < G; g0 += 3) {
      if (G - g0 >= 3) v_rows_regs<kind, D, 3>(sc, n, g0, vc, off, acc);
      else if (G - g0 == 2) v_rows_regs<kind, D, 2>(sc, n, g0, vc, off, acc);
      else v_rows_regs<kind, D, 1>(sc, n, g0, vc, off, acc);
    }
    if (online)
      for (int g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) acc[g * D + d] += zs[g];
    return;
  }
#endif
  for (int i = 0; i < G * D; ++i) acc[i] = 0.0f;
  vec zsum[64];  // online: sum_t p_t zero_t per query head, in W partial sums (G <= 64, checked by the caller)
  for (int g = 0; g < G; ++g) zsum[g] = vzero();
  for (int64_t t0 = 0; t0 < n; t0 += W) {
    const int r = n - t0 < W ? (int)(n - t0) : W;
    prefetch_rows<kind, D>(vc, online ? vp : nullptr, off, t0 + PF, t0 + PF + W, n);
    vec vs, vz;  // online: the rows' scales (times vunit) and zeros; each row is converted as code * scale
    if (online) rows_params<D>(vp, off + t0, r, &vs, &vz), vs = vs * vset1(vunit);
    for (int j = 0; j < r; ++j) {
      if (online) {
        const vec sj = vlane(vs, j);
        for (int d = 0; d < D; d += W) vstorea(blk + j * D + d, loadw<kind>(vc, off[t0 + j] + d) * sj);
      } else {
        for (int d = 0; d < D; d += W) vstorea(blk + j * D + d, loadw<kind>(vc, off[t0 + j] + d));
      }
    }
    for (int g = 0; g < G; ++g) {
      const float* pg = sc + g * n + t0;
      vec o[D / W];
      for (int d = 0; d < D / W; ++d) o[d] = vload(acc + g * D + d * W);
      for (int j = 0; j < r; ++j) {
        const vec p = vset1(pg[j]);
        for (int d = 0; d < D / W; ++d) o[d] = vfma(p, vloada(blk + j * D + d * W), o[d]);
      }
      for (int d = 0; d < D / W; ++d) vstore(acc + g * D + d * W, o[d]);
      if (online) zsum[g] = vfma(load_first(pg, r), vz, zsum[g]);
    }
  }
  if (online)
    for (int g = 0; g < G; ++g) {
      alignas(64) float z[W];
      vstorea(z, zsum[g]);
      float zs = 0.0f;
      for (int j = 0; j < W; ++j) zs += z[j];
      for (int d = 0; d < D; ++d) acc[g * D + d] += zs;
    }
}

#if KVQ_W == 16 && defined(__AVX512VNNI__)
#define KVQ_INT 1
// Integer kinds (1 int8, 4 uint8 codes, 6 int4) on AVX512-VNNI: the stored codes are widened to int16 (exact)
// and multiplied by int16 operands with vpdpwssd (32 multiply-adds per instruction into int32, twice fp32 FMA's
// rate, and no int -> float conversion per element). Each fp32 operand x is split into two int16 parts against
// its group's largest |x|: x = scale * (hi + lo / 32768), scale = max|x| / 32767, |lo| <= 16384 (quantize_i16),
// so the result is as exact as fp32 arithmetic (x is represented to 2^-31 of the largest; int32 sums are exact):
//   K: each query row once per item, q . code = scale * (hi . code + (lo . code) / 32768), each dot exact in int32
//      (|sum| <= 32767 * 255 * 128 < 2^31); kind 6's full blocks fold their (scale, zero) rows into q once per
//      block: q . x^ = (q * scale_c) . code + q . zero_c. A bf16 q (exact_k false) takes hi alone: q to 2^-16 of
//      its largest |q_d|, far inside bf16's own 2^-9 rounding of each q_d, for half the K pass's dot products
//      (int8 / int4 attention 1.1-1.2x faster at 8 x 2048 on Zen 4); V keeps both parts in every mode (a sharp
//      softmax's thousands of tiny weights need them: one part alone leaves ~1e-3);
//   V: each head's weights w_t = p_t (* the row's scale) per group of 32 rows; pairs of rows are interleaved so that
//      one vpdpwssd adds w_t code_t + w_t+1 code_t+1 for 16 dimensions; each group's int32 sums
//      (<= 32 * 32767 * 255) are added into fp32 accumulators times the group's scale.
typedef __m512i ivec;
// [sum(a[0]), ..., sum(a[15])] of int32 lanes, as floats: hsumw's tree on integers.
static inline vec hsumw_i(const ivec* a) {
  ivec x[8], y[4], z[2];
#define KVQ_SHUF(u, v, imm) _mm512_castps_si512(_mm512_shuffle_ps(_mm512_castsi512_ps(u), _mm512_castsi512_ps(v), imm))
  for (int j = 0; j < 8; ++j)
    x[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_epi32(a[2 * j], a[2 * j + 1]));
  for (int j = 0; j < 4; ++j)
    y[j] = _mm512_add_epi32(KVQ_SHUF(x[2 * j], x[2 * j + 1], 0x44), KVQ_SHUF(x[2 * j], x[2 * j + 1], 0xEE));
#undef KVQ_SHUF
  for (int j = 0; j < 2; ++j)
    z[j] = _mm512_add_epi32(_mm512_shuffle_i32x4(y[2 * j], y[2 * j + 1], 0x88), _mm512_shuffle_i32x4(y[2 * j], y[2 * j + 1], 0xDD));
  return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_shuffle_i32x4(z[0], z[1], 0x88), _mm512_shuffle_i32x4(z[0], z[1], 0xDD)));
}

// qi = round(x / scale) with scale = max|x| / 32767 (0 for an all-zero x, then qi = 0), and the rounding residual
// in units of scale / 32768: ql = round((x / scale - qi) * 32768), |ql| <= 16384, so x = scale * (qi + ql / 32768)
// to 2^-31 of max|x|; returns scale.
template <int D>
static inline float quantize_i16(const float* x, int16_t* qi, int16_t* ql) {
  vec m = vzero();
  for (int d = 0; d < D; d += W) m = _mm512_max_ps(m, _mm512_abs_ps(vload(x + d)));
  const float amax = _mm512_reduce_max_ps(m);
  const vec inv = vset1(amax > 0 ? 32767.0f / amax : 0.0f);
  for (int d = 0; d < D; d += W) {
    const vec y = _mm512_mul_ps(vload(x + d), inv);
    const ivec h = _mm512_cvtps_epi32(y);
    _mm256_storeu_si256((__m256i*)(qi + d), _mm512_cvtsepi32_epi16(h));
    const vec res = _mm512_sub_ps(y, _mm512_cvtepi32_ps(h));
    _mm256_storeu_si256((__m256i*)(ql + d), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(res, vset1(32768.0f)))));
  }
  return amax / 32767.0f;
}

// A K row's D codes as int16 in element order, 32 per vector (kind 6: element offset o of the unpacked layout;
// a packed byte b holds elements 2i (b & 15) and 2i + 1 (b >> 4), widened to the words of one dword).
template <int kind, int D>
static inline void k_codes_i16(const void* base, int64_t o, int16_t* dst) {
  const uint8_t* p = (const uint8_t*)base;
  for (int d = 0; d < D; d += 32) {
    ivec x;
    if (kind == 1) x = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(p + o + d)));
    else if (kind == 4) x = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + o + d)));
    else {
      const ivec b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + (o + d) / 2)));
      x = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), _mm512_set1_epi32(0x000F000F), 0xA8);  // (b | b << 12) & c
    }
    _mm512_store_si512(dst + d, x);
  }
}

// 64 V codes of a row as bytes in element order (kind 6: 32 packed bytes; word i = byte i -> (b & 15) | (b >> 4) << 8).
template <int kind>
static inline ivec v_bytes64(const uint8_t* p, int64_t o) {
  if (kind != 6) return _mm512_loadu_si512(p + o);
  const ivec w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + o / 2)));
  return _mm512_ternarylogic_epi32(w, _mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0F0F), 0xA8);
}

// The dimension that lane i of interleaved vector v (0..3) of a 64-element segment holds (see v_pairs).
static inline int pair_dim(int v, int i) { return (v & 1) * 32 + (v >> 1) * 8 + (i < 8 ? i : i + 8); }

// Rows a and b (64 codes each) interleaved into 4 vectors of dwords (a_d as the low word, b_d the high one), for
// the dimensions pair_dim(v, 0..15): unpack{lo,hi}_epi8 per 128-bit lane, then widened (signed for int8 codes).
template <int kind>
static inline void v_pairs(ivec a, ivec b, ivec* out) {
  const ivec lo = _mm512_unpacklo_epi8(a, b), hi = _mm512_unpackhi_epi8(a, b);
  if (kind == 1) {
    out[0] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(lo)), out[1] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(lo, 1));
    out[2] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(hi)), out[3] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(hi, 1));
  } else {
    out[0] = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)), out[1] = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(lo, 1));
    out[2] = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(hi)), out[3] = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(hi, 1));
  }
}

// attend_chunk for the integer kinds (same contract), on vpdpwssd. Kind 6's key rows outside full blocks (the
// open block's int8 rows), or a group of W rows spanning two blocks, take k_group_f32.
template <int kind, int D, bool exact_k>
static void attend_chunk_int(const float* qx, int G, const void* kc, const void* vc, const uint16_t* kp,
                             const uint16_t* vp, const int64_t* off, const int64_t* kofs, const int64_t* kpar,
                             int64_t n, float kscale, float kzero, float vunit, float* sc, float* acc, float* ml,
                             std::vector<int16_t>& scratch) {
  constexpr bool online = kind >= 4;
  constexpr int VG = 32;  // V rows per weight quantization group
  // per thread: qi (G, D) int16, then per V group the weights wi (G, VG) int16
  scratch.resize((size_t)2 * G * D + (size_t)2 * G * VG + 64);
  int16_t* qi = (int16_t*)(((uintptr_t)scratch.data() + 63) & ~(uintptr_t)63);
  int16_t* ql = qi + G * D;  // the residuals (quantize_i16)
  int16_t* wi = ql + G * D;
  int16_t* wl = wi + G * VG;
  alignas(64) float qsc[64], qcon[64];  // per head: qscale, and (kind 6) the block's q . zero_c
  alignas(64) float cs[D], cz[D], xq[D];
  int64_t cpar = -1, ipar = -1;  // blocks whose parameters cs / cz (fp32 path) and qi (int path) hold
  if (kind != 6)
    for (int g = 0; g < G; ++g) qsc[g] = quantize_i16<D>(qx + g * (D + 1), qi + g * D, ql + g * D), qcon[g] = 0.0f;
  alignas(64) int16_t blk[W * D];
  alignas(64) float rs[W], rz[W];
  const uint16_t* kpp = kind == 4 ? kp : nullptr;
  prefetch_rows<kind, D>(kc, kpp, off, 0, PF, n);
  prefetch_rows<kind, D>(vc, nullptr, off, 0, PF, n);  // V rows during the K pass: see prefetch_rows
  for (int64_t t0 = 0; t0 < n; t0 += W) {
    const int r = n - t0 < W ? (int)(n - t0) : W;
    prefetch_rows<kind, D>(kc, kpp, off, t0 + PF, t0 + PF + W, n);
    prefetch_rows<kind, D>(vc, nullptr, off, t0 + PF, t0 + PF + W, n);
    if (kind == 6) {
      const int64_t t1 = t0 + r - 1;
      if (kofs[t0] >= 0 || kofs[t1] >= 0 || kpar[t0] != kpar[t1]) {  // not all in one full block
        k_group_f32<kind, D>(qx, G, kc, kp, off, kofs, kpar, n, t0, kscale, kzero, cs, cz, &cpar, sc);
        continue;
      }
      if (kpar[t0] != ipar) {  // fold this block's (scale, zero) rows into q
        const uint16_t* pc = kp + kpar[t0];
        for (int g = 0; g < G; ++g) {
          const float* qg = qx + g * (D + 1);
          vec z = vzero();
          for (int d = 0; d < D; d += W) {
            vstore(xq + d, _mm512_mul_ps(vload(qg + d), loadw<0>(pc, d)));
            z = vfma(vload(qg + d), loadw<0>(pc + D, d), z);
          }
          qsc[g] = quantize_i16<D>(xq, qi + g * D, ql + g * D), qcon[g] = _mm512_reduce_add_ps(z);
        }
        ipar = kpar[t0];
      }
    }
    for (int j = 0; j < W; ++j) {  // rows past the chunk repeat its last row; their scores are dropped
      k_codes_i16<kind, D>(kc, off[t0 + (j < r ? j : r - 1)], blk + j * D);
      rs[j] = 1.0f, rz[j] = kind == 6 ? 0.0f : 1.0f;
    }
    if (kind == 4) rows_params<D>(kp, off + t0, r, rs, rz);
    const vec vrs = _mm512_mul_ps(vloada(rs), vset1(kscale)), vrz = _mm512_mul_ps(vloada(rz), vset1(kzero));
    for (int g = 0; g < G; ++g) {
      vec dots = vzero();
      for (int part = 0; part < (exact_k ? 2 : 1); ++part) {  // hi . code, then + (lo . code) / 32768
        const int16_t* qp = (part ? ql : qi) + g * D;
        ivec a[W];
        for (int j = 0; j < W; ++j) a[j] = _mm512_setzero_si512();
        for (int d = 0; d < D; d += 32) {
          const ivec qv = _mm512_load_si512(qp + d);
          for (int j = 0; j < W; ++j) a[j] = _mm512_dpwssd_epi32(a[j], qv, _mm512_load_si512(blk + j * D + d));
        }
        dots = vfma(hsumw_i(a), vset1(part ? 1.0f / 32768.0f : 1.0f), dots);
      }
      alignas(64) float s[W];
      dots = vfma(dots, vset1(qsc[g]), vset1(qcon[g]));
      vstorea(s, vfma(dots, vrs, vrz * vset1(qx[g * (D + 1) + D])));
      for (int j = 0; j < r; ++j) sc[g * n + t0 + j] = s[j];
    }
  }
  prefetch_rows<kind, D>(vc, online ? vp : nullptr, off, 0, PF, n);
  softmax_chunk(sc, G, n, ml);
  // V pass: per head, fp32 sums in acc in pair_dim order (put in element order at the end), int32 sums per group
  // of VG rows; pv: the group's rows interleaved in pairs (an odd last row pairs with itself at weight 0).
  constexpr int NV = D / 16;  // interleaved vectors per pair of rows
  alignas(64) ivec pv[VG / 2][NV];
  alignas(64) float vsr[VG], vzr[VG];  // the rows' weight multipliers (online: their scale) and zeros
  const uint8_t* vb = (const uint8_t*)vc;
  for (int i = 0; i < G * D; ++i) acc[i] = 0.0f;
  float zsum[64] = {0};  // online: sum_t p_t zero_t per query head
  for (int64_t t0 = 0; t0 < n; t0 += VG) {
    const int r = n - t0 < VG ? (int)(n - t0) : VG, pairs = (r + 1) / 2;
    prefetch_rows<kind, D>(vc, online ? vp : nullptr, off, t0 + PF, t0 + PF + VG, n);
    for (int j = 0; j < VG; ++j) vsr[j] = j < r ? vunit : 0.0f, vzr[j] = 0.0f;
    if (online) {
      for (int j = 0; j < r; j += 16) rows_params<D>(vp, off + t0 + j, r - j < 16 ? r - j : 16, vsr + j, vzr + j);
      for (int j = 0; j < r; ++j) vsr[j] *= vunit;
    }
    for (int k = 0; k < pairs; ++k) {
      const int64_t ta = off[t0 + 2 * k], tb = 2 * k + 1 < r ? off[t0 + 2 * k + 1] : ta;
      for (int seg = 0; seg < D / 64; ++seg)
        v_pairs<kind>(v_bytes64<kind>(vb, ta + seg * 64), v_bytes64<kind>(vb, tb + seg * 64), pv[k] + 4 * seg);
    }
    const __mmask16 m0 = r >= 16 ? 0xFFFF : (__mmask16)((1u << r) - 1);
    const __mmask16 m1 = r <= 16 ? 0 : r >= 32 ? 0xFFFF : (__mmask16)((1u << (r - 16)) - 1);
    for (int g = 0; g < G; ++g) {
      const float* pg = sc + g * n + t0;
      const vec p0 = _mm512_maskz_loadu_ps(m0, pg), p1 = _mm512_maskz_loadu_ps(m1, pg + 16);
      alignas(64) float w[VG];  // this head's weights (0 past the group's rows), split into two int16 parts
      vstorea(w, _mm512_mul_ps(p0, vloada(vsr))), vstorea(w + 16, _mm512_mul_ps(p1, vloada(vsr + 16)));
      if (online) zsum[g] += _mm512_reduce_add_ps(vfma(p0, vloada(vzr), _mm512_mul_ps(p1, vloada(vzr + 16))));
      int16_t *wg = wi + g * VG, *wgl = wl + g * VG;
      const float wscale = quantize_i16<VG>(w, wg, wgl);
      ivec ia[NV], il[NV];
      for (int v = 0; v < NV; ++v) ia[v] = _mm512_setzero_si512(), il[v] = _mm512_setzero_si512();
      for (int k = 0; k < pairs; ++k) {
        int32_t w2, l2;
        __builtin_memcpy(&w2, wg + 2 * k, 4);  // weights of rows 2k (low word) and 2k + 1
        const ivec wv = _mm512_set1_epi32(w2);
        __builtin_memcpy(&l2, wgl + 2 * k, 4);  // ... and their residuals
        const ivec lv = _mm512_set1_epi32(l2);
        for (int v = 0; v < NV; ++v)
          ia[v] = _mm512_dpwssd_epi32(ia[v], wv, pv[k][v]), il[v] = _mm512_dpwssd_epi32(il[v], lv, pv[k][v]);
      }
      const vec ws = vset1(wscale), wsl = vset1(wscale / 32768.0f);
      for (int v = 0; v < NV; ++v) {
        const vec x = vfma(_mm512_cvtepi32_ps(ia[v]), ws, vload(acc + g * D + v * 16));
        vstore(acc + g * D + v * 16, vfma(_mm512_cvtepi32_ps(il[v]), wsl, x));
      }
    }
  }
  alignas(64) float row[D];
  for (int g = 0; g < G; ++g) {  // pair_dim order -> element order (+ sum_t p_t zero_t)
    float* a = acc + g * D;
    for (int d = 0; d < D; ++d) row[d] = a[d];
    for (int v = 0; v < NV; ++v)
      for (int i = 0; i < 16; ++i) a[v / 4 * 64 + pair_dim(v % 4, i)] = row[v * 16 + i] + zsum[g];
  }
}
#endif

// bf16 <-> fp32 (q and the output in the compute dtype): widening is exact; narrowing rounds to nearest even
// as torch does (NaN stays NaN).
static inline float from_bf16(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
static inline uint16_t to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((bits >> 16) | 0x40);
  return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

struct Item { int b, h; int64_t start, n; };  // positions [start, start + n) of sequence b, KV head h

template <int kind, int D>
static void decode_attn_t(const void* q, const void* kc, const void* vc, const int32_t* tables,
                          const int32_t* lengths, const float* ks, const float* kz, const float* vs,
                          const float* vz, const uint16_t* kp, const uint16_t* vp, float softmax_scale, int B,
                          int H, int Hkv, int64_t block_size, int64_t max_blocks, int64_t chunk, int parallel,
                          int io_bf16, void* out) {
  constexpr bool online = kind >= 4;  // ks..vz unused (null); per-row parameters in kp, vp
  const int G = H / Hkv;
  const float unit = kind == 2 || kind == 5 ? 256.0f : 1.0f;  // e4m3 rows are read as value * 2^-8
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
    // Flush-to-zero / denormals-are-zero for this thread while it works (softmax weights of far-below-max
    // scores are denormal, and denormal arithmetic is ~100x slower); the caller's mode is restored below.
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
    std::vector<float> qx((size_t)G * (D + 1)), sc;  // per thread, reused across its items
    std::vector<int64_t> off, kofs, kpar;
    std::vector<int16_t> iscratch;  // attend_chunk_int's int16 operands
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) {
      const Item it = items[i];
      for (int g = 0; g < G; ++g) {  // q rows of this KV head's group, each followed by sum(q)
        const int64_t row = ((int64_t)it.b * H + (int64_t)it.h * G + g) * D;
        float s = 0;
        for (int d = 0; d < D; ++d) s += (qx[g * (D + 1) + d] = io_bf16 ? from_bf16(((const uint16_t*)q)[row + d])
                                                                       : ((const float*)q)[row + d]);
        qx[g * (D + 1) + D] = s;
      }
      // One offset per position, written block-table column by column (a run of consecutive rows: an arithmetic
      // sequence the compiler vectorizes; a per-row cursor cost ~3 ns a row, 5-7% of the kernel). Kind 6
      // (per-channel keys) also gives each row its K address and parameters: a full block's (scale, zero) rows,
      // or in the open last block the row's int8 codes and pair (block for row < half, else its helper, the next
      // column; at row % half).
      off.resize(it.n);
      if (kind == 6) kofs.resize(it.n), kpar.resize(it.n);
      const int32_t* table = tables + it.b * max_blocks;
      const int64_t full = lengths[it.b] / block_size * block_size, half = block_size / 2;
      for (int64_t t = 0, col = it.start / block_size, row0 = it.start % block_size; t < it.n; ++col, row0 = 0) {
        const int64_t run = block_size - row0 < it.n - t ? block_size - row0 : it.n - t;  // rows in this column
        const int64_t base = table[col] * page_stride + ((int64_t)it.h * block_size + row0) * D;
        for (int64_t j = 0; j < run; ++j) off[t + j] = base + j * D;
        if (kind == 6) {
          for (int64_t j = 0; j < run; ++j) {
            const int64_t row = row0 + j;
            if (it.start + t + j < full) {
              kofs[t + j] = -1, kpar[t + j] = ((int64_t)table[col] * Hkv + it.h) * 2 * D;
            } else {
              const int64_t page = table[row < half ? col : col + 1], rr = row < half ? row : row - half;
              kofs[t + j] = page * page_stride / 2 + ((int64_t)it.h * half + rr) * D;
              kpar[t + j] = (page * Hkv + it.h) * 2 * D + 2 * rr;
            }
          }
        }
        t += run;
      }
      sc.resize((size_t)G * it.n);
      const float kscale = (online ? 1.0f : ks[it.h]) * unit * softmax_scale;
      const float kzero = (online ? 1.0f : kz[it.h]) * softmax_scale;
#if KVQ_INT
      if constexpr (kind == 1 || kind == 4 || kind == 6)
        (io_bf16 ? attend_chunk_int<kind, D, false> : attend_chunk_int<kind, D, true>)(
            qx.data(), G, kc, vc, kp, vp, off.data(), kofs.data(), kpar.data(), it.n, kscale, kzero, unit, sc.data(),
            part_acc.data() + i * G * D, part_ml.data() + i * G * 2, iscratch);
      else
#endif
      attend_chunk<kind, D>(qx.data(), G, kc, vc, kp, vp, off.data(), kofs.data(), kpar.data(), it.n, kscale,
                            kzero, unit, sc.data(), part_acc.data() + i * G * D, part_ml.data() + i * G * 2);
    }
    // Split-K merge, one (sequence, KV head) per iteration; a sequence without items (length 0) gets zeros.
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < (int64_t)B * Hkv; ++bh) {
      const int b = (int)(bh / Hkv), h = (int)(bh % Hkv);
      const int64_t chunks = (first[b + 1] - first[b]) / Hkv;
      const float vscale = online ? 1.0f : vs[h] * unit, vzero = online ? 0.0f : vz[h];
      for (int g = 0; g < G; ++g) {
        const int64_t row = ((int64_t)b * H + (int64_t)h * G + g) * D;
        float o[128];
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
        for (int d = 0; d < D; ++d)
          if (io_bf16) ((uint16_t*)out)[row + d] = to_bf16(o[d]);
          else ((float*)out)[row + d] = o[d];
      }
    }
    _mm_setcsr(csr);
  }
}

// Returns 0, or 1 (err = {b, length}) for a length outside [0, max_blocks * block_size], or 2
// (err = {b, column, block id}) for a block a length reaches that lies outside [0, num_blocks).
// chunk <= 0: chosen here (whole sequences when they alone give every thread several items).
extern "C" int decode_attn(const void* q, const void* kc, const void* vc, const int32_t* tables,
                           const int32_t* lengths, const float* ks, const float* kz, const float* vs,
                           const float* vz, const uint16_t* kp, const uint16_t* vp, float softmax_scale, int B,
                           int H, int Hkv, int64_t num_blocks,
                           int64_t block_size, int64_t max_blocks, int D, int kind, int64_t chunk,
                           int64_t parallel_min, int io_bf16, void* out, int64_t* err) {
  int64_t total = 0, longest = 0;
  for (int b = 0; b < B; ++b) {
    const int64_t L = lengths[b];
    // per-channel keys (kind 6): an open block past its first half also reaches its helper, one column on
    const int64_t reach = kind == 6 && L % block_size > block_size / 2 ? L + block_size : L;
    if (L < 0 || reach > max_blocks * block_size) { err[0] = b; err[1] = L; return 1; }
    for (int64_t j = 0; j * block_size < reach; ++j) {
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
#define KVQ_KIND(k) (D == 64 ? decode_attn_t<k, 64> : decode_attn_t<k, 128>)
  auto* f = kind == 0 ? KVQ_KIND(0) : kind == 1 ? KVQ_KIND(1) : kind == 2 ? KVQ_KIND(2) : kind == 3 ? KVQ_KIND(3)
          : kind == 4 ? KVQ_KIND(4) : kind == 5 ? KVQ_KIND(5) : KVQ_KIND(6);
#undef KVQ_KIND
  f(q, kc, vc, tables, lengths, ks, kz, vs, vz, kp, vp, softmax_scale, B, H, Hkv, block_size, max_blocks, chunk,
    parallel, io_bf16, out);
  return 0;
}
"""
# Below this many (token, KV head) rows the work is too small to repay waking the OpenMP threads.
PARALLEL_MIN = 2048
MAX_GROUP = 64  # query heads per KV head the kernel takes (attend_chunk's per-head scratch)
KINDS = {torch.float16: 0, torch.int8: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}  # static: by pool dtype
ONLINE_KINDS = {"int8_per_token_head": 4, "fp8_per_token_head": 5, "int4_per_token_head": 6}


def kernel_kind(kv_dtype: str | None, pool_dtype: torch.dtype) -> int | None:
    """The kernel's kind: an online mode by name (a uint8 pool is INT8 or INT4), a static one by pool dtype."""
    if kv_dtype is not None and quant.is_online(kv_dtype):
        return ONLINE_KINDS[kv_dtype]
    return KINDS.get(pool_dtype)


AVX512 = ("avx512f", "avx512bw")  # what the 16-lane build needs of the CPU; the native build is it where present


@functools.cache
def _cpp_module(avx512: bool | None = None, vnni: bool | None = None):
    """The kernel library (built once, see runtime.cpp_build), or None where it cannot run. avx512: the 16-lane
    build (KVQ_W = 16) or the 8-lane AVX2 one from the same source; vnni: with AVX512-VNNI, the integer kinds
    (int8, int8/int4 per token head) run on int16 dot products (attend_chunk_int); None = what the CPU has (tests
    ask for the others to check every build on one machine)."""
    from runtime import cpp_build

    if avx512 is None:
        avx512 = cpp_build.cpu_has(*AVX512)
    if vnni is None:
        vnni = avx512 and cpp_build.cpu_has("avx512_vnni")
    flags = ["-O3", "-ffast-math", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
    need = ("avx2", "fma", "f16c")
    if avx512:
        flags, need = [*flags, "-mavx512f", "-mavx512bw"], (*need, *AVX512)
    if avx512 and vnni:
        flags, need = [*flags, "-mavx512vnni"], (*need, "avx512_vnni")
    name = "decode_attn" + ("" if avx512 and vnni else "_avx512" if avx512 else "_avx2")
    lib = cpp_build.load(name, KERNEL_SRC, flags, need)
    if lib is not None and lib.decode_attn.argtypes is None:
        lib.decode_attn.restype = ctypes.c_int
        lib.decode_attn.argtypes = (
            [ctypes.c_void_p] * 11
            + [ctypes.c_float]
            + [ctypes.c_int] * 3
            + [ctypes.c_int64] * 3
            + [ctypes.c_int] * 2
            + [ctypes.c_int64] * 2
            + [ctypes.c_int]
            + [ctypes.c_void_p] * 2
        )
    return lib


# Which build runs a kind's attention. On AMD CPUs with AVX-512 (Zen 4 executes each 512-bit instruction as two
# 256-bit halves) the 8-lane AVX2 build runs the INT8 caches faster than the native AVX512-VNNI one: its rows stay
# in registers shared by 3 query heads, while the 16-lane integer path spends two int16 dot products per element.
# Measured in one process on the SmolLM2 engine (2 threads, the native and the AVX2 build's engines interleaved
# step by step): decode steps with int8 / int8_per_token_head 1.06-1.09x faster at 8 x 2048, 1.02-1.09x at 32 x 1024,
# 0.99-1.02x at batch 1; fp16, fp8_e4m3 and int4_per_token_head tied or lost (0.97-1.01x): they keep the native build.
AVX2_ON_AMD_AVX512 = frozenset({KINDS[torch.int8], ONLINE_KINDS["int8_per_token_head"]})
# Measure decode steps, not the kernel alone: on a 2-core Ice Lake Xeon (AVX-512 without bf16, fp32 compute) decode
# attention alone ran 0.74-0.89x the native build's time on the AVX2 build for every kind but int4_per_token_head
# (30 layers' pools, the builds interleaved), yet in the engine, between the AVX-512 build of the fp16-weight linear
# kernel, steps with AVX2 attention were 1.06-1.20x slower at 8 x 2048 for fp16 / INT8 / FP8 / int8_per_token_head
# (tied at batch 1; mixing 256- and 512-bit code there was slower than either alone, which fits the clock that
# 512-bit code sets for the core), so Intel CPUs keep the native build.
BUILD_ENV = "KVQ_ATTENTION_BUILD"  # auto (default), native or avx2


def prefers_avx2(kind: int | None, vendor: str, avx512: bool) -> bool:
    """Does `kind` run faster on the 8-lane AVX2 build than on the native one, on a CPU of this vendor?"""
    return avx512 and vendor == "AuthenticAMD" and kind in AVX2_ON_AMD_AVX512


def build_choice() -> str:
    """$KVQ_ATTENTION_BUILD: auto (unset), native or avx2; ValueError naming it otherwise (the engine checks it at
    start-up, before the first decode step would)."""
    choice = os.environ.get(BUILD_ENV, "auto")
    if choice not in ("auto", "native", "avx2"):
        raise ValueError(f"{BUILD_ENV}={choice!r}: expected auto, native or avx2 (unset it for auto)")
    return choice


def library_for(kv_dtype: str | None, pool_dtype: torch.dtype):
    """The kernel library a cache's decode attention runs on: the native build (`_cpp_module()`), or the AVX2 one
    where `prefers_avx2`; $KVQ_ATTENTION_BUILD = native or avx2 overrides the choice."""
    from runtime import cpp_build

    choice = build_choice()
    if choice == "auto":
        kind = kernel_kind(kv_dtype, pool_dtype)
        choice = "avx2" if prefers_avx2(kind, cpp_build.cpu_vendor(), cpp_build.cpu_has(*AVX512)) else "native"
    lib = _cpp_module(avx512=False, vnni=False) if choice == "avx2" else None
    return lib if lib is not None else _cpp_module()


def decode_attention_cpp(
    q,
    k_pool,
    v_pool,
    block_tables,
    lengths,
    k_scale,
    k_zp,
    v_scale,
    v_zp,
    softmax_scale,
    *,
    kv_dtype: str | None = None,
    k_param=None,
    v_param=None,
    chunk: int = 0,
):
    """Same contract as decode_attention_torch, through the C++ kernel (caller checks availability).

    chunk: positions per work item (0: chosen by the kernel from the work size and the thread count); tests
    pass a small one to exercise the split-K merge on short sequences.
    """
    params = (k_scale, k_zp, v_scale, v_zp)
    check_paged_args(q, k_pool, v_pool, block_tables, lengths, params, kv_dtype, (k_param, v_param))
    plan = DecodePlan(k_pool, v_pool, params, kv_dtype, k_param, v_param, heads=q.shape[1], head_dim=q.shape[2])
    for name, t in (("block_tables", block_tables), ("lengths", lengths)):  # int64 values must survive int32
        if t.dtype == torch.int64 and t.numel() and not -(2**31) <= int(t.min()) <= int(t.max()) < 2**31:
            raise ValueError(f"{name} holds values outside int32 (the kernel indexes blocks and positions with int32)")
    if q.device.type != "cpu" or block_tables.device.type != "cpu" or lengths.device.type != "cpu":
        raise ValueError("the C++ decode kernel takes CPU tensors only (runtime.cuda has the GPU kernels)")
    return plan(q, block_tables, lengths, softmax_scale, chunk)


class DecodePlan:
    """The C++ decode kernel bound to one layer's pools: what stays fixed from step to step (the pools, their
    parameters, the kind, the shapes) is checked and converted once, so a decode step passes only q, the block
    tables and the lengths (the engine calls it 30 times a step; the per-call checks cost ~100 us each on a
    2-core machine, as much as the kernel at batch 1). The kernel itself checks the tables' and lengths' values.

    params: (k_scale, k_zp, v_scale, v_zp) per KV head for the static kinds (all None for the online ones);
    k_param / v_param: the online kinds' per-row parameter pools; heads: query heads H (a multiple of H_kv);
    head_dim: D (INT4 pools hold D / 2 bytes a row)."""

    def __init__(self, k_pool, v_pool, params, kv_dtype, k_param=None, v_param=None, *, heads: int, head_dim: int):
        self.lib = library_for(kv_dtype, k_pool.dtype)
        D = head_dim
        q = torch.empty(0, heads, D)
        check_paged_args(
            q,
            k_pool,
            v_pool,
            q.new_empty(0, 1, dtype=torch.int32),
            q.new_empty(0, dtype=torch.int32),
            params,
            kv_dtype,
            (k_param, v_param),
        )
        self.kind = kernel_kind(kv_dtype, k_pool.dtype)
        if self.lib is None or not _kernel_takes(q, k_pool, kv_dtype) or not v_pool.is_contiguous():
            raise ValueError(
                f"the C++ decode kernel takes contiguous fp16/int8/fp8 or online pools with head size 64 or 128; got "
                f"D={D}, {kv_dtype or k_pool.dtype}, {heads // max(k_pool.shape[1], 1)} query heads per KV head (at "
                f"most {MAX_GROUP}; use decode_attention, which falls back to torch)"
            )
        online = self.kind in ONLINE_KINDS.values()
        rows = (k_param, v_param) if online else ()
        if any(t.device.type != "cpu" for t in (k_pool, v_pool, *(p for p in params + rows if p is not None))):
            raise ValueError("the C++ decode kernel takes CPU tensors only (runtime.cuda has the GPU kernels)")
        # self.copied: the kernel reads converted copies, which would not see later in-place updates of the
        # parameters (FP8's dynamic scales); then the plan is good for one call only
        if online:  # per-row (scale, zero) pools; no per-head parameters (null pointers)
            static, row_ts = [None] * 4, [p.contiguous() for p in rows]
            self.copied = any(a is not b for a, b in zip(row_ts, rows, strict=True))
        else:
            static = [p if p.dtype == torch.float32 and p.is_contiguous() else p.float().contiguous() for p in params]
            row_ts = [None, None]
            self.copied = any(a is not b for a, b in zip(static, params, strict=True))
        self.k_pool, self.v_pool = k_pool, v_pool  # held: the pointers below stay valid while the plan lives
        self.held = static + row_ts
        self.pools = (k_pool.data_ptr(), v_pool.data_ptr())
        self.ptrs = tuple(None if p is None else p.data_ptr() for p in self.held)
        self.num_blocks, self.Hkv, self.block_size = k_pool.shape[:3]
        self.H, self.D = heads, D

    def __call__(self, q, block_tables, lengths, softmax_scale, chunk: int = 0):
        """q (B, H, D) fp32/bf16 (other float dtypes go through fp32) -> (B, H, D) in q's dtype."""
        B = q.shape[0]
        if q.dim() != 3 or q.shape[1:] != (self.H, self.D) or block_tables.dim() != 2 or lengths.shape != (B,):
            raise ValueError(
                f"q must be (B, {self.H}, {self.D}), block_tables (B, max_blocks), lengths (B,); got "
                f"{tuple(q.shape)}, {tuple(block_tables.shape)}, {tuple(lengths.shape)}"
            )
        io_bf16 = q.dtype == torch.bfloat16  # bf16 q in, bf16 out (the kernel converts); else fp32 both ways
        qf = q.contiguous() if io_bf16 or q.dtype == torch.float32 else q.to(torch.float32).contiguous()
        out = torch.empty(B, self.H, self.D, dtype=torch.bfloat16 if io_bf16 else torch.float32)
        tables = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
        tables = tables.contiguous()  # the engine's Batch tables are int32 and contiguous already
        lengths32 = (lengths if lengths.dtype == torch.int32 else lengths.to(torch.int32)).contiguous()
        err = (ctypes.c_int64 * 3)()
        rc = self.lib.decode_attn(
            qf.data_ptr(),
            *self.pools,
            tables.data_ptr(),
            lengths32.data_ptr(),
            *self.ptrs,
            float(softmax_scale),
            B,
            self.H,
            self.Hkv,
            self.num_blocks,
            self.block_size,
            tables.shape[1],
            self.D,
            self.kind,
            chunk,
            PARALLEL_MIN,
            int(io_bf16),
            out.data_ptr(),
            ctypes.addressof(err),
        )
        raise_for(rc, err, tables.shape[1], self.block_size, self.num_blocks)
        return out if io_bf16 or q.dtype == torch.float32 else out.to(q.dtype)


def raise_for(rc: int, err, max_blocks: int, block_size: int, num_blocks: int) -> None:
    """The ValueError for decode_attn's return code rc (0: none) and its err = (b, length or column, block id)."""
    b, x, page = err
    if rc == 1:
        raise ValueError(f"lengths[{b}] = {x} is outside [0, {max_blocks * block_size}] (max_blocks * block_size)")
    if rc == 2:
        raise ValueError(f"block_tables[{b}, {x}] = {page} is outside the pool [0, {num_blocks})")


def _kernel_takes(q: torch.Tensor, k_pool: torch.Tensor, kv_dtype: str | None) -> bool:
    """Shapes, dtypes and layout the kernel is built for: a (B, H, D) q with D 64 or 128, a contiguous 4-D pool of a
    storage mode it knows, at most MAX_GROUP query heads per KV head."""
    if q.dim() != 3 or k_pool.dim() != 4 or q.shape[-1] not in (64, 128) or not k_pool.is_contiguous():
        return False
    return kernel_kind(kv_dtype, k_pool.dtype) is not None and q.shape[1] // max(k_pool.shape[1], 1) <= MAX_GROUP


def cpp_usable(q: torch.Tensor, k_pool: torch.Tensor, kv_dtype: str | None = None) -> bool:
    """The kernel handles these CPU tensors (`_kernel_takes`) and builds on this machine."""
    return not q.is_cuda and _kernel_takes(q, k_pool, kv_dtype) and _cpp_module() is not None


def decode_attention(q, k_pool, *args, kv_dtype: str | None = None, **kwargs):
    """The fastest available implementation (C++ kernel if it builds and takes these tensors, else the torch
    reference), called with the same arguments as `decode_attention_torch`."""
    impl = decode_attention_cpp if cpp_usable(q, k_pool, kv_dtype) else decode_attention_torch
    return impl(q, k_pool, *args, kv_dtype=kv_dtype, **kwargs)
