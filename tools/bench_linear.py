"""The decode step's linear kernels against PyTorch's GEMM, on a decode step's matrices.

    python tools/bench_linear.py [--rows 1,2,4,8,16,32,64,128] [--repeats 5] [--threads 2]
    python tools/bench_linear.py --bf16 [--rows ...]

All matrices of one SmolLM2-135M decode step (30 layers x fused QKV, output projection, gate+up and down
projections, plus the LM head: 121 calls, 270 MB of fp16 or bf16 / 540 MB of fp32 weights, more than the CPU caches
hold, so weights come from memory as in a real step) with random weights. Default: the fp16-weight kernel
(runtime/cpu_f16w.py), its AVX-512 build where the CPU has AVX-512 and its AVX2 build, on the fp16 matrices packed
in its panels against F.linear on fp32 copies of the same values. --bf16: runtime/cpu_linear.py's bf16 kernel, its
AMX tile build where the CPU has AMX-BF16 and its AVX512-BF16 build, against F.linear in bf16. Rounds alternate
between the implementations in one process; reports the median time per step, the weight bytes read per second,
GFLOP/s and each one's time / PyTorch's.
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

from runtime import cpu_f16w, cpu_linear  # noqa: E402

HIDDEN, INTER, LAYERS, VOCAB, QKV = 576, 1536, 30, 49152, (9 + 2 * 3) * 64  # SmolLM2-135M


def implementations(bf16: bool, shapes: list[tuple[int, int]], g: torch.Generator) -> tuple[dict, list, int]:
    """{name: fn(xs)} running every matrix once on activations xs {K: (rows, K)}, the activation dtype, and the
    weight bytes; PyTorch's GEMM last."""
    if not bf16:
        builds = {"AVX-512": cpu_f16w._library(), "AVX2": cpu_f16w._library(avx512=False)}
        if builds["AVX2"] is None:
            raise SystemExit("the fp16-weight kernel needs an x86-64 CPU with AVX2, FMA and F16C, and g++")
        if builds["AVX-512"] is builds["AVX2"]:
            del builds["AVX-512"]  # no AVX-512 here
        w16 = [(torch.randn(s, generator=g) * 0.05).half() for s in shapes]
        w32 = [w.float() for w in w16]
        panels = [cpu_f16w.Panels.pack(w) for w in w16]  # the kernel's layout, as the model holds them
        impls = {
            name: (lambda xs, lib=lib: [cpu_f16w._linear(xs[w.shape[1]], w, lib) for w in panels])
            for name, lib in builds.items()
        }
        impls["torch fp32"] = lambda xs: [F.linear(xs[w.shape[1]], w) for w in w32]
        return impls, torch.float32, sum(w.numel() * 2 for w in w16)
    builds = {"tiles (AMX)": cpu_linear._library(), "AVX512-BF16": cpu_linear._library(amx=False)}
    if builds["AVX512-BF16"] is None:
        raise SystemExit("the bf16 kernel needs an x86-64 CPU with AVX512-BF16 and g++")
    if builds["tiles (AMX)"] is builds["AVX512-BF16"]:
        del builds["tiles (AMX)"]  # no AMX here
    wb = [(torch.randn(s, generator=g) * 0.05).to(torch.bfloat16) for s in shapes]
    impls = {
        name: (lambda xs, lib=lib: [cpu_linear._linear_bf16(lib, xs[w.shape[1]], w) for w in wb])
        for name, lib in builds.items()
    }
    impls["torch bf16"] = lambda xs: [F.linear(xs[w.shape[1]], w) for w in wb]
    return impls, torch.bfloat16, sum(w.numel() * 2 for w in wb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128", help="activation rows per call (batch size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="the bf16 kernel (AMX tiles / AVX512-BF16) vs PyTorch bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)] * LAYERS + [(VOCAB, HIDDEN)]
    g = torch.Generator().manual_seed(0)
    impls, dtype, nbytes = implementations(args.bf16, shapes, g)
    flops_per_row = nbytes  # 2 flops per weight, 2 bytes per weight
    print(f"{len(shapes)} matrices, {nbytes / 1e6:.0f} MB; {args.threads} threads; medians of {args.repeats}")
    print(f"{'rows':>5} " + " ".join(f"{name + ' ms':>17} {'GB/s':>5} {'GFLOP/s':>7} {'/torch':>6}" for name in impls))
    peer = list(impls)[-1]
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in (HIDDEN, INTER)}
        for fn in impls.values():
            fn(xs)  # warm-up (kernel builds, first-touch)
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.repeats):
            for name, fn in impls.items():
                t = time.perf_counter()
                fn(xs)
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        cells = (
            f"{med[n] * 1e3:>17.1f} {nbytes / med[n] / 1e9:>5.1f} {rows * flops_per_row / med[n] / 1e9:>7.0f} "
            f"{med[n] / med[peer]:>6.2f}"
            for n in impls
        )
        print(f"{rows:>5} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
