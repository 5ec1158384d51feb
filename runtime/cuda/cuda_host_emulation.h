// cuda_host_emulation.h: just enough of the CUDA execution model to run this project's kernels on the CPU.
//
// Used only by the tests (runtime/cuda/toolchain.py build_host_library compiles host_launch.cpp with
// g++ -std=c++17): the very same .cu files the GPU runs are compiled as host C++ against this header, so the
// CPU tests execute the kernels' own indexing, synchronisation and arithmetic.
//
// What it provides:
//   - NVIDIA's cuda_fp16.h / cuda_bf16.h / cuda_fp8.h compiled as host code: the half, bf16 and fp8
//     conversions are NVIDIA's own host implementations (rounding and __NV_SATFINITE saturation included).
//   - threadIdx / blockIdx / blockDim / gridDim as thread_local variables (1-D blocks).
//   - kvq_emu::launch(grid, block, body): runs every CUDA thread of a block as a std::thread; the block's
//     threads run concurrently (so __syncthreads is a real barrier), blocks run one after another, each
//     worker thread walking the grid in the same order.
//   - __shared__ = static: because one block runs at a time, a kernel's static locals are exactly that
//     block's shared memory (launch() puts a barrier between blocks so no thread races ahead).
//   - __syncthreads(): a generation-counting barrier across the block's threads.
//   - __shfl_xor_sync / __shfl_down_sync / __shfl_sync: each lane writes its value into a per-warp buffer
//     (double-buffered), the warp meets at a barrier, and reads its source lane. Like on the GPU, every lane of
//     the warp must call the shuffle (full mask); a missing lane deadlocks, and the barrier then aborts
//     with a message after 60 s instead of hanging the test run.
//   - __float2int_rn (round half to even, saturating, NaN -> 0 like cvt.rni.s32.f32), __fdiv_rn / __fmul_rn /
//     __fadd_rn (IEEE operations, which the host's are: the emulation is compiled without fast-math and with
//     -ffp-contract=off, so no FMA forms), __int_as_float, __byte_perm (selectors 0-7),
//     exp2f/fmaxf from <cmath>, integer min/max.
#pragma once

#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

using std::max;
using std::min;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace kvq_emu {

class Barrier {  // reusable barrier for a fixed number of threads
   public:
    explicit Barrier(int count) : count_(count) {}
    void wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned long gen = generation_;
        if (++arrived_ == count_) {
            arrived_ = 0;
            ++generation_;
            cv_.notify_all();
            return;
        }
        if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != gen; })) {
            std::fprintf(stderr, "cuda_host_emulation: barrier timeout (a thread skipped __syncthreads or a shuffle)\n");
            std::abort();
        }
    }

   private:
    std::mutex mutex_;
    std::condition_variable cv_;
    int count_;
    int arrived_ = 0;
    unsigned long generation_ = 0;
};

struct Block {  // state shared by the threads of the running block
    Barrier block_barrier;
    std::vector<Barrier*> warp_barriers;
    std::vector<unsigned long long> exchange;  // (2, num_warps, 32) double-buffered shuffle buffer
    int num_warps;
    explicit Block(int threads)
        : block_barrier(threads), exchange(2 * ((threads + 31) / 32) * 32), num_warps((threads + 31) / 32) {
        for (int w = 0; w * 32 < threads; ++w) warp_barriers.push_back(new Barrier(min(32, threads - w * 32)));
    }
    ~Block() {
        for (Barrier* b : warp_barriers) delete b;
    }
};

inline thread_local Block* current_block = nullptr;
inline thread_local int shuffle_parity = 0;  // which half of the exchange buffer this lane's next shuffle uses
inline std::mutex launch_mutex;  // kernels use static (shared) memory: one launch at a time

// Run body() as every thread of every block of grid x block (1-D blocks; grid up to 3-D).
template <typename Body>
void launch(dim3 grid, dim3 block, Body body) {
    std::lock_guard<std::mutex> guard(launch_mutex);
    const int threads = (int)block.x;
    Block state(threads);
    std::vector<std::thread> workers;
    for (int tid = 0; tid < threads; ++tid) {
        workers.emplace_back([&, tid] {
            current_block = &state;
            shuffle_parity = 0;
            threadIdx = make_uint3((unsigned)tid, 0u, 0u);
            blockDim = block;
            gridDim = grid;
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = make_uint3(x, y, z);
                        body();
                        state.block_barrier.wait();  // the next block may reuse shared memory
                    }
            current_block = nullptr;
        });
    }
    for (std::thread& w : workers) w.join();
}

template <typename T>
T shuffle_from(T value, int src_lane) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a type wider than 8 bytes");
    Block& blk = *current_block;
    const int lane = (int)threadIdx.x % 32, warp = (int)threadIdx.x / 32;
    // Double buffering: shuffle i+2 rewrites this half only after every lane has passed the barrier of
    // shuffle i+1, which each lane reaches after its read here; so one barrier per shuffle suffices.
    unsigned long long* buf = &blk.exchange[(shuffle_parity * blk.num_warps + warp) * 32];
    shuffle_parity ^= 1;
    std::memcpy(&buf[lane], &value, sizeof(T));
    blk.warp_barriers[warp]->wait();
    T result;
    std::memcpy(&result, &buf[src_lane], sizeof(T));
    return result;
}

}  // namespace kvq_emu

inline void __syncthreads() { kvq_emu::current_block->block_barrier.wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask, int width = 32) {
    const int lane = (int)threadIdx.x % 32;
    const int src = lane ^ lane_mask;
    return kvq_emu::shuffle_from(value, (src / width == lane / width) ? src : lane);
}

template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, unsigned delta, int width = 32) {
    const int lane = (int)threadIdx.x % 32;
    const int src = lane + (int)delta;
    return kvq_emu::shuffle_from(value, (lane % width) + (int)delta < width ? src : lane);
}

template <typename T>
T __shfl_sync(unsigned /*mask*/, T value, int src_lane, int width = 32) {
    const int lane = (int)threadIdx.x % 32;
    return kvq_emu::shuffle_from(value, (lane / width) * width + (src_lane % width));
}

inline int __float2int_rn(float x) {
    if (std::isnan(x)) return 0;
    if (x >= 2147483648.0f) return INT_MAX;
    if (x < -2147483648.0f) return INT_MIN;
    return (int)std::nearbyint(x);  // default FE_TONEAREST: half to even
}

inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmul_rn(float x, float y) { return x * y; }  // no FMA: -ffp-contract=off
inline float __fadd_rn(float x, float y) { return x + y; }

// Byte permute (selector nibbles 0-7 pick bytes of {x, y}, x's bytes 0-3; the sign-replicate bit is not used).
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const unsigned long long both = ((unsigned long long)y << 32) | x;
    unsigned int r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned int)((both >> (8 * ((s >> (4 * n)) & 7u))) & 0xffu) << (8 * n);
    return r;
}

inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, sizeof f);
    return f;
}
