"""Decode-attention benchmark: time per step for fp16 vs INT8 vs FP8 vs online per-row KV caches (runtime/cuda).

    python tools/bench_cuda.py                 # GPU: timings + bandwidth; no GPU: the byte counts only
    python tools/bench_cuda.py --quick         # fewer shapes
    python tools/bench_cuda.py --modes fp16 int4_per_token_head   # a subset of the modes

For each model shape (7B: 32 heads, 32 KV heads, D 128; SmolLM2: 9 heads, 3 KV heads, D 64) and batch x
context, on a paged pool of BLOCK_SIZE-token blocks handed out in shuffled order (as after some allocation
churn), it reports, for one layer, the bytes one decode step must read (K and V of every cached token, the block
tables, plus q and out),
the kernel time (CUDA events, median of repeats), the achieved bandwidth, that bandwidth as a fraction of
the device's measured copy bandwidth (torch copy of 1 GiB: read + write bytes / time), and the speed-up
of each mode over fp16. Targets (issue 4): INT8/FP8 >= 1.6x fp16 at long context, >= 70% of copy bandwidth.
The online modes (*_per_token_head) also read each row's fp16 (scale, zero), counted in their bytes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import quant  # noqa: E402
from runtime.cuda.kernels import POOL_DTYPES  # noqa: E402
from runtime.quant import BYTES_PER_ELEM, PARAM_DTYPE, is_online, online_row_bytes  # noqa: E402

SHAPES = {"7B": (32, 32, 128), "SmolLM2": (9, 3, 64)}  # heads, kv heads, head_dim
MODES = ("fp16", "int8", "fp8_e4m3", "int8_per_token_head", "fp8_per_token_head", "int4_per_token_head")
GRID = [(1, 8192), (8, 8192), (64, 1024), (64, 8192), (16, 4096)]
QUICK_GRID = [(1, 8192), (64, 8192)]
BLOCK_SIZE = 64  # the engine's default


def step_bytes(batch: int, context: int, heads: int, kv_heads: int, dim: int, kv_dtype: str) -> int:
    """Bytes a decode step must move: K and V of every cached token (online modes: with each row's params),
    block tables (int32), q in and out (fp16), per-head params."""
    row = online_row_bytes(kv_dtype, dim) if is_online(kv_dtype) else dim * BYTES_PER_ELEM[kv_dtype]
    cache = 2 * batch * context * kv_heads * row
    tables = 4 * batch * math.ceil(context / BLOCK_SIZE)
    return cache + tables + 2 * batch * heads * dim * 2 + 4 * kv_heads * 4


def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write) over 1 GiB."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times[2:])


def time_step(batch: int, context: int, heads: int, kv_heads: int, dim: int, kv_dtype: str, repeats: int) -> float:
    """Median seconds of one decode_attention call with every sequence at `context` tokens."""
    from runtime.cuda import decode_attention

    dev = "cuda"
    max_blocks = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * max_blocks
    raw = torch.randint(-100, 100, (num_blocks, kv_heads, BLOCK_SIZE, dim), dtype=torch.int8, device=dev)
    if kv_dtype == "fp16":
        pool = raw.to(torch.float16) / 64
    elif kv_dtype in ("int8", "int8_per_token_head"):
        pool = raw.view(POOL_DTYPES[kv_dtype])
    elif kv_dtype == "int4_per_token_head":
        pool = raw[..., : dim // 2].contiguous().view(torch.uint8)  # (..., D / 2): two codes per byte
    else:
        pool = (raw.to(torch.float32) / 32).to(POOL_DTYPES[kv_dtype])
    k_pool, v_pool = pool, pool.clone()
    # (batch, max_blocks) int32: every block used once, in shuffled order; int4_per_token_head's keys of a partly
    # filled last block may reach the block after it (its helper): one more column (and block) per sequence
    if quant.channel_keys(kv_dtype) and context % BLOCK_SIZE:
        max_blocks += 1
        num_blocks += batch
        k_pool = torch.cat([k_pool, k_pool[:batch]]).contiguous()
        v_pool = torch.cat([v_pool, v_pool[:batch]]).contiguous()
    block_tables = torch.randperm(num_blocks, device=dev).to(torch.int32).view(batch, max_blocks)
    q = torch.randn(batch, heads, dim, dtype=torch.float16, device=dev)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=dev)
    scale, zp, params = torch.full((kv_heads,), 0.02, device=dev), torch.zeros(kv_heads, device=dev), {}
    if is_online(kv_dtype):  # no per-head parameters; (num_blocks, H_kv, BLOCK_SIZE, 2) fp16 (scale, zero) per row
        param = torch.rand(num_blocks, kv_heads, BLOCK_SIZE, 2, device=dev).to(PARAM_DTYPE) * 0.02
        k_param = param
        if quant.channel_keys(kv_dtype):  # keys: (scale row, zero row) per block, (num_blocks, H_kv, 2, D)
            k_param = torch.rand(num_blocks, kv_heads, 2, dim, device=dev).to(PARAM_DTYPE) * 0.02
        scale, zp, params = None, None, dict(k_param=k_param, v_param=param.clone())
    args = (q, k_pool, v_pool, block_tables, lengths, scale, zp, scale, zp, kv_dtype, 1 / math.sqrt(dim))
    decode_attention(*args, max_length=context, **params)  # compile + warm up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decode_attention(*args, max_length=context, **params)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only batch x context 1 x 8192 and 64 x 8192")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="KV modes (fp16 is the base)")
    args = parser.parse_args()
    grid = QUICK_GRID if args.quick else GRID
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        bw = copy_bandwidth()
        print(f"device: {torch.cuda.get_device_name()}  measured copy bandwidth: {bw / 1e9:.0f} GB/s")
    else:
        print("no CUDA device: printing the bytes each mode must read per decode step and layer; timings need a GPU")
    print(
        f"{'shape':8} {'batch':>5} {'ctx':>5} {'mode':19} {'MiB/step':>9} {'us/step':>9} {'GB/s':>7} "
        f"{'%copy':>6} {'vs fp16':>7}"
    )
    for shape, (heads, kv_heads, dim) in SHAPES.items():
        for batch, context in grid:
            base = None
            for mode in args.modes:
                nbytes = step_bytes(batch, context, heads, kv_heads, dim, mode)
                row = f"{shape:8} {batch:5d} {context:5d} {mode:19} {nbytes / 2**20:9.1f}"
                if has_gpu:
                    sec = time_step(batch, context, heads, kv_heads, dim, mode, args.repeats)
                    base = sec if mode == "fp16" else base
                    speedup = f"{base / sec:6.2f}x" if base else "      -"
                    row += f" {sec * 1e6:9.1f} {nbytes / sec / 1e9:7.0f} {100 * nbytes / sec / bw:5.0f}% {speedup}"
                print(row)


if __name__ == "__main__":
    main()
