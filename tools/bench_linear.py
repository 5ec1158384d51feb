"""The fp16-weight linear kernel (runtime/cpu_f16w.py) against PyTorch's fp32 GEMM, on a decode step's matrices.

    python tools/bench_linear.py [--rows 1,2,4,8,16,32,64,128] [--repeats 5] [--threads 2]

All matrices of one SmolLM2-135M decode step (30 layers x fused QKV, output projection, gate+up and down
projections, plus the LM head: 121 calls, 270 MB of fp16 / 540 MB of fp32 weights, more than the CPU caches
hold, so weights come from memory as in a real step) with random weights: the kernel on the fp16 matrices packed
in its panels, F.linear on fp32 copies of the same values. Rounds alternate between the two in one process;
reports the median time per step, the weight bytes read per second, GFLOP/s and the speed ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import cpu_f16w  # noqa: E402

HIDDEN, INTER, LAYERS, VOCAB, QKV = 576, 1536, 30, 49152, (9 + 2 * 3) * 64  # SmolLM2-135M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128", help="activation rows per call (batch size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not cpu_f16w.available():
        raise SystemExit("the fp16-weight kernel needs an x86-64 CPU with AVX2, FMA and F16C, and g++")
    torch.set_num_threads(args.threads)
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)] * LAYERS + [(VOCAB, HIDDEN)]
    g = torch.Generator().manual_seed(0)
    w16 = [(torch.randn(s, generator=g) * 0.05).half() for s in shapes]
    w32 = [w.float() for w in w16]
    panels = [cpu_f16w.Panels.pack(w) for w in w16]  # the kernel's layout, as the model holds them
    nbytes = sum(w.numel() * 2 for w in w16)
    flops_per_row = 2 * sum(w.numel() for w in w16)
    print(f"{len(shapes)} matrices, {nbytes / 1e6:.0f} MB fp16; {args.threads} threads; medians of {args.repeats}")
    print(
        f"{'rows':>5} {'kernel ms':>10} {'GB/s':>6} {'GFLOP/s':>8} {'torch fp32 ms':>14} {'GFLOP/s':>8} {'speed-up':>9}"
    )
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k, generator=g) for k in (HIDDEN, INTER)}
        times: dict[str, list[float]] = {"kernel": [], "torch": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            for w in panels:
                cpu_f16w.linear_f16w(xs[w.shape[1]], w)
            times["kernel"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for w in w32:
                F.linear(xs[w.shape[1]], w)
            times["torch"].append(time.perf_counter() - t)
        k, p = statistics.median(times["kernel"]), statistics.median(times["torch"])
        print(
            f"{rows:>5} {k * 1e3:>10.1f} {nbytes / k / 1e9:>6.1f} {rows * flops_per_row / k / 1e9:>8.0f} "
            f"{p * 1e3:>14.1f} {rows * flops_per_row / p / 1e9:>8.0f} {p / k:>8.2f}x"
        )


if __name__ == "__main__":
    main()
