// decode_attention.cu: one decode step of attention over a paged (quantized) KV pool, dequantizing in registers.
//
// Computes, for every sequence b and query head h (GQA: KV head kvh = h / (H / H_kv)):
//     out[b, h] = softmax(softmax_scale * q[b, h] . K^[b, kvh, :L_b]) @ V^[b, kvh, :L_b]
// with L_b = lengths[b] and K^[b, kvh, t] the dequantized pool row k_pool[block_tables[b, t / block_size], kvh,
// t % block_size] (kvq_common.cuh: int8 x^ = q*scale + zp, fp8 x^ = f*scale, per KV head; online modes
// x^ = code*scale_t + zero_t with the row's own fp16 (scale_t, zero_t)); V^ likewise. No dequantized copy is
// written anywhere, and the inner loop only converts stored bytes to floats:
//   per-head modes: the K scale is folded into q (and the INT8 zero point into one per-query constant
//     zp * sum(q)), the V scale and zero point are applied once to the output;
//   online modes:   score_t = scale_t * (q . code_t) + zero_t * sum(q), one FMA per key on the reduced dot;
//     out accumulates (p_t * scale_t) * code_t per channel plus one scalar p_t * zero_t per key, added to
//     every channel when the groups merge.
//   int4_per_token_head keys (mode 6) are per channel within a block (runtime/quant.py quantize_channels,
//     runtime/kv_cache.py gather_channel_keys): a key in one of the sequence's full blocks (t < L_b / bs * bs)
//     is x^_c = code_c * scale_c + zero_c with its block's per-channel fp16 params (k_param (num_blocks, H_kv, 2,
//     D) = scale row, zero row), dequantized per channel before the dot; a key in the open block (row r) is an
//     int8 row (mode 4 formulas, its own (scale, zero)) at row r % (bs / 2) of block block_tables[b, t / bs]
//     (r < bs / 2) or of the next entry, the helper (r >= bs / 2), viewed as (num_blocks, H_kv, bs / 2, D)
//     bytes, its (scale, zero) in k_param viewed as (num_blocks, H_kv, D, 2), same row. Values as mode 6 rows.
// Online softmax in fp32, in the log2 domain (exp2f); a sequence with L_b = 0 gets a zero output.
//
// Layout (contiguous, row-major):
//   q, out              (B, H, D)                              Tq = float | __half | __nv_bfloat16
//   k_pool, v_pool      (num_blocks, H_kv, block_size, D)      KvStore<MODE>::T; rows 16-byte aligned
//                                                               (D * bytes % 16 == 0, pool base % 16 == 0)
//                       (num_blocks, H_kv, block_size, D / 2)  uint8, int4 mode (two codes per byte)
//   block_tables        (B, max_blocks) int32                   pool block of each block_size positions
//   lengths             (B,) int32                              L_b, clamped to [0, max_blocks * block_size]
//   k_scale ... v_zp    (H_kv,) fp32       modes 1-3 only; zero points not read in fp8 modes
//   k_param, v_param    (num_blocks, H_kv, block_size, 2) fp16  (scale, zero) per row, online modes only;
//                       k_param (num_blocks, H_kv, 2, D) fp16   mode 6 (see above), 16-byte aligned
//   part_o              (B, H, splits, D)  fp32, split-K partial outputs (normalised), splits > 1 only
//   part_ml             (B, H, splits, 2)  fp32, each split's running max (log2 domain) and softmax sum
// Only rows t < L_b are read, and only the block-table entries those rows fall in: rows past the length and
// padding entries may hold anything (stale data, NaN). A block id outside [0, num_blocks) is never
// dereferenced; its keys are masked out (memory-safe; the engine never passes one); so are mode 6's open keys
// whose helper entry lies past max_blocks or outside the pool.
//
// Launch (flash-decoding):
//   decode_attention<Tq, MODE, D>: grid (H, B, splits), block 128 threads = 4 warps. Block (h, b, z) reads
//     keys [z*chunk, min(L_b, (z+1)*chunk)). Lanes work in groups of TPK = D / EPV lanes per key: each lane
//     loads 16 bytes (8 for int4) of a K row and of a V row, EPV = 8 (fp16) or 16 values (a pool row is
//     contiguous, so a group reads one whole row); the group looks the key's block up in the block table and,
//     in the online modes, loads the key's K and V (scale, zero) as one __half2 each (same addresses for the
//     group's lanes: broadcast loads). Mode 6 keys: a full-block key loads 8 bytes of codes; when a group's keys
//     enter another block it loads its lane's 16 channels' scales and zeros (2 x 32 bytes of the block's param
//     rows) and keeps q_c * scale_c and sum_c q_c * zero_c (channel_factors); an open key loads 16 int8 codes and its row's (scale, zero). The block's 128/TPK
//     groups take consecutive keys, UNROLL keys per group per iteration with all loads issued before the math;
//     q.k is reduced across the group with __shfl_xor_sync. The groups' (max, sum, acc) are merged through
//     shared memory at the end.
//     splits == 1: the block writes out directly; splits > 1: it writes part_o / part_ml (empty splits
//     write nothing).
//   decode_attention_combine<Tq, D>: grid (H, B), block D threads; merges the non-empty splits.
// The launcher (kernels.py plan_splits) picks splits so that small batches with long contexts still fill
// the GPU; with many sequences it uses one split and no second pass.
#include "kvq_common.cuh"

#define KVQ_ATTN_THREADS 128
#define KVQ_ATTN_UNROLL 4

// Resident blocks per SM asked of the register allocator (launch bounds) and keys per group in flight, per mode.
// Measured on an H200 (sm_90; 7B shape, 64 x 8192): the 8-bit kernels at 4 blocks (<= 128 registers, 25 %
// occupancy) read 65-77 % of the copy bandwidth; capped at 80 registers (6 blocks) INT8 / FP8 read 88 / 93 %. The
// online modes spill at 80 registers and take 5 blocks (<= 96); INT4 keeps 2 keys in flight per group. sm_80 /
// sm_89 (software or other FP8 conversions) spill under those caps and keep 4 blocks. No spill in any variant for
// any architecture: tests/test_cuda_compile.py.
// The CPU emulation (host_launch.cpp) defines KVQ_EMULATE_SM90 to run the sm_90 variants.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(KVQ_EMULATE_SM90)
#define KVQ_SM90_TUNING 1
#else
#define KVQ_SM90_TUNING 0
#endif
__host__ __device__ constexpr int kvq_attn_min_blocks(int mode) {
#if KVQ_SM90_TUNING
    return kvq_is_online(mode) ? 5 : 6;
#else
    return 4;
#endif
}
__host__ __device__ constexpr int kvq_attn_unroll(int mode) {
#if KVQ_SM90_TUNING
    return mode == KVQ_MODE_INT4_PTH ? 2 : KVQ_ATTN_UNROLL;
#else
    return KVQ_ATTN_UNROLL;
#endif
}
#define KVQ_LOG2E 1.4426950408889634f
#define KVQ_NEG_INF (-__int_as_float(0x7f800000))

// Keys to read for sequence b: lengths[b] clamped to [0, max_blocks * block_size] (the block table's reach).
__device__ __forceinline__ int sequence_length(const int* lengths, int b, int max_blocks, int block_size) {
    return (int)max(0LL, min((long long)lengths[b], (long long)max_blocks * block_size));
}

// Mode 6 full-block keys: q . x^ = sum_i (q_i * scale_i) * code_i + sum_i q_i * zero_i over a lane's 16 channels.
// Both factors depend only on the block, so a group computes them when its keys enter a new block (the scales at
// param[0..16), the zeros at param[D..D + 16): the block's scale and zero rows, 16-byte loads) and each key then
// costs 16 FMAs, as an INT8 row does. qz is this lane's share; the group's shuffle reduction adds the lanes.
__device__ __forceinline__ void channel_factors(const float* qf, const __half* param, int D, float* qs, float& qz) {
    qz = 0.0f;
#pragma unroll
    for (int v = 0; v < 2; ++v) {
        const uint4 sr = *reinterpret_cast<const uint4*>(param + 8 * v);
        const uint4 zr = *reinterpret_cast<const uint4*>(param + D + 8 * v);
        const unsigned int sw[4] = {sr.x, sr.y, sr.z, sr.w}, zw[4] = {zr.x, zr.y, zr.z, zr.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            __half2_raw sh, zh;
            sh.x = (unsigned short)(sw[i] & 0xffffu), sh.y = (unsigned short)(sw[i] >> 16);
            zh.x = (unsigned short)(zw[i] & 0xffffu), zh.y = (unsigned short)(zw[i] >> 16);
            const float2 sc = __half22float2(__half2(sh)), ze = __half22float2(__half2(zh));
            const int j = 8 * v + 2 * i;
            qs[j] = qf[j] * sc.x;
            qs[j + 1] = qf[j + 1] * sc.y;
            qz += qf[j] * ze.x;
            qz += qf[j + 1] * ze.y;
        }
    }
}

template <typename Tq, int MODE, int D>
__global__ void __launch_bounds__(KVQ_ATTN_THREADS, kvq_attn_min_blocks(MODE)) decode_attention(
    const Tq* __restrict__ q, const typename KvStore<MODE>::T* __restrict__ k_pool,
    const typename KvStore<MODE>::T* __restrict__ v_pool, const int* __restrict__ block_tables,
    const int* __restrict__ lengths, const float* __restrict__ k_scale, const float* __restrict__ k_zp,
    const float* __restrict__ v_scale, const float* __restrict__ v_zp, const __half* __restrict__ k_param,
    const __half* __restrict__ v_param, float softmax_scale, int num_heads,
    int num_kv_heads, int num_blocks, int block_size, int max_blocks, int chunk, Tq* __restrict__ out,
    float* __restrict__ part_o, float* __restrict__ part_ml) {
    constexpr bool ONLINE = kvq_is_online(MODE);
    constexpr int EPV = KvVec<MODE>::N;  // values per lane load: 8 (fp16) or 16 (8-bit and 4-bit modes)
    constexpr int TPK = D / EPV;         // lanes per key
    constexpr int NG = KVQ_ATTN_THREADS / TPK;  // key groups per block
    constexpr int U = kvq_attn_unroll(MODE);
    constexpr int ROW = MODE == KVQ_MODE_INT4_PTH ? D / 2 : D;  // storage elements per pool row
    constexpr int LANE_ELEMS = KvVec<MODE>::BYTES / (int)sizeof(typename KvStore<MODE>::T);  // per lane load
    static_assert(D % EPV == 0 && 32 % TPK == 0, "head_dim must split into lane loads within a warp");

    const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z, num_splits = gridDim.z;
    const int kvh = h / (num_heads / num_kv_heads);
    const int len = sequence_length(lengths, b, max_blocks, block_size);
    const int start = split * chunk;
    const int end = min(len, start + chunk);
    if (num_splits > 1 && start >= end) return;  // block-uniform exit; the combine pass skips empty splits
    const int group = threadIdx.x / TPK, lane = threadIdx.x % TPK;
    // mode 6 keys: positions below full_len are in full blocks (per-channel codes), the rest are open int8 rows
    const int full_len = len / block_size * block_size, half = block_size / 2;
    const int c0 = lane * EPV;  // this lane's channels [c0, c0 + EPV)

    // Per-head parameters (modes 1-3); the online modes apply theirs per key below.
    const float k_mul = MODE == KVQ_MODE_FP16 || ONLINE ? 1.0f : k_scale[kvh];
    const float k_add = MODE == KVQ_MODE_INT8 ? k_zp[kvh] : 0.0f;
    const float v_mul = MODE == KVQ_MODE_FP16 || ONLINE ? 1.0f : v_scale[kvh];
    const float v_add = MODE == KVQ_MODE_INT8 ? v_zp[kvh] : 0.0f;

    // q . k^ = sum_d q_d (k_d * k_mul + k_add) = k_mul * (q . k) + k_add * sum(q); log2 domain for exp2f.
    const float q_mul = softmax_scale * KVQ_LOG2E;
    const Tq* q_row = q + ((long long)b * num_heads + h) * D + c0;
    float qf[EPV];
    float q_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < EPV; ++i) {
        const float x = to_float(q_row[i]);
        qf[i] = x * q_mul * k_mul;
        q_sum += x;
    }
    if constexpr (MODE == KVQ_MODE_INT8 || ONLINE) {
#pragma unroll
        for (int off = TPK / 2; off > 0; off /= 2) q_sum += __shfl_xor_sync(0xffffffffu, q_sum, off);
    }
    const float z_term = q_mul * k_add * q_sum;  // per-head int8
    const float q_sum_scaled = q_mul * q_sum;     // online: times zero_t per key

    // Pool row of (block, kvh, row) = (block * H_kv + kvh) * block_size + row; its params sit at 2 * that, its
    // data at ROW * that (+ this lane's LANE_ELEMS slice). 64-bit: a pool passes 2^31 elements easily.
    const int* table = block_tables + (long long)b * max_blocks;
    const long long head_row = (long long)kvh * block_size;
    const long long block_rows = (long long)num_kv_heads * block_size;
    float m = KVQ_NEG_INF, l = 0.0f, z_acc = 0.0f, acc[EPV];  // z_acc: online sum_t p_t * zero_t
#pragma unroll
    for (int i = 0; i < EPV; ++i) acc[i] = 0.0f;

    // mode 6: the per-channel factors of the block this group's last full-block key was in (channel_factors)
    long long chan_block = -1;
    float chan_qs[MODE == KVQ_MODE_INT4_PTH ? EPV : 1], chan_qz = 0.0f;

    // Trip count is the same for every thread of the block, so the shuffles below see the full warp.
    for (int t0 = start; t0 < end; t0 += NG * U) {
        uint4 k_raw[U], v_raw[U];
        float2 k_par[U], v_par[U];  // online: each key's (scale, zero)
        long long k_chan[U];  // mode 6: a full-block key's param rows (offset into k_param), -1 for an open key
        unsigned valid = 0u;  // bit u: key t0 + u*NG + group is read (inside the range and the pool)
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u * NG + group;
            const unsigned col = (unsigned)t / (unsigned)block_size;  // t >= 0, block_size >= 1
            const int block = t < end ? table[col] : -1;
            k_par[u] = v_par[u] = make_float2(0.0f, 0.0f);
            k_chan[u] = -1;
            // mode 6 open key: its row in the half-block layout of this block or of the helper (next entry)
            const int r = t - (int)col * block_size;
            const int page = MODE != KVQ_MODE_INT4_PTH || t >= end || t < full_len || r < half ? block
                             : col + 1 < (unsigned)max_blocks ? table[col + 1]
                                                              : -1;
            if ((unsigned)block < (unsigned)num_blocks && (unsigned)page < (unsigned)num_blocks) {
                const long long row = block * block_rows + head_row + r;
                if constexpr (MODE == KVQ_MODE_INT4_PTH) {
                    if (t < full_len) {
                        k_raw[u] = load_vec<MODE>(k_pool + row * ROW + lane * LANE_ELEMS);
                        k_chan[u] = ((long long)block * num_kv_heads + kvh) * 2 * D;
                    } else {
                        const long long page_head = (long long)page * num_kv_heads + kvh;
                        const long long open_row = page_head * half + r % half;  // D bytes per open row
                        k_raw[u] = load_vec<KVQ_MODE_INT8_PTH>(k_pool + open_row * D + lane * EPV);
                        k_par[u] = __half22float2(
                            *reinterpret_cast<const __half2*>(k_param + page_head * 2 * D + 2 * (r % half)));
                    }
                    v_raw[u] = load_vec<MODE>(v_pool + row * ROW + lane * LANE_ELEMS);
                    v_par[u] = __half22float2(*reinterpret_cast<const __half2*>(v_param + 2 * row));
                    valid |= 1u << u;
                    continue;
                }
                k_raw[u] = load_vec<MODE>(k_pool + row * ROW + lane * LANE_ELEMS);
                v_raw[u] = load_vec<MODE>(v_pool + row * ROW + lane * LANE_ELEMS);
                if constexpr (ONLINE) {
                    k_par[u] = __half22float2(*reinterpret_cast<const __half2*>(k_param + 2 * row));
                    v_par[u] = __half22float2(*reinterpret_cast<const __half2*>(v_param + 2 * row));
                }
                valid |= 1u << u;
            } else {
                k_raw[u] = make_uint4(0u, 0u, 0u, 0u);
                v_raw[u] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        float s[U];
        float tile_max = KVQ_NEG_INF;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[EPV];
            float dot = 0.0f;
            bool chan = false;  // mode 6 full-block key: dot already holds q . x^ (params applied per channel)
            if constexpr (MODE == KVQ_MODE_INT4_PTH) {
                chan = k_chan[u] >= 0;
                if (chan) {
                    if (k_chan[u] != chan_block) {  // this group's keys entered another block
                        chan_block = k_chan[u];
                        channel_factors(qf, k_param + chan_block + c0, D, chan_qs, chan_qz);
                    }
                    unpack_vec<MODE>(k_raw[u], kf);
                    dot = chan_qz;
#pragma unroll
                    for (int i = 0; i < EPV; ++i) dot += chan_qs[i] * kf[i];
                } else {
                    unpack_vec<KVQ_MODE_INT8_PTH>(k_raw[u], kf);
#pragma unroll
                    for (int i = 0; i < EPV; ++i) dot += qf[i] * kf[i];
                }
            } else {
                unpack_vec<MODE>(k_raw[u], kf);
#pragma unroll
                for (int i = 0; i < EPV; ++i) dot += qf[i] * kf[i];
            }
#pragma unroll
            for (int off = TPK / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
            const float score = chan ? dot : ONLINE ? k_par[u].x * dot + k_par[u].y * q_sum_scaled : dot + z_term;
            s[u] = ((valid >> u) & 1u) ? score : KVQ_NEG_INF;
            tile_max = fmaxf(tile_max, s[u]);
        }
        const float m_new = fmaxf(m, tile_max);
        if (m_new == KVQ_NEG_INF) continue;  // no valid key for this group in this tile yet
        const float corr = exp2f(m - m_new);  // 0 on the first valid tile (m = -inf)
        l *= corr;
        z_acc *= corr;
#pragma unroll
        for (int i = 0; i < EPV; ++i) acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float p = exp2f(s[u] - m_new);  // 0 for masked keys
            const float pv = ONLINE ? p * v_par[u].x : p;  // p_t * scale_t: the codes' weight
            float vf[EPV];
            unpack_vec<MODE>(v_raw[u], vf);
            l += p;
            if constexpr (ONLINE) z_acc += p * v_par[u].y;
#pragma unroll
            for (int i = 0; i < EPV; ++i) acc[i] += pv * vf[i];
        }
        m = m_new;
    }

    // Merge the NG groups: shared (max, sum) per group and the group's D accumulators.
    __shared__ float s_m[NG], s_l[NG];
    __shared__ float s_acc[NG * D];  // NG * D = 128 * EPV floats: 4 KiB (fp16) or 8 KiB (8-bit, 4-bit)
    if (lane == 0) {
        s_m[group] = m;
        s_l[group] = l;
    }
#pragma unroll
    for (int i = 0; i < EPV; ++i) s_acc[group * D + c0 + i] = acc[i] + z_acc;  // z_acc = 0 unless online
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float m_all = KVQ_NEG_INF;
        for (int g = 0; g < NG; ++g) m_all = fmaxf(m_all, s_m[g]);
        float l_all = 0.0f, o = 0.0f;
        if (m_all != KVQ_NEG_INF) {
            for (int g = 0; g < NG; ++g) {
                const float w = exp2f(s_m[g] - m_all);
                l_all += w * s_l[g];
                o += w * s_acc[g * D + d];
            }
        }
        // Back from stored units: sum_t p_t (v_t * v_mul + v_add) / sum_t p_t.
        o = l_all > 0.0f ? o / l_all * v_mul + v_add : 0.0f;
        const long long row = (long long)b * num_heads + h;
        if (num_splits == 1) {
            out[row * D + d] = from_float<Tq>(o);
        } else {
            part_o[(row * num_splits + split) * D + d] = o;
            if (d == 0) {
                part_ml[(row * num_splits + split) * 2] = m_all;
                part_ml[(row * num_splits + split) * 2 + 1] = l_all;
            }
        }
    }
}

template <typename Tq, int D>
__global__ void __launch_bounds__(D) decode_attention_combine(
    const float* __restrict__ part_o, const float* __restrict__ part_ml, const int* __restrict__ lengths,
    int num_heads, int max_blocks, int block_size, int chunk, int num_splits, Tq* __restrict__ out) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const int len = sequence_length(lengths, b, max_blocks, block_size);
    const int used = min(num_splits, (len + chunk - 1) / chunk);  // the non-empty splits
    const long long row = (long long)b * num_heads + h;
    const float* ml = part_ml + row * num_splits * 2;
    float m_all = KVQ_NEG_INF;
    for (int z = 0; z < used; ++z) m_all = fmaxf(m_all, ml[2 * z]);
    float l_all = 0.0f, o = 0.0f;
    for (int z = 0; z < used; ++z) {
        const float w = exp2f(ml[2 * z] - m_all) * ml[2 * z + 1];  // each split's softmax mass
        l_all += w;
        o += w * part_o[(row * num_splits + z) * D + d];
    }
    out[row * D + d] = from_float<Tq>(l_all > 0.0f ? o / l_all : 0.0f);
}
