"""Engine behaviours on a tiny random llama workspace: batching, sessions, length limits, KV parameter
errors, use_context_fmha, on-the-fly FP8 scales, banner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rt_workspace import make_workspace, write_params

from runtime.engine import Engine, RequestError
from runtime.kv_params import KVParamsError, file_name
from runtime.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [list(range(100, 103)), list(range(200, 217)), list(range(300, 309))]


@pytest.fixture
def ws(tiny_hf, tmp_path):
    return make_workspace(tiny_hf("llama"), tmp_path / "ws", session_len=128)


@pytest.fixture
def ws_int8(ws):
    write_params(ws / "triton_models" / "weights", "int8", 0.02, 0.0, 0.02, 0.0)
    return ws


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_batch_of_different_lengths_equals_each_alone(ws_int8, kv):
    engine = Engine(ws_int8, kv_cache_dtype=kv, max_batch_size=3)
    batched = engine.generate(PROMPTS, [GREEDY] * 3)
    alone = [engine.generate([p], [GREEDY])[0] for p in PROMPTS]
    assert batched == alone and all(len(t) == 12 for t in batched)
    assert engine.stats().num_free_blocks == engine.num_kv_blocks
    more = engine.generate(PROMPTS * 2, [GREEDY] * 6)  # more prompts than max_batch_size: they queue
    assert more == alone * 2


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_second_turn_sends_only_new_tokens(ws_int8, kv, monkeypatch):
    import runtime.sampling

    engine = Engine(ws_int8, kv_cache_dtype=kv, max_batch_size=2, use_context_fmha=0)
    rows, greedy = [], runtime.sampling.greedy_rows  # the logits rows greedy tokens are picked from

    def recording(logits, params):
        picked = greedy(logits, params)
        rows.extend(logits[i] for i in picked)
        return picked

    monkeypatch.setattr(runtime.sampling, "greedy_rows", recording)
    fed = []
    forward = engine.model.forward
    monkeypatch.setattr(
        engine.model, "forward", lambda tokens, *a, **k: fed.append(tokens.shape) or forward(tokens, *a, **k)
    )
    first, second = PROMPTS[1], PROMPTS[2]
    s = engine.new_session()
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    reply = list(engine.stream(s, first, one))
    list(engine.stream(s, second, one))
    assert fed == [(1, len(first)), (1, 1 + len(second))]  # turn 2 feeds the reply token + its own tokens
    assert s.num_tokens == len(first) + 1 + len(second) + 1
    whole = engine.score(torch.tensor([first + reply + second]))[0, -1]
    torch.testing.assert_close(rows[-1], whole, atol=1e-5, rtol=0)


def test_stream_keeps_history_and_survives_early_close(ws):
    engine = Engine(ws, max_batch_size=1)
    s = engine.new_session()
    it = engine.stream(s, PROMPTS[0], GREEDY)
    got = [next(it) for _ in range(3)]
    it.close()  # the consumer stops (e.g. Ctrl-C): what was yielded stays in the session
    assert s.num_tokens == len(PROMPTS[0]) + 3 and s.seq.token_ids == PROMPTS[0] + got
    rest = list(engine.stream(s, PROMPTS[1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    # the same as one stream over the concatenated history (the yielded tokens were fed back first)
    engine.end_session(s)
    s2 = engine.new_session()
    again = list(
        engine.stream(s2, PROMPTS[0] + got + PROMPTS[1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    )
    assert rest == again


def test_stream_stops_at_stop_token_ids(ws):
    engine = Engine(ws, max_batch_size=1)
    first = engine.generate([PROMPTS[0]], [GREEDY])[0]
    s = engine.new_session()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[first[4]])
    out = list(engine.stream(s, PROMPTS[0], params))
    assert out == first[: first.index(first[4]) + 1]


def test_session_length_error_before_anything(ws):
    engine = Engine(ws, max_batch_size=1)
    s = engine.new_session()
    with pytest.raises(RequestError, match="session_len 128"):
        engine.stream(s, list(range(100)), SamplingParams(max_tokens=29))
    assert s.num_tokens == 0
    list(engine.stream(s, list(range(100)), SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)))
    assert s.num_tokens == 128
    with pytest.raises(RequestError):
        engine.generate([list(range(120))], [SamplingParams(max_tokens=9)])


@pytest.mark.parametrize("damage", ["missing", "short", "nan"])
def test_bad_param_file_names_the_file(ws, damage):
    wdir = ws / "triton_models" / "weights"
    write_params(wdir, "int8", 0.02, 0.0, 0.02, 0.0)
    bad = wdir / file_name(1, 0, "int8", "tensor")
    if damage == "missing":
        bad.unlink()
    elif damage == "short":
        bad.write_bytes(bad.read_bytes()[:8])
    else:
        np.array([np.nan, 0, 0.02, 0], dtype="<f4").tofile(bad)
    with pytest.raises(KVParamsError, match=bad.name):
        Engine(ws, kv_cache_dtype="int8", max_batch_size=1)
    with pytest.raises(KVParamsError, match="fp8_e4m3"):  # no FP8 files at all, and no silent scale 1.0
        Engine(ws, kv_cache_dtype="fp8", max_batch_size=1)


def test_use_context_fmha_switches_prefill_attention(ws_int8):
    ids = torch.tensor([PROMPTS[1]])
    ref = Engine(ws_int8, kv_cache_dtype="fp16", max_batch_size=1).score(ids)
    fmha1 = Engine(ws_int8, kv_cache_dtype="int8", max_batch_size=1, use_context_fmha=1).score(ids)
    fmha0 = Engine(ws_int8, kv_cache_dtype="int8", max_batch_size=1, use_context_fmha=0).score(ids)
    torch.testing.assert_close(fmha1, ref, atol=1e-5, rtol=0)  # prefill never reads the quantized cache
    diff = (fmha0 - ref).abs()
    assert diff.max() > 1e-4  # 0: prefill attention read back the int8 values
    assert diff.max() < 0.05 * float(ref.max() - ref.min())
    fp16_0 = Engine(ws_int8, kv_cache_dtype="fp16", max_batch_size=1, use_context_fmha=0).score(ids)
    torch.testing.assert_close(fp16_0, ref, atol=2e-3, rtol=0)  # fp16 read-back: rounding only


def test_calculate_kv_scales_without_files(ws):
    engine = Engine(ws, kv_cache_dtype="fp8", calculate_kv_scales=True, max_batch_size=2)
    assert engine.kv_dtype == "fp8_e4m3" and "on the fly" in engine.banner()
    out = engine.generate(PROMPTS[:2], [GREEDY] * 2)
    assert all(len(t) == 12 for t in out)
    assert engine.quantizer.observed.all()
    ks = engine.quantizer.affine(0, "k")[0]
    assert (ks > 0).all() and torch.all(ks == ks[0])  # per layer (tensor) scale
    assert torch.isfinite(engine.cache.k[0].float()).all()
    with pytest.raises(ValueError, match="FP8"):
        Engine(ws, kv_cache_dtype="int8", calculate_kv_scales=True)


def test_banner_and_cache_bytes(ws_int8):
    e16 = Engine(ws_int8, kv_cache_dtype="fp16", max_batch_size=4)
    e8 = Engine(ws_int8, kv_cache_dtype="auto", max_batch_size=4)
    assert e8.kv_dtype == "fp16"  # auto follows config.ini
    e8 = Engine(ws_int8, kv_cache_dtype="int8", max_batch_size=4)
    cfg = e16.config
    data16 = 2 * cfg.num_layer * 4 * cfg.kv_head_num * 128 * cfg.size_per_head * 2
    assert e16.cache_bytes() - data16 == e8.cache_bytes() - data16 // 2 > 0  # same small parameter overhead
    b = e8.banner()
    assert "int8" in b and "tensor" in b and "past_kv_scale" in b and f"{4 * 128} tokens" in b
    assert f"{2 * cfg.num_layer * cfg.kv_head_num * cfg.size_per_head} bytes/token" in b


def test_interrupt_inside_a_forward_pass_keeps_the_session_consistent(ws, monkeypatch):
    """Ctrl-C landing inside a decode step: the token being cached stays pending, nothing is lost."""
    engine = Engine(ws, max_batch_size=1)
    s = engine.new_session()
    forward, calls = engine.model.forward, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # prefill, decode, then KeyboardInterrupt in the second decode step
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", interrupted)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for token in engine.stream(s, PROMPTS[0], GREEDY):
            got.append(token)
    monkeypatch.setattr(engine.model, "forward", forward)
    assert len(got) == 2 and s.num_tokens == len(PROMPTS[0]) + 2
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    rest = list(engine.stream(s, PROMPTS[1], params))
    engine.end_session(s)
    assert rest == list(engine.stream(engine.new_session(), PROMPTS[0] + got + PROMPTS[1], params))


def test_explicit_kv_params_and_granularity_override(ws):
    from runtime.kv_params import KVParams

    wdir = ws / "triton_models" / "weights"
    write_params(wdir, "int8", 0.02, 0.01, 0.03, -0.01, granularity="head")
    from_files = Engine(ws, kv_cache_dtype="int8", kv_granularity="head", max_batch_size=1)
    assert "past_kv_scale_head" in from_files.banner() and "granularity head" in from_files.banner()
    L, H = from_files.config.num_layer, from_files.config.kv_head_num
    full = lambda x: torch.full((L, H), x)  # noqa: E731
    given = Engine(
        ws,
        kv_cache_dtype="int8",
        max_batch_size=1,
        kv_params=KVParams("int8", "head", full(0.02), full(0.01), full(0.03), full(-0.01)),
    )
    assert "given by the caller" in given.banner()
    tokens = torch.tensor([PROMPTS[1]])
    assert torch.equal(given.score(tokens), from_files.score(tokens))
    with pytest.raises(ValueError, match="kv_params are fp8_e4m3"):
        Engine(
            ws,
            kv_cache_dtype="int8",
            kv_params=KVParams("fp8_e4m3", "tensor", full(1.0), full(0.0), full(1.0), full(0.0)),
        )


def test_engines_can_share_one_model(ws):
    first = Engine(ws, kv_cache_dtype="fp16", max_batch_size=1)
    second = Engine(ws, kv_cache_dtype="fp8_e4m3", calculate_kv_scales=True, max_batch_size=2, model=first.model)
    assert second.model is first.model and second.cache is not first.cache
    alone = Engine(ws, kv_cache_dtype="fp8_e4m3", calculate_kv_scales=True, max_batch_size=2)
    tokens = torch.tensor([PROMPTS[1]])
    assert torch.equal(second.score(tokens), alone.score(tokens))
    with pytest.raises(ValueError, match="same workspace, dtype, device"):
        Engine(ws, dtype="bfloat16", model=first.model)


def test_gpu_without_cupy_is_a_clear_error(monkeypatch):
    """On a GPU the engine asks for the CUDA kernels when it starts; without CuPy that is one error naming the
    package for this torch's CUDA, not a traceback at the first forward pass."""
    import sys

    from runtime import engine as eng

    assert eng._kernels(torch.device("cpu")) is None
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ValueError, match=r"device = 'cuda:0'.*need CuPy.*pip install cupy-cuda13x"):
        eng._kernels(torch.device("cuda:0"))


def test_compute_dtype_auto_follows_the_hardware(monkeypatch):
    """auto: float16 on cuda; on a CPU bfloat16 exactly when it has native bf16, else float32; the environment
    variable replaces auto's choice; explicit dtypes pass through; unknown ones name the value."""
    from runtime import engine as eng

    monkeypatch.delenv(eng.AUTO_DTYPE_ENV, raising=False)
    assert eng.resolve_compute_dtype("auto", "cuda:0") == "float16"
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(eng, "cpu_has_native_bf16", lambda native=native: native)
        assert eng.resolve_compute_dtype("auto", "cpu") == want
        assert eng.EngineSettings(device="cpu").dtype == want
    assert eng.resolve_compute_dtype("float32", "cuda") == "float32"
    monkeypatch.setenv(eng.AUTO_DTYPE_ENV, "float32")
    assert eng.resolve_compute_dtype("auto", "cpu") == "float32"
    monkeypatch.setenv(eng.AUTO_DTYPE_ENV, "fp64")
    with pytest.raises(ValueError, match=r"\$KVQ_COMPUTE_DTYPE = 'fp64'"):
        eng.resolve_compute_dtype("auto", "cpu")
    with pytest.raises(ValueError, match="dtype = 'half'"):
        eng.EngineSettings(dtype="half")
