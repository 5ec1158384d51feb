"""Shared fixtures: the SmolLM2 demo model (built once, cached) and tiny random HF checkpoints.

Tiny checkpoints reuse the demo model's tokenizer so every path (chat templates, detokenization)
sees a real tokenizer; their weights are random, saved in fp16 like the demo model.

The engine's compute dtype "auto" is pinned to float32 for the whole suite (and the CLIs it starts as
subprocesses, which inherit the environment): float32 is the dtype of the accuracy checks against HF
transformers and of the batch-invariance checks. Tests of auto itself clear the variable.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_demo_model import ensure_demo_model  # noqa: E402

os.environ["KVQ_COMPUTE_DTYPE"] = "float32"  # runtime.engine.AUTO_DTYPE_ENV

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """SmolLM2-135M-Instruct as an fp16 safetensors HF directory (30 layers, 9 heads, 3 KV heads, D 64)."""
    return ensure_demo_model()


def make_tiny_hf(path: Path, arch: str = "llama", *, tokenizer_from: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny randomly initialised HF checkpoint (fp16 safetensors) of `arch` to `path`."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    kinds = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    config_cls, model_cls = kinds[arch]
    kw = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).to(torch.float16)
    with torch.no_grad():  # larger-than-default weights so attention is not uniform and logits differ
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, demo_model):
    """Factory: tiny_hf(arch, **config_overrides) -> HF directory (cached per argument set)."""
    cache: dict = {}

    def build(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[key] = make_tiny_hf(path, arch, tokenizer_from=demo_model, **overrides)
        return cache[key]

    return build


@pytest.fixture(params=["native", "avx512-fp32", "avx2"])
def cpu_kernel_build(request, monkeypatch) -> str:
    """Run a C++ decode-attention test on every build of the one kernel source: the one this CPU gets (16-lane
    AVX-512 with AVX512-VNNI integer dot products where it has them), the 16-lane fp32-only one (AVX-512 CPUs
    without VNNI) and the 8-lane AVX2 one that CPUs without AVX-512 get."""
    from runtime import cpp_build, cpu_attention

    if request.param == "native":
        build = cpu_attention._cpp_module()
    else:
        avx512 = request.param == "avx512-fp32"
        if avx512 and not cpp_build.cpu_has("avx512_vnni"):
            pytest.skip("the native build is the fp32 AVX-512 one here")
        build = cpu_attention._cpp_module(avx512=avx512, vnni=False)
        if build is None:
            pytest.skip(f"the {request.param} build of the kernel does not build here")
        monkeypatch.setattr(cpu_attention, "_cpp_module", lambda *_, **__: build)
    # every kind on this build (by default some kinds run on the AVX2 build on some CPUs: library_for)
    monkeypatch.setattr(cpu_attention, "library_for", lambda *_: build)
    return request.param


def _on_build(request, monkeypatch, module, **second) -> str:
    """A kernel test on the build this CPU gets (param "native") or on `module._library(**second)`, the build other
    CPUs get, which replaces `module._library` for the test (skipped where it is the native one)."""
    if request.param != "native":
        build = module._library(**second)
        if module._library() is build:
            pytest.skip(f"the native build is the {request.param} one here")
        monkeypatch.setattr(module, "_library", lambda *_, **__: build)
    return request.param


@pytest.fixture(params=["native", "AVX512-BF16"])
def linear_build(request, monkeypatch) -> str:
    """runtime.cpu_linear's bf16 kernels on each build: AMX tiles where the CPU has AMX-BF16, and AVX512-BF16."""
    from runtime import cpu_linear

    return _on_build(request, monkeypatch, cpu_linear, amx=False)


@pytest.fixture(params=["native", "AVX2"])
def f16w_build(request, monkeypatch) -> str:
    """runtime.cpu_f16w's fp32 kernels on each build: AVX-512 where the CPU has it, and AVX2."""
    from runtime import cpu_f16w

    return _on_build(request, monkeypatch, cpu_f16w, avx512=False)
