"""KV cache: quantize-on-write through a slot mapping against hand formulas, block gathers, FP8 on-the-fly
scales, and the byte count. No model needed (decode attention: tests/test_paged_attention.py)."""

from __future__ import annotations

import pytest
import torch

from runtime import cpu_write
from runtime.kv_cache import KVCache, StaticQuantizer

KV_DTYPES = ("fp16", "int8", "fp8_e4m3", "fp8_e5m2")
FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}


def ref_quantize(x: torch.Tensor, kv: str, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """Independent reference: x (B, H_kv, T, D), per-head scale/zp (H_kv,)."""
    s, z = scale.view(-1, 1, 1), zp.view(-1, 1, 1)
    if kv == "fp16":
        return x.half()
    if kv == "int8":  # round half to even, saturate to [-128, 127]
        return torch.clamp(torch.round((x - z) / s), -128, 127).to(torch.int8)
    dt, fmax = FP8[kv]
    return torch.clamp(x / s, -fmax, fmax).to(dt)


def params(kv: str, H: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kv == "fp16":
        return torch.ones(H), torch.zeros(H), torch.ones(H), torch.zeros(H)
    ks, vs = torch.rand(H, generator=g) * 0.05 + 0.01, torch.rand(H, generator=g) * 0.05 + 0.01
    kz = torch.randn(H, generator=g) * 0.2 if kv == "int8" else torch.zeros(H)
    vz = torch.randn(H, generator=g) * 0.2 if kv == "int8" else torch.zeros(H)
    return ks, kz, vs, vz


@pytest.mark.parametrize("fast", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("kv", KV_DTYPES)
def test_write_quantizes_like_the_hand_formula(kv, fast):
    L, H, NB, BS, D = 2, 3, 6, 4, 8
    ks, kz, vs, vz = params(kv, H)
    quantizer = StaticQuantizer(
        kv, torch.stack([ks, ks * 2]), torch.stack([kz, kz]), torch.stack([vs, vs]), torch.stack([vz, vz])
    )
    cache = KVCache(L, NB, H, BS, D, quantizer)
    cache.fast_write = fast  # the C++ write (runtime.cpu_write) where it builds, or the PyTorch one
    torch.manual_seed(1)
    k, v = torch.randn(7, H, D) * 2, torch.randn(7, H, D) * 3  # seven new tokens
    if kv != "fp16":
        k[0, 0, 0] = 1e6  # saturates, never overflows
    # a sequence on blocks [5, 2] from position 2 (5 tokens: rows 2, 3 of block 5, then 0..2 of block 2),
    # another on block [0] (2 tokens)
    slots = torch.tensor([5 * BS + 2, 5 * BS + 3, 2 * BS, 2 * BS + 1, 2 * BS + 2, 0, 1])
    cache.write(1, slots, k, v)
    assert cache.k[1].dtype == quantizer.storage_dtype and cache.k[1].shape == (NB, H, BS, D)
    want_k = ref_quantize(k.transpose(0, 1), kv, ks * 2 if kv != "fp16" else ks, kz).transpose(0, 1)  # (N, H, D)
    want_v = ref_quantize(v.transpose(0, 1), kv, vs, vz).transpose(0, 1)
    for n, slot in enumerate(slots.tolist()):
        assert torch.equal(cache.k[1][slot // BS, :, slot % BS].float(), want_k[n].float())
        assert torch.equal(cache.v[1][slot // BS, :, slot % BS].float(), want_v[n].float())
    assert torch.isfinite(cache.k[1].float()).all()
    untouched = [b for b in range(NB) if b not in (0, 2, 5)]
    assert (cache.k[1][untouched] == 0).all() and (cache.k[0] == 0).all()  # other blocks and layers
    assert (cache.k[1][5, :, :2] == 0).all() and (cache.k[1][2, :, 3:] == 0).all()  # rows before/after


@pytest.mark.skipif(not cpu_write.takes_static("int8", torch.zeros(1)), reason="the C++ write does not build here")
@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_fp8_write_rounds_like_torch_at_every_tie(kv, dtype):
    """Every finite fp8 value, the midpoints between neighbours (ties go to the even code) and the fp32 neighbours
    of each midpoint, both signs, through the C++ static write (scale 1) against torch's cast."""
    fdt, fmax = FP8[kv]
    vals = torch.arange(256, dtype=torch.uint8).view(fdt).float()
    vals = vals[vals.isfinite() & (vals >= 0)].sort().values
    mids = (vals[1:] + vals[:-1]) / 2  # exact in fp32
    x = torch.cat([vals, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e9)), -vals, -mids])
    x = torch.cat([x, torch.tensor([fmax * 1.5, -fmax * 3, 1e-30, -1e-30])]).to(dtype)
    N, H, D, BS = x.numel(), 1, 1, 8
    pool = [torch.zeros(-(-N // BS), H, BS, D, dtype=fdt) for _ in range(2)]
    ones, zeros = torch.ones(H), torch.zeros(H)
    cpu_write.static_write(x.view(N, H, D), -x.view(N, H, D), torch.arange(N), kv, *pool, ones, zeros, ones, zeros)
    for got, src in zip(pool, (x, -x), strict=True):
        want = src.float().clamp(-fmax, fmax).to(fdt)
        assert torch.equal(got.view(-1)[:N].view(torch.uint8), want.view(torch.uint8))


def test_read_gathers_blocks_in_table_order():
    H, BS, D = 2, 4, 8
    cache = KVCache(1, 5, H, BS, D, StaticQuantizer.identity("fp16", 1, H))
    x = torch.randn(10, H, D)
    table = [3, 0, 4]  # tokens 0-3 in block 3, 4-7 in block 0, 8-9 in block 4
    slots = torch.tensor([table[t // BS] * BS + t % BS for t in range(10)])
    cache.write(0, slots, x, -x)
    k, v = cache.read(0, torch.tensor([table]), 10, torch.float32)  # (1, H, 10, D)
    torch.testing.assert_close(k[0], x.half().float().transpose(0, 1))
    torch.testing.assert_close(v[0], -x.half().float().transpose(0, 1))


def test_int8_and_fp8_store_half_the_bytes_of_fp16():
    sizes = {kv: KVCache(2, 3, 2, 10, 8, StaticQuantizer.identity(kv, 2, 2)).nbytes() for kv in KV_DTYPES}
    data16 = 2 * 2 * 3 * 2 * 10 * 8 * 2  # K and V, 2 layers, 3 blocks of 10 tokens, 2 KV heads, D 8, 2 bytes
    side = 4 * 2 * 2 * 4  # four (layers, H_kv) fp32 parameter tensors
    assert sizes["fp16"] == data16 + side
    for kv in ("int8", "fp8_e4m3", "fp8_e5m2"):
        assert sizes[kv] == data16 // 2 + side


def test_calculate_kv_scales_sets_vllm_scales_once_then_saturates():
    q = StaticQuantizer.identity("fp8_e4m3", 2, 3, dynamic=True)
    k, v = torch.randn(1, 3, 4, 8) * 5, torch.randn(1, 3, 4, 8)
    q.observe(0, k, v)
    ks, _ = q.affine(0, "k")
    vs, _ = q.affine(0, "v")
    assert torch.allclose(ks, torch.full((3,), float(k.abs().max()) / 200))  # vLLM: amax/200 for K, amax/100 for V
    assert torch.allclose(vs, torch.full((3,), float(v.abs().max()) / 100))
    q.observe(0, k * 100, v * 100)  # later prompts keep the first scales
    assert torch.allclose(q.affine(0, "k")[0], ks)
    big = q.quantize(k * 1000, 0, "k")
    assert torch.isfinite(big.float()).all() and big.float().abs().max() == 448.0
    assert torch.equal(q.affine(1, "k")[0], torch.ones(3))  # layer 1 not seen yet


@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3", "int8_per_token_head"])
def test_decode_attention_follows_parameters_and_pools_across_steps(kv):
    """KVCache.decode_attention binds the C++ kernel to each layer's pools once (DecodePlan) where it builds: a
    later call still reads the parameters as they are now (FP8's dynamic scales are set in place after the first
    prompt) and the pool's current contents, equal to the torch reference on the same arguments every time."""
    from runtime.cpu_attention import decode_attention_torch
    from runtime.kv_cache import OnlineQuantizer

    L, H, Hq, NB, BS, D = 2, 3, 9, 4, 16, 64
    online = kv.endswith("per_token_head")
    quantizer = OnlineQuantizer(kv) if online else StaticQuantizer(kv, *(torch.stack([p, p]) for p in params(kv, H)))
    cache = KVCache(L, NB, H, BS, D, quantizer)
    g = torch.Generator().manual_seed(3)
    slots = torch.arange(40)
    tables, lengths = torch.tensor([[0, 1, 2]], dtype=torch.int32), torch.tensor([40], dtype=torch.int32)
    q = torch.randn(1, Hq, D, generator=g)

    def check(layer: int) -> None:
        got = cache.decode_attention(layer, q, tables, lengths, D**-0.5)
        qr = quantizer.rotate(q) if online else q
        want = decode_attention_torch(
            qr,
            cache.k[layer],
            cache.v[layer],
            tables,
            lengths,
            *cache._affine(layer),
            D**-0.5,
            kv_dtype=kv,
            **cache._params(layer),
        )
        torch.testing.assert_close(got, quantizer.unrotate(want) if online else want, rtol=1e-5, atol=1e-5)

    for step in range(2):
        cache.write(1, slots, torch.randn(40, H, D, generator=g), torch.randn(40, H, D, generator=g))
        check(1)
        if not online:  # new scales in place, as FP8's dynamic scales are set
            for which in ("k", "v"):
                quantizer.params[which][0][1].mul_(1.5 + step)
            check(1)
