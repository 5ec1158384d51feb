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


def engine_for(ws, kv: str, dtype: str, rotation: str = "auto") -> Engine:
    if kv.endswith("_per_token_head"):
        return Engine(ws, kv_cache_dtype=kv, dtype=dtype, max_batch_size=8, kv_rotation=rotation)
    params = None
    if kv != "fp16":  # per-head scales that differ between heads and layers (zero points too for INT8)
        g = torch.Generator().manual_seed(1)
        rand = lambda lo, hi: lo + (hi - lo) * torch.rand(2, 2, generator=g)  # noqa: E731  (layers, KV heads)
        zp = rand(-0.05, 0.05) if kv == "int8" else torch.zeros(2, 2)
        params = KVParams(kv, "head", rand(0.01, 0.03), zp, rand(0.005, 0.02), zp)
    return Engine(ws, kv_cache_dtype=kv, dtype=dtype, max_batch_size=8, kv_params=params)


def dtypes() -> list:
    no_bf16 = pytest.mark.skipif(not cpu_linear.available(), reason="the bf16 kernels need AVX512-BF16")
    return ["float32", pytest.param("bfloat16", marks=no_bf16)]


def step_both_ways(engine: Engine, steps: int = 6):
    """Three sequences of different lengths (two of them across a block boundary during the steps) decode `steps`
    tokens; each step runs through the Python step and then, from the same cache state, through the graph.
    Yields (python logits, graph logits, python pools, graph pools) per step."""
    model, cache = engine.model, engine.cache
    g = torch.Generator().manual_seed(2)
    seqs = []
    for n in (5, 61, 126):
        s = Sequence(f"s{n}", torch.randint(3, 1000, (n,), generator=g).tolist(), n, None)
        s.block_ids = engine.scheduler.allocator.allocate(engine.scheduler.blocks_for(n + steps + 2))
        seqs.append(s)
    with torch.inference_mode():
        engine._forward([Chunk(s, 0, len(s.token_ids)) for s in seqs])
        for _ in range(steps):
            for s in seqs:
                s.token_ids.append(int(torch.randint(3, 1000, (1,), generator=g)))
            chunks = [Chunk(s, len(s.token_ids) - 1, 1) for s in seqs]
            before = [p.clone() for p in cache.pools()]
            model.use_decode_graph = False
            ref = engine._forward(chunks)
            after_ref = [p.clone() for p in cache.pools()]
            for p, b in zip(cache.pools(), before, strict=True):
                p.copy_(b)
            model.use_decode_graph = True
            out = engine._forward(chunks)
            assert model._graphs[cache][1] is not None, "the graph did not apply"
            yield ref, out, after_ref, [p.clone() for p in cache.pools()]
    assert ref.shape == (3, model.output.shape[0]) and ref.dtype == torch.float32 and bool(ref.isfinite().all())


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize(
    "kv, rotation",
    [(kv, "auto") for kv in ("fp16", "int8", "fp8_e4m3", "fp8_e5m2")]
    + [(kv, "off") for kv in ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head")],
)
def test_graph_step_equals_python_step(ws, kv, rotation, dtype):
    """Same kernels, same order: the same logits and the same cache bytes (the online modes' parameters too)."""
    for ref, out, ref_pools, out_pools in step_both_ways(engine_for(ws, kv, dtype, rotation)):
        assert torch.equal(out, ref)
        for a, b in zip(out_pools, ref_pools, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("kv", ["int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"])
def test_graph_step_rotated_online_modes(ws, kv, dtype):
    """With the Hadamard rotation the graph rotates in its own fp32 loop (PyTorch's matmul sums in another order):
    logits within 1e-4 of the logit range (bf16: 1e-2), and the cache codes equal but for rare rounding ties."""
    engine = engine_for(ws, kv, dtype, "on")
    assert engine.cache.quantizer.rotation is not None
    tol = 1e-2 if dtype == "bfloat16" else 1e-4
    for ref, out, ref_pools, out_pools in step_both_ways(engine):
        assert (out - ref).abs().max() <= tol * float(ref.max() - ref.min())
        data = 2 * len(engine.cache.k)  # the K and V code pools come first, then the (scale, zero) pools
        codes = [(a != b).float().mean() for a, b in zip(out_pools[:data], ref_pools[:data], strict=True)]
        assert max(codes) < 0.01, codes


def test_generation_with_the_graph_equals_without(ws):
    """The engine's own loop (continuous batching: the batch shrinks as sequences finish) gives the same tokens."""
    prompts = [[5, 6, 7, 8, 9], list(range(10, 80)), [11, 12]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 5, 20)]
    runs = []
    for use in (False, True):
        engine = engine_for(ws, "int8", "float32")
        engine.model.use_decode_graph = use
        runs.append(engine.generate(prompts, params))
        assert (engine.model._graphs.get(engine.cache, (None, None))[1] is not None) == use
    assert runs[0] == runs[1]
    assert [len(r) for r in runs[1]] == [12, 5, 20]


def test_engines_sharing_weights_each_keep_their_graph(ws):
    """Engines on one model (as tools/bench_serve.py runs them, step by step in turns) each decode through a graph
    of their own cache, built once, and generate what they generate alone; a dropped engine's graph goes with it."""
    import gc

    prompts, params = [[5, 6, 7, 8], [9, 10, 11]], [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * 2
    alone = {kv: engine_for(ws, kv, "float32").generate(prompts, params) for kv in ("int8", "fp16")}
    first = engine_for(ws, "int8", "float32")
    second = Engine(ws, kv_cache_dtype="fp16", max_batch_size=8, model=first.model)
    out = {}
    for e in (first, second):
        for p, sp in zip(prompts, params, strict=True):
            e.add_request(p, sp)
    while first.has_unfinished_requests() or second.has_unfinished_requests():
        for name, e in (("int8", first), ("fp16", second)):
            if e.has_unfinished_requests():
                for o in e.step():
                    out.setdefault(name, {}).setdefault(o.request_id, []).extend(o.new_token_ids)
    for name, alone_tokens in alone.items():
        assert sorted(out[name].values()) == sorted(alone_tokens)
    graphs = first.model._graphs
    assert {id(c) for c in graphs} == {id(first.cache), id(second.cache)}
    assert all(g is not None for _, g in graphs.values())
    del second, e
    gc.collect()
    assert len(graphs) == 1


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
    if cpu_linear.available():  # bf16: up to the kernel's rows on this CPU (more with AMX tiles)
        bf = engine_for(ws, "int8", "bfloat16")
        assert bf.model.decode_graph(bf.cache, cpu_linear.max_rows()) is not None
        assert bf.model.decode_graph(bf.cache, cpu_linear.max_rows() + 1) is None
    forced = engine_for(ws, "int8_per_token_head", "float32")
    forced.cache.fast_write = False  # the PyTorch write asked for: the Python step
    assert forced.model.decode_graph(forced.cache, 1) is None
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
    assert model._graphs[cache][1] is not None  # the graph raised these, not the Python step
