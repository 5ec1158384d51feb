"""The CPU cache writes in C++: the online modes (int8_per_token_head, int4_per_token_head, fp8_per_token_head) and
the static ones (fp16, int8, fp8_e4m3, fp8_e5m2 with per-head parameters).

The PyTorch write (`runtime.kv_cache.KVCache.write`, formulas in `runtime.quant`) is some 40 small tensor
operations per layer (row min / max, fp16 rounding, division, rounding, packing, scatter; INT4 keys also the
int8 open rows and the per-channel blocks): ~600 us a layer for 16 decode rows, 18 ms a step over 30 layers.
This kernel does the same arithmetic row by row, in the same fp32 operations in the same order, so its bytes
equal the PyTorch write's (tests/test_online_kv.py compares them): IEEE division and min / max (built without
-ffast-math and with -ffp-contract=off, so q * scale + zero stays two roundings as in PyTorch), round half to
even (rintf), fp16 rounding to nearest even (F16C). Rotation stays outside (the caller passes rotated rows).

    online_write(k, v, slots, kv_dtype, k_pool, v_pool, k_param, v_param, key_plan)
    static_write(k, v, slots, kv_dtype, k_pool, v_pool, k_scale, k_zp, v_scale, v_zp)

k, v (N, H_kv, D) rows (online: fp32, rotated; static: fp32 or bf16, the compute dtype); slots (N,) = block *
block_size + row; for int4_per_token_head the step's `KeyPlan`. Rows whose slot lies outside the pool are
skipped (the caller's slots come from the scheduler). The static write replaces quant.quantize + an indexed
store (~10 tensor operations a layer, most of a batch-1 step's cache-write time): int8 q = clamp(rint((x - zp)
/ scale), -128, 127) with the IEEE division; fp8 the saturating scaled cast clamp(x / scale, +-max) rounded
to nearest even in the format (c10's fp32 -> fp8 conversion: subnormals by a magic-number add, normals by
adding half an ulp minus one plus the low mantissa bit); fp16 the F16C rounding to nearest even.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from runtime import quant

KERNEL_SRC = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <vector>

static inline float h16(float x) { return _cvtsh_ss(_cvtss_sh(x, 0)); }  // round to fp16 (nearest even) and back

// One row x[0..n) (stride step) -> its (scale, zero) as fp16 bits and codes; quant.online_params and
// quant.quantize_online for the integer modes: scale = fp16((max - min) / top), zero = fp16(min),
// q = clamp(rint((x - zero) / scale), 0, top), 0 where scale is 0.
static inline void quantize_row(const float* x, int64_t n, int64_t step, int top, uint8_t* q, uint16_t* pair) {
  float mn = x[0], mx = x[0];
  for (int64_t i = 1; i < n; ++i) {
    const float a = x[i * step];
    mn = a < mn ? a : mn;
    mx = a > mx ? a : mx;
  }
  const float range = mx - mn;
  const float scale_f = range / (float)top;
  pair[0] = _cvtss_sh(scale_f, 0);
  pair[1] = _cvtss_sh(mn, 0);
  const float s = _cvtsh_ss(pair[0]), z = _cvtsh_ss(pair[1]);
  for (int64_t i = 0; i < n; ++i) {
    float y = s > 0.0f ? (x[i * step] - z) / s : 0.0f;
    y = rintf(y);
    y = y < 0.0f ? 0.0f : (y > (float)top ? (float)top : y);
    q[i] = (uint8_t)y;
  }
}

// fp32 -> fp8 (M mantissa bits, exponent bias B) rounded to nearest even, |f| <= the format's max (the caller
// clamps): c10's fp8e4m3fn / fp8e5m2 conversion. Below the smallest normal, adding 2^(E) with E = (127 - B) +
// (23 - M) + 1 lets the FPU round the value into the low bits; above it, the exponent is rebiased and the mantissa
// rounded by adding 2^(22 - M) - 1 plus its lowest kept bit.
template <int M, int B>
static inline uint8_t to_fp8(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint8_t out;
  if (bits < (uint32_t)(127 - B + 1) << 23) {
    const uint32_t magic = (uint32_t)((127 - B) + (23 - M) + 1) << 23;
    float m, y;
    memcpy(&m, &magic, 4);
    memcpy(&y, &bits, 4);
    y += m;
    memcpy(&bits, &y, 4);
    out = (uint8_t)(bits - magic);
  } else {
    const uint32_t odd = (bits >> (23 - M)) & 1u;
    bits += ((uint32_t)(B - 127) << 23) + ((1u << (22 - M)) - 1u) + odd;
    out = (uint8_t)(bits >> (23 - M));
  }
  return out | (uint8_t)(sign >> 24);
}

// fp8_per_token_head, one row: quant.online_params and quant.quantize_online: scale = fp16(absmax / 448), zero 0,
// f = e4m3(clamp(x / scale, -448, 448)), 0 where scale is 0.
static inline void quantize_row_fp8(const float* x, int64_t n, uint8_t* q, uint16_t* pair) {
  float a = 0.0f;
  for (int64_t i = 0; i < n; ++i) a = fabsf(x[i]) > a ? fabsf(x[i]) : a;
  pair[0] = _cvtss_sh(a / 448.0f, 0);
  pair[1] = 0;  // fp16 +0
  const float s = _cvtsh_ss(pair[0]);
  for (int64_t i = 0; i < n; ++i) {
    float y = s > 0.0f ? x[i] / s : 0.0f;
    y = y < -448.0f ? -448.0f : (y > 448.0f ? 448.0f : y);
    q[i] = to_fp8<3, 7>(y);
  }
}

static inline void pack4(const uint8_t* q, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n / 2; ++i) out[i] = (uint8_t)(q[2 * i] | (q[2 * i + 1] << 4));
}

static inline float read8(const uint8_t* q, const uint16_t* pair, int64_t i) {
  const float s = _cvtsh_ss(pair[0]), z = _cvtsh_ss(pair[1]);
  const float p = (float)q[i] * s;  // two roundings, as dequantize_online
  return p + z;
}

// mode (ONLINE_MODES) 8: int8_per_token_head, K and V per row at their slots; 0: fp8_per_token_head, the same with
// e4m3 values. 4: int4_per_token_head: V per row (packed),
// K per channel within blocks (runtime.kv_cache.KVCache._write_channel_keys): the blocks complete (M, 4) =
// (block, helper, r0, i0) are quantized per channel from the int8 read-back of their rows (earlier open rows,
// then this step's rows i0 ...), all read before any is stored; then rows with helper[n] >= 0 become int8 open
// rows in the half-block layout (rows < bs / 2 in their block, others in helper[n]).
extern "C" void online_write(const float* k, const float* v, int64_t N, int64_t H, int64_t D, int64_t bs,
                             int64_t num_blocks, int mode, uint8_t* kpool, uint8_t* vpool, uint16_t* kparam,
                             uint16_t* vparam, const int64_t* slots, const int64_t* helper, const int64_t* complete,
                             int64_t M) {
  const int64_t width = mode == 4 ? D / 2 : D;  // stored bytes per row
  const int top = mode == 4 ? 15 : 255;
  std::vector<uint8_t> q(D);
  for (int64_t n = 0; n < N; ++n) {  // per-row rows: V always, K too for int8
    const int64_t slot = slots[n];
    if (slot < 0 || slot >= num_blocks * bs) continue;
    const int64_t blk = slot / bs, row = slot % bs;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t r = (blk * H + h) * bs + row;  // row index in (num_blocks, H, bs)
      for (int which = mode == 4 ? 1 : 0; which < 2; ++which) {
        const float* x = (which ? v : k) + (n * H + h) * D;
        uint8_t* pool = which ? vpool : kpool;
        uint16_t* param = which ? vparam : kparam;
        if (mode == 0) quantize_row_fp8(x, D, q.data(), param + 2 * r);
        else quantize_row(x, D, 1, top, q.data(), param + 2 * r);
        if (mode == 4) pack4(q.data(), D, pool + r * width);
        else memcpy(pool + r * width, q.data(), D);
      }
    }
  }
  if (mode != 4) return;
  // INT4 keys: this step's rows as int8 rows (codes + pair), as the open layout and the completions read them
  std::vector<uint8_t> c8((size_t)N * H * D);
  std::vector<uint16_t> p8((size_t)N * H * 2);
  for (int64_t r = 0; r < N * H; ++r) quantize_row(k + r * D, D, 1, 255, c8.data() + r * D, p8.data() + 2 * r);
  const int64_t half = bs / 2, page = H * bs * D / 2;  // page: K bytes of one block; kparam: H * 2 * D per block
  std::vector<float> x((size_t)bs * D);
  std::vector<uint8_t> codes((size_t)M * H * bs * D / 2), qc((size_t)bs);
  std::vector<uint16_t> cpar((size_t)M * H * 2 * D);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t blk = complete[4 * m], nxt = complete[4 * m + 1], r0 = complete[4 * m + 2], i0 = complete[4 * m + 3];
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t r = 0; r < bs; ++r) {  // the block's rows, int8 read-back (bs, D) for this head
        const uint8_t* cq;
        const uint16_t* pr;
        if (r >= r0) {
          const int64_t i = i0 + r - r0;
          cq = c8.data() + (i * H + h) * D, pr = p8.data() + 2 * (i * H + h);
        } else {
          const int64_t src = r < half ? blk : nxt, rr = r % half;
          cq = kpool + src * page + (h * half + rr) * D, pr = kparam + (src * H + h) * 2 * D + 2 * rr;
        }
        for (int64_t d = 0; d < D; ++d) x[r * D + d] = read8(cq, pr, d);
      }
      uint16_t* par = cpar.data() + (m * H + h) * 2 * D;
      uint8_t* out = codes.data() + (m * H + h) * bs * D / 2;
      for (int64_t d = 0; d < D; ++d) {  // per channel over the bs rows
        uint16_t pair[2];
        quantize_row(x.data() + d, bs, D, 15, qc.data(), pair);
        par[d] = pair[0], par[D + d] = pair[1];
        for (int64_t r = 0; r < bs; ++r) {  // element d of row r: low nibble when d is even
          uint8_t* b = out + r * D / 2 + d / 2;
          *b = (uint8_t)(d % 2 ? (*b & 0x0F) | (qc[r] << 4) : (*b & 0xF0) | qc[r]);
        }
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const int64_t blk = complete[4 * m];
    memcpy(kpool + blk * page, codes.data() + m * H * bs * D / 2, (size_t)H * bs * D / 2);
    memcpy(kparam + blk * H * 2 * D, cpar.data() + m * H * 2 * D, (size_t)H * 2 * D * 2);
  }
  for (int64_t n = 0; n < N; ++n) {  // open rows
    const int64_t slot = slots[n], hb = helper[n];
    if (hb < 0 || slot < 0 || slot >= num_blocks * bs || hb >= num_blocks) continue;
    const int64_t row = slot % bs, dst = row < half ? slot / bs : hb, rr = row % half;
    for (int64_t h = 0; h < H; ++h) {
      memcpy(kpool + dst * page + (h * half + rr) * D, c8.data() + (n * H + h) * D, D);
      uint16_t* pair = kparam + (dst * H + h) * 2 * D + 2 * rr;
      pair[0] = p8[2 * (n * H + h)], pair[1] = p8[2 * (n * H + h) + 1];
    }
  }
}

// kind 0 fp16, 1 int8, 2 fp8 e4m3, 3 fp8 e5m2 (runtime.cpu_attention's numbering); x rows fp32, or bf16 when
// bf16 is set; ks..vz (H,) fp32 per-head parameters (unused for fp16).
extern "C" void static_write(const void* k, const void* v, int bf16, int64_t N, int64_t H, int64_t D, int64_t bs,
                             int64_t num_blocks, int kind, void* kpool, void* vpool, const int64_t* slots,
                             const float* ks, const float* kz, const float* vs, const float* vz) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t slot = slots[n];
    if (slot < 0 || slot >= num_blocks * bs) continue;
    const int64_t blk = slot / bs, row = slot % bs;
    for (int which = 0; which < 2; ++which) {
      const void* src = which ? v : k;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t i0 = (n * H + h) * D, o = ((blk * H + h) * bs + row) * D;
        const float scale = kind ? (which ? vs : ks)[h] : 1.0f, zp = kind == 1 ? (which ? vz : kz)[h] : 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          float x;
          if (bf16) {
            const uint32_t b = (uint32_t)((const uint16_t*)src)[i0 + d] << 16;
            memcpy(&x, &b, 4);
          } else {
            x = ((const float*)src)[i0 + d];
          }
          if (kind == 0) {
            ((uint16_t*)(which ? vpool : kpool))[o + d] = _cvtss_sh(x, 0);
            continue;
          }
          uint8_t* dst = (uint8_t*)(which ? vpool : kpool) + o + d;
          if (kind == 1) {
            float y = rintf((x - zp) / scale);
            y = y < -128.0f ? -128.0f : (y > 127.0f ? 127.0f : y);
            *dst = (uint8_t)(int8_t)y;
          } else {
            const float fmax = kind == 2 ? 448.0f : 57344.0f;
            float y = x / scale;
            y = y < -fmax ? -fmax : (y > fmax ? fmax : y);
            *dst = kind == 2 ? to_fp8<3, 7>(y) : to_fp8<2, 15>(y);
          }
        }
      }
    }
  }
}
"""

ONLINE_MODES = {"int8_per_token_head": 8, "int4_per_token_head": 4, "fp8_per_token_head": 0}  # online_write's mode
STATIC_KINDS = {"fp16": 0, "int8": 1, "fp8_e4m3": 2, "fp8_e5m2": 3}


@functools.cache
def _library():
    from runtime import cpp_build

    lib = cpp_build.load(
        "online_write", KERNEL_SRC, ["-O2", "-mf16c", "-ffp-contract=off", "-fno-fast-math"], ("f16c",)
    )
    if lib is not None:
        lib.online_write.restype = None
        lib.online_write.argtypes = (
            [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_int] + [ctypes.c_void_p] * 7 + [ctypes.c_int64]
        )
        lib.static_write.restype = None
        lib.static_write.argtypes = (
            [ctypes.c_void_p] * 2 + [ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.c_int] + [ctypes.c_void_p] * 7
        )
    return lib


def _check_contiguous(fn: str, **pools: torch.Tensor) -> None:
    """The kernels write the pools through raw pointers: each must be contiguous (ValueError naming it)."""
    for name, t in pools.items():
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous")


def takes(kv_dtype: str, k: torch.Tensor) -> bool:
    """Whether the kernel writes this mode's rows (online modes, CPU) and builds here."""
    return kv_dtype in ONLINE_MODES and k.device.type == "cpu" and _library() is not None


def online_write(
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    kv_dtype: str,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k_param: torch.Tensor,
    v_param: torch.Tensor,
    key_plan=None,
) -> None:
    """Store rotated rows k, v (N, H_kv, D) at slots (N,) in the pools of one layer (see the module docstring)."""
    lib = _library()
    N, H, D = k.shape
    num_blocks, _, bs, _ = k_pool.shape
    _check_contiguous("online_write", k_pool=k_pool, v_pool=v_pool, k_param=k_param, v_param=v_param)
    k = k.to(torch.float32).contiguous()
    v = v.to(torch.float32).contiguous()
    slots = slots.to(torch.int64).contiguous()
    helper = complete = None
    M = 0
    if quant.channel_keys(kv_dtype):
        helper = key_plan.helper.to(torch.int64).contiguous()
        complete = key_plan.complete.to(torch.int64).contiguous()
        M = complete.shape[0]
    lib.online_write(
        k.data_ptr(),
        v.data_ptr(),
        N,
        H,
        D,
        bs,
        num_blocks,
        ONLINE_MODES[kv_dtype],
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        k_param.data_ptr(),
        v_param.data_ptr(),
        slots.data_ptr(),
        None if helper is None else helper.data_ptr(),
        None if complete is None else complete.data_ptr(),
        M,
    )


def takes_static(kv_dtype: str, k: torch.Tensor) -> bool:
    """Whether static_write takes this mode and these rows (CPU, fp32 or bf16) and the kernel builds here."""
    return (
        kv_dtype in STATIC_KINDS
        and k.device.type == "cpu"
        and k.dtype in (torch.float32, torch.bfloat16)
        and _library() is not None
    )


def static_write(
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    kv_dtype: str,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k_scale: torch.Tensor,
    k_zp: torch.Tensor,
    v_scale: torch.Tensor,
    v_zp: torch.Tensor,
) -> None:
    """Store rows k, v (N, H_kv, D) (fp32 or bf16) at slots (N,) in a static mode's pools of one layer, as
    quant.quantize with the per-head (scale, zp) would (see the module docstring)."""
    N, H, D = k.shape
    num_blocks, _, bs, _ = k_pool.shape
    _check_contiguous("static_write", k_pool=k_pool, v_pool=v_pool)
    dt = torch.bfloat16 if k.dtype == torch.bfloat16 else torch.float32
    k, v = k.to(dt).contiguous(), v.to(dt).contiguous()
    slots = slots.to(torch.int64).contiguous()
    params = [p.to(torch.float32).contiguous() for p in (k_scale, k_zp, v_scale, v_zp)]
    _library().static_write(
        k.data_ptr(),
        v.data_ptr(),
        int(dt == torch.bfloat16),
        N,
        H,
        D,
        bs,
        num_blocks,
        STATIC_KINDS[kv_dtype],
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        slots.data_ptr(),
        *(p.data_ptr() for p in params),
    )
