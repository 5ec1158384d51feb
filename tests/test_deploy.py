"""Round trip of `deploy`: read the workspace back with numpy alone and rebuild every HF tensor bit-exactly.

The reference side is independent of deploy/ and runtime/workspace.py: HF tensors come straight
from safetensors (numpy) or torch.load, dimensions from config.json, and the workspace files are
read with np.fromfile and un-done by hand (transpose, RoPE interleave, per-rank QKV fusion, TP
split, vocab padding). runtime.workspace.read_joined is checked separately against the same HF tensors.
"""

from __future__ import annotations

import configparser
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.convert import deploy
from runtime.workspace import load_config, read_joined, weight_table

# ----------------------------------------------------------------------------------------------
# Independent reference helpers


def hf_state(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF dir as numpy, read without deploy.checkpoint."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        from safetensors.numpy import load_file

        out.update(load_file(f))
    for f in sorted(path.glob("*.bin")):
        out.update({k: v.numpy() for k, v in torch.load(f, weights_only=True).items()})
    return out


def unpermute(w: np.ndarray, heads: int, D: int) -> np.ndarray:
    """Inverse of the TurboMind interleave on the last dim: [x0, x_{D/2}, x1, ...] -> [first half | second half]."""
    lead = w.shape[:-1]
    return w.reshape(*lead, heads, D // 2, 2).swapaxes(-1, -2).reshape(w.shape)


def dims(path: Path, tp: int) -> dict:
    c = json.loads((path / "config.json").read_text())
    H, hidden = c["num_attention_heads"], c["hidden_size"]
    return dict(
        H=H,
        KV=c.get("num_key_value_heads", H),
        D=c.get("head_dim") or hidden // H,
        hidden=hidden,
        inter=c["intermediate_size"],
        V=c["vocab_size"],
        L=c["num_hidden_layers"],
        tp=tp,
    )


def undo_layer(qkv: np.ndarray, d: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joined [Q | K | V] (workspace layout, (in, out) or (out,)) -> HF q, k, v ((out, in) or (out,))."""
    H, KV, D = d["H"], d["KV"], d["D"]
    q, k, v = np.split(qkv, [H * D, (H + KV) * D], axis=-1)
    q, k = unpermute(q, H, D), unpermute(k, KV, D)
    return (q.T, k.T, v.T) if qkv.ndim == 2 else (q, k, v)


def rebuild_from_files(ws: Path, d: dict) -> tuple[dict[str, np.ndarray], set[str]]:
    """HF-named tensors rebuilt from the raw files with np.fromfile; also the set of files read."""
    wdir = ws / "triton_models" / "weights"
    H, KV, D, hidden, inter, V, tp = d["H"], d["KV"], d["D"], d["hidden"], d["inter"], d["V"], d["tp"]
    read_files: set[str] = set()

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        read_files.add(name)
        a = np.fromfile(wdir / name, dtype="<f2")
        assert a.size == int(np.prod(shape)), (name, a.size, shape)
        return a.reshape(shape)

    def ranks(name: str, shape: tuple[int, ...]) -> list[np.ndarray]:
        stem, ext = name.rsplit(".", 1)
        return [read(f"{stem}.{r}.{ext}", shape) for r in range(tp)]

    padded = -(-V // tp) * tp
    out: dict[str, np.ndarray] = {}
    for ws_name, hf_name in (
        ("tok_embeddings.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
    ):
        w = read(ws_name, (padded, hidden))
        assert not w[V:].any(), f"{ws_name}: vocab padding rows must be zero"
        out[hf_name] = w[:V]
    out["model.norm.weight"] = read("norm.weight", (hidden,))
    qkv_r = (H + 2 * KV) * D // tp
    has_bias = (wdir / "layers.0.attention.w_qkv.0.bias").exists()
    for i in range(d["L"]):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = read(p + "attention_norm.weight", (hidden,))
        out[h + "post_attention_layernorm.weight"] = read(p + "ffn_norm.weight", (hidden,))
        for kind, shape in (("weight", (hidden, qkv_r)), ("bias", (qkv_r,))):
            if kind == "bias" and not has_bias:
                continue
            parts = [
                np.split(x, [H * D // tp, (H + KV) * D // tp], axis=-1)
                for x in ranks(p + f"attention.w_qkv.{kind}", shape)
            ]
            joined = np.concatenate([np.concatenate([pr[j] for pr in parts], axis=-1) for j in range(3)], axis=-1)
            for proj, x in zip("qkv", undo_layer(joined, d), strict=True):
                out[h + f"self_attn.{proj}_proj.{kind}"] = x
        out[h + "self_attn.o_proj.weight"] = np.concatenate(
            ranks(p + "attention.wo.weight", (H * D // tp, hidden)), 0
        ).T
        if has_bias:
            biases = ranks(p + "attention.wo.bias", (hidden,))
            assert all((b.view(np.uint16) == biases[0].view(np.uint16)).all() for b in biases), (
                "wo bias differs by rank"
            )
            out[h + "self_attn.o_proj.bias"] = biases[0]
        out[h + "mlp.gate_proj.weight"] = np.concatenate(
            ranks(p + "feed_forward.w1.weight", (hidden, inter // tp)), 1
        ).T
        out[h + "mlp.up_proj.weight"] = np.concatenate(ranks(p + "feed_forward.w3.weight", (hidden, inter // tp)), 1).T
        out[h + "mlp.down_proj.weight"] = np.concatenate(
            ranks(p + "feed_forward.w2.weight", (inter // tp, hidden)), 0
        ).T
    return out, read_files


def rebuild_from_joined(ws: Path, d: dict) -> dict[str, np.ndarray]:
    """The same HF tensors from runtime.workspace.read_joined (checks that reader against HF too)."""
    j = read_joined(ws / "triton_models" / "weights", load_config(ws))
    out = {
        "model.embed_tokens.weight": j["tok_embeddings.weight"],
        "lm_head.weight": j["output.weight"],
        "model.norm.weight": j["norm.weight"],
    }
    for i in range(d["L"]):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = j[p + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = j[p + "ffn_norm.weight"]
        for kind in ("weight", "bias"):
            if p + f"attention.w_qkv.{kind}" in j:
                for proj, x in zip("qkv", undo_layer(np.asarray(j[p + f"attention.w_qkv.{kind}"]), d), strict=True):
                    out[h + f"self_attn.{proj}_proj.{kind}"] = x
        out[h + "self_attn.o_proj.weight"] = j[p + "attention.wo.weight"].T
        if p + "attention.wo.bias" in j:
            out[h + "self_attn.o_proj.bias"] = j[p + "attention.wo.bias"]
        out[h + "mlp.gate_proj.weight"] = j[p + "feed_forward.w1.weight"].T
        out[h + "mlp.up_proj.weight"] = j[p + "feed_forward.w3.weight"].T
        out[h + "mlp.down_proj.weight"] = j[p + "feed_forward.w2.weight"].T
    return out


def assert_round_trip(hf: Path, ws: Path, tp: int) -> None:
    d = dims(hf, tp)
    src = hf_state(hf)
    assert all(v.dtype == np.float16 for v in src.values())
    expected = dict(src)
    expected.setdefault("lm_head.weight", src["model.embed_tokens.weight"])  # tied embeddings
    for name in [n for n in expected if n.endswith("q_proj.bias")]:  # q/k/v bias only (Qwen2): wo bias is zeros
        expected.setdefault(name.replace("q_proj", "o_proj"), np.zeros(d["hidden"], np.float16))

    for label, rebuilt in (("np.fromfile", rebuild_from_files(ws, d)[0]), ("read_joined", rebuild_from_joined(ws, d))):
        assert rebuilt.keys() == expected.keys(), (label, sorted(rebuilt.keys() ^ expected.keys())[:5])
        for name, want in expected.items():
            got = np.asarray(rebuilt[name])
            assert got.shape == want.shape, (label, name, got.shape, want.shape)
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), f"{label}: {name} differs"

    # exactly the files weight_table lists (+ config.ini), every one of them read above
    wdir = ws / "triton_models" / "weights"
    on_disk = {f.name for f in wdir.iterdir()} - {"config.ini"}
    assert on_disk == set(weight_table(load_config(ws)))
    assert on_disk == rebuild_from_files(ws, d)[1]


# ----------------------------------------------------------------------------------------------
# Checkpoint variants built from the tiny random models


@pytest.fixture(scope="module")
def variants(tiny_hf, tmp_path_factory):
    """name -> HF dir: tiny llama (GQA), qwen2, mistral, internlm, odd vocab, .bin, sharded safetensors."""
    root = tmp_path_factory.mktemp("variants")
    v = {
        "llama": tiny_hf("llama"),
        "qwen2": tiny_hf("qwen2"),
        "mistral": tiny_hf("mistral"),
        "odd_vocab": tiny_hf("llama", vocab_size=1001),
        "tied": tiny_hf("llama", tie_word_embeddings=True),
    }

    internlm = shutil.copytree(tiny_hf("llama", attention_bias=True), root / "internlm")
    cfg = json.loads((internlm / "config.json").read_text())
    cfg.update(architectures=["InternLMForCausalLM"], model_type="internlm", bias=True)
    cfg.pop("attention_bias")
    (internlm / "config.json").write_text(json.dumps(cfg))
    v["internlm"] = internlm

    from safetensors.torch import load_file, save_file

    state = load_file(v["llama"] / "model.safetensors")
    binary = shutil.copytree(v["llama"], root / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(state, binary / "pytorch_model.bin")
    v["bin"] = binary

    sharded = shutil.copytree(v["llama"], root / "sharded", ignore=shutil.ignore_patterns("*.safetensors"))
    names = sorted(state)
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, sharded / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    v["sharded"] = sharded
    return v


CASES = [(name, tp) for name in ("llama", "qwen2", "internlm") for tp in (1, 2)] + [
    ("mistral", 2),
    ("odd_vocab", 2),
    ("tied", 2),
    ("bin", 2),
    ("sharded", 2),
]


@pytest.mark.parametrize("name,tp", CASES)
def test_round_trip_tiny(variants, tmp_path, name, tp):
    ws = deploy("base", variants[name], tmp_path / "ws", tp, progress=False)
    assert ws == (tmp_path / "ws").absolute()
    assert load_config(ws).attn_bias == (name in ("qwen2", "internlm"))  # the bias paths really are exercised
    assert_round_trip(variants[name], ws, tp)


def test_round_trip_checks_catch_a_wrong_layout(variants, tmp_path):
    """The round-trip check must fail when one file is altered (it can fail, so it means something)."""
    ws = deploy("base", variants["llama"], tmp_path / "ws", 2, progress=False)
    f = ws / "triton_models" / "weights" / "layers.1.attention.w_qkv.1.weight"
    a = np.fromfile(f, dtype="<f2").reshape(64, -1)
    a[:, [0, 1]] = a[:, [1, 0]]  # swap two interleaved q channels
    a.tofile(f)
    with pytest.raises(AssertionError):
        assert_round_trip(variants["llama"], ws, 2)


def test_config_ini_matches_hf_config(variants, tmp_path):
    hf = variants["qwen2"]
    ws = deploy("qwen-7b", hf, tmp_path / "ws", 2, progress=False)
    c = json.loads((hf / "config.json").read_text())
    ini = configparser.ConfigParser()
    ini.read(ws / "triton_models" / "weights" / "config.ini")
    s = ini["llama"]
    keys = list(s.keys())
    upstream = [
        "model_name",
        "head_num",
        "kv_head_num",
        "size_per_head",
        "vocab_size",
        "num_layer",
        "rotary_embedding",
        "rope_theta",
        "inter_size",
        "norm_eps",
        "attn_bias",
        "start_id",
        "end_id",
        "weight_type",
        "group_size",
        "max_batch_size",
        "max_context_token_num",
        "session_len",
        "step_length",
        "cache_max_entry_count",
        "cache_chunk_size",
        "use_context_fmha",
        "quant_policy",
        "tensor_para_size",
        "max_position_embeddings",
        "use_dynamic_ntk",
        "use_logn_attn",
    ]
    assert keys[: len(upstream)] == upstream
    assert set(keys[len(upstream) :]) == {"kv_cache_dtype", "kv_granularity", "format_version"}
    D = c["hidden_size"] // c["num_attention_heads"]
    theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta"))
    want = {
        "model_name": "qwen-7b",
        "head_num": c["num_attention_heads"],
        "kv_head_num": c["num_key_value_heads"],
        "size_per_head": D,
        "vocab_size": c["vocab_size"],
        "num_layer": c["num_hidden_layers"],
        "rotary_embedding": D,
        "inter_size": c["intermediate_size"],
        "attn_bias": 1,
        "start_id": c["bos_token_id"],
        "end_id": c["eos_token_id"],
        "weight_type": "fp16",
        "group_size": 0,
        "max_batch_size": 32,
        "max_context_token_num": 4,
        "session_len": 8192 + 8,
        "step_length": 1,
        "cache_chunk_size": 1,
        "use_context_fmha": 1,
        "quant_policy": 0,
        "tensor_para_size": 2,
        "max_position_embeddings": c["max_position_embeddings"],
        "use_dynamic_ntk": 0,
        "use_logn_attn": 0,
        "kv_cache_dtype": "fp16",
        "kv_granularity": "tensor",
        "format_version": 1,
    }
    for key, value in want.items():
        assert s[key] == str(value), key
    assert float(s["rope_theta"]) == theta and float(s["norm_eps"]) == c["rms_norm_eps"]
    assert float(s["cache_max_entry_count"]) == 48
    assert load_config(ws).tensor_para_size == 2


def test_config_llama_no_bias_dynamic_rope_and_eos_list(variants, tmp_path):
    hf = shutil.copytree(variants["llama"], tmp_path / "hf")
    c = json.loads((hf / "config.json").read_text())
    c.pop("rope_theta", None)
    c["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0}
    (hf / "config.json").write_text(json.dumps(c))
    (hf / "generation_config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": [9, 2]}))
    notes: list[str] = []
    ws = deploy("llama2", hf, tmp_path / "ws", 1, progress=False, notes=notes.append)
    cfg = load_config(ws)
    assert (cfg.attn_bias, cfg.rope_theta, cfg.use_dynamic_ntk) == (0, 5000.0, 1)
    assert (cfg.start_id, cfg.end_id, cfg.session_len, cfg.model_name) == (7, 9, 4096 + 8, "llama2")
    assert any("eos_token_id" in n and "9" in n for n in notes)


def test_workspace_tree(variants, tmp_path):
    ws = deploy("smollm2", variants["llama"], tmp_path / "ws", 2, progress=False)
    models = ws / "triton_models"
    script = (ws / "service_docker_up.sh").read_text()
    assert "\nTP=2\n" in script and "\nTP=1\n" not in script
    for link, target in (
        ("turbomind", "interactive"),
        ("preprocessing", "preprocessing"),
        ("postprocessing", "postprocessing"),
    ):
        path = ws / "model_repository" / link
        assert path.is_symlink() and path.resolve() == (models / target).resolve()
    weights_link = models / "interactive" / "1" / "weights"
    assert weights_link.is_symlink() and weights_link.resolve() == (models / "weights").resolve()
    assert (models / "interactive" / "config.pbtxt").is_file()
    for stage in ("preprocessing", "postprocessing"):
        assert (models / stage / "1" / "model.py").is_file()
        assert (models / stage / "1" / "tokenizer").resolve() == (models / "tokenizer").resolve()
    copied = {f.name for f in (models / "tokenizer").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= copied
    assert "model.safetensors" not in copied
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models / "tokenizer")
    ref = AutoTokenizer.from_pretrained(variants["llama"])
    assert tok.encode("Hello, workspace!") == ref.encode("Hello, workspace!")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 3])
def test_round_trip_demo_model(demo_model, tmp_path, tp):
    ws = deploy("smollm2", demo_model, tmp_path / "ws", tp, progress=False)
    assert_round_trip(demo_model, ws, tp)
    cfg = load_config(ws)
    assert (cfg.head_num, cfg.kv_head_num, cfg.size_per_head, cfg.inter_size, cfg.num_layer) == (9, 3, 64, 1536, 30)
    assert (cfg.rope_theta, cfg.start_id, cfg.end_id, cfg.tensor_para_size) == (100000.0, 1, 2, tp)
