"""Online serving benchmark: Poisson arrivals against `python -m runtime.serve`, the figures `vllm bench serve` reports.

    python tools/bench_serve_http.py WORKSPACE --modes fp16,int8,fp8 --kv-cache-gib 0.5 \\
        --num-prompts 200 --request-rate 4 --input-len 256 --output-len 128 [--out DIR]
    python tools/bench_serve_http.py --url http://127.0.0.1:23333 [--api-key K] ...   (one running server)

With WORKSPACE, one server subprocess per KV mode (`fp16`, `int8`, `fp8` = `fp8_e4m3`, `fp8_e5m2`; add
`:dynamic` for FP8 scales calculated from the first prompt, e.g. `fp8:dynamic`), all at the same
`--kv-cache-gib`, so a 1-byte cache holds twice the tokens of fp16; each is started on a free loopback
port, warmed up with one request, benchmarked and stopped (SIGTERM). INT8 / calibrated FP8 need the
workspace's scale files (lite.kv_qparams).

Requests: `--num-prompts` windows of `--input-len` tokens from real English text (Debian Reference HTML,
`--dataset` to change), sent as token ids to /v1/completions with stream = true, greedy, ignore_eos and
max_tokens = `--output-len` (so every answer has that many tokens, like vLLM's random dataset). Arrival
times are a seeded Poisson process at `--request-rate` requests/s (`inf`: all at once);
`--max-concurrency` caps requests in flight.

Per request: TTFT (send -> first token chunk), ITL (gaps between token chunks), TPOT ((latency - TTFT) /
(output tokens - 1)), E2E latency; per run: request and output-token throughput over the wall time
from the first send to the last answer, mean / median / p99 of each latency, and from the server's
/metrics the KV pool size and preemptions. Prints a table; writes bench_serve_http.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATASET = "/usr/share/debian-reference/*.en.html"


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# -- prompts --------------------------------------------------------------------------------------
def make_prompts(tokenizer, dataset: str, n: int, input_len: int, seed: int) -> list[list[int]]:
    """n windows of input_len tokens at seeded random offsets in the dataset's token stream."""
    from lite.datasets import local_files, read_documents

    ids: list[int] = []
    docs = (doc for path in local_files(dataset) for doc in read_documents(path))
    for doc in docs:
        ids += tokenizer.encode(doc.strip() + "\n\n", add_special_tokens=False)
        if len(ids) > 50 * input_len + 200_000:  # plenty of distinct windows; no need to read it all
            break
    if len(ids) < input_len + 1:
        raise SystemExit(f"{dataset}: {len(ids)} tokens, fewer than --input-len {input_len}")
    rng = random.Random(seed)
    return [ids[o : o + input_len] for o in (rng.randrange(len(ids) - input_len) for _ in range(n))]


# -- one benchmark run against one server ---------------------------------------------------------
async def one_request(client, url: str, model: str, prompt: list[int], output_len: int) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res = RequestResult(ok=False, prompt_tokens=len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - start
        res.ok = res.output_tokens > 0
    except Exception as e:  # a benchmark reports failures, it does not stop on the first one
        res.error = repr(e)
    return res


async def benchmark(url: str, model: str, prompts, args, headers: dict) -> tuple[list[RequestResult], float]:
    import httpx

    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None), limits=limits) as client:
        warm = await one_request(client, url, model, prompts[0][:16], 4)
        if not warm.ok:
            raise SystemExit(f"warm-up request failed: {warm.error}")

        async def limited(p):
            if sem is None:
                return await one_request(client, url, model, p, args.output_len)
            async with sem:
                return await one_request(client, url, model, p, args.output_len)

        tasks = []
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(limited(p)))
            if args.request_rate != float("inf") and i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson process: exponential gaps
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]

    def stats_ms(values: list[float]) -> dict:
        if not values:
            return {"mean": None, "median": None, "p99": None}
        v = sorted(values)
        p99 = v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))]
        return {"mean": 1e3 * statistics.fmean(v), "median": 1e3 * statistics.median(v), "p99": 1e3 * p99}

    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": stats_ms([x for r in ok for x in r.itl]),
        "e2el_ms": stats_ms([r.latency for r in ok]),
    }


def server_metrics(url: str) -> dict:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text

    def value(name: str) -> float | None:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m[1]) if m else None

    dtype = re.search(r'kvq_kv_cache_info\{[^}]*kv_dtype="([^"]+)"', text)
    return {
        "kv_dtype": dtype[1] if dtype else None,
        "kv_cache_tokens": value("kvq_kv_cache_tokens"),
        "kv_blocks_total": value("kvq_kv_blocks_total"),
        "preemptions": value("kvq_num_preemptions_total"),
    }


# -- server subprocesses --------------------------------------------------------------------------
def mode_args(mode: str) -> list[str]:
    kv, _, variant = mode.partition(":")
    if variant not in ("", "dynamic"):
        raise SystemExit(f"--modes: {mode!r}: the only variant is ':dynamic' (FP8 scales from the first prompt)")
    return ["--kv-cache-dtype", kv] + (["--calculate-kv-scales"] if variant else [])


def start_server(args, mode: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "runtime.serve", args.workspace, "--port", str(port), "--disable-access-log"]
    cmd += ["--served-model-name", "bench", "--kv-cache-gib", str(args.kv_cache_gib), *mode_args(mode)]
    cmd += args.server_arg
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(
                f"server for {mode} exited with {proc.returncode}; log {log_path}:\n{log_path.read_text()}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server for {mode} not healthy after {args.startup_timeout} s; log {log_path}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- report ---------------------------------------------------------------------------------------
def table(runs: dict[str, dict]) -> str:
    cols = [
        ("mode", lambda r: r["mode"], "{}"),
        ("KV tok", lambda r: r["server"]["kv_cache_tokens"], "{:.0f}"),
        ("ok/fail", lambda r: f"{r['completed']}/{r['failed']}", "{}"),
        ("req/s", lambda r: r["request_throughput"], "{:.2f}"),
        ("out tok/s", lambda r: r["output_throughput"], "{:.1f}"),
        ("TTFT p50", lambda r: r["ttft_ms"]["median"], "{:.0f}"),
        ("TTFT p99", lambda r: r["ttft_ms"]["p99"], "{:.0f}"),
        ("TPOT p50", lambda r: r["tpot_ms"]["median"], "{:.1f}"),
        ("TPOT p99", lambda r: r["tpot_ms"]["p99"], "{:.1f}"),
        ("ITL p50", lambda r: r["itl_ms"]["median"], "{:.1f}"),
        ("ITL p99", lambda r: r["itl_ms"]["p99"], "{:.1f}"),
        ("preempt", lambda r: r["server"]["preemptions"], "{:.0f}"),
    ]

    def cell(fmt, v):
        return "-" if v is None else fmt.format(v)

    rows = [[name for name, _, _ in cols]]
    rows += [[cell(fmt, get(r)) for _, get, fmt in cols] for r in runs.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    return "\n".join(lines) + "\n(latencies in ms; TTFT/TPOT/ITL p50 and p99; KV tok = the pool's token capacity)"


def plot(runs: dict[str, dict], path: Path, title: str) -> None:
    from lite.plots import _pyplot

    plt = _pyplot()
    names = list(runs)
    panels = [
        ("output tokens/s", [runs[m]["output_throughput"] for m in names], None),
        (
            "TTFT ms (p50, p99)",
            [runs[m]["ttft_ms"]["median"] or 0 for m in names],
            [runs[m]["ttft_ms"]["p99"] or 0 for m in names],
        ),
        (
            "TPOT ms (p50, p99)",
            [runs[m]["tpot_ms"]["median"] or 0 for m in names],
            [runs[m]["tpot_ms"]["p99"] or 0 for m in names],
        ),
        (
            "ITL ms (p50, p99)",
            [runs[m]["itl_ms"]["median"] or 0 for m in names],
            [runs[m]["itl_ms"]["p99"] or 0 for m in names],
        ),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    x = range(len(names))
    for ax, (label, a, b) in zip(axes, panels, strict=True):
        if b is None:
            ax.bar_label(ax.bar(x, a, color="tab:blue"), fmt="%.3g", fontsize=8)
        else:
            ax.bar_label(ax.bar([i - 0.2 for i in x], a, 0.4, color="tab:blue", label="p50"), fmt="%.3g", fontsize=7)
            ax.bar_label(ax.bar([i + 0.2 for i in x], b, 0.4, color="tab:orange", label="p99"), fmt="%.3g", fontsize=7)
            ax.legend(fontsize=7)
        ax.set_xticks(list(x), names)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workspace", nargs="?", help="start one server per --modes on this workspace")
    p.add_argument("--url", help="benchmark this running server instead (one run; no --modes)")
    p.add_argument("--api-key", default=os.environ.get("KVQ_API_KEY"), help="for --url servers that need one")
    p.add_argument("--model", help="model name to send (default: what /v1/models lists)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: WORKSPACE's, or the --url server's)")
    p.add_argument("--modes", default="fp16,int8,fp8", help="KV modes, comma-separated (with WORKSPACE)")
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="the same KV budget for every mode")
    p.add_argument("--server-arg", action="append", default=[], help="extra runtime.serve option (repeatable)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="local text: file, directory or quoted glob")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--out", default="bench_serve_http_out", help="directory for the JSON, PNG and server logs")
    args = p.parse_args(argv)
    if bool(args.workspace) == bool(args.url):
        p.error("give a WORKSPACE (servers are started per mode) or --url (one running server), not both")
    return args


def tokenizer_dir(args, card: dict) -> Path:
    """--tokenizer, else the workspace's tokenizer (ours, or the one the server reports as its root)."""
    if args.tokenizer:
        return Path(args.tokenizer)
    ws = args.workspace or card.get("root") or ""
    path = Path(ws) / "triton_models" / "tokenizer"
    if not path.is_dir():
        raise SystemExit(f"no tokenizer at {path}; pass --tokenizer DIR (the server's workspace tokenizer)")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx
    from transformers import AutoTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    runs: dict[str, dict] = {}
    modes = [args.url] if args.url else [m.strip() for m in args.modes.split(",") if m.strip()]
    prompts = None
    for mode in modes:
        proc = None
        if args.url:
            url = args.url.rstrip("/")
        else:
            print(f"=== {mode}: starting the server (--kv-cache-gib {args.kv_cache_gib})", flush=True)
            proc, url = start_server(args, mode, out / f"server_{mode.replace(':', '_')}.log")
        try:
            card = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]
            model = args.model or card["id"]
            if prompts is None:
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(args, card))
                prompts = make_prompts(tokenizer, args.dataset, args.num_prompts, args.input_len, args.seed)
            print(
                f"    {len(prompts)} requests x ({args.input_len} in, {args.output_len} out) at rate {args.request_rate}/s",
                flush=True,
            )
            results, duration = asyncio.run(benchmark(url, model, prompts, args, headers))
            run = {
                "mode": mode if not args.url else "server",
                **summarize(results, duration),
                "server": server_metrics(url),
            }
        finally:
            if proc is not None:
                stop_server(proc)
        runs[run["mode"]] = run
        print(
            f"    {run['completed']} ok, {run['failed']} failed in {duration:.1f} s"
            + (f"; errors: {run['errors']}" if run["errors"] else ""),
            flush=True,
        )
    settings = {
        k: getattr(args, k)
        for k in (
            "num_prompts",
            "request_rate",
            "max_concurrency",
            "input_len",
            "output_len",
            "kv_cache_gib",
            "dataset",
            "seed",
        )
    }
    settings["request_rate"] = str(settings["request_rate"])  # inf is not JSON
    if args.url:
        settings["kv_cache_gib"] = None  # the running server's own budget (see runs[...]["server"])
    (out / "bench_serve_http.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=2) + "\n")
    budget = f", KV {args.kv_cache_gib} GiB each" if args.workspace else ""
    title = (
        f"{args.num_prompts} requests, rate {args.request_rate}/s, {args.input_len} in / {args.output_len} out{budget}"
    )
    plot(runs, out / "bench_serve_http.png", title)
    print(table(runs))
    print(f"wrote {out / 'bench_serve_http.json'} and {out / 'bench_serve_http.png'}")
    return 0 if all(r["failed"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
