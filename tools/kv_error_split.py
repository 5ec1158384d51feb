"""Which of K or V limits an online KV mode's accuracy: fake-quantize one of them at a time.

    python tools/kv_error_split.py WORKSPACE [--mode int4_per_token_head] [--samples 4] [--seqlen 512]
        [--dataset '/usr/share/doc/debian/FAQ/*.en.html'] [--group 64] [--no-rotation] [--block-size 64]

An fp16-cache engine (compute fp32, use_context_fmha 0 as lite.eval) scores the same windows with its K,
its V, or both passed through the mode's quantize -> dequantize round trip (`runtime.quant`, rotated by the
runtime's Hadamard matrix unless --no-rotation, per row of --group values; int4_per_token_head keys per channel
over blocks of --block-size positions, as the runtime stores them) before they are stored. Prints the
mean KL to the plain fp16 cache and the top-1 agreement for each. A diagnostic for choosing where extra bits
or a different grouping would pay; the runtime's own modes are measured by `python -m lite.eval`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--mode", default="int4_per_token_head", help="an online mode of runtime.quant.ONLINE_MODES")
    ap.add_argument("--dataset", default="/usr/share/doc/debian/FAQ/*.en.html", help="evaluation text")
    ap.add_argument("--samples", type=int, default=4, help="windows (default 4)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--group", type=int, default=0, help="values per (scale, zero) (default: the whole head)")
    ap.add_argument("--no-rotation", action="store_true", help="quantize without the Hadamard rotation")
    ap.add_argument(
        "--block-size", type=int, default=64, help="int4_per_token_head keys: rows per block (default 64, the engine's)"
    )
    args = ap.parse_args()

    from lite.datasets import get_calib_windows
    from runtime import kv_cache, quant
    from runtime.engine import Engine

    if args.mode not in quant.ONLINE_MODES:
        raise SystemExit(f"--mode {args.mode!r}: expected one of {', '.join(quant.ONLINE_MODES)}")
    engine = Engine(args.workspace, kv_cache_dtype="fp16", max_batch_size=2, use_context_fmha=0, dtype="float32")
    D = engine.config.size_per_head
    group = args.group or D
    if D % group:
        raise SystemExit(f"--group {group} must divide the head size {D}")
    rot = None if args.no_rotation else quant.hadamard(D, 0)
    windows = get_calib_windows(args.dataset, engine.tokenizer, args.samples, args.seqlen, seed=0)

    def round_trip(x: torch.Tensor) -> torch.Tensor:
        y = x.float() @ rot if rot is not None else x.float()
        grouped = y.unflatten(-1, (D // group, group))
        y = quant.dequantize_online(*quant.quantize_online(grouped, args.mode), args.mode).flatten(-2)
        return (y @ rot.T if rot is not None else y).to(x.dtype)

    def key_round_trip(x: torch.Tensor) -> torch.Tensor:
        """Keys as the runtime stores them: per row, or (int4_per_token_head) per channel over each full block of
        --block-size positions of the window's one prefill, from the int8 read-back; the last partial block's
        rows stay int8 rows."""
        if not quant.channel_keys(args.mode):
            return round_trip(x)
        y = quant.int8_round_trip(x.float() @ rot if rot is not None else x.float())  # (N, H_kv, D)
        full = y.shape[0] // args.block_size * args.block_size
        blocks = y[:full].unflatten(0, (-1, args.block_size)).transpose(1, 2)  # (n, H_kv, bs, D)
        y[:full] = quant.dequantize_channels(*quant.quantize_channels(blocks)).transpose(1, 2).flatten(0, 1)
        return (y @ rot.T if rot is not None else y).to(x.dtype)

    def score_all() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [engine.score(w.view(1, -1))[0] for w in windows]

    reference = score_all()
    plain = kv_cache.KVCache.write
    keep = lambda x: x  # noqa: E731
    print(f"{args.mode}, groups of {group}, rotation {'off' if rot is None else 'on'}; {len(windows)} x {args.seqlen}")
    for label, fk, fv in (
        ("K only", key_round_trip, keep),
        ("V only", keep, round_trip),
        ("K and V", key_round_trip, round_trip),
    ):

        def write(self, layer, slot_mapping, k, v, key_plan=None, *, fk=fk, fv=fv):
            return plain(self, layer, slot_mapping, fk(k), fv(v), key_plan)

        kv_cache.KVCache.write = write
        try:
            got = score_all()
        finally:
            kv_cache.KVCache.write = plain
        kl, top = [], []
        for ref, out in zip(reference, got, strict=True):
            r, o = torch.log_softmax(ref.float(), -1), torch.log_softmax(out.float(), -1)
            kl.append((r.exp() * (r - o)).sum(-1))
            top.append((out.argmax(-1) == ref.argmax(-1)).float())
        print(f"{label:>8}: mean KL {torch.cat(kl).mean():.4f}  top-1 {torch.cat(top).mean():.4f}", flush=True)


if __name__ == "__main__":
    main()
