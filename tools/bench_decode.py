"""Decode/prefill throughput: HF transformers `generate` (fp32) vs this runtime with fp16, INT8 and FP8 KV caches.

Same model (the SmolLM2 demo), same prompt tokens, same thread count, one run. Each configuration runs
in its own subprocess so its peak RSS (VmHWM from /proc/self/status) is its own.

    python tools/bench_decode.py                 # batch 1 x 1024-token prompt and batch 8 x 2048 context
    python tools/bench_decode.py --quick         # batch 1 x 256 and batch 4 x 512
    python tools/bench_decode.py --dtype bfloat16 --threads 2 --new-tokens 32

Reported: prefill tokens/s (all prompt tokens / time of the first forward), decode tokens/s
(batch x steps / time of the steps after the first token), KV bytes per token, peak RSS; then the
ratios the issue targets (ours fp16 / HF, INT8 and FP8 / ours fp16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    text = Path(ROOT / "README.md").read_text() if (ROOT / "README.md").is_file() else ""
    text += " The quick brown fox jumps over the lazy dog while the cache fills up." * 400
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [(ids[b * 37 :] + ids)[:length] for b in range(batch)]  # same length, different contents


def run_one(args) -> dict:
    """One configuration in this process: returns the measurements."""
    import torch

    torch.set_num_threads(args.threads)
    if args.impl == "hf":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.hf)
        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
        ids = torch.tensor(prompts(tok, args.batch, args.prompt_len))
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kw)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
            total = time.perf_counter() - t0
        kv_bytes = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 64 * 4
        decode = total - prefill
    else:
        from runtime.engine import Engine

        engine = Engine(
            args.workspace,
            kv_cache_dtype=args.impl,
            dtype=args.dtype,
            max_batch_size=args.batch,
            calculate_kv_scales=args.impl.startswith("fp8"),
        )
        ps = prompts(engine.tokenizer, args.batch, args.prompt_len)
        sessions = [engine.new_session() for _ in ps]
        t0 = time.perf_counter()
        logits = engine._step(sessions, ps)  # (B, V) prefill
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            nxt = logits.argmax(-1).tolist()
            logits = engine._step(sessions, [[t] for t in nxt])
        decode = time.perf_counter() - t0
        from runtime import quant
        from runtime.workspace import kv_bytes_per_token

        kv_bytes = kv_bytes_per_token(engine.config, quant.BYTES_PER_ELEM[engine.kv_dtype])
    steps = args.new_tokens - 1
    return {
        "impl": args.impl,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "prefill_tok_s": args.batch * args.prompt_len / prefill,
        "decode_tok_s": args.batch * steps / decode,
        "kv_bytes_per_token": kv_bytes,
        "peak_rss_mib": peak_rss_mib(),
    }


def workspace_for(hf: Path, dst: Path, session_len: int) -> Path:
    from runtime.workspace import load_config, replace, save_config, weights_dir

    if (ROOT / "deploy" / "convert.py").is_file():
        subprocess.run(
            [sys.executable, "-m", "deploy", "smollm2", str(hf), "--dst-path", str(dst)], check=True, cwd=ROOT
        )
    else:  # until deploy lands: the test suite's minimal writer
        sys.path.insert(0, str(ROOT / "tests"))
        from rt_workspace import make_workspace

        make_workspace(hf, dst)
    save_config(replace(load_config(dst), session_len=session_len), weights_dir(dst))
    write_int8_params(dst)
    return dst


def write_int8_params(ws: Path) -> None:
    """INT8 asymmetric per-layer parameters from the fp16 cache of one short prompt (speed does not depend on them)."""
    import torch

    from runtime import kv_params
    from runtime.engine import Engine

    e = Engine(ws, kv_cache_dtype="fp16", max_batch_size=1)
    n = len(ids := prompts(e.tokenizer, 1, 256)[0])
    e.score(torch.tensor([ids]))
    rows = []
    for k, v in zip(e.cache.k, e.cache.v, strict=True):
        k, v = k[0, :, :n].float(), v[0, :, :n].float()
        rows.append(
            [(k.max() - k.min()) / 255, (k.max() + k.min()) / 2, (v.max() - v.min()) / 255, (v.max() + v.min()) / 2]
        )
    t = torch.tensor([[float(x) for x in r] for r in rows])
    H = e.config.kv_head_num
    kv_params.write(
        e.wdir,
        e.config,
        kv_params.KVParams("int8", "tensor", *(t[:, j : j + 1].expand(-1, H).contiguous() for j in range(4))),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (batch 1 x 256, batch 4 x 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--shapes", help="comma list of BATCHxPROMPT, e.g. 1x1024,8x2048 (overrides --quick)")
    ap.add_argument("--impls", default="hf,fp16,int8,fp8_e4m3", help="comma list of hf,fp16,int8,fp8_e4m3,fp8_e5m2")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON of one sub-run's arguments
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(argparse.Namespace(**json.loads(args.one)))))
        return
    from make_demo_model import ensure_demo_model

    hf = ensure_demo_model()
    shapes = [(1, 256), (4, 512)] if args.quick else [(1, 1024), (8, 2048)]
    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace_for(hf, Path(tmp) / "ws", session_len=max(p for _, p in shapes) + args.new_tokens + 8)
        rows = []
        for batch, plen in shapes:
            for impl in args.impls.split(","):
                one = dict(
                    impl=impl,
                    batch=batch,
                    prompt_len=plen,
                    new_tokens=args.new_tokens,
                    threads=args.threads,
                    dtype=args.dtype,
                    hf=str(hf),
                    workspace=str(ws),
                )
                out = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True, cwd=ROOT
                )
                if out.returncode != 0:
                    raise SystemExit(f"sub-run {one} failed:\n{out.stderr[-3000:]}")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"{impl:>9} b{batch} x {plen}: prefill {r['prefill_tok_s']:8.1f} tok/s  decode "
                    f"{r['decode_tok_s']:7.2f} tok/s  KV {r['kv_bytes_per_token']:.0f} B/token  "
                    f"peak {r['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
    print(f"\nthreads {args.threads}, our compute dtype {args.dtype}, {args.new_tokens} new tokens, HF fp32")
    for batch, plen in shapes:
        by = {r["impl"]: r for r in rows if r["batch"] == batch and r["prompt_len"] == plen}
        parts = []
        if "hf" in by and "fp16" in by:
            parts.append(f"fp16/HF {by['fp16']['decode_tok_s'] / by['hf']['decode_tok_s']:.2f}x")
        for q in ("int8", "fp8_e4m3", "fp8_e5m2"):
            if q in by and "fp16" in by:
                parts.append(f"{q}/fp16 {by[q]['decode_tok_s'] / by['fp16']['decode_tok_s']:.2f}x")
        print(f"decode ratios b{batch} x {plen}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
