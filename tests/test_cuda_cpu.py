"""The CUDA kernels executed on the CPU (same .cu files, g++ + cuda_host_emulation.h) against PyTorch references.

References: runtime/quant.py (the project's formulas), torch's own float16 / bfloat16 / float8 casts, and the
paged decode-attention reference runtime.cpu_attention.decode_attention_torch (itself checked against a dense
float64 attention in tests/test_paged_attention.py, whose poisoned paged pools these tests share).
Tolerances:
  - cache writes (fp16 / int8 / fp8) and every conversion: bit-exact;
  - decode attention vs the fp32 reference on the same q values: fp32 output |err| <= 1e-5 + 1e-4 |ref|
    (fp32 accumulation, exp2f); fp16 output 1e-5 + 1e-3 |ref| (one fp16 rounding); bf16 1e-5 + 8e-3 |ref|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from test_paged_attention import PagedCase, lengths_for, make_case

from runtime import quant
from runtime.cpu_attention import decode_attention_torch
from runtime.cuda import kernels
from runtime.kv_cache import KeyPlan, KVCache, OnlineQuantizer, gather_channel_keys, key_plan, open_key_rows

host_ops = pytest.importorskip("runtime.cuda.host_ops")

FP8_KINDS = ("fp8_e4m3", "fp8_e5m2")
CALIBRATED = tuple(m for m in kernels.KV_MODES if not quant.is_online(m))  # per-head fp32 parameters
ACT_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # rtol per output dtype


@pytest.fixture(scope="module", autouse=True)
def host_library():
    """Build (or load the cached) emulation library once; a g++ failure fails loudly here."""
    return host_ops.library()


# ---- conversions, exhaustively ---------------------------------------------------------------------------


def all_halves() -> torch.Tensor:
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)


def midpoints(values: torch.Tensor) -> torch.Tensor:
    """Exact midpoints (ties) between consecutive finite values of a narrow format, as fp32."""
    v = values.to(torch.float64)
    v = v[torch.isfinite(v)].unique()
    return ((v[1:] + v[:-1]) / 2).to(torch.float32)


def fp32_sweep() -> torch.Tensor:
    """Dense fp32 sweep: every half, every fp16 tie and its neighbours, ~1M strided bit patterns over all of
    fp32 (subnormals, huge values, inf, NaN), and the fp8 ties."""
    halves = all_halves().to(torch.float32)
    ties = midpoints(all_halves())
    strided = torch.arange(0, 2**32, 4099, dtype=torch.int64)
    strided = torch.where(strided >= 2**31, strided - 2**32, strided).to(torch.int32).view(torch.float32)
    fp8_ties = [midpoints(torch.arange(256, dtype=torch.uint8).view(quant.FP8_DTYPES[k])) for k in FP8_KINDS]
    parts = [
        halves,
        ties,
        torch.nextafter(ties, torch.full_like(ties, math.inf)),
        torch.nextafter(ties, torch.full_like(ties, -math.inf)),
        strided,
        *fp8_ties,
    ]
    parts += [-p for p in fp8_ties]
    parts.append(torch.tensor([0.0, -0.0, math.inf, -math.inf, 448.0, 464.0, 57344.0, 61440.0, 1e-45, 3e38]))
    return torch.cat(parts)


def assert_same_values(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bitwise equal, except that NaN only has to meet NaN (payloads may differ)."""
    g, w = got.float(), want.float()
    nan = torch.isnan(w)
    assert torch.equal(torch.isnan(g), nan), f"{what}: NaN positions differ"
    bits_g, bits_w = got[~nan].view(torch.uint8), want[~nan].view(torch.uint8)
    bad = (bits_g.view(-1, got.element_size()) != bits_w.view(-1, want.element_size())).any(dim=1)
    assert not bad.any(), f"{what}: {int(bad.sum())} mismatches, e.g. x={want[~nan][bad][:5]} got {got[~nan][bad][:5]}"


def test_half_and_bf16_stores_match_torch():
    x = fp32_sweep()
    assert_same_values(host_ops.probe_store("fp16", x), x.to(torch.float16), "cache fp16 store")
    assert_same_values(host_ops.probe_from_float(torch.float16, x), x.to(torch.float16), "from_float<__half>")
    assert_same_values(host_ops.probe_from_float(torch.bfloat16, x), x.to(torch.bfloat16), "from_float<bf16>")


def test_half_read_path_all_65536_patterns():
    halves = all_halves()
    assert_same_values(host_ops.probe_unpack("fp16", halves), halves.to(torch.float32), "unpack16<fp16>")


@pytest.mark.parametrize("kind", FP8_KINDS)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_fp8_store_saturates_like_clamped_torch_cast(kind, scale):
    x = fp32_sweep()
    want = quant.quantize_fp8(x, torch.tensor([scale]), kind).flatten()  # clamp to +-max, then torch's RNE cast
    assert_same_values(host_ops.probe_store(kind, x, scale=scale), want, f"{kind} store, scale {scale}")


@pytest.mark.parametrize("kind", FP8_KINDS)
def test_fp8_read_path_all_256_bytes(kind):
    stored = torch.arange(256, dtype=torch.uint8).view(quant.FP8_DTYPES[kind])
    assert_same_values(host_ops.probe_unpack(kind, stored), stored.to(torch.float32), f"unpack16<{kind}>")


def test_int8_store_rounds_half_to_even_and_saturates():
    ties = torch.arange(-140.0, 140.0, 0.5)  # every .5 tie in and beyond [-128, 127]
    x = torch.cat([ties, fp32_sweep()])
    x = x[torch.isfinite(x)]  # NaN has no int8 value in torch either
    for scale, zp in ((1.0, 0.0), (0.0123, -0.4), (3.5, 7.25)):
        want = quant.quantize_int8(x, torch.tensor([scale]), torch.tensor([zp])).flatten()
        assert torch.equal(host_ops.probe_store("int8", x, scale, zp), want), (scale, zp)
    stored = torch.arange(-128, 128, dtype=torch.int8)
    assert torch.equal(host_ops.probe_unpack("int8", stored), stored.to(torch.float32))


# ---- kv_write --------------------------------------------------------------------------------------------


def make_params(kv_dtype: str, x: torch.Tensor, symmetric: bool = False) -> dict:
    """Per-head (H_kv,) parameters from x (..., H_kv, D), deliberately tight so some values saturate; None where
    the mode does not read them (the launchers accept None there)."""
    per_head = x.transpose(0, -2).reshape(x.shape[-2], -1)  # (H_kv, everything else)
    mx, mn, amax = per_head.amax(1) * 0.8, per_head.amin(1) * 0.8, per_head.abs().amax(1) * 0.8
    if kv_dtype == "fp16":
        return dict(k_scale=None, k_zp=None, v_scale=None, v_zp=None)
    if kv_dtype == "int8":
        scale, zp = quant.int8_params(mx, mn, amax, symmetric)
        return dict(k_scale=scale, k_zp=zp, v_scale=scale * 1.3, v_zp=-zp)
    scale = quant.fp8_scale(amax, kv_dtype)
    return dict(k_scale=scale, k_zp=None, v_scale=scale * 0.7, v_zp=None)


def full_params(p: dict, num_kv_heads: int) -> tuple:
    ones, zeros = torch.ones(num_kv_heads), torch.zeros(num_kv_heads)
    pick = lambda t, d: d if t is None else t  # noqa: E731
    return pick(p["k_scale"], ones), pick(p["k_zp"], zeros), pick(p["v_scale"], ones), pick(p["v_zp"], zeros)


def kernel_params(case: PagedCase) -> dict:
    """A paged case's parameters as the launchers take them: None where the mode does not read them."""
    names = ("k_scale", "k_zp", "v_scale", "v_zp")
    used = {"fp16": (), "int8": names, "fp8_e4m3": ("k_scale", "v_scale"), "fp8_e5m2": ("k_scale", "v_scale")}
    return {n: (p if n in used[case.kv_dtype] else None) for n, p in zip(names, case.params, strict=True)}


@pytest.mark.parametrize("kv_dtype", CALIBRATED)
@pytest.mark.parametrize("act", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_write_is_bit_exact(kv_dtype, act):
    """Every token lands, quantized exactly like quant.quantize, at row slot % block_size of block
    slot // block_size; negative and out-of-pool slots write nothing, every other byte is untouched."""
    seed = CALIBRATED.index(kv_dtype) * 3 + list(kernels.ACT_TYPES).index(act)
    gen = torch.Generator().manual_seed(seed)
    num_blocks, hkv, block_size, dim = 4, 3, 7, 64 if act != torch.float16 else 128
    n = 19  # tokens at distinct, scattered slots
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    k_new = (torch.randn(n, hkv, dim, generator=gen) * 3).to(act)
    v_new = (torch.randn(n, hkv, dim, generator=gen) * 2 + 0.5).to(act)
    params = make_params(kv_dtype, k_new.float())
    storage = quant.STORAGE_DTYPES[kv_dtype]
    sentinel = torch.randint(
        0, 256, (2, num_blocks, hkv, block_size, dim * storage.itemsize), dtype=torch.uint8, generator=gen
    )
    k_pool, v_pool = (sentinel[i].clone().view(storage) for i in range(2))
    # Tokens that must be skipped: slot -1, -7, one past the pool, and (int64) one that wraps to slot 3 as int32.
    skipped = torch.tensor([-1, -7, num_blocks * block_size, 2**32 + 3])
    bad = torch.randn(len(skipped), hkv, dim).to(act)
    slot_dtype = torch.int64 if seed % 2 else torch.int32  # both index dtypes; the wrap test needs int64
    slot_mapping = torch.cat([slots, skipped if slot_dtype == torch.int64 else skipped[:3]]).to(slot_dtype)
    nbad = len(slot_mapping) - n
    host_ops.kv_cache_write(
        k_pool,
        v_pool,
        torch.cat([k_new, bad[:nbad]]),
        torch.cat([v_new, bad[:nbad]]),
        slot_mapping,
        **params,
        kv_dtype=kv_dtype,
    )
    k_scale, k_zp, v_scale, v_zp = full_params(params, hkv)
    want_k, want_v = (sentinel[i].clone().view(storage) for i in range(2))
    # quant.quantize wants (..., H_kv, T, D): treat the N tokens as T.
    want_k[slots // block_size, :, slots % block_size] = quant.quantize(
        k_new.transpose(0, 1), kv_dtype, k_scale, k_zp
    ).transpose(0, 1)
    want_v[slots // block_size, :, slots % block_size] = quant.quantize(
        v_new.transpose(0, 1), kv_dtype, v_scale, v_zp
    ).transpose(0, 1)
    assert torch.equal(k_pool.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(v_pool.view(torch.uint8), want_v.view(torch.uint8))


# ---- decode attention ------------------------------------------------------------------------------------

ATTENTION_CASES = [  # kv_dtype, head_dim, H, H_kv, q dtype, symmetric int8, block_size
    ("fp16", 128, 2, 2, torch.float32, False, 16),
    ("int8", 64, 9, 3, torch.float32, False, 5),  # SmolLM2 shape, odd block size
    ("int8", 128, 8, 1, torch.float16, True, 64),
    ("fp8_e4m3", 128, 3, 1, torch.float32, False, 5),
    ("fp8_e5m2", 64, 2, 2, torch.bfloat16, False, 16),
    ("fp8_e4m3", 64, 8, 1, torch.float16, False, 64),
    ("fp16", 64, 6, 2, torch.float16, False, 5),
]


def case_id(c) -> str:
    return f"{c[0]}-D{c[1]}-H{c[2]}-KV{c[3]}-{c[4]}-bs{c[6]}".replace("torch.", "")


def attention_case(case: tuple, seed: int) -> PagedCase:
    """A paged case from an ATTENTION_CASES row: int32 block tables and lengths, as the launchers take them."""
    kv_dtype, dim, num_heads, hkv, act, symmetric, block_size = case
    return make_case(
        kv_dtype, dim, hkv, num_heads // hkv, block_size, lengths_for(block_size), seed, act, symmetric, torch.int32
    )


def emulated_attention(c: PagedCase, block_tables: torch.Tensor | None = None, num_splits: int | None = None):
    """host_ops.decode_attention on a paged case (optionally with other block tables)."""
    tables = c.block_tables if block_tables is None else block_tables
    return host_ops.decode_attention(
        c.q,
        c.k_pool,
        c.v_pool,
        tables,
        c.lengths,
        **kernel_params(c),
        kv_dtype=c.kv_dtype,
        softmax_scale=c.softmax_scale,
        num_splits=num_splits,
    )


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
def test_decode_attention_matches_reference(case):
    """Shuffled blocks in a NaN / garbage pool, padded block tables, lengths 1, one block, 0 and ragged."""
    c = attention_case(case, seed=ATTENTION_CASES.index(case))
    want = decode_attention_torch(c.q.float(), *c.args()[1:])  # fp32 reference on the same q values
    tol = ACT_TOL[c.q.dtype]
    # one block per (head, sequence), and split-K over 3 chunks (some empty) plus the combine pass
    for splits in (1, 3):
        got = emulated_attention(c, num_splits=splits)
        assert got.dtype == c.q.dtype and got.shape == c.q.shape
        err = (got.double() - want).abs()
        bound = 1e-5 + tol * want.abs()
        assert (err <= bound).all(), f"splits={splits}: max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"
        assert got[2].abs().max() == 0  # the empty sequence


def test_decode_attention_never_dereferences_bad_block_ids():
    """A block id outside the pool inside a sequence's range is skipped, not read (memory safety): the result is
    attention over that sequence's other keys (decode attention does not depend on the keys' order)."""
    c = attention_case(ATTENTION_CASES[0], seed=1)  # block size 16; sequence 3 has 46 tokens in 3 blocks
    tables = c.block_tables.clone()
    tables[3, 1] = 1 << 30  # positions 16..31 now point far outside the pool
    got = emulated_attention(c, block_tables=tables, num_splits=2)
    # the same keys without block column 1: blocks 0 and 2, 16 + 14 positions
    ref_tables, ref_lengths = c.block_tables.clone(), c.lengths.clone()
    ref_tables[3, 1] = c.block_tables[3, 2]
    ref_lengths[3] = 30
    want = decode_attention_torch(c.q, c.k_pool, c.v_pool, ref_tables, ref_lengths, *c.params, c.softmax_scale)
    assert ((got.double() - want.double()).abs() <= 1e-5 + 1e-4 * want.double().abs()).all()


# ---- argument checks and planning ------------------------------------------------------------------------


def test_launch_checks_name_the_bad_argument():
    k_pool = torch.zeros(6, 2, 16, 64, dtype=torch.int8)
    q = torch.zeros(2, 4, 64)
    one = torch.ones(2)
    ok = dict(k_scale=one, k_zp=one, v_scale=one, v_zp=one, kv_dtype="int8", max_length=None, num_sms=1)
    tables = torch.zeros(2, 3, dtype=torch.int32)
    lengths = torch.zeros(2, dtype=torch.int32)
    kernels.prepare_attention(q, k_pool, k_pool, tables, lengths, **ok)
    bad = [
        (dict(kv_dtype="fp8_e4m3"), "k_pool.dtype"),
        (dict(kv_dtype="int4"), "kv_dtype"),
        (dict(k_zp=None), "k_zp"),
        (dict(v_scale=torch.ones(3)), "v_scale.shape"),
        (dict(k_scale=torch.ones(2, dtype=torch.float16)), "k_scale.dtype"),
    ]
    for override, needle in bad:
        with pytest.raises(kernels.CudaOpError, match=needle.replace(".", r"\.")):
            kernels.prepare_attention(q, k_pool, k_pool, tables, lengths, **{**ok, **override})
    calls = [  # (q, k_pool, v_pool, block_tables, lengths), the argument the message must name
        ((torch.zeros(2, 3, 64), k_pool, k_pool, tables, lengths), "num_heads % num_kv_heads"),
        ((torch.zeros(2, 64, 4).transpose(1, 2), k_pool, k_pool, tables, lengths), "non-contiguous"),
        ((q, torch.zeros(6, 2, 16, 96, dtype=torch.int8), k_pool, tables, lengths), "head_dim"),
        ((q, k_pool[..., 0], k_pool, tables, lengths), "k_pool.shape"),
        ((q, k_pool, k_pool[:5], tables, lengths), "v_pool.shape"),
        ((q, k_pool, k_pool, tables.long(), lengths), "block_tables.dtype"),
        ((q, k_pool, k_pool, tables[:1], lengths), "block_tables.shape"),
        ((q, k_pool, k_pool, tables[0], lengths), "block_tables.shape"),
        ((q, k_pool, k_pool, tables.t().contiguous().t(), lengths), "non-contiguous"),
        ((q, k_pool, k_pool, tables, lengths.long()), "lengths.dtype"),
        ((q, k_pool, k_pool, tables, lengths[:1]), "lengths.shape"),
    ]
    for args, needle in calls:
        with pytest.raises(kernels.CudaOpError, match=needle.replace(".", r"\.")):
            kernels.prepare_attention(*args, **ok)
    new = torch.zeros(3, 2, 64)
    write = dict(k_scale=one, k_zp=one, v_scale=one, v_zp=one, kv_dtype="int8")
    kernels.prepare_write(k_pool, k_pool, new, new, torch.zeros(3, dtype=torch.int64), **write)
    with pytest.raises(kernels.CudaOpError, match=r"slot_mapping\.shape"):
        kernels.prepare_write(k_pool, k_pool, new, new, torch.zeros(2, dtype=torch.int32), **write)
    with pytest.raises(kernels.CudaOpError, match=r"slot_mapping\.dtype"):
        kernels.prepare_write(k_pool, k_pool, new, new, torch.zeros(3), **write)
    with pytest.raises(kernels.CudaOpError, match=r"k_new\.shape"):
        kernels.prepare_write(k_pool, k_pool, new[..., :32], new, torch.zeros(3, dtype=torch.int32), **write)


def test_plan_splits():
    assert kernels.plan_splits(64, 32, 8192, 132) == (1, 8192)  # enough blocks: no second pass
    splits, chunk = kernels.plan_splits(1, 32, 8192, 132)
    assert splits > 8 and chunk >= kernels.MIN_CHUNK and splits * chunk >= 8192
    assert kernels.plan_splits(2, 9, 100, 132) == (1, 100)  # short context: never below MIN_CHUNK keys
    for batch, heads, length in ((1, 9, 8192), (3, 8, 333), (4, 32, 1), (1, 1, 257)):
        splits, chunk = kernels.plan_splits(batch, heads, length, 132)
        assert (splits - 1) * chunk < length <= splits * chunk  # no split is empty at max_length


# ---- online per-(token, KV head) modes -------------------------------------------------------------------
# Reference: quant.quantize_online / dequantize_online. Writes are bit-exact (codes and fp16 params): the kernel
# computes the same fp32 values with the same IEEE operations (min / max, (max - min) / (2^b - 1), the fp16
# rounding, (x - zero) * (1 / scale)), so even ties round alike. Attention uses the tolerances above.
# Not covered, by design: NaN inputs (no defined code on either side), and a row whose minimum is a zero of both
# signs (0.0 and -0.0): torch's amin and the warp's fminf may pick different ones, so the stored fp16 zero may
# differ in its sign bit only (same codes, same value read back).

ONLINE = quant.ONLINE_MODES
ROW_ONLINE = tuple(m for m in ONLINE if not quant.channel_keys(m))  # K and V both per row
CHANNEL = "int4_per_token_head"  # keys per channel within a block (see the section below)


def online_pool_shape(kv_dtype: str, num_blocks: int, hkv: int, block_size: int, dim: int) -> tuple:
    return (num_blocks, hkv, block_size, dim // 2 if kv_dtype == "int4_per_token_head" else dim)


def online_poison(kv_dtype: str, num_blocks: int, hkv: int, block_size: int, dim: int, gen: torch.Generator):
    """A data pool of random bytes (fp8: byte 0x7F, NaN in E4M3FN) and a NaN fp16 param pool: what a kernel must
    never read (attention) or must leave alone (write)."""
    shape = online_pool_shape(kv_dtype, num_blocks, hkv, block_size, dim)
    if kv_dtype == "fp8_per_token_head":
        data = torch.full(shape, 0x7F, dtype=torch.uint8)
    else:
        data = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    params = torch.full((num_blocks, hkv, block_size, 2), float("nan"), dtype=quant.PARAM_DTYPE)
    return data.view(quant.ONLINE_STORAGE[kv_dtype]), params


def hard_rows(n: int, hkv: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(n, H_kv, D) fp32 rows, random ranges and offsets, with the cases that break a careless kernel: all-equal
    rows (scale 0), zeros, ranges of 1e4 and 1e-4 (fp16-subnormal scales), one outlier channel, all-negative."""
    x = torch.randn(n, hkv, dim, generator=gen) * torch.rand(n, hkv, 1, generator=gen) * 8
    x += torch.randn(n, hkv, 1, generator=gen) * 2
    special = [
        torch.full((dim,), 1.7),
        torch.zeros(dim),
        torch.randn(dim, generator=gen) * 1e4,
        torch.randn(dim, generator=gen) * 1e-4 + 3e-4,
        torch.cat([torch.full((1,), 300.0), torch.randn(dim - 1, generator=gen) * 0.1]),
        -torch.rand(dim, generator=gen) - 0.5,
    ]
    for i, row in enumerate(special):
        x[i % n, (i // n) % hkv] = row
        x[(n - 1 - i) % n, (i + 1) % hkv] = -row.flip(0)
    return x


@pytest.mark.parametrize("kv_dtype", ROW_ONLINE)
@pytest.mark.parametrize(
    "act, dim", [(torch.float32, 64), (torch.float32, 128), (torch.float16, 128), (torch.bfloat16, 64)]
)
def test_online_kv_write_is_bit_exact(kv_dtype, act, dim):
    """Codes and fp16 (scale, zero) equal quant.quantize_online bit for bit, at row slot % block_size of block
    slot // block_size, for shuffled slots; negative and out-of-pool slots write nothing, other rows untouched."""
    gen = torch.Generator().manual_seed(ONLINE.index(kv_dtype) * 7 + dim + list(kernels.ACT_TYPES).index(act))
    num_blocks, hkv, block_size, n = 5, 3, 7, 23
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    k_new, v_new = hard_rows(n, hkv, dim, gen).to(act), (hard_rows(n, hkv, dim, gen) * 0.5 + 0.25).to(act)
    k_pool, k_param = online_poison(kv_dtype, num_blocks, hkv, block_size, dim, gen)
    v_pool, v_param = online_poison(kv_dtype, num_blocks, hkv, block_size, dim, gen)
    want = [t.clone() for t in (k_pool, k_param, v_pool, v_param)]
    skipped = torch.tensor([-1, -5, num_blocks * block_size, 2**32 + 3])  # the last wraps to slot 3 as int32
    slot_mapping = torch.cat([slots, skipped]).to(torch.int64 if dim == 64 else torch.int32)
    if slot_mapping.dtype == torch.int32:
        slot_mapping = slot_mapping[:-1]
    bad = torch.randn(len(slot_mapping) - n, hkv, dim, generator=gen).to(act)
    host_ops.kv_cache_write(
        k_pool,
        v_pool,
        torch.cat([k_new, bad]),
        torch.cat([v_new, bad]),
        slot_mapping,
        None,
        None,
        None,
        None,
        kv_dtype,
        k_param=k_param,
        v_param=v_param,
    )
    blocks, rows = slots // block_size, slots % block_size
    for x, data, params in ((k_new, want[0], want[1]), (v_new, want[2], want[3])):
        data[blocks, :, rows], params[blocks, :, rows] = quant.quantize_online(x, kv_dtype)  # (n, H_kv, ...)
    names = ("k data", "k params", "v data", "v params")
    for got, ref, name in zip((k_pool, k_param, v_pool, v_param), want, names, strict=True):
        diff = got.view(torch.uint8) != ref.view(torch.uint8)
        assert not diff.any(), f"{name}: {int(diff.sum())} bytes differ"


def test_online_read_path_all_bytes():
    """unpack_vec of the online modes: uint8 codes as themselves, int4 low nibble then high, E4M3 bytes."""
    stored = torch.arange(256, dtype=torch.uint8)
    assert_same_values(host_ops.probe_unpack("int8_per_token_head", stored), stored.float(), "unpack_vec<uint8>")
    got = host_ops.probe_unpack("int4_per_token_head", stored)
    assert torch.equal(got, quant.unpack_int4(stored).float()), "unpack_vec<int4>"
    fp8 = stored.view(torch.float8_e4m3fn)
    assert_same_values(host_ops.probe_unpack("fp8_per_token_head", fp8), fp8.float(), "unpack_vec<fp8 per row>")


@dataclass
class OnlineCase:
    kv_dtype: str
    q: torch.Tensor  # (B, H, D)
    k_pool: torch.Tensor  # (num_blocks, H_kv, block_size, D or D / 2)
    v_pool: torch.Tensor
    k_param: torch.Tensor  # (num_blocks, H_kv, block_size, 2) fp16; int4_per_token_head (num_blocks, H_kv, 2, D)
    v_param: torch.Tensor
    block_tables: torch.Tensor  # (B, max_blocks) int32
    lengths: torch.Tensor  # (B,) int32
    softmax_scale: float


def store_channel_keys(k_pool, k_param, ids, k) -> None:
    """int4_per_token_head keys k (n, H_kv, D) fp32 of one sequence into its blocks ids, built from the format's
    definition (runtime/quant.py): the full blocks quantize_channels of the int8 read-back of their rows, the rest
    int8 rows in the half-block layout (rows [0, bs / 2) of the open block in it, the rest in the next block)."""
    bs = k_pool.shape[2]
    full, x = k.shape[0] // bs, quant.int8_round_trip(k)
    for j in range(full):
        k_pool[ids[j]], k_param[ids[j]] = quant.quantize_channels(x[j * bs : (j + 1) * bs].transpose(0, 1))
    rows8, par8 = open_key_rows(k_pool, k_param)
    codes, params = quant.quantize_online(k[full * bs :], "int8_per_token_head")
    for i in range(codes.shape[0]):
        page = ids[full + i // (bs // 2)]
        rows8[page, :, i % (bs // 2)], par8[page, :, i % (bs // 2)] = codes[i], params[i]


def online_case(kv_dtype, dim, num_heads, hkv, act, block_size, lengths, seed) -> OnlineCase:
    """K (channel outliers, per-head offsets) and V quantized per row by quant.quantize_online into shuffled blocks
    of a poisoned pool; block tables padded with -1, a far block id or a poisoned spare block. int4_per_token_head
    keys per channel (`store_channel_keys`), a sequence whose open block is past its first half with the helper
    block after it in its table."""
    gen = torch.Generator().manual_seed(seed)
    batch, longest = len(lengths), max(lengths)
    channel = quant.channel_keys(kv_dtype)
    need = [math.ceil(n / block_size) + int(channel and n % block_size > block_size // 2) for n in lengths]
    num_blocks, max_blocks = sum(need) + 3, max(need) + 2
    k = torch.randn(batch, longest, hkv, dim, generator=gen) * (1 + 4 * torch.rand(dim, generator=gen))
    k += torch.arange(hkv).view(-1, 1) * 0.5 - 0.3
    v = torch.randn(batch, longest, hkv, dim, generator=gen) + 0.3
    (kq, kp), (vq, vp) = quant.quantize_online(k, kv_dtype), quant.quantize_online(v, kv_dtype)  # (B, L, H_kv, ...)
    k_pool, k_param = online_poison(kv_dtype, num_blocks, hkv, block_size, dim, gen)
    v_pool, v_param = online_poison(kv_dtype, num_blocks, hkv, block_size, dim, gen)
    if channel:
        k_param = torch.full((num_blocks, hkv, 2, dim), float("nan"), dtype=quant.PARAM_DTYPE)
    perm = torch.randperm(num_blocks, generator=gen)  # the last 3 are spare blocks
    tables, taken = torch.empty(batch, max_blocks, dtype=torch.int32), 0
    for b, n in enumerate(lengths):
        ids = perm[taken : taken + need[b]]
        taken += need[b]
        tables[b] = (-1, 10**6, int(perm[-1]))[b % 3]
        tables[b, : need[b]] = ids
        pos = torch.arange(n)
        pairs = ((v_pool, vq), (v_param, vp)) + (() if channel else ((k_pool, kq), (k_param, kp)))
        for pool, src in pairs:
            pool[ids[pos // block_size], :, pos % block_size] = src[b, :n]
        if channel:
            store_channel_keys(k_pool, k_param, ids, k[b, :n])
    q = torch.randn(batch, num_heads, dim, generator=gen).to(act)
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    return OnlineCase(kv_dtype, q, k_pool, v_pool, k_param, v_param, tables, lengths_t, 1 / math.sqrt(dim))


def online_reference(c: OnlineCase) -> torch.Tensor:
    """float64 (B, H, D): each sequence's rows gathered through its block table, dequantized by
    quant.dequantize_online (int4_per_token_head keys: kv_cache.gather_channel_keys), then plain softmax
    attention (GQA: query head h reads KV head h // group)."""
    batch, num_heads, dim = c.q.shape
    block_size, hkv = c.k_pool.shape[2], c.k_pool.shape[1]
    out = torch.zeros(batch, num_heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(c.lengths[b])
        if n == 0:
            continue
        t = torch.arange(n)
        blocks, rows = c.block_tables[b, t // block_size].long(), t % block_size
        kv = []
        for pool, params in ((c.k_pool, c.k_param), (c.v_pool, c.v_param)):
            if pool is c.k_pool and quant.channel_keys(c.kv_dtype):
                table, length = c.block_tables[b : b + 1].long(), c.lengths[b : b + 1].long()
                x = gather_channel_keys(pool, params, table, length, t.view(1, -1))[0]  # (n, H_kv, D)
            else:
                x = quant.dequantize_online(pool[blocks, :, rows], params[blocks, :, rows], c.kv_dtype)
            kv.append(x.double().transpose(0, 1).repeat_interleave(num_heads // hkv, 0))  # (H, n, D)
        scores = torch.einsum("hd,hnd->hn", c.q[b].double(), kv[0]) * c.softmax_scale
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), kv[1])
    return out


def online_attention(c: OnlineCase, num_splits: int | None) -> torch.Tensor:
    return host_ops.decode_attention(
        c.q,
        c.k_pool,
        c.v_pool,
        c.block_tables,
        c.lengths,
        None,
        None,
        None,
        None,
        c.kv_dtype,
        c.softmax_scale,
        max_length=int(c.lengths.max()),
        k_param=c.k_param,
        v_param=c.v_param,
        num_splits=num_splits,
        num_sms=4,
    )


ONLINE_CASES = [  # kv_dtype, head_dim, H, H_kv (GQA 1 / 3 / 8), q dtype, block_size
    ("int8_per_token_head", 64, 9, 3, torch.float32, 5),
    ("int8_per_token_head", 128, 8, 1, torch.bfloat16, 16),
    ("int4_per_token_head", 64, 2, 2, torch.float32, 16),
    ("int4_per_token_head", 128, 8, 1, torch.float16, 6),
    ("fp8_per_token_head", 128, 3, 1, torch.float32, 7),
    ("fp8_per_token_head", 64, 4, 4, torch.float16, 16),
]


def online_case_id(c) -> str:
    return f"{c[0]}-D{c[1]}-H{c[2]}-KV{c[3]}-{c[4]}-bs{c[5]}".replace("torch.", "")


@pytest.mark.parametrize("case", ONLINE_CASES, ids=online_case_id)
def test_online_decode_attention_matches_reference(case):
    """Shuffled blocks in a poisoned pool, padded block tables, lengths 1, one block, 0, ragged and one long
    sequence (600 keys: several key tiles per group); one split, split-K forced to 3 (some splits empty for the
    short sequences) and the planner's choice, which splits the long sequence into MIN_CHUNK chunks."""
    kv_dtype, dim, num_heads, hkv, act, block_size = case
    lengths = [1, block_size, 0, 3 * block_size - 2, 45, 600]
    c = online_case(kv_dtype, dim, num_heads, hkv, act, block_size, lengths, seed=ONLINE_CASES.index(case))
    want = online_reference(c)
    tol = ACT_TOL[act]
    for splits in (1, 3, None):
        got = online_attention(c, splits)
        assert got.dtype == act and got.shape == c.q.shape
        err = (got.double() - want).abs()
        bound = 1e-5 + tol * want.abs()
        assert (err <= bound).all(), f"splits={splits}: max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"
        assert got[2].abs().max() == 0  # the empty sequence


def test_online_write_then_attention():
    """The two kernels together: kv_write fills the pools and param pools, decode attention reads them back
    (int4_per_token_head: 4 blocks completed in one write, the fifth open past its half, so a helper block)."""
    gen = torch.Generator().manual_seed(5)
    kv_dtype, num_blocks, hkv, block_size, dim, n = CHANNEL, 7, 2, 8, 64, 38
    k_pool, _ = online_poison(kv_dtype, num_blocks, hkv, block_size, dim, gen)
    v_pool, v_param = online_poison(kv_dtype, num_blocks, hkv, block_size, dim, gen)
    k_param = torch.full((num_blocks, hkv, 2, dim), float("nan"), dtype=quant.PARAM_DTYPE)
    k, v = torch.randn(n, hkv, dim, generator=gen), torch.randn(n, hkv, dim, generator=gen)
    blocks = torch.randperm(num_blocks, generator=gen)[:6].to(torch.int32)
    t = torch.arange(n)
    slot_mapping = blocks.long()[t // block_size] * block_size + t % block_size
    plan = key_plan([blocks.tolist()], [0], [n], block_size)
    host_ops.kv_cache_write(
        k_pool,
        v_pool,
        k,
        v,
        slot_mapping,
        None,
        None,
        None,
        None,
        kv_dtype,
        k_param=k_param,
        v_param=v_param,
        k_helper=plan.helper,
        k_complete=plan.complete,
    )
    q = torch.randn(1, 4, dim, generator=gen)
    c = OnlineCase(
        kv_dtype, q, k_pool, v_pool, k_param, v_param, blocks.view(1, -1), torch.tensor([n], dtype=torch.int32), 0.125
    )
    want = online_reference(c)
    got = online_attention(c, None)
    assert ((got.double() - want).abs() <= 1e-5 + 1e-4 * want.abs()).all()


def test_online_launch_checks_name_the_bad_argument():
    k_pool = torch.zeros(6, 2, 16, 32, dtype=torch.uint8)  # int4, D = 64
    param = torch.zeros(6, 2, 16, 2, dtype=torch.float16)  # per row: V (and K of the other online modes)
    kparam = torch.zeros(6, 2, 2, 64, dtype=torch.float16)  # int4_per_token_head K: per channel
    misaligned = torch.zeros(kparam.numel() + 2, dtype=torch.float16)[2:].view(kparam.shape)  # 4 bytes off
    q = torch.zeros(2, 4, 64)
    tables, lengths = torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    none = dict(k_scale=None, k_zp=None, v_scale=None, v_zp=None)
    ok = dict(**none, kv_dtype="int4_per_token_head", max_length=None, num_sms=1, k_param=kparam, v_param=param)
    assert kernels.prepare_attention(q, k_pool, k_pool, tables, lengths, **ok).head_dim == 64
    bad = [
        (dict(k_param=None), "k_param"),
        (dict(v_param=param.float()), "v_param.dtype"),
        (dict(k_param=param), "k_param.shape.*per-channel keys"),  # the old per-row K params
        (dict(k_param=kparam[:, :1]), "k_param.shape"),
        (dict(k_param=misaligned), "k_param.data_ptr"),
        (dict(v_param=param.transpose(0, 1).contiguous().transpose(0, 1)), "non-contiguous"),
        (dict(k_scale=torch.ones(2)), "k_scale"),
        (dict(kv_dtype="int8_per_token_head", k_param=param), "head_dim"),  # a 32-wide int8 pool: D = 32
        (dict(kv_dtype="fp8_per_token_head", k_param=param), "k_pool.dtype"),
    ]
    for override, needle in bad:
        with pytest.raises(kernels.CudaOpError, match=needle.replace(".", r"\.").replace(r"\.*", ".*")):
            kernels.prepare_attention(q, k_pool, k_pool, tables, lengths, **{**ok, **override})
    odd_pool = torch.zeros(6, 2, 15, 32, dtype=torch.uint8)  # int4 keys per channel need an even block_size
    odd = {**ok, "v_param": torch.zeros(6, 2, 15, 2, dtype=torch.float16)}
    with pytest.raises(kernels.CudaOpError, match="block_size"):
        kernels.prepare_attention(q, odd_pool, odd_pool, tables, lengths, **odd)
    per_head = dict(k_scale=torch.ones(2), k_zp=torch.ones(2), v_scale=torch.ones(2), v_zp=torch.ones(2))
    int8_pool = torch.zeros(6, 2, 16, 64, dtype=torch.int8)
    calibrated = {**ok, **per_head, "kv_dtype": "int8"}
    with pytest.raises(kernels.CudaOpError, match="k_param"):  # a calibrated mode takes no param pool
        kernels.prepare_attention(q, int8_pool, int8_pool, tables, lengths, **calibrated)
    new = torch.zeros(3, 2, 64)
    slots = torch.zeros(3, dtype=torch.int32)
    plan = dict(k_helper=torch.tensor([4, -1, -1]), k_complete=torch.tensor([[0, 1, 1, 1]]))
    write = dict(**none, kv_dtype="int4_per_token_head", k_param=kparam, v_param=param, **plan)
    w = kernels.prepare_write(k_pool, k_pool, new, new, slots, **write)
    assert w.grid == 1 and w.head_dim == 64  # 3 tokens x 2 heads = 6 rows of one warp each
    assert w.k_helper.dtype == w.k_complete.dtype == torch.int32 and w.num_complete == 1
    bad_writes = [
        (dict(v_param=None), "v_param"),
        (dict(k_param=param), "k_param.shape.*per-channel keys"),
        (dict(k_helper=None), "k_helper.*key_plan"),
        (dict(k_complete=None), "k_complete.*key_plan"),
        (dict(k_helper=torch.zeros(2, dtype=torch.int64)), "k_helper.shape"),
        (dict(k_helper=torch.zeros(3)), "k_helper.dtype"),
        (dict(k_complete=torch.zeros(1, 3, dtype=torch.int64)), "k_complete.shape"),
    ]
    for override, needle in bad_writes:
        with pytest.raises(kernels.CudaOpError, match=needle.replace(".", r"\.").replace(r"\.*", ".*")):
            kernels.prepare_write(k_pool, k_pool, new, new, slots, **{**write, **override})
    int8_pool = torch.zeros(6, 2, 16, 64, dtype=torch.uint8)
    row_write = dict(**none, kv_dtype="int8_per_token_head", k_param=param, v_param=param)
    assert kernels.prepare_write(int8_pool, int8_pool, new, new, slots, **row_write).num_complete == 0
    for name in plan:  # only per-channel keys take a key plan
        with pytest.raises(kernels.CudaOpError, match=f"{name}.*only 'int4_per_token_head'"):
            kernels.prepare_write(int8_pool, int8_pool, new, new, slots, **row_write, **{name: plan[name]})
    with pytest.raises(kernels.CudaOpError, match=r"k_new\.shape"):
        kernels.prepare_write(k_pool, k_pool, new[..., :32].contiguous(), new, slots, **write)


# ---- int4_per_token_head: keys per channel within a block ------------------------------------------------
# The format and the write are defined in PyTorch (runtime/quant.py quantize_channels, runtime/kv_cache.py KeyPlan /
# KVCache.write): two caches over the same poisoned pools, one writing through the kernels (host emulation), one
# through PyTorch, see the same steps and must hold the same bytes after each (K data, K per-channel params, V,
# V params); decode attention over the kernel cache must match cpu_attention.decode_attention_torch.

CHANNEL_STEPS = [  # (starts, counts) per step for two sequences, block_size 8 (open rows of a block: 4 + 4)
    ((0, 0), (6, 11)),  # prefill: seq 0 open past its half (helper); seq 1 completes block 0 alone, opens block 1
    ((6, 11), (1, 1)),
    ((7, 12), (1, 1)),  # seq 0 completes block 0 from 7 open rows (3 in the helper); seq 1 crosses its half
    ((8, 13), (1, 3)),  # seq 1 completes block 1 from 5 open rows
    ((9, 16), (3, 1)),
    ((12, 17), (1, 1)),  # seq 0 past its half
    ((13, 18), (13, 1)),  # seq 0: completes block 1 (open rows in block 2) and block 2, opens block 3
    ((26, 19), (4, 1)),  # seq 0 crosses its half
    ((30, 20), (4, 1)),  # seq 0: completes block 3 and opens block 4 where block 3's rows 4, 5 were (its helper)
    ((34, 21), (6, 11)),  # seq 1: all rows alike (constant channels: scale 0); block 3 completed with no helper
    ((40, 32), (8, 0)),  # seq 0 completes block 5 in one write; seq 1 writes nothing
    ((48, 32), (8, 0)),  # seq 0 completes block 6 in one write, the last of its table (no helper)
]
CHANNEL_IDS = ([9, 2, 12, 0, 7, 4, 10], [5, 11, 1, 6])  # seq 0 ends at 56 tokens, seq 1 at 32; 8, 3: spare
SAME_ROWS_STEP = 9  # seq 1's rows are all one row in this step


def channel_caches(num_blocks, hkv, block_size, dim, gen, kernels_module, device="cpu", rotation=None):
    """(kernel cache on device, PyTorch cache on the CPU) over the same poisoned pools: random bytes, NaN params."""
    caches = [
        KVCache(1, num_blocks, hkv, block_size, dim, OnlineQuantizer(CHANNEL, rotation, dev), dev, kernels=m)
        for m, dev in ((kernels_module, device), (None, "cpu"))
    ]
    data = [torch.randint(0, 256, caches[0].shape, dtype=torch.uint8, generator=gen) for _ in range(2)]
    for c in caches:
        c.k[0].copy_(data[0])
        c.v[0].copy_(data[1])
        c.k_param[0].fill_(float("nan"))
        c.v_param[0].fill_(float("nan"))
    return caches


def channel_step(caches, step: int, act, gen) -> list[int]:
    """Write CHANNEL_STEPS[step] into both caches (hard rows, keys with per-channel offsets); the lengths after."""
    (starts, counts), bs = CHANNEL_STEPS[step], caches[0].block_size
    plan = key_plan(list(CHANNEL_IDS), list(starts), list(counts), bs)
    slots = [
        ids[t // bs] * bs + t % bs
        for ids, s, n in zip(CHANNEL_IDS, starts, counts, strict=True)
        for t in range(s, s + n)
    ]
    n, (hkv, dim) = len(slots), (caches[0].k[0].shape[1], caches[0].head_dim)
    k, v = hard_rows(n, hkv, dim, gen), hard_rows(n, hkv, dim, gen)
    k[1::2] += torch.randn(hkv, dim, generator=gen) * 4  # post-RoPE-like per-channel offsets on half the rows
    if step == SAME_ROWS_STEP:
        k[counts[0] :] = k[counts[0]]
    for c in caches:
        dev = c.k[0].device
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        c.write(0, slot_mapping, k.to(dev, act), v.to(dev, act), KeyPlan(*(t.to(dev) for t in plan)))
    return [s + n for s, n in zip(starts, counts, strict=True)]


def assert_same_cache(got: KVCache, want: KVCache, what: str) -> None:
    for name in ("k", "k_param", "v", "v_param"):
        a, b = getattr(got, name)[0].cpu(), getattr(want, name)[0].cpu()
        diff = a.view(torch.uint8) != b.view(torch.uint8)
        assert not diff.any(), f"{what}: {name}: {int(diff.sum())} bytes differ"


def channel_attention_check(
    cache: KVCache, lengths: list[int], act, gen, what: str, decode_attention, slack: float = 1.0, **kw
):
    """decode_attention (host_ops or kernels) over the cache vs decode_attention_torch (fp32, same q values);
    slack widens the tolerance (the GPU's exp2f)."""
    dev = cache.k[0].device
    max_blocks = max(len(ids) for ids in CHANNEL_IDS)
    tables = torch.full((2, max_blocks), -1, dtype=torch.int32)
    for b, ids in enumerate(CHANNEL_IDS):
        tables[b, : len(ids)] = torch.tensor(ids)
    q = torch.randn(2, 4, cache.head_dim, generator=gen).to(act)
    lens = torch.tensor(lengths, dtype=torch.int32)
    pools = (cache.k[0].cpu(), cache.v[0].cpu(), tables, lens, None, None, None, None)
    params = dict(k_param=cache.k_param[0].cpu(), v_param=cache.v_param[0].cpu())
    want = decode_attention_torch(q.float(), *pools, 0.125, kv_dtype=CHANNEL, **params).double()
    cond = attention_conditioning(cache, q, tables, lens, 0.125)
    for splits in (1, 3):
        got = decode_attention(
            q.to(dev),
            cache.k[0],
            cache.v[0],
            tables.to(dev),
            lens.to(dev),
            None,
            None,
            None,
            None,
            CHANNEL,
            0.125,
            max_length=max(lengths),
            k_param=cache.k_param[0],
            v_param=cache.v_param[0],
            num_splits=splits,
            **kw,
        ).cpu()
        assert got.dtype == act
        err, bound = (got.double() - want).abs(), slack * (1e-5 + ACT_TOL[act] * want.abs() + 4 * 2**-24 * cond)
        assert (err <= bound).all(), f"{what}, splits={splits}: max err {err.max():.3g}"


def attention_conditioning(cache: KVCache, q: torch.Tensor, tables, lens, softmax_scale: float) -> torch.Tensor:
    """(B, H, 1): (1 + max |score| in the log2 domain) * max |v^| over each sequence: the scale of fp32 attention's
    rounding error. A score s rounds by ~|s| * 2^-24, which moves its weight 2^s by that much relative, and the
    output (a mix of v^ rows) by that times |v^|: two correct fp32 evaluations summing in different orders (the
    kernel, the PyTorch reference) differ by a few of these units where the hard rows make the scores large."""
    bs, (n, H, D), hkv = cache.block_size, q.shape, cache.k[0].shape[1]
    tables, lens = tables.long(), lens.long()
    pos = torch.arange(int(lens.max())).view(1, -1).expand(n, -1)
    valid = pos < lens.view(-1, 1)
    pos = pos.masked_fill(~valid, 0)
    k = gather_channel_keys(cache.k[0].cpu(), cache.k_param[0].cpu(), tables, lens, pos)  # (n, c, H_kv, D)
    pages, rows = tables.gather(1, pos // bs), pos % bs
    v = quant.dequantize_online(cache.v[0].cpu()[pages, :, rows], cache.v_param[0].cpu()[pages, :, rows], CHANNEL)
    scores = torch.einsum("nkgd,nckd->nkgc", q.float().view(n, hkv, H // hkv, D), k) * softmax_scale / math.log(2)
    s_max = scores.masked_fill(~valid.view(n, 1, 1, -1), 0).abs().amax(-1)  # (n, H_kv, G)
    v_max = v.abs().masked_fill(~valid.view(n, -1, 1, 1), 0).amax(dim=(1, 3))  # (n, H_kv)
    return ((1 + s_max) * v_max.unsqueeze(-1)).view(n, H, 1).double()


@pytest.mark.parametrize(
    "act, dim, rotate",
    [(torch.float32, 64, False), (torch.float32, 128, True), (torch.float16, 128, False), (torch.bfloat16, 64, False)],
)
def test_channel_keys_write_steps_match_pytorch(act, dim, rotate):
    """Prefill, decode steps and chunks over two sequences (CHANNEL_STEPS): the kernels' cache equals the PyTorch
    write bit for bit after every step (open rows, helper rows, completed blocks, values), and decode attention
    over it matches decode_attention_torch at every step's lengths, one split and three."""
    gen = torch.Generator().manual_seed(dim + 3 * rotate + list(kernels.ACT_TYPES).index(act))
    rotation = quant.hadamard(dim, seed=1) if rotate else None
    caches = channel_caches(13, 2, 8, dim, gen, host_ops, rotation=rotation)
    for step in range(len(CHANNEL_STEPS)):
        lengths = channel_step(caches, step, act, gen)
        assert_same_cache(*caches, f"step {step} {CHANNEL_STEPS[step]}")
        channel_attention_check(caches[0], lengths, act, gen, f"step {step}", host_ops.decode_attention, num_sms=4)
    assert lengths == [56, 32]
    flat = caches[0].k_param[0][CHANNEL_IDS[1][3], :, 0]  # seq 1's block 3: all rows alike
    assert (flat == 0).all(), "constant channels store scale 0"


def test_channel_keys_kernel_skips_bad_plan_entries():
    """k_complete entries outside the pool or the step and helpers outside the pool write no key (memory safety;
    the engine never passes them)."""
    gen = torch.Generator().manual_seed(9)
    caches = channel_caches(6, 2, 8, 64, gen, host_ops)
    k, v = hard_rows(9, 2, 64, gen), hard_rows(9, 2, 64, gen)
    slots = torch.tensor([8 + r for r in range(8)] + [2 * 8])
    plan = key_plan([[1, 2, 3]], [0], [9], 8)
    for c in caches:
        c.write(0, slots, k, v, plan)
    before = [t.clone() for t in (caches[0].k[0], caches[0].k_param[0])]
    bad = torch.tensor([[6, -1, 0, 0], [-1, 2, 0, 0], [1, 2, 9, 0], [1, 2, 0, 5], [1, -1, 5, 0], [1, 99, 6, 6]])
    helper = torch.tensor([6, 99, -1])
    host_ops.kv_cache_write(
        caches[0].k[0],
        caches[0].v[0],
        k[:3],
        v[:3],
        torch.tensor([0, 1, 2]),
        None,
        None,
        None,
        None,
        CHANNEL,
        k_param=caches[0].k_param[0],
        v_param=caches[0].v_param[0],
        k_helper=helper,
        k_complete=bad,
    )
    assert torch.equal(caches[0].k[0].view(torch.uint8), before[0].view(torch.uint8))
    assert torch.equal(caches[0].k_param[0].view(torch.uint8), before[1].view(torch.uint8))


def test_channel_keys_attention_masks_a_missing_helper():
    """An open block past its half whose helper entry is padding (-1), outside the pool, or past the table's end:
    the kernel never dereferences it and drops those keys (memory safety; the engine always passes the helper, and
    decode_attention_torch rejects such a table): the output is attention over the keys in the open block itself."""
    gen = torch.Generator().manual_seed(13)
    caches = channel_caches(4, 2, 8, 64, gen, host_ops)
    k, v = hard_rows(7, 2, 64, gen), hard_rows(7, 2, 64, gen)
    for c in caches:
        c.write(0, torch.arange(8, 15), k, v, key_plan([[1, 2]], [0], [7], 8))
    cache, q = caches[0], torch.randn(1, 4, 64, generator=gen)
    pools = (cache.k[0], cache.v[0])
    params = dict(k_param=cache.k_param[0], v_param=cache.v_param[0])
    four = torch.tensor([4], dtype=torch.int32)  # rows 0..3: no helper needed
    want = decode_attention_torch(
        q, *pools, torch.tensor([[1, -1]]), four, *[None] * 4, 0.125, kv_dtype=CHANNEL, **params
    )
    seven = torch.tensor([7], dtype=torch.int32)
    for table in ([[1, -1]], [[1, 4]], [[1]]):
        tables = torch.tensor(table, dtype=torch.int32)
        got = host_ops.decode_attention(q, *pools, tables, seven, *[None] * 4, CHANNEL, 0.125, **params)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), table
