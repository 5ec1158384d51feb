"""The CUDA kernels executed on the CPU (same .cu files, g++ + cuda_host_emulation.h) against PyTorch references.

References: runtime/quant.py (the project's formulas) and torch's own float16 / bfloat16 / float8 casts.
Tolerances:
  - cache writes (fp16 / int8 / fp8) and every conversion: bit-exact;
  - decode attention vs a float64 reference on the dequantized cache: fp32 output |err| <= 1e-5 + 1e-4 |ref|
    (fp32 accumulation, exp2f); fp16 output 1e-5 + 1e-3 |ref| (one fp16 rounding); bf16 1e-5 + 8e-3 |ref|.
"""

from __future__ import annotations

import math

import pytest
import torch

from runtime import quant
from runtime.cuda import kernels

host_ops = pytest.importorskip("runtime.cuda.host_ops")

FP8_KINDS = ("fp8_e4m3", "fp8_e5m2")
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
    """Per-head (H_kv,) parameters from x (..., H_kv, D), deliberately tight so some values saturate."""
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


@pytest.mark.parametrize("kv_dtype", list(kernels.KV_MODES))
@pytest.mark.parametrize("act", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_write_is_bit_exact(kv_dtype, act):
    gen = torch.Generator().manual_seed(hash((kv_dtype, str(act))) % 2**31)
    num_slots, hkv, max_seq, dim = 3, 3, 23, 64 if act != torch.float16 else 128
    n = 29  # tokens: distinct (slot, position) pairs, scattered
    flat = torch.randperm(num_slots * max_seq, generator=gen)[:n]
    slots, positions = flat // max_seq, flat % max_seq
    k_new = (torch.randn(n, hkv, dim, generator=gen) * 3).to(act)
    v_new = (torch.randn(n, hkv, dim, generator=gen) * 2 + 0.5).to(act)
    params = make_params(kv_dtype, k_new.float())
    storage = quant.STORAGE_DTYPES[kv_dtype]
    sentinel = torch.randint(
        0, 256, (2, num_slots, hkv, max_seq, dim * storage.itemsize), dtype=torch.uint8, generator=gen
    )
    k_cache, v_cache = (sentinel[i].clone().view(storage) for i in range(2))
    # Two extra tokens that must be skipped: position past S and slot -1.
    bad_k = torch.randn(2, hkv, dim).to(act)
    host_ops.kv_cache_write(
        k_cache,
        v_cache,
        torch.cat([k_new, bad_k]),
        torch.cat([v_new, bad_k]),
        torch.cat([slots, torch.tensor([0, -1])]).to(torch.int32),
        torch.cat([positions, torch.tensor([max_seq + 5, 0])]),
        **params,
        kv_dtype=kv_dtype,
    )
    k_scale, k_zp, v_scale, v_zp = full_params(params, hkv)
    want_k, want_v = (sentinel[i].clone().view(storage) for i in range(2))
    # quant.quantize wants (..., H_kv, T, D): treat the N tokens as T.
    want_k[slots, :, positions] = quant.quantize(k_new.transpose(0, 1), kv_dtype, k_scale, k_zp).transpose(0, 1)
    want_v[slots, :, positions] = quant.quantize(v_new.transpose(0, 1), kv_dtype, v_scale, v_zp).transpose(0, 1)
    assert torch.equal(k_cache.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), want_v.view(torch.uint8))


# ---- decode attention ------------------------------------------------------------------------------------


def reference_attention(q, k_cache, v_cache, slots, lengths, params: dict, kv_dtype: str, softmax_scale: float):
    """float64 attention over quant.dequantize(cache); zero output for empty sequences."""
    num_kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    k_scale, k_zp, v_scale, v_zp = full_params(params, num_kv_heads)
    keys = quant.dequantize(k_cache.cpu(), kv_dtype, k_scale.cpu(), k_zp.cpu()).double()
    values = quant.dequantize(v_cache.cpu(), kv_dtype, v_scale.cpu(), v_zp.cpu()).double()
    batch, num_heads, dim = q.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(batch, num_heads, dim, dtype=torch.float64)
    for b in range(batch):
        length = max(0, min(int(lengths[b]), max_seq))
        if length == 0:
            continue
        k = keys[int(slots[b]), :, :length].repeat_interleave(group, 0)  # (H, L, D)
        v = values[int(slots[b]), :, :length].repeat_interleave(group, 0)
        p = torch.softmax(torch.einsum("hd,hld->hl", q[b].cpu().double(), k) * softmax_scale, dim=-1)
        out[b] = torch.einsum("hl,hld->hd", p, v)
    return out


def random_cache(kv_dtype, num_slots, hkv, max_seq, dim, symmetric, gen):
    """Caches quantized by quant.quantize from K with channel outliers and shifted V, and their parameters."""
    k = torch.randn(num_slots, hkv, max_seq, dim, generator=gen) * (1 + 4 * torch.rand(dim, generator=gen))
    v = torch.randn(num_slots, hkv, max_seq, dim, generator=gen) + 0.3
    params = make_params(kv_dtype, k.permute(0, 2, 1, 3).reshape(-1, hkv, dim), symmetric)
    if kv_dtype == "int8":  # V gets its own range
        v_scale, v_zp = quant.int8_params(
            *(
                f(v.transpose(0, 1).reshape(hkv, -1))
                for f in (lambda t: t.amax(1), lambda t: t.amin(1), lambda t: t.abs().amax(1))
            ),
            symmetric,
        )
        params.update(v_scale=v_scale, v_zp=v_zp)
    k_scale, k_zp, v_scale, v_zp = full_params(params, hkv)
    return quant.quantize(k, kv_dtype, k_scale, k_zp), quant.quantize(v, kv_dtype, v_scale, v_zp), params


ATTENTION_CASES = [  # kv_dtype, head_dim, H, H_kv, q dtype, symmetric int8
    ("fp16", 128, 8, 8, torch.float32, False),
    ("int8", 64, 9, 3, torch.float32, False),  # SmolLM2 shape
    ("int8", 128, 16, 2, torch.float16, True),
    ("fp8_e4m3", 128, 8, 1, torch.float32, False),
    ("fp8_e5m2", 64, 3, 3, torch.bfloat16, False),
    ("fp8_e4m3", 64, 6, 2, torch.float16, False),
    ("fp16", 64, 6, 2, torch.float16, False),
]


@pytest.mark.parametrize(
    "case", ATTENTION_CASES, ids=lambda c: f"{c[0]}-D{c[1]}-H{c[2]}-KV{c[3]}-{c[4]}".replace("torch.", "")
)
def test_decode_attention_matches_reference(case):
    kv_dtype, dim, num_heads, hkv, act, symmetric = case
    gen = torch.Generator().manual_seed(sum(map(ord, str(case))))
    num_slots, max_seq = 5, 261
    k_cache, v_cache, params = random_cache(kv_dtype, num_slots, hkv, max_seq, dim, symmetric, gen)
    slots = torch.tensor([3, 0, 4, 1, 2], dtype=torch.int32)
    lengths = torch.tensor([1, max_seq, 129, 0, 200])  # length 1, full, not a multiple of any block, empty
    q = torch.randn(5, num_heads, dim, generator=gen).to(act)
    scale = 1 / math.sqrt(dim)
    want = reference_attention(q, k_cache, v_cache, slots, lengths, params, kv_dtype, scale)
    tol = ACT_TOL[act]
    # one block per (head, sequence), and split-K over 5 chunks of 53 keys (some empty) plus the combine pass
    for splits in (1, 5):
        got = host_ops.decode_attention(
            q, k_cache, v_cache, slots, lengths, **params, kv_dtype=kv_dtype, softmax_scale=scale, num_splits=splits
        )
        assert got.dtype == act and got.shape == q.shape
        err = (got.double() - want).abs()
        bound = 1e-5 + tol * want.abs()
        assert (err <= bound).all(), f"splits={splits}: max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"
    assert got[3].abs().max() == 0  # the empty sequence


# ---- argument checks and planning ------------------------------------------------------------------------


def test_launch_checks_name_the_bad_argument():
    k_cache = torch.zeros(2, 2, 16, 64, dtype=torch.int8)
    q = torch.zeros(1, 4, 64)
    one = torch.ones(2)
    ok = dict(k_scale=one, k_zp=one, v_scale=one, v_zp=one, kv_dtype="int8", max_length=None, num_sms=1)
    idx = torch.zeros(1, dtype=torch.int32)
    kernels.prepare_attention(q, k_cache, k_cache, idx, idx, **ok)
    bad = [
        (dict(kv_dtype="fp8_e4m3"), "k_cache.dtype"),
        (dict(kv_dtype="int4"), "kv_dtype"),
        (dict(k_zp=None), "k_zp"),
        (dict(v_scale=torch.ones(3)), "v_scale.shape"),
        (dict(k_scale=torch.ones(2, dtype=torch.float16)), "k_scale.dtype"),
    ]
    for override, needle in bad:
        with pytest.raises(kernels.CudaOpError, match=needle.replace(".", r"\.")):
            kernels.prepare_attention(q, k_cache, k_cache, idx, idx, **{**ok, **override})
    with pytest.raises(kernels.CudaOpError, match="num_heads % num_kv_heads"):
        kernels.prepare_attention(torch.zeros(1, 3, 64), k_cache, k_cache, idx, idx, **ok)
    with pytest.raises(kernels.CudaOpError, match="non-contiguous"):
        kernels.prepare_attention(torch.zeros(1, 64, 4).transpose(1, 2), k_cache, k_cache, idx, idx, **ok)
    with pytest.raises(kernels.CudaOpError, match="head_dim"):
        kernels.prepare_attention(q, torch.zeros(2, 2, 16, 96, dtype=torch.int8), k_cache, idx, idx, **ok)
    with pytest.raises(kernels.CudaOpError, match="slots.dtype"):
        kernels.prepare_attention(q, k_cache, k_cache, idx.float(), idx, **ok)
    with pytest.raises(kernels.CudaOpError, match="positions.shape"):
        kernels.prepare_write(
            k_cache,
            k_cache,
            torch.zeros(3, 2, 64),
            torch.zeros(3, 2, 64),
            torch.zeros(3, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int64),
            one,
            one,
            one,
            one,
            "int8",
        )


def test_plan_splits():
    assert kernels.plan_splits(64, 32, 8192, 132) == (1, 8192)  # enough blocks: no second pass
    splits, chunk = kernels.plan_splits(1, 32, 8192, 132)
    assert splits > 8 and chunk >= kernels.MIN_CHUNK and splits * chunk >= 8192
    assert kernels.plan_splits(2, 9, 100, 132) == (1, 100)  # short context: never below MIN_CHUNK keys
    for batch, heads, length in ((1, 9, 8192), (3, 8, 333), (4, 32, 1), (1, 1, 257)):
        splits, chunk = kernels.plan_splits(batch, heads, length, 132)
        assert (splits - 1) * chunk < length <= splits * chunk  # no split is empty at max_length
