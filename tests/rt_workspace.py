"""Test helper for the runtime tests: HF checkpoint -> workspace (through deploy), HF reference model,
KV param files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_CACHE: dict = {}


def make_workspace(
    hf_dir: Path, dst: Path, *, tp: int = 1, model_name: str = "smollm2", session_len: int = 520
) -> Path:
    """Deploy hf_dir to dst with the project's own deploy (cached per arguments); returns the workspace root."""
    from deploy.convert import deploy
    from runtime.workspace import load_config, replace, save_config, weights_dir

    key = (str(hf_dir), str(dst), tp, model_name, session_len)
    if key not in _CACHE:
        deploy(model_name, hf_dir, dst, tp, progress=False, notes=lambda _: None)
        save_config(replace(load_config(dst), session_len=session_len), weights_dir(dst))
        _CACHE[key] = dst
    return _CACHE[key]


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


def kernel_workspace(tiny_hf, dst: Path, session_len: int) -> Path:
    """A tiny llama workspace for the kernel paths: head_dim 64 (a size the kernels are instantiated for), GQA 2,
    with per-layer INT8 and FP8 parameter files."""
    hf = tiny_hf("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    ws = make_workspace(hf, dst, session_len=session_len)
    wdir = ws / "triton_models" / "weights"
    write_params(wdir, "int8", 0.03, 0.1, 0.02, -0.05)
    write_params(wdir, "fp8_e4m3", 0.01, 0.0, 0.005, 0.0)
    return ws
