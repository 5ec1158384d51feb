"""How many sessions fit: KV-cache memory per mode, computed and measured on the runtime's real cache.

    python -m lite.memory WORKSPACE [--batch 8,16,32,48] [--session-len N] [--budget-gib G]
                          [--modes fp16,int8,fp8_e4m3,int4_per_token_head] [--out DIR]
    python -m lite.memory --shape internlm-chat-7b | --shape LAYERS,KV_HEADS,HEAD_DIM  (no weights needed)

Formulas (docs/formats.md §1; bytes/elem from `runtime.quant.BYTES_PER_ELEM`: fp16 2, int8 1, fp8 1):
    KV bytes per token    = 2 * num_layer * kv_head_num * row bytes   (K and V)
    row bytes             = size_per_head * bytes/elem, or for the online *_per_token_head modes the data
                            (size_per_head bytes; int4: size_per_head / 2) + 4 B of fp16 (scale, zero) stored
                            in the block (`runtime.quant.kv_row_bytes`)
    KV bytes per session  = per token * session_len
    scale overhead        = 4 * num_layer * kv_head_num * 4 B   (fp32 [k_scale, k_zp, v_scale, v_zp] per layer
                            and KV head, as the runtime holds them; once per cache, not per session; 0 for fp16
                            and the online modes, whose parameters are in the per-token bytes)
    total(batch)          = weight bytes + batch * per session + scale overhead
    sessions in a budget  = floor((budget - weights - scale overhead) / per session)

"Measured" allocates `runtime.kv_cache.KVCache` for (batch, session_len) and sums the bytes of the K/V
tensors it holds (online modes: and their parameter pools; on the CPU they are views into one arena of that
size, runtime.hugepages) plus its quantizer's parameters. Shapes above MEASURE_ON_CPU_LIMIT bytes are allocated
on torch's "meta" device instead: the same class, shapes, dtypes and sizes, no memory.

Published check (LMDeploy 2023, internlm-chat-7b, fp16 -> INT8): -4096 / -8224 / -16448 / -24672 MiB at
batch 8 / 16 / 32 / 48. The saving per session is 2*32*32*128*S*(2-1) B = S/4 MiB: 514 MiB at the model's
session_len 2056 and exactly 512 MiB at 2048. So batch 8 implies S = 2048 (-4096; ours at 2056: -4112) and
batches 16/32/48 imply S = 2056 (ours: equal). `published_check` prints this per batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.workspace import KV_CACHE_DTYPES, WorkspaceConfig, WorkspaceError, kv_bytes_per_token, weight_table

MiB, GiB = 2**20, 2**30
MODES = KV_CACHE_DTYPES  # every KV mode a workspace or the runtime knows
DEFAULT_MODES = "fp16,int8,fp8_e4m3,int8_per_token_head,int4_per_token_head"
MEASURE_ON_CPU_LIMIT = 256 * MiB
PUBLISHED_INT8_DELTA_MIB = {8: -4096, 16: -8224, 32: -16448, 48: -24672}  # internlm-chat-7b, LMDeploy 2023

# Named shapes: full configs so the weight table gives the fp16 weight bytes without any weight file.
NAMED_SHAPES = {
    "internlm-chat-7b": WorkspaceConfig(
        model_name="internlm-chat-7b",
        head_num=32,
        kv_head_num=32,
        size_per_head=128,
        vocab_size=103168,
        num_layer=32,
        rotary_embedding=128,
        rope_theta=10000.0,
        inter_size=11008,
        norm_eps=1e-6,
        attn_bias=1,
        start_id=1,
        end_id=2,
        session_len=2056,
    ),
    "llama2-7b": WorkspaceConfig(
        model_name="llama2",
        head_num=32,
        kv_head_num=32,
        size_per_head=128,
        vocab_size=32000,
        num_layer=32,
        rotary_embedding=128,
        rope_theta=10000.0,
        inter_size=11008,
        norm_eps=1e-5,
        attn_bias=0,
        start_id=1,
        end_id=2,
        session_len=4104,
    ),
}


@dataclass
class ModeMemory:
    """One KV mode at one session length; `totals` etc. are per batch size (same order as `batches`)."""

    mode: str
    bytes_per_token: float
    bytes_per_session: int
    scale_bytes: int
    totals: list[int]  # weights + batch * per session + scale bytes
    delta_vs_fp16_mib: list[float]
    measured: list[int]  # KVCache data tensors + quantizer parameters, as allocated
    measured_device: list[str]
    sessions_in_budget: int | None


def scale_bytes(cfg: WorkspaceConfig, kv_dtype: str) -> int:
    """fp32 (4,) parameters per layer and KV head (runtime layout); fp16 and the online modes hold none."""
    return 0 if kv_dtype == "fp16" or kv_dtype.endswith("_per_token_head") else 4 * cfg.num_layer * cfg.kv_head_num * 4


def channel_block(cfg: WorkspaceConfig, kv_dtype: str) -> int | None:
    """int4_per_token_head: the engine's default block size (its key parameters are per block); else None."""
    from runtime.engine import default_block_size
    from runtime.quant import channel_keys

    return default_block_size(kv_dtype, cfg.size_per_head) if channel_keys(kv_dtype) else None


def bytes_per_token(cfg: WorkspaceConfig, kv_dtype: str) -> float:
    """KV bytes per token (int4_per_token_head: with its per-block key parameters spread over the block)."""
    from runtime.quant import kv_row_bytes

    block = channel_block(cfg, kv_dtype) or 64
    per_token = kv_bytes_per_token(cfg, kv_row_bytes(kv_dtype, cfg.size_per_head, block))
    return int(per_token) if per_token == int(per_token) else per_token


def session_tokens(cfg: WorkspaceConfig, kv_dtype: str, session_len: int) -> int:
    """Tokens of cache a session holds: session_len, rounded up to whole blocks for int4_per_token_head."""
    block = channel_block(cfg, kv_dtype)
    return session_len if block is None else -(-session_len // block) * block


def kv_total_bytes(cfg: WorkspaceConfig, kv_dtype: str, batch: int, session_len: int) -> int:
    """KV data of `batch` sessions of `session_len` tokens plus the scale overhead."""
    per_session = round(session_tokens(cfg, kv_dtype, session_len) * bytes_per_token(cfg, kv_dtype))
    return batch * per_session + scale_bytes(cfg, kv_dtype)


def weight_bytes(cfg: WorkspaceConfig, wdir: Path | None = None) -> int:
    """fp16 weight bytes: the files' sizes when a weights dir is given (each must exist), else from the table."""
    total = 0
    for name, shape in weight_table(cfg).items():
        if wdir is None:
            total += math.prod(shape) * 2
            continue
        path = wdir / name
        if not path.is_file():
            raise WorkspaceError(f"missing weight file {path}; re-run python -m deploy")
        total += path.stat().st_size
    return total


def measure_cache(cfg: WorkspaceConfig, kv_dtype: str, batch: int, session_len: int) -> tuple[int, int, str]:
    """Allocate the runtime's KVCache for (batch, session_len): (data bytes, parameter bytes, device)."""
    from runtime import quant
    from runtime.kv_cache import KVCache, OnlineQuantizer, StaticQuantizer

    device = "cpu" if kv_total_bytes(cfg, kv_dtype, batch, session_len) <= MEASURE_ON_CPU_LIMIT else "meta"
    if quant.is_online(kv_dtype):
        quantizer = OnlineQuantizer(kv_dtype)
    else:
        quantizer = StaticQuantizer.identity(kv_dtype, cfg.num_layer, cfg.kv_head_num)
    # one block of session_len tokens per session, so the pool is exactly batch x session_len tokens (the
    # engine's 64-token blocks round each session up to a multiple of 64); int4_per_token_head, whose key
    # parameters are per block, in the engine's blocks
    block = channel_block(cfg, kv_dtype)
    if block is None:
        blocks, block = batch, session_len
    else:
        blocks = batch * (session_tokens(cfg, kv_dtype, session_len) // block)
    cache = KVCache(cfg.num_layer, blocks, cfg.kv_head_num, block, cfg.size_per_head, quantizer, device=device)
    pools = cache.pools()  # each (batch, H_kv, session_len, D | D/2 | 2)
    data = sum(t.nbytes for t in pools)
    params = cache.nbytes() - sum(t.numel() * t.element_size() for t in pools)
    del cache
    return data, params, device


def report(
    cfg: WorkspaceConfig,
    modes: list[str],
    batches: list[int],
    session_len: int,
    weights: int,
    budget_gib: float | None = None,
    measure: bool = True,
) -> list[ModeMemory]:
    """Computed (and measured) memory for every mode and batch size; fp16 is the delta reference."""
    fp16_totals = [weights + kv_total_bytes(cfg, "fp16", b, session_len) for b in batches]
    rows = []
    for mode in modes:
        per_session = round(bytes_per_token(cfg, mode) * session_tokens(cfg, mode, session_len))
        totals = [weights + kv_total_bytes(cfg, mode, b, session_len) for b in batches]
        measured, devices = [], []
        for b in batches:
            if not measure:
                continue
            data, params, device = measure_cache(cfg, mode, b, session_len)
            if data != b * per_session:
                raise AssertionError(f"{mode} batch {b}: KVCache holds {data} data bytes, formula {b * per_session}")
            if mode != "fp16" and params != scale_bytes(cfg, mode):
                raise AssertionError(
                    f"{mode}: KVCache holds {params} parameter bytes, formula {scale_bytes(cfg, mode)}"
                )
            # The runtime keeps identity (unused) parameters for fp16 too: they count as measured.
            measured.append(weights + data + params)
            devices.append(device)
        budget = None
        if budget_gib is not None:
            budget = max(0, int((budget_gib * GiB - weights - scale_bytes(cfg, mode)) // per_session))
        rows.append(
            ModeMemory(
                mode,
                bytes_per_token(cfg, mode),
                per_session,
                scale_bytes(cfg, mode),
                totals,
                [(t - f) / MiB for t, f in zip(totals, fp16_totals, strict=True)],
                measured,
                devices,
                budget,
            )
        )
    return rows


def published_check(batches: list[int] = (8, 16, 32, 48)) -> list[str]:
    """Lines comparing our internlm-chat-7b fp16 -> INT8 deltas with the published ones (see module docstring)."""
    cfg = NAMED_SHAPES["internlm-chat-7b"]
    saving_per_token = bytes_per_token(cfg, "fp16") - bytes_per_token(cfg, "int8")  # 262144 B
    lines = []
    for b in batches:
        ours = -b * cfg.session_len * saving_per_token / MiB
        published = PUBLISHED_INT8_DELTA_MIB.get(b)
        if published is None:
            lines.append(f"batch {b:>3}: ours {ours:.0f} MiB (no published figure)")
            continue
        implied = -published * MiB / (b * saving_per_token)
        lines.append(
            f"batch {b:>3}: ours {ours:.0f} MiB at session {cfg.session_len}; published {published} MiB "
            f"implies session_len {implied:g}"
        )
    return lines


def parse_shape(spec: str) -> WorkspaceConfig:
    """A named shape or LAYERS,KV_HEADS,HEAD_DIM (weights then unknown: counted as 0)."""
    if spec in NAMED_SHAPES:
        return NAMED_SHAPES[spec]
    try:
        layers, kv_heads, head_dim = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(
            f"--shape {spec!r}: expected one of {', '.join(NAMED_SHAPES)} or LAYERS,KV_HEADS,HEAD_DIM (e.g. 32,32,128)"
        ) from None
    return WorkspaceConfig(
        model_name="base",
        head_num=kv_heads,
        kv_head_num=kv_heads,
        size_per_head=head_dim,
        vocab_size=1,
        num_layer=layers,
        rotary_embedding=head_dim,
        rope_theta=10000.0,
        inter_size=1,
        norm_eps=1e-6,
        attn_bias=0,
        start_id=1,
        end_id=2,
    )


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated positive integers, e.g. 8,16,32") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{what} {text!r}: expected comma-separated positive integers, e.g. 8,16,32")
    return values


def format_table(rows: list[ModeMemory], batches: list[int], weights: int, session_len: int) -> str:
    head = f"weights {weights / GiB:.2f} GiB, session_len {session_len}"
    lines = [
        head,
        f"{'mode':<19} {'B/token':>9} {'MiB/session':>12} {'batch':>6} {'total GiB':>10} "
        f"{'measured GiB':>13} {'vs fp16 MiB':>12} {'fit budget':>10}",
    ]
    for r in rows:
        for j, b in enumerate(batches):
            measured = (
                f"{r.measured[j] / GiB:.3f}" + ("*" if r.measured_device[j] == "meta" else "") if r.measured else "-"
            )
            fit = "" if r.sessions_in_budget is None or j else str(r.sessions_in_budget)
            lines.append(
                f"{r.mode:<19} {r.bytes_per_token:>9} {r.bytes_per_session / MiB:>12.2f} {b:>6} "
                f"{r.totals[j] / GiB:>10.3f} {measured:>13} {r.delta_vs_fp16_mib[j]:>12.1f} {fit:>10}"
            )
    if any("meta" in r.measured_device for r in rows):
        lines.append(
            f"* allocated on torch's meta device (over {MEASURE_ON_CPU_LIMIT // MiB} MiB: shapes and storage "
            "sizes only, no memory committed)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lite.memory", description=__doc__.split("\n")[0])
    parser.add_argument(
        "workspace", nargs="?", help="workspace (root, triton_models/ or weights dir); or give --shape instead"
    )
    parser.add_argument(
        "--shape",
        help=f"report a shape without weights: {' | '.join(NAMED_SHAPES)} | L,KV_HEADS,D (default: the WORKSPACE's)",
    )
    parser.add_argument("--batch", default="8,16,32,48", help="comma-separated batch sizes (default: 8,16,32,48)")
    parser.add_argument(
        "--session-len", type=int, default=None, help="tokens per session (default: config.ini session_len)"
    )
    parser.add_argument(
        "--budget-gib", type=float, default=None, help="memory budget in GiB for weights + KV (default: none)"
    )
    parser.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help=f"comma-separated KV modes of {', '.join(MODES)} (default: {DEFAULT_MODES})",
    )
    parser.add_argument(
        "--out", default=None, help="directory for memory.json and memory.png (default: none, the table only)"
    )
    parser.add_argument(
        "--no-measure", action="store_true", help="skip allocating the runtime's cache (default: measure it)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime import interrupts

    interrupts.reset()
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.out and str(Path(args.out) / "memory.json") in interrupts.written():
            return interrupts.interrupted(f"after the report was written: {Path(args.out) / 'memory.json'}", True)
        return interrupts.interrupted("nothing was written" + (f" to {args.out}" if args.out else ""))


def _run(args: argparse.Namespace) -> int:
    try:
        if (args.workspace is None) == (args.shape is None):
            raise ValueError("give a WORKSPACE or --shape NAME|L,KV_HEADS,D (exactly one)")
        batches = parse_ints(args.batch, "--batch")
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise ValueError(f"--modes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODES)}")
        if "fp16" not in modes:
            modes.insert(0, "fp16")
        if args.shape:
            cfg = parse_shape(args.shape)
            weights = weight_bytes(cfg) if args.shape in NAMED_SHAPES else 0
        else:
            from runtime.workspace import load_config, weights_dir

            wdir = weights_dir(args.workspace)
            cfg = load_config(wdir)
            weights = weight_bytes(cfg, wdir)
        session_len = args.session_len or cfg.session_len
        if session_len <= 0:
            raise ValueError(f"--session-len {session_len}: must be positive")
        rows = report(cfg, modes, batches, session_len, weights, args.budget_gib, measure=not args.no_measure)
    except (ValueError, OSError) as e:  # WorkspaceError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, batches, weights, session_len))
    if args.shape == "internlm-chat-7b" or cfg.model_name.startswith("internlm-chat-7b"):
        print("published fp16 -> INT8 deltas (LMDeploy 2023, internlm-chat-7b):")
        print("\n".join("  " + line for line in published_check(batches)))
    if not args.out:
        print("(no files written; --out DIR writes memory.json and memory.png)")
        return 0
    from lite.plots import memory_plot
    from runtime.atomic import staged_files

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "shape": args.shape or str(args.workspace),
        "num_layer": cfg.num_layer,
        "kv_head_num": cfg.kv_head_num,
        "size_per_head": cfg.size_per_head,
        "session_len": session_len,
        "weight_bytes": weights,
        "batches": batches,
        "budget_gib": args.budget_gib,
        "modes": {r.mode: asdict(r) for r in rows},
    }
    title = f"{args.shape or cfg.model_name}: weights + KV cache, session_len {session_len}"
    with staged_files() as stage:  # json and png renamed into place together
        stage(out / "memory.json").write_text(json.dumps(doc, indent=2) + "\n")
        memory_plot(rows, batches, weights, stage(out / "memory.png"), budget_gib=args.budget_gib, title=title)
    print(f"wrote {out / 'memory.json'} and {out / 'memory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
