"""The engine's GPU path without a GPU: the KV cache routed through the CUDA kernels' CPU emulation.

`KVCache.kernels = runtime.cuda` is what the engine sets on a CUDA device; `runtime.cuda.host_ops`
runs the same .cu kernels on the CPU with the same signatures. Driving a whole model through them
checks the engine-side wiring (token flattening, slots, positions, lengths, parameter passing) that
the kernel unit tests cannot: generation must equal the PyTorch path token for token, and the cache
bytes must be identical.
"""

from __future__ import annotations

import pytest
import torch
from rt_workspace import kernel_workspace

from runtime.engine import Engine
from runtime.sampling import SamplingParams

pytest.importorskip("runtime.cuda.host_ops")


@pytest.fixture(scope="module")
def ws(tiny_hf, tmp_path_factory):
    return kernel_workspace(tiny_hf, tmp_path_factory.mktemp("kernels") / "ws", session_len=64)


@pytest.mark.parametrize("kv", ["fp16", "int8", "fp8_e4m3", "int4_per_token_head"])
def test_kernel_path_equals_torch_path(ws, kv):
    from runtime.cuda import host_ops

    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [list(range(100, 111)), list(range(300, 305))]  # different lengths in one batch
    # INT4 keys: blocks of 4 so that the prefill and the decode steps complete blocks and open new ones
    kw = {"block_size": 4} if kv == "int4_per_token_head" else {}
    ref = Engine(ws, kv_cache_dtype=kv, max_batch_size=2, use_context_fmha=0, **kw)
    emu = Engine(ws, kv_cache_dtype=kv, max_batch_size=2, use_context_fmha=0, **kw)
    emu.cache.kernels = host_ops
    results = {}
    for name, engine in (("ref", ref), ("emu", emu)):
        # the scheduler prefills both prompts in one pass, then both decode in each step
        tokens = engine.generate(prompts, [params] * 2)
        results[name] = (tokens, engine.score(torch.tensor([prompts[0] + tokens[0]])))
    (tok_ref, logit_ref), (tok_emu, logit_emu) = results["ref"], results["emu"]
    assert tok_emu == tok_ref
    torch.testing.assert_close(logit_emu, logit_ref, atol=1e-3, rtol=1e-4)
    # Layer 0's K/V depend only on the tokens: bit-identical. Deeper layers see the two attention
    # implementations' last-bit fp32 differences, which may flip a rounding: nearly all bytes equal.
    for layer in range(ref.config.num_layer):
        pools = [(ref.cache.k[layer], emu.cache.k[layer]), (ref.cache.v[layer], emu.cache.v[layer])]
        if ref.cache.k_param:
            pools += [
                (ref.cache.k_param[layer], emu.cache.k_param[layer]),
                (ref.cache.v_param[layer], emu.cache.v_param[layer]),
            ]
        for a, b in pools:
            same = (a.view(torch.uint8) == b.view(torch.uint8)).float().mean().item()
            assert same == 1.0 if layer == 0 else same > 0.99, (layer, same)
