// kv_write.cu: store one step's new K and V into the paged KV pool, quantizing on the way.
//
// Computes, for every new token n, KV head h and channel d, with slot = slot_mapping[n]:
//     k_pool[slot / block_size, h, slot % block_size, d] = store<MODE>(k_new[n, h, d])   (same for V)
// where store<MODE> is one of kvq_common.cuh's stores (formulas of runtime/quant.py). slot = block_id *
// block_size + row. Calibrated modes (0-3) use the per-head fp32 scale / zero point; the online modes (4-6) first
// reduce each row x = k_new[n, h, :] to its (scale, zero) (min / max, or absmax for fp8), round them to fp16,
// store them in k_param[slot / block_size, h, slot % block_size] and quantize the row with the rounded values.
// Mode 6 (int4_per_token_head) keys are per channel within a block instead (runtime/kv_cache.py KeyPlan and
// KVCache.write define the write, runtime/quant.py quantize_channels the format): a key row whose block stays open
// (k_helper[n] >= 0) is stored as an int8 row (mode 4) in the half-block layout, open row r of block A at row
// r % (bs / 2) of block (r < bs / 2 ? A : k_helper[n]) viewed as (num_blocks, H_kv, bs / 2, D) bytes, its fp16
// (scale, zero) at k_param (num_blocks, H_kv, 2, D) viewed as (num_blocks, H_kv, D, 2), same row; a key row whose
// block this write completes (k_helper[n] = -1) goes through the block's entry of k_complete (M, 4) = (block,
// helper or -1, r0, i0): rows [0, r0) are earlier open rows, rows [r0, bs) are k_new rows i0, i0 + 1, ...; every
// row is read back through int8 (x~ = dequantized int8 row), then each channel c over the bs rows gets
// scale_c = fp16((max - min) / 15), zero_c = fp16(min) and codes clamp(rn_even((x~ - zero_c) / scale_c), 0, 15).
//
// Layout (all contiguous, row-major):
//   k_new, v_new        (N, H_kv, D)                           Tin = float | __half | __nv_bfloat16
//   k_pool, v_pool      (num_blocks, H_kv, block_size, D)      KvStore<MODE>::T (fp16 | int8 | fp8 | uint8 bytes)
//                       (num_blocks, H_kv, block_size, D / 2)  uint8, int4 mode (two codes per byte)
//   slot_mapping        (N,) int32                              destination slot; negative = skip the token
//   k_scale ... v_zp    (H_kv,) fp32      modes 1-3 only; zero points not read in fp8 modes
//   k_param, v_param    (num_blocks, H_kv, block_size, 2) fp16  (scale, zero) per row, online modes only;
//                       k_param (num_blocks, H_kv, 2, D) fp16   mode 6: (scale row, zero row) per block and head
//   k_helper            (N,) int32                              mode 6 only (see above)
//   k_complete          (M, 4) int32                            mode 6 only (see above)
//   stash_codes         (M, H_kv, block_size, D) uint8          mode 6 scratch: each completed block's earlier
//   stash_params        (M, H_kv, block_size, 2) fp16           open rows [0, r0), copied before the step writes
// Tokens whose slot is negative or >= num_blocks * block_size are skipped (never written out of bounds); so are
// mode-6 helper blocks and k_complete entries outside the pool or the step.
//
// Launch: block 256 threads, grid-stride, grid min(ceil(work / 256), 65535) with work = N * H_kv * D for the
// calibrated modes (one element of K and one of V per thread per step; consecutive threads touch consecutive
// channels of one pool row, so reads and writes are coalesced) and N * H_kv * 32 for the online modes (one warp
// per row: each lane holds D / 32 consecutive channels of K and of V, the warp reduces min / max with
// __shfl_xor_sync, and every lane then writes its own codes; lane 0 writes the params). The write is a tiny
// fraction of a decode step (one token per sequence), so it favours simplicity over vector stores.
// Mode 6 with M > 0 completed blocks runs three kernels in order (kernels.py kv_cache_write):
//   kv_stash_open_keys   grid (M, H_kv), 128 threads: copy the earlier open rows of each completed block to the
//                        stash (the step's open rows may overwrite them: a completed block's helper is the next
//                        block, whose first open rows this step may write);
//   kv_write<Tin, 6>     as above (open key rows and all value rows);
//   kv_write_channel_keys<Tin>  grid (M, H_kv), 128 threads: one (completed block, KV head) per CUDA block; the
//                        4 warps compute the bs rows' int8 (scale, zero) into shared memory (stash or a warp
//                        reduction of the new row), then thread t < D / 2 takes channels 2t, 2t + 1: per-channel
//                        min / max over the int8 read-back, fp16 params, codes packed into one byte per row.
#include "kvq_common.cuh"

#define KVQ_WRITE_THREADS 256  // kernels.py WRITE_THREADS
#define KVQ_MAX_PER_LANE 4  // D / 32 channels per lane, D <= 128
#define KVQ_CHANNEL_THREADS 128  // kernels.py CHANNEL_THREADS: kv_stash_open_keys, kv_write_channel_keys
#define KVQ_MAX_BLOCK_SIZE 256  // mode 6: block_size <= 2 * D <= 256

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

// Online modes: the warp's row x[0..n) (n = D / 32 channels per lane) -> its fp16 (scale, zero), on every lane.
// Every lane of the warp calls this (the reductions shuffle across the full warp).
template <int MODE>
__device__ __forceinline__ void row_params(const float* x, int n, __half* scale_h, __half* zero_h) {
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
    *scale_h = __float2half_rn(scale32);
    *zero_h = __float2half_rn(MODE == KVQ_MODE_FP8_PTH ? 0.0f : lo);
}

// Online modes: the warp's row x[0..n) -> params at param[0..1], codes at pool. Every lane of the warp calls this.
template <int MODE>
__device__ __forceinline__ void quantize_row(const float* x, int n, unsigned char* pool, __half* param, int lane) {
    __half scale_h, zero_h;
    row_params<MODE>(x, n, &scale_h, &zero_h);
    const int top = MODE == KVQ_MODE_INT4_PTH ? 15 : 255;
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
                                           __half* v_param, const int* k_helper, int num_tokens, int num_kv_heads,
                                           int num_blocks, int block_size, int head_dim) {
    const int lane = threadIdx.x % 32, n = head_dim / 32;
    const int row_bytes = MODE == KVQ_MODE_INT4_PTH ? head_dim / 2 : head_dim;
    const long long total = (long long)num_tokens * num_kv_heads;
    const long long stride = (long long)gridDim.x * (blockDim.x / 32);
    // r is the same for the whole warp, so the warp enters and leaves the loop (and skips rows) together.
    for (long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; r < total; r += stride) {
        const int h = (int)(r % num_kv_heads);
        const int slot = slot_mapping[r / num_kv_heads];
        const long long row = slot_row(slot, h, num_kv_heads, num_blocks, block_size);
        if (row < 0) continue;
        float k[KVQ_MAX_PER_LANE], v[KVQ_MAX_PER_LANE];
#pragma unroll
        for (int i = 0; i < KVQ_MAX_PER_LANE; ++i) {
            k[i] = i < n ? to_float(k_new[r * head_dim + lane * n + i]) : 0.0f;
            v[i] = i < n ? to_float(v_new[r * head_dim + lane * n + i]) : 0.0f;
        }
        if constexpr (MODE == KVQ_MODE_INT4_PTH) {
            // keys per channel: a row whose block stays open is an int8 row in the half-block layout (block A's
            // rows [0, bs / 2) in A, the rest in its helper); kv_write_channel_keys writes the completed blocks
            const int helper = k_helper[r / num_kv_heads];
            if (helper >= 0 && helper < num_blocks) {
                const int block = slot / block_size, brow = slot - block * block_size, half = block_size / 2;
                const long long page_head = (long long)(brow < half ? block : helper) * num_kv_heads + h;
                const int rr = brow % half;
                quantize_row<KVQ_MODE_INT8_PTH>(k, n, k_pool + (page_head * half + rr) * head_dim,
                                                k_param + page_head * 2 * head_dim + 2 * rr, lane);
            }
        } else {
            quantize_row<MODE>(k, n, k_pool + row * row_bytes, k_param + 2 * row, lane);
        }
        quantize_row<MODE>(v, n, v_pool + row * row_bytes, v_param + 2 * row, lane);
    }
}

template <typename Tin, int MODE>
__global__ void __launch_bounds__(KVQ_WRITE_THREADS) kv_write(
    const Tin* __restrict__ k_new, const Tin* __restrict__ v_new,
    typename KvStore<MODE>::T* __restrict__ k_pool, typename KvStore<MODE>::T* __restrict__ v_pool,
    const int* __restrict__ slot_mapping, const float* __restrict__ k_scale, const float* __restrict__ k_zp,
    const float* __restrict__ v_scale, const float* __restrict__ v_zp, __half* __restrict__ k_param,
    __half* __restrict__ v_param, const int* __restrict__ k_helper, int num_tokens, int num_kv_heads, int num_blocks,
    int block_size, int head_dim) {
    if constexpr (kvq_is_online(MODE)) {
        write_rows<Tin, MODE>(k_new, v_new, k_pool, v_pool, slot_mapping, k_param, v_param, k_helper, num_tokens,
                              num_kv_heads, num_blocks, block_size, head_dim);
    } else {
        write_elements<Tin, MODE>(k_new, v_new, k_pool, v_pool, slot_mapping, k_scale, k_zp, v_scale, v_zp,
                                  num_tokens, num_kv_heads, num_blocks, block_size, head_dim);
    }
}

// ---- mode 6 keys: completed blocks, per channel ---------------------------------------------------------

// The k_complete entry m = (block, helper, r0, i0), checked against the pool and the step: false = skip it (the
// engine never passes such an entry; the check only keeps a bad one from reading or writing out of bounds).
__device__ __forceinline__ bool complete_entry(const int* k_complete, int m, int num_tokens, int num_blocks,
                                               int block_size, int* block, int* helper, int* r0, int* i0) {
    *block = k_complete[4 * m], *helper = k_complete[4 * m + 1], *r0 = k_complete[4 * m + 2];
    *i0 = k_complete[4 * m + 3];
    const int half = block_size / 2;
    return *block >= 0 && *block < num_blocks && *r0 >= 0 && *r0 <= block_size && *i0 >= 0 &&
           (long long)*i0 + (block_size - *r0) <= num_tokens &&
           (*r0 <= half || (*helper >= 0 && *helper < num_blocks)) && block_size <= KVQ_MAX_BLOCK_SIZE;
}

// Copy completed block m's earlier open rows [0, r0) of KV head h (codes and fp16 (scale, zero)) to the stash.
__global__ void __launch_bounds__(KVQ_CHANNEL_THREADS) kv_stash_open_keys(
    const unsigned char* __restrict__ k_pool, const __half* __restrict__ k_param, const int* __restrict__ k_complete,
    unsigned char* __restrict__ stash_codes, __half* __restrict__ stash_params, int num_tokens, int num_kv_heads,
    int num_blocks, int block_size, int head_dim) {
    const int m = blockIdx.x, h = blockIdx.y, half = block_size / 2;
    int block, helper, r0, i0;
    if (!complete_entry(k_complete, m, num_tokens, num_blocks, block_size, &block, &helper, &r0, &i0)) return;
    const long long dst_row = ((long long)m * num_kv_heads + h) * block_size;  // stash row of r = 0
    for (int e = threadIdx.x; e < r0 * head_dim; e += blockDim.x) {
        const int r = e / head_dim, c = e - r * head_dim;
        const long long page_head = (long long)(r < half ? block : helper) * num_kv_heads + h;
        stash_codes[(dst_row + r) * head_dim + c] = k_pool[(page_head * half + r % half) * head_dim + c];
    }
    for (int e = threadIdx.x; e < 2 * r0; e += blockDim.x) {
        const int r = e / 2;
        const long long page_head = (long long)(r < half ? block : helper) * num_kv_heads + h;
        stash_params[(dst_row + r) * 2 + e % 2] = k_param[page_head * 2 * head_dim + 2 * (r % half) + e % 2];
    }
}

// Row r, channel c of a completed block as its int8 read-back: the code (an earlier row's from the stash, or this
// step's k_new row i0 + (r - r0) quantized with the row's int8 (scale, zero)) times the row's scale plus its zero,
// as two rounded fp32 operations (quant.dequantize_online; __fmul_rn / __fadd_rn never contract into an FMA).
template <typename Tin>
__device__ __forceinline__ float completed_key(const Tin* k_new, const unsigned char* stash_codes, long long stash_row,
                                               const float* s_scale, const float* s_zero, int r, int c, int r0,
                                               int i0, int h, int num_kv_heads, int head_dim) {
    const unsigned int code =
        r < r0 ? stash_codes[(stash_row + r) * head_dim + c]
               : quantize_code(to_float(k_new[((long long)(i0 + r - r0) * num_kv_heads + h) * head_dim + c]),
                               s_zero[r], s_scale[r], 255);
    return __fadd_rn(__fmul_rn((float)code, s_scale[r]), s_zero[r]);
}

// Quantize completed block m of KV head h per channel: rows [0, r0) from the stash, rows [r0, bs) from k_new
// rows i0 + (r - r0) through the int8 round trip; writes the block's codes and k_param (scale row, zero row).
// Launch bounds (128, 1): with (128) alone ptxas aims at full occupancy (32 registers) and spills.
template <typename Tin>
__global__ void __launch_bounds__(KVQ_CHANNEL_THREADS, 1) kv_write_channel_keys(
    const Tin* __restrict__ k_new, unsigned char* __restrict__ k_pool, __half* __restrict__ k_param,
    const int* __restrict__ k_complete, const unsigned char* __restrict__ stash_codes,
    const __half* __restrict__ stash_params, int num_tokens, int num_kv_heads, int num_blocks, int block_size,
    int head_dim) {
    __shared__ float s_scale[KVQ_MAX_BLOCK_SIZE], s_zero[KVQ_MAX_BLOCK_SIZE];  // each row's int8 (scale, zero)
    const int m = blockIdx.x, h = blockIdx.y;
    int block, helper, r0, i0;
    if (!complete_entry(k_complete, m, num_tokens, num_blocks, block_size, &block, &helper, &r0, &i0)) return;
    const long long stash_row = ((long long)m * num_kv_heads + h) * block_size;  // stash row of r = 0
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n = head_dim / 32;
    // 1. The rows' int8 parameters: stored ones for the earlier rows, a warp reduction for the step's rows.
    for (int r = warp; r < block_size; r += KVQ_CHANNEL_THREADS / 32) {  // warp-uniform
        if (r < r0) {
            if (lane == 0) {
                s_scale[r] = __half2float(stash_params[(stash_row + r) * 2]);
                s_zero[r] = __half2float(stash_params[(stash_row + r) * 2 + 1]);
            }
            continue;
        }
        const Tin* src = k_new + ((long long)(i0 + r - r0) * num_kv_heads + h) * head_dim + lane * n;
        float x[KVQ_MAX_PER_LANE];
#pragma unroll
        for (int i = 0; i < KVQ_MAX_PER_LANE; ++i) x[i] = i < n ? to_float(src[i]) : 0.0f;
        __half scale_h, zero_h;
        row_params<KVQ_MODE_INT8_PTH>(x, n, &scale_h, &zero_h);
        if (lane == 0) {
            s_scale[r] = __half2float(scale_h);
            s_zero[r] = __half2float(zero_h);
        }
    }
    __syncthreads();
    // 2. Per channel pair (2t, 2t + 1): min / max of the read-back over the rows, fp16 params, packed codes.
    const int t = threadIdx.x;
    if (t >= head_dim / 2) return;  // no __syncthreads below
    float x[2], lo[2], hi[2], scale[2], zero[2];
    for (int r = 0; r < block_size; ++r) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            x[j] = completed_key(k_new, stash_codes, stash_row, s_scale, s_zero, r, 2 * t + j, r0, i0, h, num_kv_heads,
                                 head_dim);
            lo[j] = r == 0 ? x[j] : fminf(lo[j], x[j]);
            hi[j] = r == 0 ? x[j] : fmaxf(hi[j], x[j]);
        }
    }
    const long long head = (long long)block * num_kv_heads + h;
#pragma unroll
    for (int j = 0; j < 2; ++j) {  // quant.quantize_channels: online_params over the channel's rows
        const __half scale_h = __float2half_rn((hi[j] - lo[j]) / 15), zero_h = __float2half_rn(lo[j]);
        k_param[head * 2 * head_dim + 2 * t + j] = scale_h;
        k_param[head * 2 * head_dim + head_dim + 2 * t + j] = zero_h;
        scale[j] = __half2float(scale_h);
        zero[j] = __half2float(zero_h);
    }
    for (int r = 0; r < block_size; ++r) {  // the same read-back again (cheaper than keeping bs x D floats)
        unsigned int q[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const float x = completed_key(k_new, stash_codes, stash_row, s_scale, s_zero, r, 2 * t + j, r0, i0, h,
                                          num_kv_heads, head_dim);
            q[j] = quantize_code(x, zero[j], scale[j], 15);
        }
        k_pool[(head * block_size + r) * (head_dim / 2) + t] = (unsigned char)(q[0] | (q[1] << 4));
    }
}
