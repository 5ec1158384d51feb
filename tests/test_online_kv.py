"""The online per-(token, KV head) KV modes: the format against formulas written out here, INT4 packing, the
Hadamard rotation, the cache's data and parameter pools, and decode attention (torch reference and C++ kernel
kinds 4-6) against dense attention over the dequantized rows. No model needed (engine: test_serving_engine)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_paged_attention import BF16_ATOL, BF16_RTOL, assert_close

from runtime import cpu_write, quant
from runtime.cpu_attention import _cpp_module, decode_attention_cpp, decode_attention_torch
from runtime.kv_cache import KVCache, OnlineQuantizer, key_plan, rotation_for

ONLINE = ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head")
INTEGER = {"int8_per_token_head": 255, "int4_per_token_head": 15}  # top code: 2^bits - 1

needs_cpp = pytest.mark.skipif(_cpp_module() is None, reason="the C++ kernel does not build here (no AVX2/g++)")


# ---------------------------------------------------------------------------------------------
# Formulas, written out independently of runtime.quant


def ref_int(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per row: scale = fp16((max - min) / top), zero = fp16(min),
    q = clamp(round_half_even((x - zero) / scale), 0, top) (0 where scale is 0); -> (codes, scale, zero)."""
    x = x.double()
    scale = ((x.amax(-1) - x.amin(-1)) / top).half().double()
    zero = x.amin(-1).half().double()
    q = torch.zeros_like(x)
    live = scale > 0
    q[live] = torch.round((x[live] - zero[live, None]) / scale[live, None]).clamp(0, top)
    return q, scale, zero


def ref_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax per row: scale = fp16(absmax / 448), f = e4m3(clamp(x / scale, +-448)); -> (f as float, scale)."""
    x = x.double()
    scale = (x.abs().amax(-1) / 448.0).half().double()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.where(scale[:, None] > 0, x / safe[:, None], torch.zeros_like(x)).clamp(-448, 448)
    return y.float().to(torch.float8_e4m3fn).double(), scale


def codes(data: torch.Tensor, kv: str) -> torch.Tensor:
    """Stored data -> one code per element (INT4: element 2i is the low nibble of byte i, 2i + 1 the high)."""
    if kv == "int4_per_token_head":
        return torch.stack((data & 0xF, data >> 4), -1).flatten(-2).double()
    return data.double()


def rows(seed: int = 0, n: int = 64, d: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 8 + torch.randn(n, 1, generator=g)


@pytest.mark.parametrize("kv", INTEGER)
def test_integer_modes_follow_the_asymmetric_formula(kv):
    x = rows()
    data, params = quant.quantize_online(x, kv)
    q, scale, zero = ref_int(x, INTEGER[kv])
    assert data.dtype == torch.uint8 and data.shape == (64, 64 if kv.startswith("int8") else 32)
    assert params.dtype == torch.float16 and params.shape == (64, 2)
    assert torch.equal(codes(data, kv), q)
    assert torch.equal(params.double(), torch.stack((scale, zero), -1))
    back = quant.dequantize_online(data, params, kv)
    assert torch.allclose(back.double(), q * scale[:, None] + zero[:, None], atol=1e-6, rtol=1e-6)
    assert ((back - x).abs() <= scale[:, None].float() * 0.5 + 1e-2).all()  # half a step (+ fp16 param rounding)


@pytest.mark.parametrize("kv", INTEGER)
def test_integer_rounding_at_both_ends_is_half_to_even(kv):
    top = INTEGER[kv]
    # min 0 and max top: scale 1, zero 0 exactly; halves round to even, the ends map to codes 0 and top
    x = torch.tensor([[0.0, float(top), 0.5, 1.5, 2.5, top - 0.5, top - 1.5, 0.49, top - 0.51, 1.0] + [3.0] * 6])
    data, params = quant.quantize_online(x, kv)
    want = [0, top, 0, 2, 2, top - 1, top - 1, 0, top - 1, 1] + [3] * 6
    assert codes(data, kv)[0].tolist() == want
    assert params[0].tolist() == [1.0, 0.0]
    # a negative range, scale 0.5: (x - zero) / scale = 2 * (x + 4)
    x = torch.tensor([[-4.0, -4.0 + top / 2, -3.75, -3.25, -2.75] + [-4.0] * 11])
    assert codes(quant.quantize_online(x, kv)[0], kv)[0, :5].tolist() == [0, top, 0, 2, 2]


@pytest.mark.parametrize("kv", ONLINE)
@pytest.mark.parametrize("value", [0.0, 3.25, -1000.0, 0.1])
def test_all_equal_rows_and_zeros_read_back_without_nan(kv, value):
    x = torch.full((3, 64), value)
    data, params = quant.quantize_online(x, kv)
    back = quant.dequantize_online(data, params, kv)
    assert torch.isfinite(back).all()
    if kv == "fp8_per_token_head":  # absmax: the row is +-448 x scale, E4M3's top value
        assert params[:, 1].eq(0).all() and data.float().abs().eq(448 if value else 0).all()
        assert torch.allclose(back, x, rtol=2**-4, atol=0)
        return
    assert params[:, 0].eq(0).all()  # integer modes: scale 0, the division is skipped, codes 0
    assert codes(data, kv).eq(0).all()
    assert back.eq(torch.tensor(value).half().item()).all()  # x^ = zero = fp16(min)


def ulp16(x: torch.Tensor) -> torch.Tensor:
    """Spacing of fp16 at |x| (subnormals: 2^-24)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2**-14)))
    return torch.exp2(e - 10)


@pytest.mark.parametrize("kv", INTEGER)
@pytest.mark.parametrize("magnitude", [1e4, 1e-4])
def test_integer_extreme_ranges_stay_within_a_step(kv, magnitude):
    x = rows(seed=1) / 8 * magnitude
    data, params = quant.quantize_online(x, kv)
    q, scale, zero = ref_int(x, INTEGER[kv])
    assert torch.equal(codes(data, kv), q)
    back = quant.dequantize_online(data, params, kv).double()
    assert torch.isfinite(back).all()
    # half a step, plus what fp16 parameters lose: zero's rounding, and top x scale's rounding
    exact = (x.double().amax(-1) - x.double().amin(-1)) / INTEGER[kv]
    bound = scale / 2 + ulp16(x.amin(-1)).double() / 2 + INTEGER[kv] * (scale - exact).abs()
    assert ((back - x.double()).abs() <= bound[:, None] * 1.001 + 1e-12).all()


@pytest.mark.parametrize("magnitude", [1.0, 1e4, 1e-3])
def test_fp8_follows_the_absmax_formula(magnitude):
    x = rows(seed=2) * magnitude
    data, params = quant.quantize_online(x, "fp8_per_token_head")
    f, scale = ref_fp8(x)
    assert data.dtype == torch.float8_e4m3fn and params[:, 1].eq(0).all()
    assert torch.equal(data.double(), f) and torch.equal(params[:, 0].double(), scale)
    assert not torch.isnan(data.float()).any()
    amax_code = data.float().abs().amax(-1)
    assert ((amax_code >= 416) & (amax_code <= 448)).all()  # each row's largest value near the top of E4M3
    back = quant.dequantize_online(data, params, "fp8_per_token_head")
    assert torch.allclose(back.double(), f * scale[:, None], rtol=1e-6, atol=0)
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal spacing 2^-9 x scale near zero
    err = (back.double() - x.double()).abs()
    assert (err <= x.double().abs() * 2**-4 * 1.01 + scale[:, None] * 2**-9 + 1e-3 * scale[:, None] * 448 * 2**-4).all()


def test_fp8_saturates_instead_of_overflowing():
    x = torch.tensor([[1.0, -1.0] + [0.0] * 14])
    data, params = quant.quantize_online(x, "fp8_per_token_head")
    scale = params[0, 0].double()
    assert scale < 1 / 448  # fp16 rounded the scale down: 1 / scale > 448, clamped to the largest E4M3 value
    assert data.float()[0, :2].tolist() == [448.0, -448.0]


def test_int4_packing_round_trips_and_puts_even_elements_low():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (5, 3, 64), generator=g, dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.shape == (5, 3, 32) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed), q)
    assert quant.pack_int4(torch.tensor([1, 2, 15, 0])).tolist() == [0x21, 0x0F]
    assert quant.unpack_int4(torch.tensor([0x21, 0xF0], dtype=torch.uint8)).tolist() == [1, 2, 0, 15]


def test_row_bytes_count_the_parameters():
    assert quant.online_row_bytes("int8_per_token_head", 128) == 128 + 4
    assert quant.online_row_bytes("fp8_per_token_head", 64) == 64 + 4
    # INT4: V rows 32 + 4; K rows 32 + a (scale, zero) per channel per block of 64 rows (4 * 64 / 64 bytes)
    assert quant.online_row_bytes("int4_per_token_head", 64) == 32 + 4
    assert quant.online_row_bytes("int4_per_token_head", 128) == 64 + (8 + 4) / 2
    assert quant.online_row_bytes("int4_per_token_head", 64, block_size=16) == 32 + (16 + 4) / 2
    assert quant.kv_row_bytes("fp16", 64) == 128 and quant.kv_row_bytes("int8", 64) == 64


# ---------------------------------------------------------------------------------------------
# Rotation


@pytest.mark.parametrize("d", [64, 128])
def test_hadamard_is_orthonormal_seeded_and_keeps_q_dot_k(d):
    r = quant.hadamard(d, seed=0)
    assert r.shape == (d, d) and r.dtype == torch.float32
    assert torch.allclose(r @ r.T, torch.eye(d), atol=1e-5)
    assert torch.allclose(r.abs(), torch.full((d, d), 1 / math.sqrt(d)))  # +-1/sqrt(d): a signed Hadamard
    assert torch.equal(r, quant.hadamard(d, seed=0)) and not torch.equal(r, quant.hadamard(d, seed=1))
    g = torch.Generator().manual_seed(d)
    q, k = torch.randn(7, d, generator=g), torch.randn(9, d, generator=g)
    assert torch.allclose((q @ r) @ (k @ r).T, q @ k.T, atol=1e-4)
    assert torch.allclose((k @ r) @ r.T, k, atol=1e-5)


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x[:, 5] += 40  # one outlier channel, as K often has
    err = {}
    for rot in (None, quant.hadamard(64)):
        q = OnlineQuantizer("int4_per_token_head", rot)
        data, params = q.quantize(x)
        err[rot is None] = (q.dequantize(data, params, torch.float32) - x).pow(2).mean()
    assert err[False] < err[True] / 4


def test_rotation_settings():
    assert rotation_for("int4_per_token_head", 64, "off") is None
    assert torch.equal(rotation_for("int8_per_token_head", 64, "on"), quant.hadamard(64, 0))
    assert rotation_for("int4_per_token_head", 96, "auto") is None  # not a power of two: left unrotated
    with pytest.raises(ValueError, match=r"power-of-two.*size_per_head is 96: use kv_rotation auto or off"):
        rotation_for("int4_per_token_head", 96, "on")


# ---------------------------------------------------------------------------------------------
# The cache


@pytest.mark.parametrize("kv", ["int8_per_token_head", "fp8_per_token_head"])
@pytest.mark.parametrize("rotate", [False, True])
def test_cache_writes_data_and_params_at_the_slots_and_reads_back(kv, rotate):
    L, H, NB, BS, D = 2, 3, 6, 4, 16
    rot = quant.hadamard(D, 3) if rotate else None
    cache = KVCache(L, NB, H, BS, D, OnlineQuantizer(kv, rot))
    width = D
    assert cache.k[1].shape == (NB, H, BS, width) and cache.k[1].dtype == quant.ONLINE_STORAGE[kv]
    assert cache.k_param[1].shape == (NB, H, BS, 2) and cache.k_param[1].dtype == torch.float16
    assert cache.nbytes() == 2 * L * NB * H * BS * quant.online_row_bytes(kv, D)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, H, D, generator=g) * 2, torch.randn(5, H, D, generator=g)
    slots = torch.tensor([5 * BS + 2, 5 * BS + 3, 2 * BS, 2 * BS + 1, 2 * BS + 2])  # blocks [5, 2] from row 2
    cache.write(1, slots, k, v)
    basis = (lambda x: x @ rot) if rotate else (lambda x: x)
    for x, data, param in ((k, cache.k[1], cache.k_param[1]), (v, cache.v[1], cache.v_param[1])):
        want_data, want_params = quant.quantize_online(basis(x), kv)
        got_data = data[slots // BS, :, slots % BS]  # (5, H, width)
        assert torch.equal(got_data.view(torch.uint8), want_data.view(torch.uint8))
        assert torch.equal(param[slots // BS, :, slots % BS], want_params)
    assert (cache.k_param[0] == 0).all() and (cache.k[0].view(torch.uint8) == 0).all()  # other layer untouched
    kb, vb = cache.read(1, torch.tensor([[5, 2]]), 7, torch.float32)  # (1, H, 7, D), positions 2..6 written
    tol = {"int8_per_token_head": 0.05, "fp8_per_token_head": 0.5}[kv]
    assert torch.allclose(kb[0, :, 2:].transpose(0, 1), k, atol=tol)
    assert torch.allclose(vb[0, :, 2:].transpose(0, 1), v, atol=tol / 2)


def int8_rows_read_back(x: torch.Tensor) -> torch.Tensor:
    """int8_per_token_head's read-back of rows x (..., D), from the formula: codes * scale + zero."""
    q, scale, zero = ref_int(x, 255)
    return q * scale.unsqueeze(-1) + zero.unsqueeze(-1)


def ref_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (bs, D): the asymmetric 4-bit formula per channel over the rows -> (codes (bs, D), scale (D,), zero (D,))."""
    q, scale, zero = ref_int(x.T, 15)
    return q.T, scale, zero


@pytest.mark.parametrize("rotate", [False, True])
def test_int4_keys_open_rows_then_per_channel_blocks(rotate):
    """int4_per_token_head keys, step by step (BS 8, D 16): rows of an open block are int8 rows in the half-block
    layout (rows 0-3 in the block, 4-7 in the helper block after it, (scale, zero) pairs in the (2, D) param
    region); the write of a block's last row quantizes the block per channel from the int8 read-back of its rows.
    Values stay per row. Everything against the formulas above."""
    L, H, NB, BS, D = 1, 2, 6, 8, 16
    rot = quant.hadamard(D, 1) if rotate else None
    cache = KVCache(L, NB, H, BS, D, OnlineQuantizer("int4_per_token_head", rot))
    assert cache.k[0].shape == (NB, H, BS, D // 2) and cache.k_param[0].shape == (NB, H, 2, D)
    assert cache.v_param[0].shape == (NB, H, BS, 2)
    ids = [4, 1, 5]
    g = torch.Generator().manual_seed(2)
    k = torch.randn(13, H, D, generator=g) * 3 + torch.randn(1, H, D, generator=g) * 5
    v = torch.randn(13, H, D, generator=g)
    basis = (lambda x: x.double() @ rot.double()) if rotate else (lambda x: x.double())
    kr = basis(k)  # (13, H, D) the stored basis
    for start, n in ((0, 3), (3, 3), (6, 1), (7, 4), (11, 2)):  # a prefill, chunks, single rows; 13 = 8 + 5
        pos = torch.arange(start, start + n)
        slots = torch.tensor(ids)[pos // BS] * BS + pos % BS
        cache.write(0, slots, k[start : start + n], v[start : start + n], key_plan([ids], [start], [n], BS))
        end = start + n
        if end < BS:  # block 4 open: rows [0, end) as int8 rows
            want = int8_rows_read_back(kr[:end])  # (end, H, D)
            for r in range(end):
                page = ids[0] if r < BS // 2 else ids[1]
                rr = r % (BS // 2)
                raw = cache.k[0][page].view(H, BS // 2, D)[:, rr].double()  # (H, D) uint8 codes
                pair = cache.k_param[0][page].view(H, D, 2)[:, rr].double()  # (H, 2)
                got = raw * pair[:, :1] + pair[:, 1:]
                assert torch.allclose(got, want[r], atol=1e-9, rtol=0), (start, r)
    # block 4 complete (written by the (7, 4) step from open rows 0-6 and the fresh row 7): per channel
    x8 = int8_rows_read_back(kr[:BS])  # (BS, H, D)
    for h in range(H):
        q, scale, zero = ref_channels(x8[:, h])
        assert torch.equal(quant.unpack_int4(cache.k[0][ids[0], h]).double(), q)
        assert torch.equal(cache.k_param[0][ids[0], h].double(), torch.stack((scale, zero)))
    # values: per row as ever
    vd, vp = quant.quantize_online(basis(v).float(), "int4_per_token_head")
    pos = torch.arange(13)
    assert torch.equal(cache.v[0][torch.tensor(ids)[pos // BS], :, pos % BS], vd)
    assert torch.equal(cache.v_param[0][torch.tensor(ids)[pos // BS], :, pos % BS], vp)
    # read-back (un-rotated): the full block per channel, the open block's 5 rows as int8 rows
    kb, _ = cache.read(0, torch.tensor([ids]), 13, torch.float64)
    want = torch.cat([x8, int8_rows_read_back(kr[BS:13])])
    for h in range(H):
        q, scale, zero = ref_channels(x8[:, h])
        want[:BS, h] = q * scale + zero
    unrot = (lambda x: x @ rot.double().T) if rotate else (lambda x: x)
    assert torch.allclose(kb[0].transpose(0, 1), unrot(want), atol=1e-5)
    assert torch.allclose(kb[0].transpose(0, 1), k.double(), atol=0.5 * k.abs().max().item() / 15 + 0.1)


def test_int4_block_completed_in_one_write_needs_no_helper():
    """A prefill of exactly one block: per-channel codes at once; the plan names no helper."""
    H, BS, D = 1, 4, 16
    cache = KVCache(1, 3, H, BS, D, OnlineQuantizer("int4_per_token_head"))
    plan = key_plan([[2]], [0], [BS], BS)
    assert plan.helper.tolist() == [-1] * BS and plan.complete.tolist() == [[2, -1, 0, 0]]
    k = torch.randn(BS, H, D, generator=torch.Generator().manual_seed(3))
    cache.write(0, 2 * BS + torch.arange(BS), k, k, plan)
    q, scale, zero = ref_channels(int8_rows_read_back(k)[:, 0])
    assert torch.equal(quant.unpack_int4(cache.k[0][2, 0]).double(), q)
    assert torch.equal(cache.k_param[0][2, 0].double(), torch.stack((scale, zero)))
    with pytest.raises(ValueError, match="key_plan"):
        cache.write(0, 2 * BS + torch.arange(BS), k, k)
    with pytest.raises(ValueError, match="helper"):  # an open block with nothing after it in the table
        key_plan([[2]], [0], [3], BS)
    with pytest.raises(ValueError, match="block_size"):
        KVCache(1, 3, H, 6 * D, D, OnlineQuantizer("int4_per_token_head"))


def test_key_plan_lists_open_rows_and_completed_blocks():
    # sequence 0: blocks [7, 3, 9], rows 6..17 with BS 8: 6-7 complete block 7 (rows 0-5 written earlier),
    # 8-15 fill block 3 whole, 16-17 open block 9 whose helper is missing -> sequence 0 gets a 4th block
    plan = key_plan([[7, 3, 9, 2], [5, 6]], [6, 0], [12, 3], 8)
    assert plan.helper.tolist() == [-1] * 10 + [2, 2] + [6, 6, 6]
    assert plan.complete.tolist() == [[7, 3, 6, 0], [3, 9, 0, 2]]


@pytest.mark.parametrize("kv", ONLINE)
def test_cache_decode_with_rotation_equals_dense_attention_over_the_read_back(kv):
    H, Hkv, NB, BS, D = 4, 2, 8, 4, 64
    cache = KVCache(1, NB, Hkv, BS, D, OnlineQuantizer(kv, quant.hadamard(D, 0)))
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(10, Hkv, D, generator=g), torch.randn(10, Hkv, D, generator=g)
    table = torch.tensor([[6, 1, 3, 5]])  # 3 blocks of 4 for 10 rows, and INT4's helper block for the open one
    pos = torch.arange(10)
    for a, b in ((0, 7), (7, 10)):
        plan = key_plan(table.tolist(), [a], [b - a], BS)
        cache.write(0, table[0, pos[a:b] // BS] * BS + pos[a:b] % BS, k[a:b], v[a:b], plan)
    q = torch.randn(1, H, D, generator=g)
    out = cache.decode_attention(0, q, table, torch.tensor([10]), 0.125)
    kb, vb = cache.read(0, table, 10, torch.float32)  # un-rotated (1, Hkv, 10, D)
    kb, vb = kb.repeat_interleave(H // Hkv, 1), vb.repeat_interleave(H // Hkv, 1)
    p = torch.softmax((q.unsqueeze(2) @ kb.transpose(-1, -2)) * 0.125, -1)  # (1, H, 1, 10)
    assert torch.allclose(out, (p @ vb).squeeze(2), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Decode attention: reference and C++ kernel


def paged_case(kv: str, B: int, H: int, Hkv: int, D: int, BS: int, lengths: list[int], seed: int = 0):
    """Random rows quantized into a pool, shuffled block tables padded with -1, q; plus the dequantized pools.

    int4_per_token_head keys: random bytes and parameters, read back from the layout written out here: the full
    blocks' codes * per-channel scale + zero, the open block's rows r as int8 rows (codes * scale + zero of the
    pair) in the block for r < BS / 2, else in the helper block after it (which the table then holds)."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // BS) for n in lengths) + 1
    NB = B * max_blocks + 3
    shape = (NB, Hkv, BS, D)
    k = torch.randn(shape, generator=g) * 2 + torch.randn(1, Hkv, 1, D, generator=g)
    v = torch.randn(shape, generator=g)
    kd, kp = quant.quantize_online(k, kv)
    vd, vp = quant.quantize_online(v, kv)
    perm = torch.randperm(NB, generator=g)
    tables = torch.full((B, max_blocks), -1, dtype=torch.int32)
    channel = kv == "int4_per_token_head"
    for b, n in enumerate(lengths):
        used = -(-n // BS) + (channel and n % BS > BS // 2)
        tables[b, :used] = perm[b * max_blocks : b * max_blocks + used].int()
    q = torch.randn(B, H, D, generator=g)
    dense = (quant.dequantize_online(kd, kp, kv), quant.dequantize_online(vd, vp, kv))
    if channel:
        kd = torch.randint(0, 256, (NB, Hkv, BS, D // 2), generator=g, dtype=torch.uint8)
        kp = (torch.rand(NB, Hkv, 2, D, generator=g) * 0.5 - 0.1).half()
        kf = torch.zeros(shape)
        for b, n in enumerate(lengths):
            for t in range(n):
                page, r = int(tables[b, t // BS]), t % BS
                if t < n // BS * BS:  # full block: per channel
                    kf[page, :, r] = codes(kd[page, :, r], kv).float() * kp[page, :, 0].float() + kp[page, :, 1].float()
                else:  # open row
                    src = page if r < BS // 2 else int(tables[b, t // BS + 1])
                    rr = r % (BS // 2)
                    pair = kp[src].view(Hkv, D, 2)[:, rr].float()  # (Hkv, 2)
                    kf[page, :, r] = kd[src].view(Hkv, BS // 2, D)[:, rr].float() * pair[:, :1] + pair[:, 1:]
        dense = (kf, dense[1])
    return q, kd, vd, kp, vp, tables, torch.tensor(lengths), dense


def dense_attention(q, k_pool, v_pool, tables, lengths, scale):
    B, H, D = q.shape
    Hkv, BS = k_pool.shape[1], k_pool.shape[2]
    out = torch.zeros(B, H, D)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        pos = torch.arange(n)
        pages = tables[b, pos // BS].long()
        kk = k_pool[pages, :, pos % BS].transpose(0, 1).repeat_interleave(H // Hkv, 0)  # (H, n, D)
        vv = v_pool[pages, :, pos % BS].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        p = torch.softmax((q[b].unsqueeze(1) @ kk.transpose(-1, -2)).squeeze(1) * scale, -1)  # (H, n)
        out[b] = (p.unsqueeze(1) @ vv).squeeze(1)
    return out


def call(impl, case, kv, scale=0.125, **kw):
    q, kd, vd, kp, vp, tables, lengths, _ = case
    none = (None, None, None, None)
    return impl(q, kd, vd, tables, lengths, *none, scale, kv_dtype=kv, k_param=kp, v_param=vp, **kw)


@pytest.mark.parametrize("kv", ONLINE)
@pytest.mark.parametrize("G", [1, 3, 8])
def test_reference_equals_dense_attention_over_dequantized_rows(kv, G):
    case = paged_case(kv, B=3, H=2 * G, Hkv=2, D=64, BS=16, lengths=[37, 1, 0])
    q, _, _, _, _, tables, lengths, (kf, vf) = case
    got = call(decode_attention_torch, case, kv)
    assert torch.allclose(got, dense_attention(q, kf, vf, tables, lengths, 0.125), atol=1e-4)
    assert got[2].eq(0).all()  # length 0: zero output


@needs_cpp
@pytest.mark.parametrize("kv", ONLINE)
@pytest.mark.parametrize("G, D", [(1, 64), (3, 128), (8, 64)])
@pytest.mark.parametrize("chunk", [0, 24])
def test_cpp_kernel_equals_the_reference(kv, G, D, chunk, cpu_kernel_build):
    case = paged_case(kv, B=4, H=2 * G, Hkv=2, D=D, BS=16, lengths=[37, 1, 100, 0], seed=G + D)
    want = call(decode_attention_torch, case, kv)
    got = call(decode_attention_cpp, case, kv, chunk=chunk)  # chunk 24: several split-K items per sequence
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)


@needs_cpp
@pytest.mark.parametrize("kv", ONLINE)
@pytest.mark.parametrize("D", [64, 128])
def test_cpp_kernel_bf16_q_loses_only_the_output_rounding(kv, D, cpu_kernel_build):
    """bf16 q on every build: the fp32 reference on the same q values, rounded once to bf16, within the static
    kinds' BF16_RTOL / BF16_ATOL (tests/test_paged_attention: the integer path's single int16 part of q)."""
    q, *rest = paged_case(kv, B=4, H=6, Hkv=2, D=D, BS=16, lengths=[37, 1, 100, 0], seed=D + 3)
    q = q.to(torch.bfloat16)
    want = call(decode_attention_torch, (q.float(), *rest), kv)
    for chunk in (0, 24):
        got = call(decode_attention_cpp, (q, *rest), kv, chunk=chunk)
        assert got.dtype == torch.bfloat16
        assert_close(got, want, BF16_RTOL, f"chunk={chunk}", atol=BF16_ATOL * float(want.abs().max()))


@needs_cpp
@pytest.mark.parametrize("kv", ONLINE)
@pytest.mark.parametrize("lengths", [[3000], [700, 1, 333, 900, 64, 0, 257, 512]], ids=["batch1-long", "batch8"])
def test_cpp_kernel_parallel_split_k_on_odd_blocks(kv, lengths, cpu_kernel_build):
    """Enough work for the OpenMP path and the kernel's own chunk plan, blocks of 5 rows (INT4: 6, it needs even)."""
    BS = 6 if kv == "int4_per_token_head" else 5
    case = paged_case(kv, B=len(lengths), H=6, Hkv=2, D=64, BS=BS, lengths=lengths, seed=len(lengths))
    assert torch.allclose(call(decode_attention_cpp, case, kv), call(decode_attention_torch, case, kv), atol=2e-5)


@needs_cpp
@pytest.mark.parametrize("kv", ONLINE)
def test_cpp_kernel_never_reads_rows_past_the_length(kv):
    case = paged_case(kv, B=2, H=3, Hkv=1, D=64, BS=16, lengths=[21, 5])
    q, kd, vd, kp, vp, tables, lengths, _ = case
    want = call(decode_attention_cpp, case, kv)
    for b, n in enumerate(lengths.tolist()):  # poison every unused row's parameters in the used blocks
        for t in range(n, tables.shape[1] * 16):
            page = int(tables[b, t // 16])
            if page >= 0:
                vp[page, :, t % 16] = float("nan")
                if kv != "int4_per_token_head":
                    kp[page, :, t % 16] = float("nan")
                elif t // 16 == n // 16:  # INT4 keys: the open block's unused (scale, zero) pairs
                    src = page if t % 16 < 8 else int(tables[b, t // 16 + 1])
                    kp[src].view(-1, 64, 2)[:, t % 8] = float("nan")
    got = call(decode_attention_cpp, case, kv)
    assert torch.equal(got, want)


def test_online_arguments_are_checked():
    case = paged_case("int4_per_token_head", B=1, H=2, Hkv=1, D=64, BS=16, lengths=[5])
    q, kd, vd, kp, vp, tables, lengths, _ = case
    none = (None, None, None, None)
    with pytest.raises(ValueError, match="k_param must be"):
        decode_attention_torch(q, kd, vd, tables, lengths, *none, 0.1, kv_dtype="int4_per_token_head", v_param=vp)
    with pytest.raises(ValueError, match="rows of 64"):  # packed INT4 rows read as INT8 ones
        decode_attention_torch(
            q, kd, vd, tables, lengths, *none, 0.1, kv_dtype="int8_per_token_head", k_param=kp, v_param=vp
        )


def test_kv_error_split_tool_orders_the_modes(tiny_hf, tmp_path):
    """tools/kv_error_split.py on a tiny model: finite, non-negative KLs for K only / V only / both, and on the
    same windows the INT4 round trip of K and V loses more than the INT8 one."""
    import subprocess
    import sys

    from rt_workspace import make_workspace

    ws = make_workspace(tiny_hf("llama"), tmp_path / "ws")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Sentence {i} says something about packages and their maintainers." for i in range(400)))
    root = Path(__file__).resolve().parents[1]
    kls = {}
    for mode in ("int8_per_token_head", "int4_per_token_head"):
        cmd = [sys.executable, str(root / "tools" / "kv_error_split.py"), str(ws), "--mode", mode]
        out = subprocess.run(
            cmd + ["--dataset", str(text), "--samples", "2", "--seqlen", "64"], capture_output=True, text=True, cwd=root
        )
        assert out.returncode == 0, out.stderr
        lines = {ln.split(":")[0].strip(): ln for ln in out.stdout.splitlines() if "mean KL" in ln}
        assert set(lines) == {"K only", "V only", "K and V"}, out.stdout
        kls[mode] = {k: float(ln.split("mean KL")[1].split()[0]) for k, ln in lines.items()}
        assert all(0 <= v < 10 for v in kls[mode].values()), kls
    assert kls["int4_per_token_head"]["K and V"] > kls["int8_per_token_head"]["K and V"], kls


needs_write_kernel = pytest.mark.skipif(
    not cpu_write.takes("int8_per_token_head", torch.zeros(1)), reason="the C++ write kernel does not build here"
)


@needs_write_kernel
@pytest.mark.parametrize("kv", ["int8_per_token_head", "int4_per_token_head", "fp8_per_token_head"])
@pytest.mark.parametrize("rotate", [False, True])
def test_cpp_write_kernel_stores_the_bytes_of_the_pytorch_write(kv, rotate):
    """runtime.cpu_write against KVCache's PyTorch write, byte for byte, over steps of three sequences (blocks of
    16): prefills leaving open blocks, single rows, chunks completing blocks and opening the next ones, a block
    completed in one write, all-equal rows, rows of 1e4 and 1e-4 ranges."""
    D, H, BS, NB = 64, 3, 16, 40
    rot = quant.hadamard(D, 2) if rotate else None
    fast, slow = (KVCache(2, NB, H, BS, D, OnlineQuantizer(kv, rot)) for _ in range(2))
    slow.fast_write = False
    g = torch.Generator().manual_seed(5)
    ids = [list(range(0, 12)), list(range(12, 24)), list(range(24, 36))]
    X = [torch.randn(150, H, D, generator=g) * torch.rand(1, H, D, generator=g) * 5 for _ in ids]
    X[1][:40] = 1.5  # all-equal rows, then whole all-equal channels in the first blocks
    X[2][50:70] *= 1e4
    X[0][30:60] *= 1e-4
    pos = [0, 0, 0]
    for counts in ([20, 33, 7], [1, 1, 1], [9, 15, 25], [1, 0, 1], [40, 1, 33], [1, 1, 1], [16, 16, 16]):
        live = [i for i in range(3) if counts[i]]
        plan = key_plan([ids[i] for i in live], [pos[i] for i in live], [counts[i] for i in live], BS)
        rows = [(i, t) for i in live for t in range(pos[i], pos[i] + counts[i])]
        slots = torch.tensor([ids[i][t // BS] * BS + t % BS for i, t in rows])
        k = torch.stack([X[i][t] for i, t in rows])
        for cache in (fast, slow):
            cache.write(1, slots, k, -0.5 * k, plan)
        pos = [p + c for p, c in zip(pos, counts, strict=True)]
        for a, b in zip(
            (fast.k[1], fast.v[1], fast.k_param[1], fast.v_param[1]),
            (slow.k[1], slow.v[1], slow.k_param[1], slow.v_param[1]),
            strict=True,
        ):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), counts
    assert not (fast.k[0].any() or fast.k_param[0].any())  # the other layer untouched


def test_int4_pool_holds_max_batch_size_full_sessions_with_their_helper_blocks(tiny_hf, tmp_path):
    """The pool's cap (max_batch_size sequences at session_len) counts the helper block INT4's per-channel keys
    hold while a last block is partly filled: max_batch_size sequences one token short of session_len all fit at
    once, with no preemption, and the pool has no block beyond that (a budget far larger than needed)."""
    from rt_workspace import make_workspace

    from runtime.engine import Engine

    S = 200  # not a multiple of the block size: the last block stays open
    ws = make_workspace(tiny_hf("llama"), tmp_path / "ws", session_len=S)
    engine = Engine(ws, kv_cache_dtype="int4_per_token_head", max_batch_size=3, session_len=S, kv_cache_gib=0.5)
    sch, bs = engine.scheduler, engine.block_size
    assert S % bs and sch.blocks_for(S - 1) == -(-S // bs) + 1
    assert engine.num_kv_blocks == 3 * sch.blocks_for(S - 1)
    held = [sch.allocator.allocate(sch.blocks_for(S - 1)) for _ in range(3)]
    assert len({b for blocks in held for b in blocks}) == engine.num_kv_blocks
    fp16 = Engine(ws, kv_cache_dtype="fp16", max_batch_size=3, session_len=S, kv_cache_gib=0.5)
    assert fp16.num_kv_blocks == 3 * -(-S // fp16.block_size)  # no helper blocks without per-channel keys
