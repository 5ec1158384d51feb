// kv_write.cu: store one step's new K and V into the paged KV pool, quantizing on the way.
//
// Computes, for every new token n, KV head h and channel d, with slot = slot_mapping[n]:
//     k_pool[slot / block_size, h, slot % block_size, d] = store<MODE>(k_new[n, h, d])   (same for V)
// where store<MODE> is the fp16 cast, INT8 quantization or saturating FP8 cast of kvq_common.cuh
// (formulas of runtime/quant.py; per-head fp32 scale / zero point). slot = block_id * block_size + row.
//
// Layout (all contiguous, row-major):
//   k_new, v_new        (N, H_kv, D)                           Tin = float | __half | __nv_bfloat16
//   k_pool, v_pool      (num_blocks, H_kv, block_size, D)      KvStore<MODE>::T (fp16 | int8 | fp8 bytes)
//   slot_mapping        (N,) int32                              destination slot; negative = skip the token
//   k_scale ... v_zp    (H_kv,) fp32      not read in fp16 mode; zero points not read in fp8 modes
// Tokens whose slot is negative or >= num_blocks * block_size are skipped (never written out of bounds).
//
// Launch: 1-D grid-stride loop over the N * H_kv * D elements, one element of K and one of V per thread
// per step; block 256 threads, grid min(ceil(N*H_kv*D / 256), 65535). Consecutive threads touch
// consecutive channels of one pool row, so reads and writes are coalesced. The write is a tiny fraction of
// a decode step (one token per sequence), so it favours simplicity over vector stores.
#include "kvq_common.cuh"

template <typename Tin, int MODE>
__global__ void __launch_bounds__(256) kv_write(
    const Tin* __restrict__ k_new, const Tin* __restrict__ v_new,
    typename KvStore<MODE>::T* __restrict__ k_pool, typename KvStore<MODE>::T* __restrict__ v_pool,
    const int* __restrict__ slot_mapping, const float* __restrict__ k_scale, const float* __restrict__ k_zp,
    const float* __restrict__ v_scale, const float* __restrict__ v_zp, int num_tokens, int num_kv_heads,
    int num_blocks, int block_size, int head_dim) {
    const long long total = (long long)num_tokens * num_kv_heads * head_dim;
    const long long num_slots = (long long)num_blocks * block_size;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int d = (int)(e % head_dim);
        const int h = (int)((e / head_dim) % num_kv_heads);
        const int n = (int)(e / ((long long)head_dim * num_kv_heads));
        const int slot = slot_mapping[n];
        if (slot < 0 || slot >= num_slots) continue;
        const int block = slot / block_size, row = slot - block * block_size;
        // 64-bit offset: a pool of num_blocks * H_kv * block_size * D elements passes 2^31 easily.
        const long long dst = (((long long)block * num_kv_heads + h) * block_size + row) * head_dim + d;
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
