// kvq_common.cuh: device helpers shared by kv_write.cu and decode_attention.cu.
//
// Storage modes (template parameter MODE, same codes as runtime/cuda/kernels.py KV_MODES):
//   0 fp16      cache element __half, written as a round-to-nearest-even cast, read as is
//   1 int8      q  = clamp(rn_even((x - zp) / scale), -128, 127);  x^ = q * scale + zp
//   2 fp8_e4m3  f  = cast_rne(clamp(x / scale, +-448));            x^ = f * scale
//   3 fp8_e5m2  f  = cast_rne(clamp(x / scale, +-57344));          x^ = f * scale
// The formulas are those of runtime/quant.py (the reference the tests compare against).
// Scales and zero points are fp32, one per KV head.
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

// Cache element type per mode; fp8 is stored as raw bytes (__nv_fp8_storage_t).
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

template <int MODE> __device__ __forceinline__ unsigned char quantize_fp8(float x, float scale) {
    const float fmax = MODE == KVQ_MODE_FP8_E4M3 ? 448.0f : 57344.0f;
    float y = x / scale;
    y = y > fmax ? fmax : (y < -fmax ? -fmax : y);  // clamp before the cast; NaN passes through as NaN
    return __nv_cvt_float_to_fp8(y, __NV_SATFINITE, MODE == KVQ_MODE_FP8_E4M3 ? __NV_E4M3 : __NV_E5M2);
}

// ---- dequantize 16 bytes of cache (attention read) -----------------------------------------------
// Returns the *stored* values as floats: fp16 values, int8 integers, fp8 values; the per-head scale and
// zero point are folded into q and the output by the attention kernel, so they cost nothing per element.
template <int MODE> struct KvVec {
    static constexpr int N = 16 / (int)sizeof(typename KvStore<MODE>::T);  // elements per 16-byte load
};

template <int MODE> __device__ __forceinline__ void unpack16(const uint4& raw, float* out) {
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
#pragma unroll
        for (int i = 0; i < 16; ++i) out[i] = (float)(signed char)((w[i / 4] >> (8 * (i % 4))) & 0xffu);
    } else {
        const __nv_fp8_interpretation_t kind = MODE == KVQ_MODE_FP8_E4M3 ? __NV_E4M3 : __NV_E5M2;
#pragma unroll
        for (int i = 0; i < 8; ++i) {  // two fp8 bytes -> half2 (one cvt instruction on sm_89+)
            const __nv_fp8x2_storage_t pair = (__nv_fp8x2_storage_t)((w[i / 2] >> (16 * (i % 2))) & 0xffffu);
            const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, kind)));
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    }
}
