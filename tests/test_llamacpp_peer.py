"""tools/llamacpp_peer.py: llama.cpp as the benchmarks' decode-speed peer.

Without llama-cpp-python (CI) only the error path runs: the message says how to install it. Where it is
installed, the peer must run the same model as ours: its greedy tokens on the demo model equal HF's on our
demo HF directory (both made from the one Q4_1 GGUF), for a batch of two prompts decoded together, with both
KV types.
"""

from __future__ import annotations

import importlib.util
import sys

import llamacpp_peer
import pytest

has_llamacpp = importlib.util.find_spec("llama_cpp") is not None


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(SystemExit, match=r"pip install llama-cpp-python==\d"):
        llamacpp_peer.library()


def test_unknown_kv_type_is_named():
    with pytest.raises(SystemExit, match="'q4_0'.*f16, q8_0"):
        llamacpp_peer.run("q4_0", [[1, 2, 3]], 2, 1)


@pytest.mark.skipif(not has_llamacpp, reason="llama-cpp-python is not installed (optional benchmark peer)")
@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_peer_generates_what_hf_generates_on_the_same_model(demo_model, kv):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    texts = ["The capital of France is", "Debian packages are installed with the command"]
    prompts = [tok.encode(t) for t in texts]
    prompts[1] = prompts[1][: len(prompts[0])]  # the peer decodes prompts of one length together
    new = 6
    out = llamacpp_peer.run(kv, prompts, new, threads=2)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = model.generate(torch.tensor(prompts), max_new_tokens=new, do_sample=False)[:, len(prompts[0]) :]
    assert out["generated"] == want.tolist()
    assert out["prefill_s"] > 0 and out["decode_s"] > 0
    # 30 layers x 3 KV heads x 64 values, K and V: 2 bytes a value (f16), 34 bytes a 32-value block (q8_0)
    assert out["kv_bytes_per_token"] == {"f16": 23040, "q8_0": 12240}[kv]
