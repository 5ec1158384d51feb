"""Real RawKernel launches on a CUDA device, compared with the CPU emulation and the PyTorch references.

Marked `gpu`; skipped cleanly where CuPy finds no device (no driver, no GPU). Same paged cases as the CPU tests
(tests/test_paged_attention.py make_case: shuffled blocks in a NaN / garbage pool, padded block tables), with
longer sequences so that the split-K plan and many key tiles are exercised.
"""

from __future__ import annotations

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

from test_cuda_cpu import (  # noqa: E402
    ACT_TOL,
    ATTENTION_CASES,
    CHANNEL_STEPS,
    ONLINE_CASES,
    ROW_ONLINE,
    assert_same_cache,
    case_id,
    channel_attention_check,
    channel_caches,
    channel_step,
    hard_rows,
    kernel_params,
    make_params,
    online_case,
    online_case_id,
    online_poison,
    online_reference,
)
from test_paged_attention import make_case  # noqa: E402

from runtime.cpu_attention import decode_attention_torch  # noqa: E402
from runtime.cuda import decode_attention, host_ops, kv_cache_write  # noqa: E402


def _cuda(p: dict) -> dict:
    return {k: (None if v is None else v.cuda()) for k, v in p.items()}


@pytest.mark.parametrize("kv_dtype", ["fp16", "int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("act", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_kv_write_matches_reference_bit_exactly(kv_dtype, act):
    gen = torch.Generator().manual_seed(7)
    num_blocks, hkv, block_size, dim, n = 64, 4, 16, 128, 700
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[::50] = -1  # skipped tokens
    k_new = (torch.randn(n, hkv, dim, generator=gen) * 3).to(act)
    v_new = (torch.randn(n, hkv, dim, generator=gen) * 2).to(act)
    params = make_params(kv_dtype, k_new.float())
    storage = quant.STORAGE_DTYPES[kv_dtype]
    k_pool = torch.zeros(num_blocks, hkv, block_size, dim, dtype=storage, device="cuda")
    v_pool = torch.zeros_like(k_pool)
    slot_mapping = slots.to(torch.int32)
    kv_cache_write(k_pool, v_pool, k_new.cuda(), v_new.cuda(), slot_mapping.cuda(), **_cuda(params), kv_dtype=kv_dtype)
    k_host, v_host = torch.zeros_like(k_pool, device="cpu"), torch.zeros_like(v_pool, device="cpu")
    host_ops.kv_cache_write(k_host, v_host, k_new, v_new, slot_mapping, **params, kv_dtype=kv_dtype)
    assert torch.equal(k_pool.cpu().view(torch.uint8), k_host.view(torch.uint8))
    assert torch.equal(v_pool.cpu().view(torch.uint8), v_host.view(torch.uint8))


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_gpu_decode_attention_matches_reference(case, splits):
    kv_dtype, dim, num_heads, hkv, act, symmetric, block_size = case
    lengths = [1, block_size, 0, 1000, 77, 2049]
    c = make_case(kv_dtype, dim, hkv, num_heads // hkv, block_size, lengths, 11, act, symmetric, torch.int32)
    want = decode_attention_torch(c.q.float(), *c.args()[1:])  # fp32 reference on the same q values
    got = decode_attention(
        c.q.cuda(),
        c.k_pool.cuda(),
        c.v_pool.cuda(),
        c.block_tables.cuda(),
        c.lengths.cuda(),
        **_cuda(kernel_params(c)),
        kv_dtype=kv_dtype,
        softmax_scale=c.softmax_scale,
        max_length=max(lengths),
        num_splits=splits,
    ).cpu()
    err = (got.double() - want.double()).abs()
    # exp2f / division may use the GPU's approximate paths: allow a little more than on the CPU
    bound = 2e-5 + 2 * ACT_TOL[act] * want.double().abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}"
    assert (got[2] == 0).all()  # the empty sequence


@pytest.mark.parametrize("kv_dtype", ROW_ONLINE)
@pytest.mark.parametrize("act", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_online_kv_write_matches_reference_bit_exactly(kv_dtype, act):
    """Codes and fp16 params from the GPU equal quant.quantize_online (no FMA can form in the write's formulas)."""
    gen = torch.Generator().manual_seed(3)
    num_blocks, hkv, block_size, dim, n = 64, 4, 16, 128, 700
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[::50] = -1  # skipped tokens
    k_new, v_new = hard_rows(n, hkv, dim, gen).to(act), hard_rows(n, hkv, dim, gen).to(act)
    k_pool, k_param = online_poison(kv_dtype, num_blocks, hkv, block_size, dim, gen)
    v_pool, v_param = online_poison(kv_dtype, num_blocks, hkv, block_size, dim, gen)
    want = [t.clone() for t in (k_pool, k_param, v_pool, v_param)]
    gpu = [t.cuda() for t in (k_pool, k_param, v_pool, v_param)]
    kv_cache_write(
        gpu[0],
        gpu[2],
        k_new.cuda(),
        v_new.cuda(),
        slots.to(torch.int32).cuda(),
        None,
        None,
        None,
        None,
        kv_dtype,
        k_param=gpu[1],
        v_param=gpu[3],
    )
    kept = slots >= 0
    blocks, rows = slots[kept] // block_size, slots[kept] % block_size
    for x, data, params in ((k_new[kept], want[0], want[1]), (v_new[kept], want[2], want[3])):
        data[blocks, :, rows], params[blocks, :, rows] = quant.quantize_online(x, kv_dtype)
    for got, ref in zip(gpu, want, strict=True):
        assert torch.equal(got.cpu().view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("case", ONLINE_CASES, ids=online_case_id)
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_gpu_online_decode_attention_matches_reference(case, splits):
    kv_dtype, dim, num_heads, hkv, act, block_size = case
    lengths = [1, block_size, 0, 1000, 77, 2049]
    c = online_case(kv_dtype, dim, num_heads, hkv, act, block_size, lengths, seed=11)
    want = online_reference(c)
    got = decode_attention(
        c.q.cuda(),
        c.k_pool.cuda(),
        c.v_pool.cuda(),
        c.block_tables.cuda(),
        c.lengths.cuda(),
        None,
        None,
        None,
        None,
        kv_dtype,
        c.softmax_scale,
        max_length=max(lengths),
        k_param=c.k_param.cuda(),
        v_param=c.v_param.cuda(),
        num_splits=splits,
    ).cpu()
    err = (got.double() - want).abs()
    bound = 2e-5 + 2 * ACT_TOL[act] * want.abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}"
    assert (got[2] == 0).all()  # the empty sequence


@pytest.mark.parametrize("act, dim", [(torch.float32, 128), (torch.float16, 64), (torch.bfloat16, 128)])
def test_gpu_channel_keys_write_steps_match_pytorch(act, dim):
    """int4_per_token_head keys per channel: the GPU cache (three launches per write) equals the PyTorch write on
    the CPU bit for bit after every step of test_cuda_cpu's CHANNEL_STEPS; attention over it matches
    decode_attention_torch."""
    import runtime.cuda

    gen = torch.Generator().manual_seed(dim)
    # a rotation only with fp32 rows: the kernel path rotates in the activation dtype, PyTorch's write in fp32
    rotation = quant.hadamard(dim, seed=2) if act == torch.float32 else None
    caches = channel_caches(13, 2, 8, dim, gen, runtime.cuda, device="cuda", rotation=rotation)
    if rotation is not None:
        # the same rotated rows into both caches: cuBLAS and the CPU sum x @ R in different orders (seen flipping one
        # code's rounding on an H200); the rotation is a torch matmul, the kernels are what this test compares
        cpu_rotate = caches[1].quantizer.rotate
        caches[0].quantizer.rotate = lambda x: cpu_rotate(x.cpu()).to(x.device)
    for step in range(len(CHANNEL_STEPS)):
        lengths = channel_step(caches, step, act, gen)
        assert_same_cache(*caches, f"step {step} {CHANNEL_STEPS[step]}")
        channel_attention_check(caches[0], lengths, act, gen, f"step {step}", decode_attention, slack=2.0)


# ---- the engine on the GPU: a whole model through the kernels ------------------------------------------------------

GPU_ENGINE_KV = ["fp16", "int8", "fp8_e4m3", "int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"]


@pytest.fixture(scope="module")
def gpu_ws(tiny_hf, tmp_path_factory):
    from rt_workspace import kernel_workspace

    return kernel_workspace(tiny_hf, tmp_path_factory.mktemp("gpu") / "ws", session_len=96)


PROMPTS = [list(range(100, 111)), list(range(300, 305)), list(range(500, 547))]  # different lengths, one batch


def _engine(ws, kv: str, device: str, dtype: str):
    from runtime.engine import Engine

    # INT4 keys: blocks of 4 so that the prefill and the decode steps complete blocks and open new ones
    kw = {"block_size": 4} if kv == "int4_per_token_head" else {}
    return Engine(ws, kv_cache_dtype=kv, max_batch_size=len(PROMPTS), device=device, dtype=dtype, **kw)


def _generate(ws, kv: str, device: str, dtype: str):
    import runtime.cuda
    from runtime.sampling import SamplingParams

    engine = _engine(ws, kv, device, dtype)
    if device == "cuda":
        assert engine.cache.kernels is runtime.cuda  # the engine really routes the cache through the RawKernels
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = engine.generate(PROMPTS, [params] * len(PROMPTS))
    logits = engine.score(torch.tensor([PROMPTS[2] + tokens[2]])).float().cpu()
    return tokens, logits


@pytest.mark.parametrize("kv", GPU_ENGINE_KV)
def test_gpu_engine_generates_like_the_cpu_engine(gpu_ws, kv):
    """fp32 compute: the GPU engine (cuBLAS + RawKernels) produces the CPU engine's greedy tokens and logits."""
    cpu_tokens, cpu_logits = _generate(gpu_ws, kv, "cpu", "float32")
    gpu_tokens, gpu_logits = _generate(gpu_ws, kv, "cuda", "float32")
    assert gpu_tokens == cpu_tokens
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=2e-3, rtol=1e-3)


def teacher_forced_logits(ws, kv: str, device: str, dtype: str, kernels, forced) -> torch.Tensor:
    """Logits (steps, B, V) of each decode step after a batched prefill of PROMPTS, feeding forced[b][t] at step
    t whatever the model predicts (so two numerically different paths stay on the same tokens). `kernels`: the
    cache's kernel module (runtime.cuda, runtime.cuda.host_ops) or None for the PyTorch path."""
    from runtime.scheduler import Chunk, Sequence

    engine = _engine(ws, kv, device, dtype)
    engine.cache.kernels = kernels
    prompts, sch, seqs = PROMPTS, engine.scheduler, []
    for b, (p, f) in enumerate(zip(prompts, forced, strict=True)):
        s = Sequence(f"tf-{b}", list(p) + list(f), len(p), None)
        s.block_ids = sch.allocator.allocate(sch.blocks_for(len(s.token_ids)))
        seqs.append(s)
    with torch.inference_mode():
        engine._forward([Chunk(s, 0, len(p)) for s, p in zip(seqs, prompts, strict=True)])
        steps = [
            engine._forward([Chunk(s, len(p) + t, 1) for s, p in zip(seqs, prompts, strict=True)])
            for t in range(len(forced[0]))
        ]
    return torch.stack(steps)


@pytest.mark.parametrize("kv", ["fp16", "int8", "fp8_e4m3", "int4_per_token_head"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_engine_kernels_lose_no_more_than_pytorch_in_half_precision(gpu_ws, kv, dtype):
    """The compute dtype a GPU user gets (auto = float16; bfloat16 too): over 16 teacher-forced decode steps, the
    RawKernel path's logits are as close to the fp32 engine's as the PyTorch path's on the same GPU and dtype.
    (Free-running greedy tokens of the two half-precision paths part after a few steps on this random model: its
    logits have near-ties that a last-bit difference flips; teacher forcing compares every step.)"""
    import runtime.cuda

    forced = [[(7 * b + 31 * t) % 40000 + 1000 for t in range(16)] for b in range(3)]
    ref = teacher_forced_logits(gpu_ws, kv, "cuda", "float32", runtime.cuda, forced)
    torch_path = teacher_forced_logits(gpu_ws, kv, "cuda", dtype, None, forced)
    kernel_path = teacher_forced_logits(gpu_ws, kv, "cuda", dtype, runtime.cuda, forced)
    err_torch, err_kernel = (torch_path - ref).abs(), (kernel_path - ref).abs()
    top1_torch = (torch_path.argmax(-1) == ref.argmax(-1)).float().mean().item()
    top1_kernel = (kernel_path.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        f"{kv} {dtype}: mean |err| torch {err_torch.mean():.3g} kernels {err_kernel.mean():.3g}, "
        f"top-1 torch {top1_torch:.3f} kernels {top1_kernel:.3f}"
    )
    assert err_kernel.mean() <= 1.25 * err_torch.mean() + 1e-4
    assert err_kernel.max() <= 2 * err_torch.max() + 1e-3
    assert top1_kernel >= top1_torch - 2 / ref[..., 0].numel()  # at most two more flips of 48 steps
