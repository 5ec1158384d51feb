"""Test helper for the runtime tests: HF checkpoint -> workspace, HF reference model, KV param files.

`make_workspace` uses `python -m deploy` when it is present; until then a minimal test-only writer
follows REFERENCE.md §1 (transpose, RoPE interleave permute, QKV fusion per TP rank).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
_CACHE: dict = {}


def make_workspace(
    hf_dir: Path, dst: Path, *, tp: int = 1, model_name: str = "smollm2", session_len: int = 520
) -> Path:
    """Deploy hf_dir to dst (cached per arguments); returns the workspace root."""
    key = (str(hf_dir), tp, model_name, session_len)
    if key in _CACHE:
        return _CACHE[key]
    if (ROOT / "deploy" / "__main__.py").is_file() and (ROOT / "deploy" / "convert.py").is_file():
        cmd = [sys.executable, "-m", "deploy", model_name, str(hf_dir), "--dst-path", str(dst), "--tp", str(tp)]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        from runtime.workspace import load_config, replace, save_config, weights_dir

        cfg = load_config(dst)
        save_config(replace(cfg, session_len=session_len), weights_dir(dst))
    else:
        _write_workspace(hf_dir, dst, tp, model_name, session_len)
    _CACHE[key] = dst
    return dst


def _permute(w: torch.Tensor, heads: int, D: int) -> torch.Tensor:
    """(out, ...) HF rotate_half channel order -> interleaved pairs, per head."""
    rest = w.shape[1:]
    return w.reshape(heads, 2, D // 2, *rest).transpose(1, 2).reshape(heads * D, *rest)


def _write_workspace(hf_dir: Path, dst: Path, tp: int, model_name: str, session_len: int) -> None:
    from safetensors.torch import load_file

    from runtime.workspace import WorkspaceConfig, ranked, save_config

    c = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "model.safetensors")
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    D = c.get("head_dim") or c["hidden_size"] // H
    theta = c.get("rope_theta") or c["rope_parameters"]["rope_theta"]
    bias = int("model.layers.0.self_attn.q_proj.bias" in sd)
    wdir = dst / "triton_models" / "weights"
    wdir.mkdir(parents=True)
    tok = dst / "triton_models" / "tokenizer"
    tok.mkdir()
    for f in hf_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja" or f.name == "special_tokens_map.json":
            shutil.copy(f, tok / f.name)

    def save(name: str, t: torch.Tensor) -> None:
        t.to(torch.float16).contiguous().numpy().astype("<f2").tofile(wdir / name)

    emb = sd["model.embed_tokens.weight"]
    save("tok_embeddings.weight", emb)
    save("output.weight", sd.get("lm_head.weight", emb))
    save("norm.weight", sd["model.norm.weight"])
    for i in range(c["num_hidden_layers"]):
        p, a = f"layers.{i}.", f"model.layers.{i}."
        save(p + "attention_norm.weight", sd[a + "input_layernorm.weight"])
        save(p + "ffn_norm.weight", sd[a + "post_attention_layernorm.weight"])
        for kind in ("weight", "bias") if bias else ("weight",):
            q = _permute(sd[a + f"self_attn.q_proj.{kind}"], H, D)
            k = _permute(sd[a + f"self_attn.k_proj.{kind}"], KV, D)
            v = sd[a + f"self_attn.v_proj.{kind}"]
            q, k, v = (t.T if kind == "weight" else t for t in (q, k, v))  # (in, out)
            fused = torch.cat([t.reshape(*t.shape[:-1], tp, -1) for t in (q, k, v)], dim=-1).reshape(*q.shape[:-1], -1)
            for r, part in enumerate(fused.chunk(tp, dim=-1)):
                save(ranked(p + f"attention.w_qkv.{kind}", r), part)
        for r in range(tp):
            save(ranked(p + "attention.wo.weight", r), sd[a + "self_attn.o_proj.weight"].T.chunk(tp, 0)[r])
            if bias:
                save(ranked(p + "attention.wo.bias", r), sd.get(a + "self_attn.o_proj.bias", torch.zeros(H * D)))
            save(ranked(p + "feed_forward.w1.weight", r), sd[a + "mlp.gate_proj.weight"].T.chunk(tp, 1)[r])
            save(ranked(p + "feed_forward.w3.weight", r), sd[a + "mlp.up_proj.weight"].T.chunk(tp, 1)[r])
            save(ranked(p + "feed_forward.w2.weight", r), sd[a + "mlp.down_proj.weight"].T.chunk(tp, 0)[r])
    cfg = WorkspaceConfig(
        model_name=model_name,
        head_num=H,
        kv_head_num=KV,
        size_per_head=D,
        vocab_size=c["vocab_size"],
        num_layer=c["num_hidden_layers"],
        rotary_embedding=D,
        rope_theta=theta,
        inter_size=c["intermediate_size"],
        norm_eps=c["rms_norm_eps"],
        attn_bias=bias,
        start_id=c.get("bos_token_id") or 1,
        end_id=c.get("eos_token_id") or 2,
        session_len=session_len,
        tensor_para_size=tp,
        max_position_embeddings=c["max_position_embeddings"],
    )
    save_config(cfg, wdir)


def hf_model(hf_dir: Path):
    """The HF reference: the fp16 checkpoint loaded in fp32, eager attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def write_params(
    wdir: Path, kv_dtype: str, k_scale: float, k_zp: float, v_scale: float, v_zp: float, granularity: str = "tensor"
) -> None:
    """Per-layer parameter files with the same values everywhere (raw float32 rows)."""
    from runtime.kv_params import file_name, values_per_rank
    from runtime.workspace import load_config

    cfg = load_config(wdir)
    n = values_per_rank(cfg, granularity)
    for i in range(cfg.num_layer):
        for r in range(cfg.tensor_para_size):
            rows = np.repeat(np.array([[k_scale], [k_zp], [v_scale], [v_zp]], dtype="<f4"), n, axis=1)
            rows.tofile(wdir / file_name(i, r, kv_dtype, granularity))
