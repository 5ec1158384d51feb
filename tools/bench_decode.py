"""Decode/prefill throughput: HF transformers `generate` (fp32) vs this runtime with fp16, INT8 and FP8 KV caches.

Same model (the SmolLM2 demo), same prompt tokens, same thread count, one run. Each configuration runs
in its own subprocess so its peak RSS (VmHWM from /proc/self/status) is its own; the configurations
are run round-robin for --repeats rounds (default 3) and medians are reported, because a shared
2-core machine drifts by tens of percent between minutes.

    python tools/bench_decode.py                 # batch 1 x 1024, batch 8 x 2048 and batch 32 x 1024
    python tools/bench_decode.py --quick         # batch 1 x 256 and batch 4 x 512
    python tools/bench_decode.py --dtype float32 --threads 2 --new-tokens 32
    python tools/bench_decode.py --impls hf,fp16,int8,llamacpp-f16,llamacpp-q8_0   # llama.cpp as a peer too

llama.cpp (F16 weights, f16 or q8_0 KV cache, flash attention) runs through llama-cpp-python when it is
installed (`pip install llama-cpp-python==0.3.36`, an ~11 min compile on 2 cores; see tools/llamacpp_peer.py),
from the same Q4_1 GGUF our demo model is made of, converted to F16 by llama.cpp itself.

Reported: prefill tokens/s (all prompt tokens / time of the first forward), decode tokens/s
(batch x steps / time of the steps after the first token), KV bytes per token, peak RSS; the share of
a decode step spent in the linear layers, the decode attention, the cache writes and everything else
(layer norms, RoPE, sampling, Python); then the ratios the issues target (ours fp16 / HF, INT8 and FP8 /
ours fp16). Last, in this process: decode attention alone on random pools of every KV dtype at the same
shapes, its achieved read bandwidth (cache bytes read per call / time) against the machine's read
bandwidth measured in the same process (summing a 512 MiB buffer).
"""

from __future__ import annotations

import argparse
import json
import statistics
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


LLAMACPP = "llamacpp-"  # impls llamacpp-f16, llamacpp-q8_0: llama.cpp's KV types (tools/llamacpp_peer.py)


def is_ours(impl: str) -> bool:
    return impl != "hf" and not impl.startswith(LLAMACPP)


def run_one(args) -> dict:
    """One configuration in this process: returns the measurements."""
    import torch

    torch.set_num_threads(args.threads)
    if args.impl.startswith(LLAMACPP):
        import llamacpp_peer
        from transformers import AutoTokenizer

        ps = prompts(AutoTokenizer.from_pretrained(args.hf), args.batch, args.prompt_len)
        r = llamacpp_peer.run(args.impl[len(LLAMACPP) :], ps, args.new_tokens, args.threads)
        prefill, decode, kv_bytes = r["prefill_s"], r["decode_s"], r["kv_bytes_per_token"]
    elif args.impl == "hf":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.hf)
        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
        ids = torch.tensor(prompts(tok, args.batch, args.prompt_len))
        # The greedy loop of `generate`, timed step by step: one prefill forward, then one forward per new
        # token on HF's own KV cache (timing generate(1) and generate(n) and subtracting drowns the decode
        # steps in the noise of two long prefills).
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill = time.perf_counter() - t0
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            decode = time.perf_counter() - t0
        kv_bytes = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 64 * 4
    else:
        from runtime.engine import Engine

        timers = install_timers()
        engine = Engine(
            args.workspace,
            kv_cache_dtype=args.impl,
            dtype=args.dtype,
            max_batch_size=args.batch,
            max_prefill_token_num=args.batch * args.prompt_len,  # every prompt in the first step (see below)
            calculate_kv_scales=args.impl.startswith("fp8"),
        )
        from runtime.sampling import SamplingParams

        ps = prompts(engine.tokenizer, args.batch, args.prompt_len)
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        for p in ps:
            engine.add_request(p, params)
        t0 = time.perf_counter()
        # One prefill step for all prompts, so the decode steps timed below all run the whole batch (with
        # chunked prefill, sequences admitted first would decode while later ones are still prefilling).
        first = engine.step()
        if len(first) != args.batch:
            raise SystemExit(f"the first step produced {len(first)} first tokens, not {args.batch}")
        prefill = time.perf_counter() - t0
        for k in timers:
            timers[k] = 0.0
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():  # new_tokens - 1 decode steps over the whole batch
            engine.step()
        decode = time.perf_counter() - t0
        shares = {k: v / decode for k, v in timers.items()}
        from runtime import quant
        from runtime.workspace import kv_bytes_per_token

        kv_bytes = kv_bytes_per_token(engine.config, quant.kv_row_bytes(engine.kv_dtype, engine.config.size_per_head))
    steps = args.new_tokens - 1
    extra = {"shares": shares} if is_ours(args.impl) else {}
    return {
        **extra,
        "impl": args.impl,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "prefill_tok_s": args.batch * args.prompt_len / prefill,
        "decode_tok_s": args.batch * steps / decode,
        "kv_bytes_per_token": kv_bytes,
        "peak_rss_mib": peak_rss_mib(),
    }


def install_timers() -> dict[str, float]:
    """Wall-clock accumulators for the linear layers (the down projection too: it is fused with SwiGLU), decode
    attention and cache writes: around the Python calls, and inside the one-call decode step (runtime.cpu_step)."""
    import functools

    from runtime import cpu_step, kv_cache, model

    timers = {"linear": 0.0, "attention": 0.0, "cache write": 0.0}
    cpu_step.TIMING = timers  # the C++ step adds its kernels' seconds here

    def timed(fn, key):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[key] += time.perf_counter() - t

        return wrapper

    model.linear = timed(model.linear, "linear")
    model.swiglu_linear = timed(model.swiglu_linear, "linear")  # SwiGLU fused with the down projection (w2)
    kv_cache.KVCache.decode_attention = timed(kv_cache.KVCache.decode_attention, "attention")
    kv_cache.KVCache.write = timed(kv_cache.KVCache.write, "cache write")
    return timers


def read_bandwidth_gbs(threads: int) -> float:
    """The machine's read bandwidth now: best of 5 sums over a 512 MiB fp32 buffer (larger than any cache)."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(128 * 2**20)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def compute_dtype() -> str:
    """The engine's compute dtype on this CPU (its default, "auto": bfloat16 where the CPU has bf16 arithmetic)."""
    from runtime.engine import resolve_compute_dtype

    return resolve_compute_dtype("auto", "cpu")


def attention_bandwidth(shapes, kv_dtypes, threads: int, repeats: int = 7, layers: int = 30) -> list[dict]:
    """Decode attention alone (the engine's CPU kernel, SmolLM2's 9 query / 3 KV heads, D 64) on random pools of
    each KV dtype: GB/s of cache bytes read, next to the read bandwidth measured just before each shape. Each
    timed pass runs `layers` calls on as many copies of the pools (the model's 30 layers, on huge pages like the
    engine's cache, each bound to the kernel once as the engine binds it), as a decode step does, so the cache is
    read from memory: one layer's pools alone (6-25 MB here) would stay in the CPU's caches between calls and
    overstate the bandwidth. q comes in the engine's compute dtype on this CPU (`compute_dtype()`): bf16 q takes
    the kernel's bf16 path, as the engine's decode step does."""
    import torch

    from runtime import hugepages, quant
    from runtime.cpu_attention import DecodePlan

    torch.set_num_threads(threads)
    Hkv, G, D, bs = 3, 3, 64, 64
    out = []
    for batch, ctx in shapes:
        if ctx % bs:
            raise SystemExit(f"--attention-only needs contexts in whole blocks of {bs}; got {ctx}")
        bw = read_bandwidth_gbs(threads)
        nb = batch * -(-ctx // bs)
        g = torch.Generator().manual_seed(0)
        tables = torch.randperm(nb, generator=g).view(batch, -1).to(torch.int32)  # shuffled, non-contiguous
        lengths = torch.full((batch,), ctx, dtype=torch.int32)
        q = torch.randn(batch, Hkv * G, D, generator=g).to(getattr(torch, compute_dtype()))
        for kv in kv_dtypes:
            x = torch.randn(2, nb, Hkv, bs, D, generator=g)
            params, kp, vp = (None,) * 4, None, None
            if quant.is_online(kv):  # codes and each row's (scale, zero), as the cache stores them
                (k, kp), (v, vp) = (quant.quantize_online(t, kv) for t in x)
                if quant.channel_keys(kv):  # full blocks' keys: per channel (shapes are whole blocks)
                    k, kp = quant.quantize_channels(x[0])
            else:
                scale, zp = torch.full((Hkv,), 4 / 127), torch.zeros(Hkv)
                k, v = quant.quantize(x, kv, scale, zp)  # values of a realistic range (no overflow, no denormals)
                params = (scale, zp, scale, zp)
            # each layer's copies on huge pages, as the engine's KV cache keeps its pools (runtime.hugepages), bound
            # to the kernel once per layer as the engine binds them (DecodePlan: no per-call argument checks)
            layer = [t for t in (k, v, kp, vp) if t is not None]
            arena = hugepages.Arena(layers * sum(hugepages.nbytes(t.shape, t.dtype) for t in layer))
            plans = []
            for _ in range(layers):
                pk, pv, *rows = (arena.hold(t) for t in layer)
                plans.append(DecodePlan(pk, pv, params, kv, *rows, heads=Hkv * G, head_dim=D))
            for plan in plans:
                plan(q, tables, lengths, D**-0.5)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                for plan in plans:
                    plan(q, tables, lengths, D**-0.5)
                times.append((time.perf_counter() - t) / layers)
            sec = statistics.median(times)
            del plans, arena
            read = 2 * batch * ctx * Hkv * quant.kv_row_bytes(kv, D)  # data (+ online params) of every row
            out.append(dict(batch=batch, context=ctx, kv=kv, ms=sec * 1e3, gbs=read / sec / 1e9, read_bw_gbs=bw))
    return out


def deploy_plain(hf: Path, dst: Path, session_len: int) -> Path:
    """hf deployed to dst with the given session_len, no KV parameter files."""
    from deploy.convert import deploy
    from runtime.workspace import load_config, replace, save_config, weights_dir

    deploy("smollm2", hf, dst, progress=False, notes=lambda _: None)
    save_config(replace(load_config(dst), session_len=session_len), weights_dir(dst))
    return dst


def workspace_for(hf: Path, dst: Path, session_len: int) -> Path:
    write_int8_params(deploy_plain(hf, dst, session_len))
    return dst


def write_int8_params(ws: Path) -> None:
    """INT8 asymmetric per-layer parameters from the fp16 cache of one short prompt (speed does not depend on them)."""
    import torch

    from runtime import kv_params, quant
    from runtime.engine import Engine

    e = Engine(ws, kv_cache_dtype="fp16", max_batch_size=1, session_len=256)
    n = len(ids := prompts(e.tokenizer, 1, 256)[0])
    e.score(torch.tensor([ids]))
    H = e.config.kv_head_num
    per_layer = {"k": [], "v": []}
    for which, caches in (("k", e.cache.k), ("v", e.cache.v)):
        for c in caches:
            x = c[0, :, :n].float()
            scale, zp = quant.int8_params(x.max(), x.min(), x.abs().max(), symmetric=False)
            per_layer[which].append((scale.expand(H), zp.expand(H)))
    k_scale, k_zp = (torch.stack(t) for t in zip(*per_layer["k"], strict=True))
    v_scale, v_zp = (torch.stack(t) for t in zip(*per_layer["v"], strict=True))
    kv_params.write(e.wdir, e.config, kv_params.KVParams("int8", "tensor", k_scale, k_zp, v_scale, v_zp))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (batch 1 x 256, batch 4 x 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="our compute dtype (default auto)"
    )
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--shapes", help="comma list of BATCHxPROMPT, e.g. 1x1024,8x2048 (overrides --quick)")
    ap.add_argument(
        "--impls",
        default="hf,fp16,int8,fp8_e4m3",
        help="comma list of hf, fp16, int8, fp8_e4m3, fp8_e5m2 or an online *_per_token_head mode, and the "
        "llama.cpp peer: llamacpp-f16, llamacpp-q8_0 (F16 weights, that KV type, flash attention; needs "
        "llama-cpp-python, see tools/llamacpp_peer.py)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all configurations; medians are reported")
    ap.add_argument(
        "--attention-only",
        action="store_true",
        help="only the decode-attention bandwidth section, for the --impls KV dtypes (the online "
        "*_per_token_head modes too); no model runs (default off)",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON of one sub-run's arguments
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(argparse.Namespace(**json.loads(args.one)))))
        return
    shapes = [(1, 256), (4, 512)] if args.quick else [(1, 1024), (8, 2048), (32, 1024)]
    if args.shapes:
        shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    impls = args.impls.split(",")
    if args.attention_only:
        print_attention(shapes, [i for i in impls if is_ours(i)], args.threads)
        return
    if any(i.startswith(LLAMACPP) for i in impls):
        import llamacpp_peer

        for i in impls:  # fail before the first round
            if i.startswith(LLAMACPP) and i[len(LLAMACPP) :] not in llamacpp_peer.KV_TYPES:
                raise SystemExit(
                    f"--impls {i}: the llama.cpp peer takes {', '.join(LLAMACPP + k for k in llamacpp_peer.KV_TYPES)}"
                )
        llamacpp_peer.f16_gguf(llamacpp_peer.library())  # convert once
    from make_demo_model import ensure_demo_model

    hf = ensure_demo_model()
    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace_for(hf, Path(tmp) / "ws", session_len=max(p for _, p in shapes) + args.new_tokens + 8)
        # Round-robin: every configuration once per round, so slow drifts of a shared machine hit all alike.
        for rnd in range(args.repeats):
            for batch, plen in shapes:
                for impl in impls:
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
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    runs.setdefault((batch, plen, impl), []).append(r)
                    print(
                        f"round {rnd + 1}/{args.repeats} {impl:>9} b{batch} x {plen}: prefill "
                        f"{r['prefill_tok_s']:8.1f} tok/s  decode {r['decode_tok_s']:7.2f} tok/s",
                        flush=True,
                    )

    def med(key: tuple, field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    print(
        f"\nmedians of {args.repeats} rounds; threads {args.threads}, our compute dtype {args.dtype}, "
        f"{args.new_tokens} new tokens, HF fp32"
    )
    print(
        f"{'run':>24} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode range':>15} "
        f"{'KV B/token':>11} {'peak MiB':>9}"
    )
    for batch, plen in shapes:
        for impl in impls:
            key = (batch, plen, impl)
            dec = [r["decode_tok_s"] for r in runs[key]]
            print(
                f"{impl + f' b{batch} x {plen}':>24} {med(key, 'prefill_tok_s'):14.1f} "
                f"{med(key, 'decode_tok_s'):13.2f} "
                f"{min(dec):7.2f}-{max(dec):<7.2f} {runs[key][0]['kv_bytes_per_token']:11.0f} "
                f"{max(r['peak_rss_mib'] for r in runs[key]):9.0f}"
            )
    for batch, plen in shapes:
        parts = []
        if "hf" in impls and "fp16" in impls:
            parts.append(
                f"fp16/HF {med((batch, plen, 'fp16'), 'decode_tok_s') / med((batch, plen, 'hf'), 'decode_tok_s'):.2f}x"
            )
        for q in ("int8", "fp8_e4m3", "fp8_e5m2"):
            if q in impls and "fp16" in impls:
                ratio = med((batch, plen, q), "decode_tok_s") / med((batch, plen, "fp16"), "decode_tok_s")
                parts.append(f"{q}/fp16 {ratio:.2f}x")
        for ours, peer in (("fp16", "llamacpp-f16"), ("int8", "llamacpp-f16"), ("int8", "llamacpp-q8_0")):
            if ours in impls and peer in impls:
                ratio = med((batch, plen, ours), "decode_tok_s") / med((batch, plen, peer), "decode_tok_s")
                parts.append(f"{ours}/{peer} {ratio:.2f}x")
        print(f"decode ratios b{batch} x {plen}: " + ", ".join(parts))
    print("\nwhere a decode step's time goes (medians): linear layers | decode attention | cache writes | rest")
    for batch, plen in shapes:
        for impl in impls:
            if not is_ours(impl):
                continue
            rs = [r["shares"] for r in runs[(batch, plen, impl)]]
            sh = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            rest = 1 - sum(sh.values())
            print(
                f"{impl + f' b{batch} x {plen}':>24} {sh['linear']:6.0%} | {sh['attention']:6.0%} | "
                f"{sh['cache write']:6.0%} | {rest:6.0%}"
            )
    print_attention(shapes, [i for i in impls if is_ours(i)], args.threads)


def print_attention(shapes, kvs: list[str], threads: int) -> None:
    print(
        "\ndecode attention alone (C++ kernel, 9 query / 3 KV heads, D 64, shuffled blocks of 64, 30 layers' pools "
        f"per timed pass, q in {compute_dtype()} as the engine computes here):"
    )
    for r in attention_bandwidth(shapes, kvs, threads):
        name = f"{r['kv']} b{r['batch']} x {r['context']}"
        print(
            f"{name:>32} {r['ms']:7.3f} ms/layer {r['gbs']:6.1f} GB/s = "
            f"{r['gbs'] / r['read_bw_gbs']:4.0%} of the measured read bandwidth ({r['read_bw_gbs']:.1f} GB/s)"
        )


if __name__ == "__main__":
    main()
