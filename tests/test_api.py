"""The vLLM-shaped API: `from runtime import LLM, SamplingParams`, text and token-id prompts, stop strings,
finish reasons, KV dtype aliases."""

from __future__ import annotations

import subprocess
import sys

import pytest
from rt_workspace import make_workspace

from runtime import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_hf, tmp_path_factory):
    ws = make_workspace(tiny_hf("llama"), tmp_path_factory.mktemp("api") / "ws", session_len=128)
    return LLM(str(ws), max_batch_size=4)


def test_import_is_light():
    code = "import sys, runtime; print('transformers' in sys.modules, 'cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_generate_text_and_token_prompts(llm):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = llm.generate("Hello there", greedy)
    assert len(out) == 1 and out[0].prompt == "Hello there"
    res = out[0].outputs[0]
    assert len(res.token_ids) == 8 and res.finish_reason == "length"
    assert res.text == llm.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    # smollm2 template: no BOS, so the text prompt is exactly its tokens
    ids = llm.tokenizer.encode("Hello there", add_special_tokens=False)
    assert out[0].prompt_token_ids == ids
    again = llm.generate(ids, greedy)[0]
    assert again.prompt is None and again.outputs[0].token_ids == res.token_ids
    many = llm.generate(["Hello there", "A much longer prompt about the weather today"], greedy)
    assert [r.outputs[0].token_ids for r in many][0] == res.token_ids
    assert llm.engine.generate([ids], [greedy])[0] == res.token_ids


def test_stop_strings_cut_text_and_end_generation(llm):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    full = llm.generate("Hello there", greedy)[0].outputs[0]
    # pick a stop string from the middle of the generated text
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("generated text has no usable middle piece")
    cut = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]))
    res = cut[0].outputs[0]
    assert res.text == text[: text.find(stop)] and res.finish_reason == "stop"
    assert len(res.token_ids) < len(full.token_ids) and full.token_ids[: len(res.token_ids)] == res.token_ids


def test_eos_stops_with_reason_stop(llm):
    first = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    tok = first.outputs[0].token_ids[2]
    out = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[tok]))[0]
    assert out.outputs[0].token_ids[-1] == tok and out.outputs[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(llm):
    sp = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=3, ignore_eos=True)
    a = llm.generate(["Hi", "Hi"], sp)
    assert a[0].outputs[0].token_ids == a[1].outputs[0].token_ids == llm.generate("Hi", sp)[0].outputs[0].token_ids


def test_kv_dtype_aliases(tiny_hf, tmp_path):
    ws = make_workspace(tiny_hf("llama"), tmp_path / "ws", session_len=64)
    llm = LLM(str(ws), kv_cache_dtype="fp8", calculate_kv_scales=True, max_batch_size=1)
    assert llm.engine.kv_dtype == "fp8_e4m3"
    assert len(llm.generate("Hi", SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids) <= 4
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(ws), kv_cache_dtype="int4")
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for kv in ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"):  # vLLM's names, no files
        online = LLM(str(ws), kv_cache_dtype=kv, kv_rotation="on", max_batch_size=1, kv_cache_gib=0.001)
        assert online.engine.kv_dtype == kv and online.engine.quantizer.rotation is not None
        assert len(online.generate("Hi", sp)[0].outputs[0].token_ids) == 4


def test_text_cut_by_max_tokens_drops_the_partial_character(tiny_hf):
    """LLM.generate's text: a character that max_tokens cut short is dropped (vLLM does the same), not U+FFFD."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf("llama"))
    answer = tok.encode("你好世界", add_special_tokens=False)  # 你 好 世 界 take 2, 2, 2 and 3 tokens

    class CannedEngine:
        def generate(self, prompts, params, stop_check=None):
            return [answer[: p.max_tokens] for p in params]

        def stops(self, token, params):
            return False

    llm = LLM.__new__(LLM)  # the API over a stand-in engine: only its output text is under test
    llm.engine, llm.tokenizer = CannedEngine(), tok
    for max_tokens, want in ((8, "你好世"), (9, "你好世界"), (1, "")):
        out = llm.generate([[1, 2]], SamplingParams(max_tokens=max_tokens))[0].outputs[0]
        assert out.text == want and out.finish_reason == "length" and out.token_ids == answer[:max_tokens]
