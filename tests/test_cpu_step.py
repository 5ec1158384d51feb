"""runtime.cpu_step: the one-call C++ decode step against the model's Python layer loop (the same kernels, so the
same bytes: logits and cache contents compared exactly), where it applies, where it does not, and its errors."""

from __future__ import annotations

import pytest
import torch
from rt_workspace import make_workspace

from runtime import cpu_f16w, cpu_linear, cpu_step
from runtime.engine import Engine
from runtime.kv_params import KVParams
from runtime.model import Batch
from runtime.sampling import SamplingParams
from runtime.scheduler import Chunk, Sequence

pytestmark = pytest.mark.skipif(not cpu_f16w.available(), reason="the CPU kernels need x86-64 with AVX2 and g++")


@pytest.fixture(scope="module")
def ws(tiny_hf, tmp_path_factory):
    """A tiny LLaMA with head size 64 (the attention kernel's), 4 query heads over 2 KV heads, 2 layers."""
    hf = tiny_hf("llama", hidden_size=256, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)
    return make_workspace(hf, tmp_path_factory.mktemp("ws_step"), session_len=300)


def engine_for(ws, kv: str, dtype: str) -> Engine:
    params = None
    if kv != "fp16":  # per-head scales that differ between heads and layers (zero points too for INT8)
        g = torch.Generator().manual_seed(1)
        rand = lambda lo, hi: lo + (hi - lo) * torch.rand(2, 2, generator=g)  # noqa: E731  (layers, KV heads)
        zp = rand(-0.05, 0.05) if kv == "int8" else torch.zeros(2, 2)
        params = KVParams(kv, "head", rand(0.01, 0.03), zp, rand(0.005, 0.02), zp)
    return Engine(ws, kv_cache_dtype=kv, dtype=dtype, max_batch_size=8, kv_params=params)


def dtypes() -> list[str]:
    return ["float32", "bfloat16"] if cpu_linear.available() else ["float32"]


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("kv", ["fp16", "int8", "fp8_e4m3", "fp8_e5m2"])
def test_graph_step_equals_python_step(ws, kv, dtype):
    """Three sequences of different lengths (two of them across a block boundary) decode 6 steps; each step runs
    through both paths from the same cache state and must give the same logits and the same cache bytes."""
    engine = engine_for(ws, kv, dtype)
    model, cache = engine.model, engine.cache
    g = torch.Generator().manual_seed(2)
    seqs = []
    for n in (5, 63, 130):
        s = Sequence(f"s{n}", torch.randint(3, 1000, (n,), generator=g).tolist(), n, None)
        s.block_ids = engine.scheduler.allocator.allocate(engine.scheduler.blocks_for(n + 8))
        seqs.append(s)
    with torch.inference_mode():
        engine._forward([Chunk(s, 0, len(s.token_ids)) for s in seqs])
        for _ in range(6):
            for s in seqs:
                s.token_ids.append(int(torch.randint(3, 1000, (1,), generator=g)))
            chunks = [Chunk(s, len(s.token_ids) - 1, 1) for s in seqs]
            before = [p.clone() for p in cache.k + cache.v]
            model.use_decode_graph = False
            ref = engine._forward(chunks)
            after_ref = [p.clone() for p in cache.k + cache.v]
            for p, b in zip(cache.k + cache.v, before, strict=True):
                p.copy_(b)
            model.use_decode_graph = True
            out = engine._forward(chunks)
            assert model._graph[1] is not None, "the graph did not apply"
            assert torch.equal(out, ref)
            for p, r in zip(cache.k + cache.v, after_ref, strict=True):
                assert torch.equal(p.view(torch.uint8), r.view(torch.uint8))
    assert ref.shape == (3, model.output.shape[0]) and ref.dtype == torch.float32 and bool(ref.isfinite().all())


def test_generation_with_the_graph_equals_without(ws):
    """The engine's own loop (continuous batching: the batch shrinks as sequences finish) gives the same tokens."""
    prompts = [[5, 6, 7, 8, 9], list(range(10, 80)), [11, 12]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 5, 20)]
    runs = []
    for use in (False, True):
        engine = engine_for(ws, "int8", "float32")
        engine.model.use_decode_graph = use
        runs.append(engine.generate(prompts, params))
        assert (engine.model._graph is not None and engine.model._graph[1] is not None) == use
    assert runs[0] == runs[1]
    assert [len(r) for r in runs[1]] == [12, 5, 20]


def test_timing_accumulates_the_kernels_seconds(ws, monkeypatch):
    timing: dict[str, float] = {}
    monkeypatch.setattr(cpu_step, "TIMING", timing)
    engine = engine_for(ws, "fp16", "float32")
    engine.generate([[5, 6, 7]], [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)])
    assert set(timing) == {"linear", "attention", "cache write"}
    assert all(v > 0 for v in timing.values())


def test_where_the_graph_does_not_apply(ws, tiny_hf, tmp_path):
    engine = engine_for(ws, "int8", "float32")
    model, cache = engine.model, engine.cache
    assert model.decode_graph(cache, 1) is not None
    assert model.decode_graph(cache, cpu_f16w.MAX_ROWS + 1) is None  # past the linear kernel's rows: PyTorch
    online = Engine(ws, kv_cache_dtype="int8_per_token_head", max_batch_size=2)
    assert online.model.decode_graph(online.cache, 1) is None  # rotations through PyTorch
    dynamic = Engine(ws, kv_cache_dtype="fp8_e4m3", calculate_kv_scales=True, max_batch_size=2)
    assert dynamic.model.decode_graph(dynamic.cache, 1) is None  # scales still to be set by the first prompt
    dynamic.generate([[5, 6, 7]], [SamplingParams(temperature=0, max_tokens=1)])
    assert dynamic.model.decode_graph(dynamic.cache, 1) is not None
    qwen = make_workspace(
        tiny_hf("qwen2", hidden_size=256, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2),
        tmp_path / "qwen",
    )
    biased = Engine(qwen, max_batch_size=2)
    assert biased.model.decode_graph(biased.cache, 1) is None  # q/k/v biases: the Python step adds them


def test_errors_name_the_bad_value(ws):
    engine = engine_for(ws, "int8", "float32")
    model, cache = engine.model, engine.cache
    ids = engine.scheduler.allocator.allocate(2)
    bs = cache.block_size
    tokens = torch.tensor([[7]])
    with torch.inference_mode():
        past = model.max_positions
        bad = Batch.build([ids], [3], [1], bs)
        bad.starts.fill_(past)  # the position RoPE is asked for
        with pytest.raises(ValueError, match=rf"rotation table.*pos\[0\] = {past}"):
            model.forward(tokens, cache, bad)
        bad = Batch.build([ids], [3], [1], bs)
        bad.lengths.fill_(3 * bs)  # past the two blocks of the table
        with pytest.raises(ValueError, match=rf"lengths\[0\] = {3 * bs} is outside"):
            model.forward(tokens, cache, bad)
        bad = Batch.build([ids], [3], [1], bs)
        bad.block_tables[0, 0] = cache.num_blocks
        with pytest.raises(ValueError, match=rf"block_tables\[0, 0\] = {cache.num_blocks} is outside"):
            model.forward(tokens, cache, bad)
    assert model._graph[1] is not None  # the graph raised these, not the Python step
