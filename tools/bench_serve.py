"""Offline serving throughput at a fixed KV budget: fp16 vs INT8 vs FP8 (vs online per-token-head) caches.

    python tools/bench_serve.py [--requests 64] [--budgets-mib 32,64,128] [--kv fp16,int8,fp8] [--dtype auto]
        (--kv also takes int8_per_token_head, fp8_per_token_head, int4_per_token_head: no scale files needed)

N requests are submitted at once to the paged engine (`runtime.engine.Engine`, as a server drives it:
add_request, then step until done). Prompts and output lengths come from real text: a prompt is a run of
consecutive paragraphs of the Debian Reference (installed by tools/setup.sh), an output is as long as
another run of paragraphs (see make_requests), generated with ignore_eos so every mode produces exactly the
same number of tokens. The same requests run for every KV dtype and budget; the
weights are loaded once and shared. INT8 uses the workspace's per-layer scale files (the temporary demo
workspace gets them from one fp16 prompt); FP8 uses its files when present, else calculate_kv_scales.

Per (budget, dtype): the pool's token capacity, the maximum number of sequences running at once,
preemptions, request throughput, output tokens/s, TTFT and TPOT p50/p99 (TTFT from submission to the
first token; TPOT = (finish - first token) / (output tokens - 1)). Within a budget the engines take turns
step by step and each is timed on its own clock (the sum of its step times), so machine drift hits every
dtype alike; ratios to fp16 are what to read. Writes a JSON file and a PNG
(request throughput against budget, one line per KV dtype) under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_demo_model import ensure_demo_model  # noqa: E402

TEXT_GLOB = "/usr/share/debian-reference/*.en.html"


def paragraphs(tokenizer) -> list[list[int]]:
    """The Debian Reference's <p> paragraphs as token ids, in document order."""
    import glob
    import re

    from lite.datasets import html_to_text

    files = sorted(glob.glob(TEXT_GLOB))
    if not files:
        raise SystemExit(f"no text under {TEXT_GLOB}: run bash tools/setup.sh (installs debian-reference-en)")
    out = []
    for f in files:
        for p in re.findall(r"<p\b[^>]*>(.*?)</p>", Path(f).read_text(errors="replace"), re.S):
            text = html_to_text(p).replace("\n", " ").strip()
            if text:
                out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def make_requests(tokenizer, n: int, seed: int, args) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output length)]: a prompt is a run of --prompt-paragraphs consecutive paragraphs
    of the Debian Reference (its real text), an output is as long as another run of --output-paragraphs;
    both clipped to [--min-len, --max-prompt / --max-output]."""
    paras = paragraphs(tokenizer)
    rng = random.Random(seed)

    def run(k: int) -> list[int]:
        i = rng.randrange(0, len(paras) - k)
        return [t for p in paras[i : i + k] for t in p]

    out = []
    for _ in range(n):
        prompt = run(args.prompt_paragraphs)[: args.max_prompt]
        while len(prompt) < args.min_len:
            prompt = run(args.prompt_paragraphs)[: args.max_prompt]
        out.append((prompt, min(max(len(run(args.output_paragraphs)), args.min_len), args.max_output)))
    return out


def needs_dynamic_scales(ws: Path, kv: str) -> bool:
    """FP8 without calibrated per-layer files in the workspace: scales from the first prompt instead."""
    from runtime import kv_params, quant
    from runtime.engine import KV_ALIASES
    from runtime.workspace import load_config, weights_dir

    kv = KV_ALIASES[kv]
    wdir = weights_dir(ws)
    return kv in quant.FP8_DTYPES and (kv, "tensor") not in kv_params.available(wdir, load_config(wdir))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Run:
    """One engine's run over the requests, on its own clock: the sum of its own step times. The engines of a
    budget take turns step by step, so machine drift (a shared 2-core box) hits every KV dtype alike."""

    def __init__(self, engine, requests) -> None:
        from runtime.sampling import SamplingParams

        self.engine, self.clock, self.max_running = engine, 0.0, 0
        self.ids = [
            engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
            for prompt, out_len in requests
        ]
        self.first, self.done, self.counts = {}, {}, {}
        self.preempt0 = engine.stats().num_preemptions

    def step(self) -> bool:
        """One engine step; False once every request has finished."""
        if not self.engine.has_unfinished_requests():
            return False
        t = time.perf_counter()
        outs = self.engine.step()
        self.clock += time.perf_counter() - t
        self.max_running = max(self.max_running, self.engine.stats().num_running + sum(o.finished for o in outs))
        for o in outs:
            self.first.setdefault(o.request_id, self.clock)
            self.counts[o.request_id] = o.num_output_tokens
            if o.finished:
                self.done[o.request_id] = self.clock
        return True

    def metrics(self) -> dict:
        ids, first, done, counts = self.ids, self.first, self.done, self.counts
        total = max(done.values())
        ttft = [first[r] for r in ids]
        tpot = [(done[r] - first[r]) / (counts[r] - 1) for r in ids if counts[r] > 1]
        return {
            "kv_cache_tokens": self.engine.kv_cache_tokens,
            "max_running": self.max_running,
            "preemptions": self.engine.stats().num_preemptions - self.preempt0,
            "seconds": total,
            "requests_per_s": len(ids) / total,
            "output_tok_per_s": sum(counts.values()) / total,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_ms": 1000 * percentile(tpot, 50),
            "tpot_p99_ms": 1000 * percentile(tpot, 99),
        }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lite.plots import MODE_STYLES
    from runtime.engine import KV_ALIASES

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kv in dict.fromkeys(r["kv"] for r in results):  # every dtype, in the order of --kv
        rows = sorted((r for r in results if r["kv"] == kv), key=lambda r: r["budget_mib"])
        style = MODE_STYLES.get(KV_ALIASES.get(kv, kv), {"marker": "o"})
        ax.plot([r["budget_mib"] for r in rows], [r["requests_per_s"] for r in rows], label=kv, **style)
    ax.set_xlabel("KV cache budget (MiB)")
    ax.set_ylabel("requests / s")
    ax.set_title("Offline serving throughput at a fixed KV budget (SmolLM2-135M, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(title="KV cache dtype")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64, help="requests submitted at once (default 64)")
    ap.add_argument("--budgets-mib", default="32,64,128", help="KV budgets in MiB (default 32,64,128)")
    ap.add_argument(
        "--kv",
        default="fp16,int8,fp8",
        help="KV dtypes: fp16 | int8 | fp8 | fp8_e4m3 | fp8_e5m2 | int8_per_token_head | fp8_per_token_head | "
        "int4_per_token_head (default fp16,int8,fp8)",
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype (auto: bf16 where the CPU has native bf16, else fp32; bf16 elsewhere is emulated, slow)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--prompt-paragraphs", type=int, default=8, help="paragraphs per prompt (default 8)")
    ap.add_argument("--output-paragraphs", type=int, default=4, help="paragraphs an output is as long as (default 4)")
    ap.add_argument("--min-len", type=int, default=16, help="shortest prompt/output (default 16)")
    ap.add_argument("--max-prompt", type=int, default=512, help="longest prompt (default 512)")
    ap.add_argument("--max-output", type=int, default=128, help="longest output (default 128)")
    ap.add_argument(
        "--workspace",
        help="benchmark this workspace (its INT8/FP8 scale files when present) instead of deploying the demo "
        "model into a temporary one (default: the demo model)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the request draw (default: 0)")
    ap.add_argument("--out", default="bench_out", help="directory for bench_serve.json/.png (default bench_out)")
    args = ap.parse_args()

    import torch
    from bench_decode import workspace_for

    from runtime.engine import Engine

    torch.set_num_threads(args.threads)
    from runtime.engine import KV_ALIASES

    kvs = args.kv.split(",")
    unknown = [kv for kv in kvs if kv not in KV_ALIASES]
    if unknown:
        ap.error(f"--kv: unknown {', '.join(unknown)}; choose from {', '.join(KV_ALIASES)}")
    budgets = [float(b) for b in args.budgets_mib.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.workspace:
            ws = Path(args.workspace)
        else:
            ws = workspace_for(ensure_demo_model(), Path(tmp) / "ws", session_len=args.max_prompt + args.max_output + 8)
        shared = None
        for budget in budgets:
            engines = {}
            for kv in kvs:
                engines[kv] = Engine(
                    ws,
                    kv_cache_dtype=kv,
                    calculate_kv_scales=needs_dynamic_scales(ws, kv),
                    kv_granularity="tensor",
                    dtype=args.dtype,
                    kv_cache_gib=budget / 1024,
                    max_batch_size=args.requests,
                    session_len=args.max_prompt + args.max_output + 8,
                    model=shared,
                )
                shared = engines[kv].model
            requests = make_requests(engines[kvs[0]].tokenizer, args.requests, args.seed, args)
            runs = {kv: Run(engine, requests) for kv, engine in engines.items()}
            while any([r.step() for r in runs.values()]):  # a list: every engine steps in each round
                pass
            for kv, run in runs.items():
                r = {"kv": kv, "budget_mib": budget, **run.metrics()}
                results.append(r)
                print(json.dumps(r), flush=True)
    print_table(results, kvs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    plot(results, out / "bench_serve.png")
    print(f"wrote {out / 'bench_serve.json'} and {out / 'bench_serve.png'}")


def print_table(results: list[dict], kvs: list[str]) -> None:
    print(
        f"\n{'budget':>7} {'kv':>5} {'tokens':>7} {'max run':>7} {'preempt':>7} {'req/s':>7} {'x fp16':>6} "
        f"{'out tok/s':>9} {'TTFT p50':>8} {'p99':>7} {'TPOT p50':>8} {'p99':>7}"
    )
    for r in results:
        base = next(x for x in results if x["budget_mib"] == r["budget_mib"] and x["kv"] == kvs[0])
        print(
            f"{r['budget_mib']:>5g}Mi {r['kv']:>5} {r['kv_cache_tokens']:>7} {r['max_running']:>7} "
            f"{r['preemptions']:>7} {r['requests_per_s']:>7.3f} {r['requests_per_s'] / base['requests_per_s']:>6.2f} "
            f"{r['output_tok_per_s']:>9.1f} {r['ttft_p50_s']:>7.1f}s {r['ttft_p99_s']:>6.1f}s "
            f"{r['tpot_p50_ms']:>6.0f}ms {r['tpot_p99_ms']:>5.0f}ms"
        )
    print("(TTFT from the submission of all requests at t=0; p50/p99 over requests)")


if __name__ == "__main__":
    main()
