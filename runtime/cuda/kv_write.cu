// kv_write.cu: store one step's new K and V into the paged KV pool, quantizing on the way.
//
// Computes, for every new token n, KV head h and channel d, with slot = slot_mapping[n]:
//     k_pool[slot / block_size, h, slot % block_size, d] = store<MODE>(k_new[n, h, d])   (same for V)
// where store<MODE> is one of kvq_common.cuh's stores (formulas of runtime/quant.py). slot = block_id *
// block_size + row. Calibrated modes (0-3) use the per-head fp32 scale / zero point; the online modes (4-6) first
// reduce each row x = k_new[n, h, :] to its (scale, zero) (min / max, or absmax for fp8), round them to fp16,
// store them in k_param[slot / block_size, h, slot % block_size] and quantize the row with the rounded values.
//
// Layout (all contiguous, row-major):
//   k_new, v_new        (N, H_kv, D)                           Tin = float | __half | __nv_bfloat16
//   k_pool, v_pool      (num_blocks, H_kv, block_size, D)      KvStore<MODE>::T (fp16 | int8 | fp8 | uint8 bytes)
//                       (num_blocks, H_kv, block_size, D / 2)  uint8, int4 mode (two codes per byte)
//   slot_mapping        (N,) int32                              destination slot; negative = skip the token
//   k_scale ... v_zp    (H_kv,) fp32      modes 1-3 only; zero points not read in fp8 modes
//   k_param, v_param    (num_blocks, H_kv, block_size, 2) fp16  (scale, zero) per row, online modes only
// Tokens whose slot is negative or >= num_blocks * block_size are skipped (never written out of bounds).
//
// Launch: block 256 threads, grid-stride, grid min(ceil(work / 256), 65535) with work = N * H_kv * D for the
// calibrated modes (one element of K and one of V per thread per step; consecutive threads touch consecutive
// channels of one pool row, so reads and writes are coalesced) and N * H_kv * 32 for the online modes (one warp
// per row: each lane holds D / 32 consecutive channels of K and of V, the warp reduces min / max with
// __shfl_xor_sync, and every lane then writes its own codes; lane 0 writes the params). The write is a tiny
// fraction of a decode step (one token per sequence), so it favours simplicity over vector stores.
#include "kvq_common.cuh"

#define KVQ_WRITE_THREADS 256  // kernels.py WRITE_THREADS
#define KVQ_MAX_PER_LANE 4  // D / 32 channels per lane, D <= 128

// Pool row (block, h, row) of a slot, as a row index into (num_blocks, H_kv, block_size); -1 to skip the token.
// 64-bit: a pool of num_blocks * H_kv * block_size rows times D elements passes 2^31 easily.
__device__ __forceinline__ long long slot_row(int slot, int h, int num_kv_heads, int num_blocks, int block_size) {
    if (slot < 0 || slot >= (long long)num_blocks * block_size) return -1;
    const int block = slot / block_size, row = slot - block * block_size;
    return ((long long)block * num_kv_heads + h) * block_size + row;
}

// Calibrated modes: one element per thread.
template <typename Tin, int MODE>
__device__ __forceinline__ void write_elements(const Tin* k_new, const Tin* v_new, typename KvStore<MODE>::T* k_pool,
                                               typename KvStore<MODE>::T* v_pool, const int* slot_mapping,
                                               const float* k_scale, const float* k_zp, const float* v_scale,
                                               const float* v_zp, int num_tokens, int num_kv_heads, int num_blocks,
                                               int block_size, int head_dim) {
    const long long total = (long long)num_tokens * num_kv_heads * head_dim;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int d = (int)(e % head_dim);
        const int h = (int)((e / head_dim) % num_kv_heads);
        const int n = (int)(e / ((long long)head_dim * num_kv_heads));
        const long long row = slot_row(slot_mapping[n], h, num_kv_heads, num_blocks, block_size);
        if (row < 0) continue;
        const long long dst = row * head_dim + d;
        const float k = to_float(k_new[e]);
        const float v = to_float(v_new[e]);
        if constexpr (MODE == KVQ_MODE_FP16) {
            k_pool[dst] = __float2half_rn(k);
            v_pool[dst] = __float2half_rn(v);
        } else if constexpr (MODE == KVQ_MODE_INT8) {
            k_pool[dst] = quantize_int8(k, k_scale[h], k_zp[h]);
            v_pool[dst] = quantize_int8(v, v_scale[h], v_zp[h]);
        } else {
            k_pool[dst] = quantize_fp8<MODE>(k, k_scale[h]);
            v_pool[dst] = quantize_fp8<MODE>(v, v_scale[h]);
        }
    }
}

// Online modes: the warp's row x[0..n) (n = D / 32 channels per lane) -> params at param[0..1], codes at pool.
// Every lane of the warp calls this (the reductions shuffle across the full warp).
template <int MODE>
__device__ __forceinline__ void quantize_row(const float* x, int n, unsigned char* pool, __half* param, int lane) {
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int i = 1; i < KVQ_MAX_PER_LANE; ++i) {
        if (i < n) {
            lo = fminf(lo, x[i]);
            hi = fmaxf(hi, x[i]);
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    // fp32 parameters exactly as quant.online_params (IEEE division), rounded to fp16, then used as rounded;
    // fabsf keeps an all-zero row's absmax +0 (fmaxf(0, -0) may be -0, which would store scale -0).
    const int top = MODE == KVQ_MODE_INT4_PTH ? 15 : 255;
    const float scale32 = MODE == KVQ_MODE_FP8_PTH ? fmaxf(fabsf(hi), fabsf(lo)) / 448.0f : (hi - lo) / top;
    const __half scale_h = __float2half_rn(scale32);
    const __half zero_h = __float2half_rn(MODE == KVQ_MODE_FP8_PTH ? 0.0f : lo);
    const float scale = __half2float(scale_h), zero = __half2float(zero_h);
    if (lane == 0) {
        param[0] = scale_h;
        param[1] = zero_h;
    }
    if constexpr (MODE == KVQ_MODE_INT4_PTH) {
#pragma unroll
        for (int i = 0; i < KVQ_MAX_PER_LANE; i += 2) {
            if (i < n) {
                const unsigned int even = quantize_code(x[i], zero, scale, top);
                const unsigned int odd = quantize_code(x[i + 1], zero, scale, top);
                pool[(lane * n + i) / 2] = (unsigned char)(even | (odd << 4));  // element 2j low nibble, 2j+1 high
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < KVQ_MAX_PER_LANE; ++i) {
            if (i < n) {
                pool[lane * n + i] = MODE == KVQ_MODE_FP8_PTH ? fp8_cast<MODE>(online_divide(x[i], scale))
                                                              : (unsigned char)quantize_code(x[i], zero, scale, top);
            }
        }
    }
}

template <typename Tin, int MODE>
__device__ __forceinline__ void write_rows(const Tin* k_new, const Tin* v_new, unsigned char* k_pool,
                                           unsigned char* v_pool, const int* slot_mapping, __half* k_param,
                                           __half* v_param, int num_tokens, int num_kv_heads, int num_blocks,
                                           int block_size, int head_dim) {
    const int lane = threadIdx.x % 32, n = head_dim / 32;
    const int row_bytes = MODE == KVQ_MODE_INT4_PTH ? head_dim / 2 : head_dim;
    const long long total = (long long)num_tokens * num_kv_heads;
    const long long stride = (long long)gridDim.x * (blockDim.x / 32);
    // r is the same for the whole warp, so the warp enters and leaves the loop (and skips rows) together.
    for (long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < total; r += stride) {
        const int h = (int)(r % num_kv_heads);
        const long long row = slot_row(slot_mapping[r / num_kv_heads], h, num_kv_heads, num_blocks, block_size);
        if (row < 0) continue;
        float k[KVQ_MAX_PER_LANE], v[KVQ_MAX_PER_LANE];
#pragma unroll
        for (int i = 0; i < KVQ_MAX_PER_LANE; ++i) {
            k[i] = i < n ? to_float(k_new[r * head_dim + lane * n + i]) : 0.0f;
            v[i] = i < n ? to_float(v_new[r * head_dim + lane * n + i]) : 0.0f;
        }
        quantize_row<MODE>(k, n, k_pool + row * row_bytes, k_param + 2 * row, lane);
        quantize_row<MODE>(v, n, v_pool + row * row_bytes, v_param + 2 * row, lane);
    }
}

template <typename Tin, int MODE>
__global__ void __launch_bounds__(KVQ_WRITE_THREADS) kv_write(
    const Tin* __restrict__ k_new, const Tin* __restrict__ v_new,
    typename KvStore<MODE>::T* __restrict__ k_pool, typename KvStore<MODE>::T* __restrict__ v_pool,
    const int* __restrict__ slot_mapping, const float* __restrict__ k_scale, const float* __restrict__ k_zp,
    const float* __restrict__ v_scale, const float* __restrict__ v_zp, __half* __restrict__ k_param,
    __half* __restrict__ v_param, int num_tokens, int num_kv_heads, int num_blocks, int block_size, int head_dim) {
    if constexpr (kvq_is_online(MODE)) {
        write_rows<Tin, MODE>(k_new, v_new, k_pool, v_pool, slot_mapping, k_param, v_param, num_tokens, num_kv_heads,
                              num_blocks, block_size, head_dim);
    } else {
        write_elements<Tin, MODE>(k_new, v_new, k_pool, v_pool, slot_mapping, k_scale, k_zp, v_scale, v_zp,
                                  num_tokens, num_kv_heads, num_blocks, block_size, head_dim);
    }
}
