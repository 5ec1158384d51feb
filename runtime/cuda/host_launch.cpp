// host_launch.cpp: extern "C" CPU entry points that run the project's CUDA kernels under cuda_host_emulation.h.
//
// Test-only. toolchain.py (build_host_library) compiles this file with g++ into a shared library, host_ops.py
// loads it with ctypes. The entry points take the same arguments and grid choices as the GPU launchers in
// kernels.py (the Python side computes grid / splits / chunk with the same functions), dispatch on runtime
// dtype codes to the same template instantiations, and run them with kvq_emu::launch.
//   dtype codes: 0 float32, 1 float16, 2 bfloat16.   mode codes: kvq_common.cuh KVQ_MODE_*.
// Return value: 0 on success, -1 for a variant that does not exist.
// kvq_kv_write runs int4_per_token_head's per-channel keys as kernels.kv_cache_write does: kv_stash_open_keys,
// kv_write, kv_write_channel_keys (the first and last only with completed blocks, num_complete > 0).
#include "cuda_host_emulation.h"

// The kernels' per-architecture tuning (decode_attention.cu kvq_attn_unroll) takes its sm_90 branch here, so the
// emulation runs the variant that branch adds (INT4 with 2 keys in flight per group); the other branch is the
// same code with KVQ_ATTN_UNROLL keys.
#define KVQ_EMULATE_SM90 1

#include "decode_attention.cu"
#include "kv_write.cu"

// Every storage mode, for the runtime -> template dispatch: X(mode code) once per KVQ_MODE_*.
#define KVQ_FOR_EACH_MODE(X)                                                                                \
    X(KVQ_MODE_FP16) X(KVQ_MODE_INT8) X(KVQ_MODE_FP8_E4M3) X(KVQ_MODE_FP8_E5M2) X(KVQ_MODE_INT8_PTH) \
        X(KVQ_MODE_FP8_PTH) X(KVQ_MODE_INT4_PTH)

namespace {

struct WriteArgs {
    const void* k_new;
    const void* v_new;
    void* k_pool;
    void* v_pool;
    const int* slot_mapping;
    const float *k_scale, *k_zp, *v_scale, *v_zp;
    __half *k_param, *v_param;
    const int *k_helper, *k_complete;  // int4_per_token_head keys only
    unsigned char* stash_codes;        // (num_complete, H_kv, block_size, D) scratch, num_complete > 0 only
    __half* stash_params;              // (num_complete, H_kv, block_size, 2)
    int num_tokens, num_kv_heads, num_blocks, block_size, head_dim, grid, num_complete;
};

template <typename Tin, int MODE>
void write_one(const WriteArgs& a) {
    typedef typename KvStore<MODE>::T Store;
    const bool channel_keys = MODE == KVQ_MODE_INT4_PTH && a.num_complete > 0;
    if (channel_keys) {
        kvq_emu::launch(dim3(a.num_complete, a.num_kv_heads), dim3(KVQ_CHANNEL_THREADS), [&] {
            kv_stash_open_keys((const unsigned char*)a.k_pool, a.k_param, a.k_complete, a.stash_codes,
                               a.stash_params, a.num_tokens, a.num_kv_heads, a.num_blocks, a.block_size, a.head_dim);
        });
    }
    kvq_emu::launch(dim3(a.grid), dim3(KVQ_WRITE_THREADS), [&] {
        kv_write<Tin, MODE>((const Tin*)a.k_new, (const Tin*)a.v_new, (Store*)a.k_pool, (Store*)a.v_pool,
                            a.slot_mapping, a.k_scale, a.k_zp, a.v_scale, a.v_zp, a.k_param, a.v_param, a.k_helper,
                            a.num_tokens, a.num_kv_heads, a.num_blocks, a.block_size, a.head_dim);
    });
    if (channel_keys) {
        kvq_emu::launch(dim3(a.num_complete, a.num_kv_heads), dim3(KVQ_CHANNEL_THREADS), [&] {
            kv_write_channel_keys<Tin>((const Tin*)a.k_new, (unsigned char*)a.k_pool, a.k_param, a.k_complete,
                                       a.stash_codes, a.stash_params, a.num_tokens, a.num_kv_heads, a.num_blocks,
                                       a.block_size, a.head_dim);
        });
    }
}

template <typename Tin>
int write_mode(int mode, const WriteArgs& a) {
#define KVQ_W(M) \
    case M: return write_one<Tin, M>(a), 0;
    switch (mode) { KVQ_FOR_EACH_MODE(KVQ_W) }
#undef KVQ_W
    return -1;
}

struct AttnArgs {
    const void* q;
    const void* k_pool;
    const void* v_pool;
    const int* block_tables;
    const int* lengths;
    const float *k_scale, *k_zp, *v_scale, *v_zp;
    const __half *k_param, *v_param;
    float softmax_scale;
    int batch, num_heads, num_kv_heads, num_blocks, block_size, max_blocks, chunk, num_splits;
    void* out;
    float* part_o;
    float* part_ml;
};

template <typename Tq, int MODE, int D>
void attn_one(const AttnArgs& a) {
    typedef typename KvStore<MODE>::T Store;
    kvq_emu::launch(dim3(a.num_heads, a.batch, a.num_splits), dim3(KVQ_ATTN_THREADS), [&] {
        decode_attention<Tq, MODE, D>((const Tq*)a.q, (const Store*)a.k_pool, (const Store*)a.v_pool,
                                      a.block_tables, a.lengths, a.k_scale, a.k_zp, a.v_scale, a.v_zp, a.k_param,
                                      a.v_param, a.softmax_scale, a.num_heads, a.num_kv_heads, a.num_blocks,
                                      a.block_size, a.max_blocks, a.chunk, (Tq*)a.out, a.part_o, a.part_ml);
    });
    if (a.num_splits > 1) {
        kvq_emu::launch(dim3(a.num_heads, a.batch), dim3(D), [&] {
            decode_attention_combine<Tq, D>(a.part_o, a.part_ml, a.lengths, a.num_heads, a.max_blocks, a.block_size,
                                            a.chunk, a.num_splits, (Tq*)a.out);
        });
    }
}

template <typename Tq, int MODE>
int attn_dim(int head_dim, const AttnArgs& a) {
    if (head_dim == 64) return attn_one<Tq, MODE, 64>(a), 0;
    if (head_dim == 128) return attn_one<Tq, MODE, 128>(a), 0;
    return -1;
}

template <typename Tq>
int attn_mode(int mode, int head_dim, const AttnArgs& a) {
#define KVQ_A(M) \
    case M: return attn_dim<Tq, M>(head_dim, a);
    switch (mode) { KVQ_FOR_EACH_MODE(KVQ_A) }
#undef KVQ_A
    return -1;
}

// The attention kernel's read path for one mode: unpack_vec over n_bytes (a multiple of the mode's load).
template <int MODE>
void unpack_all(const void* raw, long long n_bytes, float* out) {
    constexpr int bytes = KvVec<MODE>::BYTES, values = KvVec<MODE>::N;
    for (long long off = 0; off < n_bytes; off += bytes) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        std::memcpy(&v, (const char*)raw + off, bytes);
        unpack_vec<MODE>(v, out + off / bytes * values);
    }
}

}  // namespace

extern "C" {

int kvq_kv_write(int in_dtype, int mode, const void* k_new, const void* v_new, void* k_pool, void* v_pool,
                 const int* slot_mapping, const float* k_scale, const float* k_zp, const float* v_scale,
                 const float* v_zp, void* k_param, void* v_param, const int* k_helper, const int* k_complete,
                 void* stash_codes, void* stash_params, int num_tokens, int num_kv_heads, int num_blocks,
                 int block_size, int head_dim, int grid, int num_complete) {
    const WriteArgs a{k_new,
                      v_new,
                      k_pool,
                      v_pool,
                      slot_mapping,
                      k_scale,
                      k_zp,
                      v_scale,
                      v_zp,
                      (__half*)k_param,
                      (__half*)v_param,
                      k_helper,
                      k_complete,
                      (unsigned char*)stash_codes,
                      (__half*)stash_params,
                      num_tokens,
                      num_kv_heads,
                      num_blocks,
                      block_size,
                      head_dim,
                      grid,
                      num_complete};
    switch (in_dtype) {
        case 0: return write_mode<float>(mode, a);
        case 1: return write_mode<__half>(mode, a);
        case 2: return write_mode<__nv_bfloat16>(mode, a);
    }
    return -1;
}

int kvq_decode_attention(int q_dtype, int mode, int head_dim, const void* q, const void* k_pool,
                         const void* v_pool, const int* block_tables, const int* lengths, const float* k_scale,
                         const float* k_zp, const float* v_scale, const float* v_zp, const void* k_param,
                         const void* v_param, float softmax_scale, int batch, int num_heads, int num_kv_heads,
                         int num_blocks, int block_size, int max_blocks, int chunk, int num_splits, void* out,
                         float* part_o, float* part_ml) {
    const AttnArgs a{q, k_pool, v_pool, block_tables, lengths, k_scale, k_zp, v_scale, v_zp, (const __half*)k_param,
                     (const __half*)v_param, softmax_scale, batch, num_heads, num_kv_heads, num_blocks, block_size,
                     max_blocks, chunk, num_splits, out, part_o, part_ml};
    switch (q_dtype) {
        case 0: return attn_mode<float>(mode, head_dim, a);
        case 1: return attn_mode<__half>(mode, head_dim, a);
        case 2: return attn_mode<__nv_bfloat16>(mode, head_dim, a);
    }
    return -1;
}

// Element-wise probes of the kernels' conversion helpers, for the exhaustive conversion tests.
// kind: 0 fp16 store (__float2half_rn), 1 int8 quantize, 2/3 fp8 quantize (KVQ_MODE_FP8_*), one scale/zp.
void kvq_probe_store(int kind, const float* x, long long n, float scale, float zp, void* out) {
    for (long long i = 0; i < n; ++i) {
        if (kind == 0) ((__half*)out)[i] = __float2half_rn(x[i]);
        if (kind == 1) ((signed char*)out)[i] = quantize_int8(x[i], scale, zp);
        if (kind == KVQ_MODE_FP8_E4M3) ((unsigned char*)out)[i] = quantize_fp8<KVQ_MODE_FP8_E4M3>(x[i], scale);
        if (kind == KVQ_MODE_FP8_E5M2) ((unsigned char*)out)[i] = quantize_fp8<KVQ_MODE_FP8_E5M2>(x[i], scale);
    }
}

// The attention kernel's read path: unpack_vec<mode> over n bytes (n a multiple of 16) into floats.
void kvq_probe_unpack(int mode, const void* raw, long long n_bytes, float* out) {
#define KVQ_U(M) \
    case M: unpack_all<M>(raw, n_bytes, out); break;
    switch (mode) { KVQ_FOR_EACH_MODE(KVQ_U) }
#undef KVQ_U
}

// Activation conversions (q / k_new loads and the output store): dtype codes as above, float in, T out.
void kvq_probe_from_float(int dtype, const float* x, long long n, void* out) {
    for (long long i = 0; i < n; ++i) {
        if (dtype == 1) ((__half*)out)[i] = from_float<__half>(x[i]);
        if (dtype == 2) ((__nv_bfloat16*)out)[i] = from_float<__nv_bfloat16>(x[i]);
    }
}

}  // extern "C"
