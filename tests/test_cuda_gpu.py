"""Real RawKernel launches on a CUDA device, compared with the CPU emulation and the PyTorch references.

Marked `gpu`; skipped cleanly where CuPy finds no device (no driver, no GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from runtime import quant

pytestmark = pytest.mark.gpu


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0 and torch.cuda.is_available()
    except Exception as exc:  # cupy missing, or cudaErrorInsufficientDriver / no device: skip, with the reason
        print(f"no GPU for the CUDA tests: {exc!r}")
        return False


if not _gpu_available():
    pytest.skip("needs a CUDA device (cupy.cuda.runtime.getDeviceCount() failed or is 0)", allow_module_level=True)

from test_cuda_cpu import ACT_TOL, ATTENTION_CASES, make_params, random_cache, reference_attention  # noqa: E402

from runtime.cuda import decode_attention, host_ops, kv_cache_write  # noqa: E402


def _cuda(p: dict) -> dict:
    return {k: (None if v is None else v.cuda()) for k, v in p.items()}


@pytest.mark.parametrize("kv_dtype", ["fp16", "int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("act", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_kv_write_matches_reference_bit_exactly(kv_dtype, act):
    gen = torch.Generator().manual_seed(7)
    num_slots, hkv, max_seq, dim, n = 4, 4, 1000, 128, 700
    flat = torch.randperm(num_slots * max_seq, generator=gen)[:n]
    slots, positions = flat // max_seq, flat % max_seq
    k_new = (torch.randn(n, hkv, dim, generator=gen) * 3).to(act)
    v_new = (torch.randn(n, hkv, dim, generator=gen) * 2).to(act)
    params = make_params(kv_dtype, k_new.float())
    storage = quant.STORAGE_DTYPES[kv_dtype]
    k_cache = torch.zeros(num_slots, hkv, max_seq, dim, dtype=storage, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    kv_cache_write(
        k_cache, v_cache, k_new.cuda(), v_new.cuda(), slots.cuda(), positions.cuda(), **_cuda(params), kv_dtype=kv_dtype
    )
    k_host, v_host = torch.zeros_like(k_cache, device="cpu"), torch.zeros_like(v_cache, device="cpu")
    host_ops.kv_cache_write(k_host, v_host, k_new, v_new, slots, positions, **params, kv_dtype=kv_dtype)
    assert torch.equal(k_cache.cpu().view(torch.uint8), k_host.view(torch.uint8))
    assert torch.equal(v_cache.cpu().view(torch.uint8), v_host.view(torch.uint8))


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_gpu_decode_attention_matches_reference(case, splits):
    kv_dtype, dim, num_heads, hkv, act, symmetric = case
    gen = torch.Generator().manual_seed(11)
    num_slots, max_seq = 6, 2049
    k_cache, v_cache, params = random_cache(kv_dtype, num_slots, hkv, max_seq, dim, symmetric, gen)
    slots = torch.tensor([5, 0, 3, 1, 2, 4], dtype=torch.int32)
    lengths = torch.tensor([1, max_seq, 1000, 0, 77, 1500], dtype=torch.int32)
    q = torch.randn(6, num_heads, dim, generator=gen).to(act)
    scale = 1 / math.sqrt(dim)
    want = reference_attention(q, k_cache, v_cache, slots, lengths, params, kv_dtype, scale)
    got = decode_attention(
        q.cuda(),
        k_cache.cuda(),
        v_cache.cuda(),
        slots.cuda(),
        lengths.cuda(),
        **_cuda(params),
        kv_dtype=kv_dtype,
        softmax_scale=scale,
        num_splits=splits,
    ).cpu()
    err = (got.double() - want).abs()
    # exp2f / division may use the GPU's approximate paths: allow a little more than on the CPU
    bound = 2e-5 + 2 * ACT_TOL[act] * want.abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}"
