"""Decode-step time of KV caches side by side (fp16, INT8 and FP8 by default), in one process, interleaved.

Cross-process benchmarks (tools/bench_decode.py) drift with the load of a shared machine; here the
engines take turns step by step on the same filled cache length, so drift hits all alike:

    python tools/bench_cache_ab.py --batch 8 --context 2048 [--steps 12] [--threads 2]
        [--kv fp16,int8,fp8_e4m3,int8_per_token_head,int4_per_token_head] [--device cuda] [--hf HF_DIR]

Each engine's cache is filled with random K/V (quantized by the engine's own quantizer) up to
`--context` tokens; every step decodes one token per sequence and resets the length, so the context
stays fixed (the token's K/V overwrite the same slot each step). Reports the median ms/step (first two steps
dropped) and the ratio to the first cache of --kv. `--device cuda` times the GPU engine (CUDA kernels, compute
dtype auto = float16; each step synchronized); `--hf` deploys another HF checkpoint than the demo model (INT8 and
FP8 then run on fixed per-layer scales, as FP8 always does here: speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import deploy_plain, workspace_for  # noqa: E402
from make_demo_model import ensure_demo_model  # noqa: E402


def filled_engine(ws: Path, kv: str, batch: int, context: int, device: str = "cpu"):
    from runtime import quant
    from runtime.engine import Engine
    from runtime.kv_params import KVParams

    params = None
    if kv.startswith("fp8") or (kv == "int8" and not has_int8_params(ws)):  # fixed per-layer scales
        from runtime.workspace import load_config

        cfg = load_config(ws)
        full = lambda v: torch.full((cfg.num_layer, cfg.kv_head_num), v)  # noqa: E731
        params = KVParams(kv, "tensor", full(0.05), full(0.0), full(0.02), full(0.0))
    engine = Engine(
        ws, kv_cache_dtype=kv, max_batch_size=batch, session_len=context + 8, kv_params=params, device=device
    )
    from runtime.scheduler import Sequence

    sch = engine.scheduler
    seqs = []
    for b in range(batch):  # each sequence holds `context` cached tokens and feeds one more per step
        s = Sequence(f"bench-{b}", [5] * (context + 1), context + 1, None)
        s.block_ids, s.num_cached = sch.allocator.allocate(sch.blocks_for(context + 1)), context
        seqs.append(s)
    g = torch.Generator(engine.device).manual_seed(0)  # rows drawn where the pools are (GPU pools are large)
    randn = lambda shape: torch.randn(shape, generator=g, device=engine.device)  # noqa: E731
    cache, D = engine.cache, engine.cache.head_dim
    for i in range(engine.config.num_layer):
        if engine.quantizer.online:  # codes and their per-row (INT4 keys: per-channel) parameters
            shape = (*cache.k[i].shape[:-1], D)
            k_rows, v_rows = randn(shape), randn(shape)
            k, kp = quant.quantize_channels(k_rows) if cache.channel_keys else quant.quantize_online(k_rows, kv)
            v, vp = quant.quantize_online(v_rows, kv)
            for pool, t in ((cache.k[i], k), (cache.k_param[i], kp), (cache.v[i], v), (cache.v_param[i], vp)):
                pool.copy_(t)
            continue
        for which, pool in (("k", cache.k[i]), ("v", cache.v[i])):  # (blocks, H_kv, bs, D)
            pool.copy_(engine.quantizer.quantize(randn(pool.shape), i, which))
    return engine, seqs


def has_int8_params(ws: Path) -> bool:
    from runtime.kv_params import file_name
    from runtime.workspace import weights_dir

    return (weights_dir(ws) / file_name(0, 0, "int8", "tensor")).is_file()


def decode_step(engine, seqs) -> None:
    """One decode token per sequence at position `context`, through the engine's forward pass."""
    from runtime.scheduler import Chunk

    with torch.inference_mode():
        engine._forward([Chunk(s, s.num_cached, 1) for s in seqs])
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv", default="fp16,int8,fp8_e4m3", help="comma list of KV cache dtypes (first: the reference)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--hf", type=Path, help="HF checkpoint to deploy instead of the demo model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.hf:
            ws = deploy_plain(args.hf, Path(tmp) / "ws", session_len=args.context + 8)
        else:
            ws = workspace_for(ensure_demo_model(), Path(tmp) / "ws", session_len=args.context + 8)
        engines = {kv: filled_engine(ws, kv, args.batch, args.context, args.device) for kv in args.kv.split(",")}
        times: dict[str, list[float]] = {kv: [] for kv in engines}
        for _ in range(args.steps):
            for kv, (engine, seqs) in engines.items():
                t = time.perf_counter()
                decode_step(engine, seqs)
                times[kv].append(time.perf_counter() - t)
    med = {kv: statistics.median(v[2:]) for kv, v in times.items()}
    ref = next(iter(engines))
    for kv in engines:
        print(
            f"{kv:>19} batch {args.batch} x {args.context}: {med[kv] * 1000:7.1f} ms/step "
            f"{args.batch / med[kv]:6.1f} tok/s   {med[ref] / med[kv]:.2f}x {ref}"
        )


if __name__ == "__main__":
    main()
