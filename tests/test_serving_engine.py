"""The paged engine as a server drives it: many requests through the scheduler on a small pool
(preemption, chunked prefill) give each request's solo greedy output, in every KV mode; the memory
budget decides the pool, INT8/FP8 hold twice fp16's tokens and INT4 per token-head ~3.5x."""

from __future__ import annotations

import pytest
import torch
from rt_workspace import make_workspace, write_params

import runtime.engine
from runtime.engine import Engine, RequestError
from runtime.kv_cache import block_bytes
from runtime.sampling import SamplingParams

MODES = [("fp16", None), ("int8", "tensor"), ("int8", "head"), ("fp8_e4m3", "tensor")]
ONLINE = [("int8_per_token_head", None), ("fp8_per_token_head", None), ("int4_per_token_head", None)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def ws(tiny_hf, tmp_path_factory):
    ws = make_workspace(tiny_hf("llama"), tmp_path_factory.mktemp("paged") / "ws", session_len=256)
    wdir = ws / "triton_models" / "weights"
    write_params(wdir, "int8", 0.02, 0.01, 0.02, -0.01)
    write_params(wdir, "int8", 0.03, 0.0, 0.02, 0.0, granularity="head")
    write_params(wdir, "fp8_e4m3", 0.005, 0.0, 0.005, 0.0)
    return ws


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 90, (n,), generator=g).tolist()
    return [torch.randint(100, 40000, (m,), generator=g).tolist() for m in lengths]


def engine_for(ws, kv, granularity, **kw) -> Engine:
    return Engine(ws, kv_cache_dtype=kv, kv_granularity=granularity, use_context_fmha=0, **kw)


def assert_same_or_near_tie(engine: Engine, prompts, got, want, margin: float = 0.05) -> None:
    """int4_per_token_head: a key row computed by a prefill and by a decode step differs by float noise (~1e-7),
    which can move an int8 code of an open row and then a block's per-channel range, so a near-tie between two
    tokens may resolve differently. Each request must follow its solo output until a step where the solo engine's
    logits put the scheduled token within `margin` of the top one (a genuine tie, not a wrong cache)."""
    for p, g, w in zip(prompts, got, want, strict=True):
        if g == w:
            continue
        d = next(i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b)
        logits = engine.score(torch.tensor([p + w[:d]]))[0, -1]
        assert logits.max() - logits[g[d]] < margin, (d, float(logits.max() - logits[g[d]]))


@pytest.mark.parametrize("kv, granularity", MODES + ONLINE)
def test_scheduled_outputs_equal_each_prompt_alone_with_preemption_and_chunks(ws, kv, granularity):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(100, 40000, (m,), generator=g).tolist() for m in (5, 12, 20, 3, 40, 8, 17, 70)]
    params = [greedy(m) for m in (40, 50, 30, 60, 20, 45, 35, 10)]
    solo = engine_for(ws, kv, granularity, max_batch_size=1, block_size=16)
    alone = [solo.generate([p], [sp])[0] for p, sp in zip(ps, params, strict=True)]
    # 10 blocks of 16 = 160 tokens for 8 requests growing to 45-80 tokens each: decodes run out of blocks
    # and preempt; a prefill budget of 32 tokens per step splits the 40- and 70-token prompts into chunks
    gib = 10.5 * solo.block_bytes() / 2**30
    tight = engine_for(ws, kv, granularity, block_size=16, max_prefill_token_num=32, max_batch_size=8, kv_cache_gib=gib)
    assert tight.num_kv_blocks == 10
    got = tight.generate(ps, params)
    if kv == "int4_per_token_head":
        assert_same_or_near_tie(solo, ps, got, alone)
    else:
        assert got == alone
    st = tight.stats()
    assert st.num_preemptions > 0, "the pool was meant to be too small for all requests at once"
    assert st.num_free_blocks == st.num_blocks == 10 and st.num_running == st.num_waiting == 0


def test_a_thousand_prompts_on_a_pool_of_twenty_complete_in_order(ws):
    distinct = prompts(10, seed=1)
    ref = Engine(ws, max_batch_size=1, block_size=16)
    want = [ref.generate([p], [greedy(3)])[0] for p in distinct]
    # 20 sequences of up to ~92 tokens: 20 x 6 blocks of 16
    engine = Engine(ws, block_size=16, max_batch_size=1000, kv_cache_gib=120.5 * ref.block_bytes() / 2**30)
    assert engine.num_kv_blocks == 120
    many = [distinct[i % 10] for i in range(1000)]
    got = engine.generate(many, [greedy(3)] * 1000)
    assert got == [want[i % 10] for i in range(1000)]
    assert engine.stats().num_free_blocks == 120


def test_same_budget_gives_int8_and_fp8_twice_the_tokens(ws):
    budget = 0.01  # GiB
    pools = {kv: engine_for(ws, kv, "tensor", kv_cache_gib=budget, max_batch_size=10_000) for kv in ("fp16", "int8")}
    pools["fp8"] = Engine(ws, kv_cache_dtype="fp8", max_batch_size=10_000, kv_cache_gib=budget)
    cfg = pools["fp16"].config
    for kv, e in pools.items():  # blocks = (budget - 16 B of parameters per layer and KV head) // block bytes
        row = cfg.size_per_head * (2 if kv == "fp16" else 1)
        per_block = block_bytes(cfg.num_layer, cfg.kv_head_num, 64, row)
        assert e.num_kv_blocks == int((budget * 2**30 - 16 * cfg.num_layer * cfg.kv_head_num) // per_block)
        assert e.kv_cache_tokens == 64 * e.num_kv_blocks
        assert f"KV cache size: {e.num_kv_blocks} blocks x 64 = {e.kv_cache_tokens} tokens" in e.banner()
    assert pools["int8"].kv_cache_tokens >= 2 * pools["fp16"].kv_cache_tokens - 64
    assert pools["fp8"].kv_cache_tokens == pools["int8"].kv_cache_tokens
    assert "maximum concurrency for 256 tokens per request" in pools["fp16"].banner()


@pytest.mark.parametrize("rotation", ["auto", "on", "off"])
def test_int4_per_token_head_holds_about_3_5x_fp16s_tokens_at_d64(tiny_hf, tmp_path_factory, rotation):
    hf = tiny_hf("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # D = 64
    ws64 = make_workspace(hf, tmp_path_factory.mktemp("d64") / "ws", session_len=256)
    budget = 0.01  # GiB
    fp16 = Engine(ws64, kv_cache_gib=budget, max_batch_size=10_000)
    int4 = Engine(
        ws64, kv_cache_dtype="int4_per_token_head", kv_cache_gib=budget, max_batch_size=10_000, kv_rotation=rotation
    )
    cfg = int4.config
    # a row (one token, one KV head, K or V): fp16 64 * 2 = 128 B; int4 64 / 2 data + 2 * 2 B (scale, zero) = 36 B
    assert int4.block_bytes() == 2 * cfg.num_layer * cfg.kv_head_num * 64 * 36
    assert int4.num_kv_blocks == int(budget * 2**30 // int4.block_bytes())  # no parameters outside the blocks
    assert int4.cache_bytes() == int4.num_kv_blocks * int4.block_bytes()
    ratio = int4.kv_cache_tokens / fp16.kv_cache_tokens
    assert 3.5 <= ratio <= 128 / 36 + 0.01, ratio
    per_token = 2 * cfg.num_layer * cfg.kv_head_num * 36
    banner = int4.banner()
    assert "KV cache int4_per_token_head (no quant_policy bit)" in banner and f"{per_token} bytes/token" in banner
    assert ("unrotated" in banner) == (rotation == "off")
    out = int4.generate([[5, 6, 7, 8, 9] * 3], [greedy(5)])[0]  # the C++ kernel path (D 64) decodes
    assert len(out) == 5


def test_config_ini_selects_an_online_mode(ws, tmp_path):
    import shutil

    from runtime.workspace import load_config, replace, save_config, weights_dir

    copy = shutil.copytree(ws, tmp_path / "ws", symlinks=True)
    wdir = weights_dir(copy)
    save_config(replace(load_config(wdir), kv_cache_dtype="int4_per_token_head"), wdir)  # quant_policy stays 0
    e = Engine(copy, max_batch_size=1)
    assert e.kv_dtype == "int4_per_token_head" and e.cache.k[0].dtype == torch.uint8
    assert e.cache.k[0].shape[-1] == e.config.size_per_head // 2


def test_online_modes_need_no_parameter_files_and_check_their_settings(ws):
    for kv in ("int8_per_token_head", "fp8_per_token_head"):  # the workspace has no files for these
        e = Engine(ws, kv_cache_dtype=kv, max_batch_size=2)
        assert e.quantizer.online and "per token and KV head" in e.banner()
    with pytest.raises(ValueError, match="kv_rotation = 'maybe'"):
        Engine(ws, kv_cache_dtype="int4_per_token_head", kv_rotation="maybe")
    with pytest.raises(ValueError, match="calculate_kv_scales=True needs an FP8 KV cache"):
        Engine(ws, kv_cache_dtype="fp8_per_token_head", calculate_kv_scales=True)


def test_cache_max_entry_count_is_a_fraction_of_free_memory(ws, monkeypatch):
    monkeypatch.setattr(runtime.engine, "_free_memory", lambda device: 2**30)
    e = Engine(ws, cache_max_entry_count=0.01, max_batch_size=10_000)
    assert e.num_kv_blocks == int((0.01 * 2**30 - 16 * 2 * 2) // e.block_bytes())
    assert "cache_max_entry_count 0.01 x 1.0 GiB free" in e.banner()
    d = Engine(ws, max_batch_size=10_000)  # CPU default 0.2
    assert d.num_kv_blocks == int((0.2 * 2**30 - 16 * 2 * 2) // d.block_bytes())
    capped = Engine(ws, max_batch_size=3)  # more than 3 full-length sequences could use is never allocated
    assert capped.num_kv_blocks == 3 * 4 and "capped" in capped.banner()
    with pytest.raises(ValueError, match="cache_max_entry_count = 2"):
        Engine(ws, cache_max_entry_count=2)
    with pytest.raises(ValueError, match="holds no fp16 block"):
        Engine(ws, kv_cache_gib=1e-6)


def test_requests_that_cannot_fit_are_refused_with_numbers(ws):
    e = Engine(ws, kv_cache_gib=3.5 * Engine(ws, max_batch_size=1).block_bytes() / 2**30, max_batch_size=8)
    assert e.kv_cache_tokens == 192
    with pytest.raises(RequestError, match=r"> session_len 256"):
        e.add_request(list(range(250)), greedy(10))
    with pytest.raises(RequestError, match=r"= 200 > the KV pool's 192 tokens \(3 blocks x 64\)"):
        e.add_request(list(range(100)), greedy(100))
    assert not e.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_position_embeddings 512"):
        Engine(ws, session_len=600)
    assert Engine(ws, session_len=512, max_batch_size=1).session_len == 512  # longer than config.ini's 256


def test_step_api_abort_and_stats(ws):
    e = Engine(ws, max_batch_size=4, block_size=16)
    ids = [e.add_request(p, greedy(6)) for p in prompts(3)]
    outs = e.step()  # one prefill pass over all three: each samples its first token
    assert sorted(o.request_id for o in outs) == sorted(ids) and all(len(o.new_token_ids) == 1 for o in outs)
    st = e.stats()
    assert st.num_running == 3 and st.num_free_blocks < st.num_blocks and st.num_generated_tokens == 3
    e.abort_request(ids[1])
    assert e.stats().num_running == 2
    finished = {}
    while e.has_unfinished_requests():
        for o in e.step():
            assert o.request_id != ids[1]
            if o.finished:
                finished[o.request_id] = (o.finish_reason, o.num_output_tokens)
    assert finished == {ids[0]: ("length", 6), ids[2]: ("length", 6)}
    assert e.stats().num_free_blocks == e.num_kv_blocks


def test_chat_session_keeps_blocks_between_turns_and_frees_them_on_end(ws):
    e = Engine(ws, max_batch_size=2, block_size=16)
    s = e.new_session()
    list(e.stream(s, prompts(1)[0], greedy(4)))
    held = e.num_kv_blocks - e.stats().num_free_blocks
    assert held == len(s.seq.block_ids) > 0 and s.seq.num_cached == s.num_tokens - 1
    e.end_session(s)
    assert e.stats().num_free_blocks == e.num_kv_blocks
    with pytest.raises(ValueError, match="session was ended"):
        e.stream(s, [5], greedy(1))
