// kv_write.cu: store one step's new K and V into the KV cache, quantizing on the way.
//
// Computes, for every new token n, KV head h and channel d:
//     k_cache[slots[n], h, positions[n], d] = store<MODE>(k_new[n, h, d])   (same for V)
// where store<MODE> is the fp16 cast, INT8 quantization or saturating FP8 cast of kvq_common.cuh
// (formulas of runtime/quant.py; per-head fp32 scale / zero point).
//
// Layout (all contiguous, row-major):
//   k_new, v_new        (N, H_kv, D)      Tin = float | __half | __nv_bfloat16 (after bias and RoPE)
//   k_cache, v_cache    (B, H_kv, S, D)   KvStore<MODE>::T (fp16 | int8 | fp8 bytes)
//   slots, positions    (N,) int32        destination slot (0 <= slot < B) and position (0 <= pos < S)
//   k_scale ... v_zp    (H_kv,) fp32      not read in fp16 mode; zero points not read in fp8 modes
// Tokens whose slot or position is out of range are skipped (never written out of bounds).
//
// Launch: 1-D grid-stride loop over the N * H_kv * D elements, one element of K and one of V per thread
// per step; block 256 threads, grid min(ceil(N*H_kv*D / 256), 65535). Consecutive threads touch
// consecutive channels, so reads and writes are coalesced. The write is a tiny fraction of a decode step
// (one token per sequence), so it favours simplicity over vector stores.
#include "kvq_common.cuh"

template <typename Tin, int MODE>
__global__ void __launch_bounds__(256) kv_write(
    const Tin* __restrict__ k_new, const Tin* __restrict__ v_new,
    typename KvStore<MODE>::T* __restrict__ k_cache, typename KvStore<MODE>::T* __restrict__ v_cache,
    const int* __restrict__ slots, const int* __restrict__ positions,
    const float* __restrict__ k_scale, const float* __restrict__ k_zp,
    const float* __restrict__ v_scale, const float* __restrict__ v_zp,
    int num_tokens, int num_kv_heads, int num_slots, int max_seq, int head_dim) {
    const long long total = (long long)num_tokens * num_kv_heads * head_dim;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int d = (int)(e % head_dim);
        const int h = (int)((e / head_dim) % num_kv_heads);
        const int n = (int)(e / ((long long)head_dim * num_kv_heads));
        const int slot = slots[n];
        const int pos = positions[n];
        if (slot < 0 || slot >= num_slots || pos < 0 || pos >= max_seq) continue;
        // 64-bit offset: B * H_kv * S * D reaches 2^31 at 64 x 32 x 8192 x 128.
        const long long dst = (((long long)slot * num_kv_heads + h) * max_seq + pos) * head_dim + d;
        const float k = to_float(k_new[e]);
        const float v = to_float(v_new[e]);
        if constexpr (MODE == KVQ_MODE_FP16) {
            k_cache[dst] = __float2half_rn(k);
            v_cache[dst] = __float2half_rn(v);
        } else if constexpr (MODE == KVQ_MODE_INT8) {
            k_cache[dst] = quantize_int8(k, k_scale[h], k_zp[h]);
            v_cache[dst] = quantize_int8(v, v_scale[h], v_zp[h]);
        } else {
            k_cache[dst] = quantize_fp8<MODE>(k, k_scale[h]);
            v_cache[dst] = quantize_fp8<MODE>(v, v_scale[h]);
        }
    }
}
