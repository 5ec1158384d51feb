// kvq_common.cuh: device helpers shared by kv_write.cu and decode_attention.cu.
//
// Storage modes (template parameter MODE, same codes as runtime/cuda/kernels.py KV_MODES):
//   0 fp16      cache element __half, written as a round-to-nearest-even cast, read as is
//   1 int8      q  = clamp(rn_even((x - zp) / scale), -128, 127);  x^ = q * scale + zp
//   2 fp8_e4m3  f  = cast_rne(clamp(x / scale, +-448));            x^ = f * scale
//   3 fp8_e5m2  f  = cast_rne(clamp(x / scale, +-57344));          x^ = f * scale
// Modes 0-3 use fp32 scales and zero points, one per KV head (calibrated). The online modes carry their own
// (scale, zero) per row (one token, one KV head), computed on write and stored as fp16 pairs beside the data:
//   4 int8_per_token_head  scale = (max - min) / 255, zero = min;  q = clamp(rn_even((x - zero) / scale), 0, 255)
//   5 fp8_per_token_head   scale = absmax / 448,      zero = 0;    f = cast_rne(clamp(x / scale, +-448)) (E4M3)
//   6 int4_per_token_head  scale = (max - min) / 15,  zero = min;  q = clamp(rn_even((x - zero) / scale), 0, 15),
//                          element 2i in the low nibble, 2i + 1 in the high nibble of byte i
// dividing by the fp16-rounded scale (a row with scale 0 stores code 0 / fp8 0); read x^ = q * scale + zero.
// Mode 6 stores only its values per row like that. Its keys are per channel within a block (KIVI): a full block
// holds int4 codes with one fp16 (scale, zero) per channel, k_param (num_blocks, H_kv, 2, D) = (scale row, zero
// row), same formulas over the block's rows of one channel; the open (partial last) block holds int8 rows (mode
// 4) in the half-block layout, the second half in the sequence's next block (the helper). Definition:
// runtime/quant.py quantize_channels and runtime/kv_cache.py (KeyPlan, open_key_rows, KVCache.write).
// The formulas are those of runtime/quant.py (the reference the tests compare against).
//
// Compiled by NVRTC for the GPU, and by g++ through cuda_host_emulation.h for the CPU tests.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#define KVQ_MODE_FP16 0
#define KVQ_MODE_INT8 1
#define KVQ_MODE_FP8_E4M3 2
#define KVQ_MODE_FP8_E5M2 3
#define KVQ_MODE_INT8_PTH 4
#define KVQ_MODE_FP8_PTH 5
#define KVQ_MODE_INT4_PTH 6

__host__ __device__ constexpr bool kvq_is_online(int mode) { return mode >= KVQ_MODE_INT8_PTH; }

// Cache element type per mode; fp8 is stored as raw bytes (__nv_fp8_storage_t), online integer codes as unsigned
// bytes (int4: two codes per byte).
template <int MODE> struct KvStore { typedef unsigned char T; };
template <> struct KvStore<KVQ_MODE_FP16> { typedef __half T; };
template <> struct KvStore<KVQ_MODE_INT8> { typedef signed char T; };

// ---- activations (q, k_new, v_new, out): fp32, fp16 or bf16 -------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// ---- quantize one value (cache write) -----------------------------------------------------------
__device__ __forceinline__ signed char quantize_int8(float x, float scale, float zp) {
    // IEEE division (NVRTC's default --prec-div=true) so the result is bit-exact with torch's fp32 math;
    // __float2int_rn rounds half to even like torch.round, and saturates out-of-range floats.
    int q = __float2int_rn((x - zp) / scale);
    q = q < -128 ? -128 : (q > 127 ? 127 : q);
    return (signed char)q;
}

// Saturating cast of an already scaled value: clamp to +-max, then round to nearest even.
template <int MODE> __device__ __forceinline__ unsigned char fp8_cast(float y) {
    const float fmax = MODE == KVQ_MODE_FP8_E5M2 ? 57344.0f : 448.0f;
    y = y > fmax ? fmax : (y < -fmax ? -fmax : y);  // clamp before the cast; NaN passes through as NaN
    return __nv_cvt_float_to_fp8(y, __NV_SATFINITE, MODE == KVQ_MODE_FP8_E5M2 ? __NV_E5M2 : __NV_E4M3);
}

template <int MODE> __device__ __forceinline__ unsigned char quantize_fp8(float x, float scale) {
    return fp8_cast<MODE>(x / scale);
}

// Online: y / scale by IEEE division (__fdiv_rn, whatever the compile flags), 0 for an all-equal row (scale 0),
// exactly as quant.py computes it.
__device__ __forceinline__ float online_divide(float y, float scale) {
    return scale > 0.0f ? __fdiv_rn(y, scale) : 0.0f;
}

// Online integer code: (x - zero) / scale rounded half to even, clamped to [0, top].
__device__ __forceinline__ unsigned int quantize_code(float x, float zero, float scale, int top) {
    const int q = __float2int_rn(online_divide(x - zero, scale));
    return (unsigned int)(q < 0 ? 0 : (q > top ? top : q));
}

// ---- dequantize one load of cache (attention read) -----------------------------------------------
// Returns the *stored* values as floats: fp16 values, int8 / uint8 / uint4 integers, fp8 values; the scale and
// zero point (per head, or per row in the online modes) are folded into q, the scores and the output by the
// attention kernel, so they cost nothing per element. A load is 16 bytes, except int4 which loads 8 bytes
// (16 codes), so that every 8-bit and 4-bit mode gives a lane 16 values and the same register footprint.
template <int MODE> struct KvVec {
    static constexpr int BYTES = MODE == KVQ_MODE_INT4_PTH ? 8 : 16;  // bytes per lane load
    static constexpr int N = MODE == KVQ_MODE_INT4_PTH ? 16 : 16 / (int)sizeof(typename KvStore<MODE>::T);  // values
};

// Unsigned code (< 2^23) to float without a conversion instruction: 2^23 + code has the code in its mantissa.
__device__ __forceinline__ float code_to_float(unsigned int code) {
    return __int_as_float(0x4B000000 | (int)code) - 8388608.0f;
}

// Byte i of w as the float 2^23 + byte, in one byte permute (bytes: w's byte i, 0x00, 0x00, 0x4B). The 8-bit
// modes convert 16 values per lane load this way: an integer-to-float conversion instruction runs at a quarter
// of the FP32 rate on sm_80-sm_90 and was the INT8 kernel's bottleneck.
__device__ __forceinline__ float byte_as_float_2p23(unsigned int w, int i) {
    return __int_as_float((int)__byte_perm(w, 0x4B000000u, 0x7540u | (unsigned int)i));
}

// One lane's load: KvVec<MODE>::BYTES bytes at p (aligned to them), in a uint4 (int4: .x and .y only).
template <int MODE> __device__ __forceinline__ uint4 load_vec(const typename KvStore<MODE>::T* p) {
    if constexpr (KvVec<MODE>::BYTES == 16) {
        return *reinterpret_cast<const uint4*>(p);
    } else {
        const uint2 r = *reinterpret_cast<const uint2*>(p);
        return make_uint4(r.x, r.y, 0u, 0u);
    }
}

// raw holds KvVec<MODE>::BYTES bytes of one row (int4: raw.x, raw.y); out gets KvVec<MODE>::N floats.
template <int MODE> __device__ __forceinline__ void unpack_vec(const uint4& raw, float* out) {
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (MODE == KVQ_MODE_FP16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            __half2_raw hr;
            hr.x = (unsigned short)(w[i] & 0xffffu);
            hr.y = (unsigned short)(w[i] >> 16);
            const float2 f = __half22float2(__half2(hr));
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    } else if constexpr (MODE == KVQ_MODE_INT8) {
        // signed byte s: s ^ 0x80 = s + 128 as an unsigned byte, so 2^23 + 128 + s, exact in fp32
#pragma unroll
        for (int i = 0; i < 16; ++i) out[i] = byte_as_float_2p23(w[i / 4] ^ 0x80808080u, i % 4) - 8388736.0f;
    } else if constexpr (MODE == KVQ_MODE_INT8_PTH) {
#pragma unroll
        for (int i = 0; i < 16; ++i) out[i] = byte_as_float_2p23(w[i / 4], i % 4) - 8388608.0f;
    } else if constexpr (MODE == KVQ_MODE_INT4_PTH) {
#pragma unroll
        for (int i = 0; i < 16; ++i) out[i] = code_to_float((w[i / 8] >> (4 * (i % 8))) & 0xfu);  // low nibble first
    } else {
        const __nv_fp8_interpretation_t kind = MODE == KVQ_MODE_FP8_E5M2 ? __NV_E5M2 : __NV_E4M3;
#pragma unroll
        for (int i = 0; i < 8; ++i) {  // two fp8 bytes -> half2 (one cvt instruction on sm_89+)
            const __nv_fp8x2_storage_t pair = (__nv_fp8x2_storage_t)((w[i / 2] >> (16 * (i % 2))) & 0xffffu);
            const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, kind)));
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    }
}
