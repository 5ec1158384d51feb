"""Decode attention on the paged KV pool (runtime/cpu_attention.py): the PyTorch reference against a plain dense
softmax attention, and the C++/OpenMP kernel against the reference.

Every case scatters each sequence's quantized K/V (runtime.quant.quantize) into shuffled, non-contiguous pool
blocks; everything else in the pool (rows past a sequence's length, blocks nobody owns) is poison: NaN for
fp16 / fp8, random bytes for int8. Padding block-table entries are -1, an id far outside the pool, or a
poisoned block. A kernel that read any of it would return NaN (or, for int8, a visibly different result).
Lengths cover 0, 1, exactly one block, and values that are not a multiple of the block size.

The helpers here (make_case, dense_attention) are shared with the CUDA tests (tests/test_cuda_cpu.py,
tests/test_cuda_gpu.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from runtime import quant
from runtime.cpu_attention import (
    _cpp_module,
    decode_attention,
    decode_attention_cpp,
    decode_attention_torch,
)

KV_DTYPES = ("fp16", "int8", "fp8_e4m3", "fp8_e5m2")
FAR_BLOCK = 10**6  # a padding block id far outside any test pool


def lengths_for(block_size: int) -> list[int]:
    """One batch: a single token, exactly one block, nothing, not a multiple of the block size (twice)."""
    return [1, block_size, 0, 3 * block_size - 2, 45]


def poison_pool(shape: tuple, kv_dtype: str, gen: torch.Generator) -> torch.Tensor:
    """A pool full of what a kernel must never read: NaN (fp16, fp8: byte 0x7F is NaN in E4M3FN and E5M2),
    random int8 bytes."""
    if kv_dtype == "fp16":
        return torch.full(shape, float("nan"), dtype=torch.float16)
    if kv_dtype == "int8":
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    return torch.full(shape, 0x7F, dtype=torch.uint8).view(quant.STORAGE_DTYPES[kv_dtype])


def make_params(kv_dtype: str, k: torch.Tensor, v: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """(k_scale, k_zp, v_scale, v_zp), each (H_kv,) fp32, from K/V (B, H_kv, L, D); ranges shrunk by 0.8 so that
    some values saturate. fp16: scale 1, zero point 0 (not used by the storage)."""
    hkv = k.shape[1]
    if kv_dtype == "fp16":
        return torch.ones(hkv), torch.zeros(hkv), torch.ones(hkv), torch.zeros(hkv)
    out = []
    for x in (k, v):
        x = x.transpose(0, 1).reshape(hkv, -1)
        mx, mn, amax = x.amax(1) * 0.8, x.amin(1) * 0.8, x.abs().amax(1) * 0.8
        if kv_dtype == "int8":
            out += quant.int8_params(mx, mn, amax, symmetric)
        else:
            out += [quant.fp8_scale(amax, kv_dtype), torch.zeros(hkv)]
    return tuple(out)


@dataclass
class PagedCase:
    """One decode step over a paged pool; `args()` is the common positional argument list."""

    kv_dtype: str
    q: torch.Tensor  # (B, H, D)
    k_pool: torch.Tensor  # (num_blocks, H_kv, block_size, D) storage dtype
    v_pool: torch.Tensor
    block_tables: torch.Tensor  # (B, max_blocks)
    lengths: torch.Tensor  # (B,)
    params: tuple  # k_scale, k_zp, v_scale, v_zp: (H_kv,) fp32 each
    softmax_scale: float

    def args(self) -> tuple:
        return (self.q, self.k_pool, self.v_pool, self.block_tables, self.lengths, *self.params, self.softmax_scale)


def make_case(
    kv_dtype: str,
    dim: int,
    num_kv_heads: int,
    group: int,
    block_size: int,
    lengths: list[int],
    seed: int,
    q_dtype: torch.dtype = torch.float32,
    symmetric: bool = False,
    index_dtype: torch.dtype = torch.int64,
) -> PagedCase:
    """Quantize random K (channel outliers, per-head offsets) and V (shifted) into shuffled blocks of a poisoned
    pool; block tables padded with -1, FAR_BLOCK or a poisoned spare block, by sequence."""
    gen = torch.Generator().manual_seed(seed)
    batch, longest = len(lengths), max(lengths)
    need = [math.ceil(n / block_size) for n in lengths]
    num_blocks = sum(need) + 3  # 3 spare blocks nobody owns: stale data
    max_blocks = max(need) + 2  # every row has padding entries
    chan = 1 + 4 * torch.rand(dim, generator=gen)
    k = torch.randn(batch, num_kv_heads, longest, dim, generator=gen) * chan  # (B, H_kv, L, D)
    k += torch.arange(num_kv_heads).view(-1, 1, 1) * 0.5 - 0.3  # per-head offsets: non-zero INT8 zero points
    v = torch.randn(batch, num_kv_heads, longest, dim, generator=gen) + 0.3
    params = make_params(kv_dtype, k, v, symmetric)
    kq = quant.quantize(k, kv_dtype, params[0], params[1])  # (B, H_kv, L, D) storage dtype
    vq = quant.quantize(v, kv_dtype, params[2], params[3])
    shape = (num_blocks, num_kv_heads, block_size, dim)
    k_pool, v_pool = poison_pool(shape, kv_dtype, gen), poison_pool(shape, kv_dtype, gen)
    perm = torch.randperm(num_blocks, generator=gen)  # the last 3 are the spare blocks
    tables = torch.empty(batch, max_blocks, dtype=torch.int64)
    taken = 0
    for b, n in enumerate(lengths):
        ids = perm[taken : taken + need[b]]
        taken += need[b]
        tables[b] = (-1, FAR_BLOCK, int(perm[-1]))[b % 3]
        tables[b, : need[b]] = ids
        pos = torch.arange(n)
        k_pool[ids[pos // block_size], :, pos % block_size] = kq[b, :, :n].transpose(0, 1)  # (n, H_kv, D)
        v_pool[ids[pos // block_size], :, pos % block_size] = vq[b, :, :n].transpose(0, 1)
    q = torch.randn(batch, num_kv_heads * group, dim, generator=gen).to(q_dtype)
    return PagedCase(
        kv_dtype,
        q,
        k_pool,
        v_pool,
        tables.to(index_dtype),
        torch.tensor(lengths, dtype=index_dtype),
        params,
        1 / math.sqrt(dim),
    )


def dense_attention(case: PagedCase) -> torch.Tensor:
    """float64 (B, H, D): for each sequence b and query head h of KV head kvh = h // G,
        K^[t] = dequantize(k_pool[block_tables[b, t // block_size], kvh, t % block_size])   (V^ likewise)
        out[b, h] = sum_t softmax_t(softmax_scale * q[b, h] . K^[t]) V^[t]      over t < lengths[b]
    with quant.dequantize (x^ = scale * stored + zp); a zero output for an empty sequence."""
    batch, num_heads, dim = case.q.shape
    _, num_kv_heads, block_size, _ = case.k_pool.shape
    k_scale, k_zp, v_scale, v_zp = case.params
    out = torch.zeros(batch, num_heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(case.lengths[b])
        if n == 0:
            continue
        t = torch.arange(n)
        blocks, rows = case.block_tables[b, t // block_size].long(), t % block_size
        k = case.k_pool[blocks, :, rows].transpose(0, 1)  # (H_kv, n, D) stored
        v = case.v_pool[blocks, :, rows].transpose(0, 1)
        k = quant.dequantize(k, case.kv_dtype, k_scale, k_zp).double().repeat_interleave(num_heads // num_kv_heads, 0)
        v = quant.dequantize(v, case.kv_dtype, v_scale, v_zp).double().repeat_interleave(num_heads // num_kv_heads, 0)
        scores = torch.einsum("hd,hnd->hn", case.q[b].double(), k) * case.softmax_scale
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(scores, dim=-1), v)
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, atol: float = 1e-5) -> None:
    """|got - want| <= atol + rtol |want| everywhere (NaN fails)."""
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    ok = err <= bound
    assert ok.all(), f"{what}: max err {err.max():.3g}, worst ratio {(err / bound).nan_to_num(math.inf).max():.3g}"


# ---- the PyTorch reference against dense attention ------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("block_size, dim", [(16, 64), (64, 128), (5, 64)])
def test_reference_equals_dense_attention(kv_dtype, block_size, dim):
    for group in (1, 3, 8):
        case = make_case(kv_dtype, dim, 2, group, block_size, lengths_for(block_size), seed=group * 7 + block_size)
        want = dense_attention(case)
        got = decode_attention_torch(*case.args())
        assert got.dtype == torch.float32 and got.shape == case.q.shape
        assert_close(got, want, 1e-4, f"G={group}")
        assert (got[2] == 0).all()  # the empty sequence


def test_reference_chunks_long_sequences_and_low_precision_q(monkeypatch):
    """Several online-softmax chunks (CHUNK shrunk to 7 positions); fp16 / bf16 q computes in that dtype."""
    import runtime.cpu_attention as cpu_attention

    monkeypatch.setattr(cpu_attention, "CHUNK", 7)
    case = make_case("int8", 64, 3, 3, 5, [40, 1, 23], seed=3)
    want = dense_attention(case)
    assert_close(decode_attention_torch(*case.args()), want, 1e-4, "fp32")
    # scores, p and p @ v rounded to 11 (fp16) or 8 (bf16) significant bits, values of magnitude ~1
    for dtype, rtol, atol in ((torch.float16, 1e-2, 5e-3), (torch.bfloat16, 5e-2, 4e-2)):
        case.q = case.q.to(dtype)
        got = decode_attention_torch(*case.args())
        assert got.dtype == dtype
        assert_close(got, dense_attention(case), rtol, str(dtype), atol=atol)


def test_poison_is_seen_when_read():
    """The tests have teeth: one row past the length reads poison, and the result turns NaN."""
    case = make_case("fp16", 64, 2, 1, 16, lengths_for(16), seed=4)  # lengths 1, 16, 0, 46, 45
    case.lengths = torch.tensor([2, 16, 0, 47, 46])  # rows 1, 46 and 45 of their last blocks were never written
    out = decode_attention_torch(*case.args())
    assert out[[0, 3, 4]].isnan().all() and not out[[1, 2]].isnan().any()


# ---- the C++ kernel against the reference ---------------------------------------------------------------------

needs_cpp = pytest.mark.skipif(_cpp_module() is None, reason="the C++ kernel does not build here (needs g++, AVX2)")


@needs_cpp
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("block_size", [16, 64, 5])
@pytest.mark.parametrize("dim", [64, 128])
def test_cpp_kernel_equals_reference(kv_dtype, block_size, dim, cpu_kernel_build):
    for group, index_dtype in ((1, torch.int64), (3, torch.int32), (8, torch.int64)):
        lengths = lengths_for(block_size)
        case = make_case(
            kv_dtype, dim, 2, group, block_size, lengths, seed=dim + block_size + group, index_dtype=index_dtype
        )
        want = decode_attention_torch(*case.args())
        # chunk 0: the kernel's own plan (whole sequences here); 7: several chunks per sequence, merged split-K
        for chunk in (0, 7):
            got = decode_attention_cpp(*case.args(), chunk=chunk)
            assert got.dtype == torch.float32 and got.shape == case.q.shape
            assert_close(got, want, 1e-4, f"G={group} chunk={chunk}")
            assert (got[2] == 0).all()  # the empty sequence


@needs_cpp
@pytest.mark.parametrize("lengths", [[3000], [700, 1, 333, 900, 64, 0, 257, 512]], ids=["batch1-long", "batch8"])
def test_cpp_kernel_parallel_split_k(lengths, cpu_kernel_build):
    """Enough work for the OpenMP path and the kernel's own chunk plan: a single long sequence is split over
    the threads, a batch of uneven sequences too."""
    case = make_case("fp8_e4m3", 64, 3, 3, 16, lengths, seed=len(lengths))
    assert_close(decode_attention_cpp(*case.args()), decode_attention_torch(*case.args()), 1e-4, "auto plan")


# bf16 q: the output's own rounding to bf16 (<= 2^-8 |x|), plus 2^-12 of the largest |output| for the kernel: a
# bf16 q runs the integer path on q's int16 part alone (2^-16 of its largest element), whose score errors shift
# near-zero outputs by ~2^-15 of the largest (more than their own rounding, 2^-8 of a small |x|); q in int8 would
# leave ~2^-8
BF16_RTOL, BF16_ATOL = 2**-8, 2**-12


@needs_cpp
def test_cpp_kernel_low_precision_q():
    """q in fp16 / bf16 with a group of 8 query heads: fp16 q is read exactly (the fp32 reference on the same q,
    rounded); bf16 q within BF16_RTOL / BF16_ATOL (the integer path on VNNI CPUs takes q's int16 part alone)."""
    case = make_case("int8", 128, 1, 8, 16, lengths_for(16), seed=5)
    for dtype in (torch.float16, torch.bfloat16):
        case.q = case.q.to(dtype)
        got = decode_attention_cpp(*case.args(), chunk=7)
        want = decode_attention_torch(case.q.float(), *case.args()[1:])
        assert got.dtype == dtype
        if dtype == torch.float16:
            assert_close(got, want, 1e-3, str(dtype))
        else:
            assert_close(got, want, BF16_RTOL, str(dtype), atol=BF16_ATOL * float(want.abs().max()))


@needs_cpp
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dim", [64, 128])
def test_cpp_kernel_bf16_q_loses_only_the_output_rounding(kv_dtype, dim, cpu_kernel_build):
    """bf16 q (the engine's compute dtype on CPUs with native bf16) on every build and kind: the fp32 reference on
    the same q values, rounded once to bf16, within BF16_RTOL / BF16_ATOL."""
    case = make_case(kv_dtype, dim, 2, 3, 16, lengths_for(16), seed=dim + 17, q_dtype=torch.bfloat16)
    want = decode_attention_torch(case.q.float(), *case.args()[1:])
    for chunk in (0, 7):
        got = decode_attention_cpp(*case.args(), chunk=chunk)
        assert got.dtype == torch.bfloat16
        assert_close(got, want, BF16_RTOL, f"chunk={chunk}", atol=BF16_ATOL * float(want.abs().max()))


def test_decode_attention_picks_an_implementation():
    """The C++ kernel where it applies (equal to calling it), the reference otherwise (head size 32 here)."""
    case = make_case("fp16", 64, 2, 3, 16, lengths_for(16), seed=1)
    impl = decode_attention_cpp if _cpp_module() is not None else decode_attention_torch
    assert torch.equal(decode_attention(*case.args()), impl(*case.args()))
    small = make_case("int8", 32, 2, 3, 5, lengths_for(5), seed=2)
    assert torch.equal(decode_attention(*small.args()), decode_attention_torch(*small.args()))


# ---- invalid arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "impl", [decode_attention_torch, pytest.param(decode_attention_cpp, marks=needs_cpp)], ids=["torch", "cpp"]
)
def test_invalid_arguments_raise(impl):
    case = make_case("int8", 64, 2, 3, 16, [20, 5], seed=9)
    args = list(case.args())
    too_long = args.copy()
    too_long[4] = torch.tensor([20, case.block_tables.shape[1] * 16 + 1])
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        impl(*too_long)
    bad_block = args.copy()
    bad_block[3] = case.block_tables.clone()
    bad_block[3][0, 1] = case.k_pool.shape[0]  # the second block of a 20-token sequence is needed
    with pytest.raises(ValueError, match=r"block_tables\[0, 1\]"):
        impl(*bad_block)
    gqa = args.copy()
    gqa[0] = case.q[:, :5]  # 5 query heads over 2 KV heads
    with pytest.raises(ValueError, match="H a multiple of H_kv"):
        impl(*gqa)
    table = args.copy()
    table[3] = case.block_tables[:1]
    with pytest.raises(ValueError, match="block_tables must be"):
        impl(*table)
    param = args.copy()
    param[5] = torch.ones(3)
    with pytest.raises(ValueError, match="k_scale"):
        impl(*param)


@needs_cpp
@pytest.mark.parametrize("kv_dtype", ["int8", "fp16"])
def test_cpp_kernel_as_exact_as_fp32_on_sharp_attention(kv_dtype, cpu_kernel_build):
    """Peaked softmax (q x 12: a few rows hold most of the weight, thousands hold weights below 2^-15 of the
    largest) over a long context, against float64 dense attention: the integer dot-product path splits q and the
    weights into two int16 parts, so its error stays at fp32's level (a single int16 part leaves ~1e-3 here)."""
    case = make_case(kv_dtype, 64, 2, 3, 16, [2000, 777], seed=11)
    case.q = case.q * 12
    want = dense_attention(case)
    got = decode_attention_cpp(*case.args())
    assert_close(got, want, 1e-5, "sharp", atol=1e-5)


@needs_cpp
def test_attention_benchmark_tool_reports_its_own_arithmetic(tmp_path):
    """tools/bench_decode.py --attention-only, run as a user runs it, for a static, an online and the INT4 cache:
    one line per KV dtype, and each line's GB/s is the cache bytes of the shape (data plus the online modes'
    per-row parameters, quant.kv_row_bytes) over its printed time, a fraction of the printed read bandwidth."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    kvs = ["fp16", "int8", "int4_per_token_head"]
    cmd = [sys.executable, str(root / "tools" / "bench_decode.py"), "--attention-only", "--shapes", "2x128"]
    out = subprocess.run([*cmd, "--impls", ",".join(kvs)], capture_output=True, text=True, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr
    pat = r"(\S+) b2 x 128 +([\d.]+) ms/layer +([\d.]+) GB/s = +(\d+)% of the measured read bandwidth \(([\d.]+) GB/s\)"
    rows = {m[1]: m for m in re.finditer(pat, out.stdout)}
    assert list(rows) == kvs, out.stdout
    for kv, m in rows.items():
        ms, gbs, pct, bw = float(m[2]), float(m[3]), int(m[4]), float(m[5])
        read = 2 * 2 * 128 * 3 * quant.kv_row_bytes(kv, 64)  # K and V rows of 2 sequences x 128 tokens x 3 heads
        assert ms > 0.0005 and bw > 0
        # printed to 0.001 ms and 0.1 GB/s: the bytes over the time's rounding interval, give or take 0.05 GB/s
        assert read / (ms + 5e-4) / 1e6 - 0.05 <= gbs <= read / (ms - 5e-4) / 1e6 + 0.05, (kv, m[0])
        assert abs(pct - 100 * gbs / bw) <= 1, m[0]
