"""Decode-step time of KV caches side by side (fp16, INT8 and FP8 by default), in one process, interleaved.

Cross-process benchmarks (tools/bench_decode.py) drift with the load of a shared machine; here the
engines take turns step by step on the same filled cache length, so drift hits all alike:

    python tools/bench_cache_ab.py --batch 8 --context 2048 [--steps 12] [--threads 2]
        [--kv fp16,int8,fp8_e4m3,int8_per_token_head,int4_per_token_head]

Each engine's cache is filled with random K/V (quantized by the engine's own quantizer) up to
`--context` tokens; every step decodes one token per sequence and resets the length, so the context
stays fixed (the token's K/V overwrite the same slot each step). Reports the median ms/step (first two steps
dropped) and the ratio to the first cache of --kv.
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

from bench_decode import workspace_for  # noqa: E402
from make_demo_model import ensure_demo_model  # noqa: E402


def filled_engine(ws: Path, kv: str, batch: int, context: int):
    from runtime import quant
    from runtime.engine import Engine
    from runtime.kv_params import KVParams

    params = None
    if kv.startswith("fp8"):  # fixed per-layer scales (speed does not depend on their values)
        from runtime.workspace import load_config

        cfg = load_config(ws)
        full = lambda v: torch.full((cfg.num_layer, cfg.kv_head_num), v)  # noqa: E731
        params = KVParams(kv, "tensor", full(0.05), full(0.0), full(0.02), full(0.0))
    engine = Engine(ws, kv_cache_dtype=kv, max_batch_size=batch, session_len=context + 8, kv_params=params)
    from runtime.scheduler import Sequence

    sch = engine.scheduler
    seqs = []
    for b in range(batch):  # each sequence holds `context` cached tokens and feeds one more per step
        s = Sequence(f"bench-{b}", [5] * (context + 1), context + 1, None)
        s.block_ids, s.num_cached = sch.allocator.allocate(sch.blocks_for(context + 1)), context
        seqs.append(s)
    g = torch.Generator().manual_seed(0)
    cache, D = engine.cache, engine.cache.head_dim
    for i in range(engine.config.num_layer):
        if engine.quantizer.online:  # codes and their per-row (INT4 keys: per-channel) parameters
            shape = (*cache.k[i].shape[:-1], D)
            k_rows, v_rows = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
            k, kp = quant.quantize_channels(k_rows) if cache.channel_keys else quant.quantize_online(k_rows, kv)
            v, vp = quant.quantize_online(v_rows, kv)
            for pool, t in ((cache.k[i], k), (cache.k_param[i], kp), (cache.v[i], v), (cache.v_param[i], vp)):
                pool.copy_(t)
            continue
        for which, pool in (("k", cache.k[i]), ("v", cache.v[i])):  # (blocks, H_kv, bs, D)
            pool.copy_(engine.quantizer.quantize(torch.randn(pool.shape, generator=g), i, which))
    return engine, seqs


def decode_step(engine, seqs) -> None:
    """One decode token per sequence at position `context`, through the engine's forward pass."""
    from runtime.scheduler import Chunk

    with torch.inference_mode():
        engine._forward([Chunk(s, s.num_cached, 1) for s in seqs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv", default="fp16,int8,fp8_e4m3", help="comma list of KV cache dtypes (first: the reference)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace_for(ensure_demo_model(), Path(tmp) / "ws", session_len=args.context + 8)
        engines = {kv: filled_engine(ws, kv, args.batch, args.context) for kv in args.kv.split(",")}
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
