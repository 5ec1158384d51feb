"""Decode attention straight from the (possibly quantized) KV cache, without a full-precision copy.

One query token per sequence attends over the valid prefix `lengths[b]` of its cache slot. The cache's
per-head affine map x^ = scale * stored + zp is folded into the arithmetic instead of being applied
to the cache:
    scores = softmax_scale * (k_scale * (q . k_stored) + k_zp * sum(q))
    out    = v_scale * (p @ v_stored) + v_zp            (the softmax weights p sum to 1)
so each step reads 1 byte per INT8/FP8 element (2 for fp16), chunk by chunk with an online softmax.

Two implementations with one signature:
  - `decode_attention_torch`: chunks of `CHUNK` positions cast to the compute dtype (any machine),
  - a small C++/OpenMP kernel (`_cpp_module`, built once with torch.utils.cpp_extension.load_inline
    into torch's extension cache) used when a compiler is available; `decode_attention` picks it.
"""

from __future__ import annotations

import torch

CHUNK = 512


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    k_scale: torch.Tensor,
    k_zp: torch.Tensor,
    v_scale: torch.Tensor,
    v_zp: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """q (B, H, D); caches (B_slots, H_kv, S, D); slots, lengths (B,) long; params (H_kv,) fp32 -> (B, H, D)."""
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    cdt = torch.float32 if q.dtype == torch.float32 else q.dtype
    qg = q.to(cdt).view(B, Hkv, H // Hkv, D)  # (B, H_kv, G, D): query heads grouped by their KV head
    q_sum = qg.float().sum(-1)  # (B, H_kv, G)
    ks = (k_scale * softmax_scale).view(1, Hkv, 1, 1)
    kz = (q_sum * (k_zp * softmax_scale).view(1, Hkv, 1)).unsqueeze(-1)  # (B, H_kv, G, 1)
    max_len = int(lengths.max())
    contiguous = bool((slots == torch.arange(B)).all()) if B <= k_cache.shape[0] else False
    m = torch.full((B, Hkv, H // Hkv), float("-inf"))
    den = torch.zeros_like(m)
    acc = torch.zeros(B, Hkv, H // Hkv, D)
    for s in range(0, max_len, CHUNK):
        e = min(s + CHUNK, max_len)
        kc = k_cache[:B, :, s:e] if contiguous else k_cache[slots, :, s:e]  # (B, H_kv, c, D) stored dtype
        sc = torch.matmul(qg, kc.to(cdt).transpose(-1, -2)).float() * ks + kz  # (B, H_kv, G, c)
        invalid = torch.arange(s, e).view(1, -1) >= lengths.view(-1, 1)  # (B, c)
        sc.masked_fill_(invalid.view(B, 1, 1, -1), float("-inf"))
        m_new = torch.maximum(m, sc.amax(-1))
        p = torch.exp(sc - m_new.unsqueeze(-1))
        corr = torch.exp(m - m_new)
        den = den * corr + p.sum(-1)
        vc = v_cache[:B, :, s:e] if contiguous else v_cache[slots, :, s:e]
        acc = acc * corr.unsqueeze(-1) + torch.matmul(p.to(cdt), vc.to(cdt)).float()
        m = m_new
    out = acc / den.unsqueeze(-1) * v_scale.view(1, Hkv, 1, 1) + v_zp.view(1, Hkv, 1, 1)
    return out.view(B, H, D).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# C++ kernel. One OpenMP work item per (sequence, KV head): blocks of 8 cached rows are converted to
# fp32 once into an L1 scratch and reused by the G query heads of that KV head (8 scores reduced
# together), softmax over the valid prefix (expf vectorized: -ffast-math lets GCC call libmvec), then
# p * v rows accumulate with the output row in registers (head size 64 or 128, fixed at compile time).
# Conversions, 8 lanes per instruction:
#   int8:  cvtepi8_epi32 -> cvtepi32_ps
#   fp16:  F16C cvtph_ps
#   e5m2:  the byte is the high byte of an fp16 (same exponent bias 15): bits << 8 -> cvtph_ps
#   e4m3:  bits (s eeee mmm) -> fp16 bits s<<15 | (eeee mmm)<<7 is the same value * 2^-8 for normals
#          and subnormals alike (bias 7 vs 15); the 2^8 is folded into the scale.
KERNEL_SRC = r"""
#include <immintrin.h>
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

// One (sequence, KV head) item with head size D known at compile time: cached rows are converted to
// fp32 8 at a time into an L1 scratch block once, then reused by the G query heads (scores: 8 dot
// products reduced together; values: the output row of one query head stays in registers).
template <int kind, int D>
static void attend_item(const float* qb, const void* kc, const void* vc, int64_t row0, int64_t L, int G,
                        float kscale, float kzero, float vscale, float vzero, float* sc, float* outb) {
  alignas(32) float blk[8 * D];
  for (int64_t t0 = 0; t0 < L; t0 += 8) {
    const int n = L - t0 < 8 ? (int)(L - t0) : 8;
    for (int j = 0; j < 8; ++j)  // rows past L repeat the last valid row; their scores are dropped
      for (int d = 0; d < D; d += 8)
        _mm256_store_ps(blk + j * D + d, load8<kind>(kc, row0 + (t0 + (j < n ? j : n - 1)) * D + d));
    for (int g = 0; g < G; ++g) {
      const float* qg = qb + g * (D + 1);  // q row g, then its sum
      __m256 a[8];
      for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
      for (int d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qg + d);
        for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_load_ps(blk + j * D + d), a[j]);
      }
      alignas(32) float s8[8];
      _mm256_store_ps(s8, hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
      for (int j = 0; j < n; ++j) sc[g * L + t0 + j] = s8[j] * kscale + kzero * qg[D];  // qg[D]: sum(q)
    }
  }
  float inv[64];
  for (int g = 0; g < G; ++g) {  // softmax over the valid prefix (expf vectorized through libmvec)
    float* s = sc + g * L;
    float m = -FLT_MAX;  // -ffast-math assumes no infinities; scores are finite
    for (int64_t t = 0; t < L; ++t) m = s[t] > m ? s[t] : m;
    float den = 0;
    for (int64_t t = 0; t < L; ++t) { s[t] = expf(s[t] - m); den += s[t]; }
    inv[g] = 1.0f / den;
  }
  alignas(32) float acc[64 * D];
  for (int i = 0; i < G * D; ++i) acc[i] = 0.0f;
  for (int64_t t0 = 0; t0 < L; t0 += 8) {
    const int n = L - t0 < 8 ? (int)(L - t0) : 8;
    for (int j = 0; j < n; ++j)
      for (int d = 0; d < D; d += 8) _mm256_store_ps(blk + j * D + d, load8<kind>(vc, row0 + (t0 + j) * D + d));
    for (int g = 0; g < G; ++g) {
      __m256 o[D / 8];
      for (int d = 0; d < D / 8; ++d) o[d] = _mm256_load_ps(acc + g * D + d * 8);
      for (int j = 0; j < n; ++j) {
        const __m256 p = _mm256_set1_ps(sc[g * L + t0 + j]);
        for (int d = 0; d < D / 8; ++d) o[d] = _mm256_fmadd_ps(p, _mm256_load_ps(blk + j * D + d * 8), o[d]);
      }
      for (int d = 0; d < D / 8; ++d) _mm256_store_ps(acc + g * D + d * 8, o[d]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) outb[g * D + d] = acc[g * D + d] * inv[g] * vscale + vzero;
}

template <int kind>
static void decode_attn_t(const float* q, const void* kc, const void* vc, const int64_t* slots,
                          const int64_t* lengths, const float* ks, const float* kz, const float* vs,
                          const float* vz, float softmax_scale, int B, int H, int Hkv, int S, int D,
                          int parallel, float* out) {
  const int G = H / Hkv;
  const float unit = kind == 2 ? 256.0f : 1.0f;  // e4m3 rows are read as value * 2^-8
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int item = 0; item < B * Hkv; ++item) {
    const int b = item / Hkv, h = item % Hkv;
    const int64_t L = lengths[b];
    const int64_t row0 = ((slots[b] * Hkv + h) * (int64_t)S) * D;  // element offset of [slot, h, 0, 0]
    std::vector<float> qx((size_t)G * (D + 1)), sc((size_t)G * L);  // q rows, each followed by sum(q)
    for (int g = 0; g < G; ++g) {
      float s = 0;
      for (int d = 0; d < D; ++d) s += (qx[g * (D + 1) + d] = q[((int64_t)b * H + (int64_t)h * G + g) * D + d]);
      qx[g * (D + 1) + D] = s;
    }
    const float kscale = ks[h] * unit * softmax_scale, kzero = kz[h] * softmax_scale;
    float* ob = out + ((int64_t)b * H + (int64_t)h * G) * D;
    if (D == 64)
      attend_item<kind, 64>(qx.data(), kc, vc, row0, L, G, kscale, kzero, vs[h] * unit, vz[h], sc.data(), ob);
    else
      attend_item<kind, 128>(qx.data(), kc, vc, row0, L, G, kscale, kzero, vs[h] * unit, vz[h], sc.data(), ob);
  }
}

extern "C" void decode_attn(const float* q, const void* kc, const void* vc, const int64_t* slots,
                            const int64_t* lengths, const float* ks, const float* kz, const float* vs,
                            const float* vz, float softmax_scale, int B, int H, int Hkv, int S, int D, int kind,
                            int parallel, float* out) {
  auto* f = kind == 0 ? decode_attn_t<0> : kind == 1 ? decode_attn_t<1> : kind == 2 ? decode_attn_t<2> : decode_attn_t<3>;
  f(q, kc, vc, slots, lengths, ks, kz, vs, vz, softmax_scale, B, H, Hkv, S, D, parallel, out);
}
"""
# Below this many (token, KV head) rows the work is too small to repay waking the OpenMP threads.
PARALLEL_MIN = 2048
KINDS = {torch.float16: 0, torch.int8: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}
_lib: list = []  # [ctypes.CDLL | None], resolved once


def _cpp_module():
    """Build (once, cached by source hash under ~/.cache/kvq/kernels) and load the kernel; None if unavailable."""
    if _lib:
        return _lib[0]
    import ctypes
    import hashlib
    import os
    import platform
    import shutil
    import subprocess
    import warnings
    from pathlib import Path

    _lib.append(None)
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("KVQ_NO_CPP_KERNEL"):
        return None
    if not _cpu_has("avx2", "fma", "f16c"):  # the kernel is built with -mavx2 -mfma -mf16c
        return None
    if shutil.which("g++") is None:
        warnings.warn("g++ not found: decode attention uses the slower torch path", stacklevel=2)
        return None
    flags = ["-O3", "-ffast-math", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
    digest = hashlib.sha256((KERNEL_SRC + " ".join(flags)).encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("KVQ_KERNEL_CACHE", Path.home() / ".cache" / "kvq" / "kernels"))
    so = out_dir / f"decode_attn_{digest}.so"
    if not so.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        src = out_dir / f"decode_attn_{digest}.{os.getpid()}.cpp"
        src.write_text(KERNEL_SRC)
        tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
        proc = subprocess.run(["g++", *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
        src.unlink()
        if proc.returncode != 0:
            warnings.warn(
                f"building the C++ decode-attention kernel failed, using the torch path:\n{proc.stderr}", stacklevel=2
            )
            return None
        os.replace(tmp, so)  # atomic: concurrent builders race harmlessly
    lib = ctypes.CDLL(str(so))
    lib.decode_attn.restype = None
    lib.decode_attn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_float] + [ctypes.c_int] * 7 + [ctypes.c_void_p]
    _lib[0] = lib
    return lib


def _cpu_has(*flags: str) -> bool:
    """Does this CPU advertise all `flags` in /proc/cpuinfo (Linux)? False when it cannot tell."""
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        return False
    return set(flags) <= set(line.split())


def decode_attention_cpp(q, k_cache, v_cache, slots, lengths, k_scale, k_zp, v_scale, v_zp, softmax_scale):
    """Same contract as decode_attention_torch, through the C++ kernel (caller checks availability)."""
    lib = _cpp_module()
    B, H, D = q.shape
    if D not in (64, 128) or H // k_cache.shape[1] > 64:
        raise ValueError(
            f"the C++ decode kernel takes head size 64 or 128 and <= 64 query heads per KV head; got "
            f"D={D}, {H // k_cache.shape[1]} (use decode_attention, which falls back to torch)"
        )
    _, Hkv, S, _ = k_cache.shape
    qf = q.to(torch.float32).contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    slots = slots.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    params = [p.to(torch.float32).contiguous() for p in (k_scale, k_zp, v_scale, v_zp)]
    lib.decode_attn(
        qf.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        lengths.data_ptr(),
        *(p.data_ptr() for p in params),
        float(softmax_scale),
        B,
        H,
        Hkv,
        S,
        D,
        KINDS[k_cache.dtype],
        int(int(lengths.sum()) * Hkv >= PARALLEL_MIN),
        out.data_ptr(),
    )
    return out.to(q.dtype)


def cpp_usable(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The kernel handles CPU tensors with head size 64 or 128 and at most 64 query heads per KV head."""
    ok = (
        not q.is_cuda
        and k_cache.is_contiguous()
        and k_cache.dtype in KINDS
        and q.shape[-1] in (64, 128)
        and q.shape[1] // k_cache.shape[1] <= 64
    )
    return ok and _cpp_module() is not None


def decode_attention(q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp, v_scale, v_zp, softmax_scale):
    """Paged layout: gather each sequence's blocks into a contiguous (B, H_kv, S, D) view, then attend."""
    B = q.shape[0]
    _, Hkv, bs, D = k_pool.shape
    n = -(-int(lengths.max()) // bs)
    bt = block_tables[:, :n]
    kc = k_pool[bt].transpose(1, 2).flatten(2, 3)  # (B, H_kv, n*bs, D)
    vc = v_pool[bt].transpose(1, 2).flatten(2, 3)
    slots = torch.arange(B)
    impl = decode_attention_cpp if cpp_usable(q, kc) else decode_attention_torch
    return impl(q, kc, vc, slots, lengths, k_scale, k_zp, v_scale, v_zp, softmax_scale)
