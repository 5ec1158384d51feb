"""`python -m lite.eval`: what a KV mode costs in accuracy, measured with this project's runtime.

    python -m lite.eval WORKSPACE --dataset NAME|PATH [--samples 8] [--seqlen 512] [--modes fp16,int8,fp8_e4m3]
        [--granularity tensor|head] [--use-context-fmha 0|1] [--calculate-kv-scales] [--dtype float32|bfloat16]
        [--batch-size 2] [--seed 0] [--out ./eval_out] [--calib-dataset NAME|PATH|WORK_DIR]

A mode is DTYPE[:VARIANT]; DTYPE fp16 | int8 | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2 (static scales) or
int8_per_token_head | fp8_per_token_head | int4_per_token_head (online: scale per token and KV head); VARIANT
    tensor | head   calibrated scales from the workspace files at that granularity (default --granularity)
    dynamic         FP8 scales calculated on the fly from the first batch (calculate_kv_scales)
    unit            FP8 with scale 1.0: the uncalibrated baseline peers fall back to
    rot | norot     online modes with / without the Hadamard rotation (default: the runtime's per-mode choice,
                    runtime.kv_cache.DEFAULT_ROTATION)
fp16 is the reference row and always runs first. Every mode scores the same seeded windows
(`lite.datasets.get_calib_windows`) with `runtime.engine.Engine.score`: a teacher-forced prefill
through a fresh cache of that mode. Metrics over every predicted position t (token t+1 from logits t):
    ppl             exp(mean NLL)                 ppl_change_pct  100 * (ppl / ppl_fp16 - 1)
    top1_agreement  mean [argmax z = argmax z_fp16]
    kl              mean sum_v p_fp16 (log p_fp16 - log p)           (nats)
    max_abs_logit_diff  max |z - z_fp16|
Windows go in batches (outer loop) through one Engine per mode (inner loop), so only one batch of
fp16 logits is held at a time. With --use-context-fmha 1 the prefill attends over unquantized K/V,
so the cache dtype never reaches the scored logits (all modes then match fp16): the default is 0.
Output: the table on stdout, OUT/eval.json and OUT/eval.png (written together at the end; Ctrl-C
before then writes nothing and says so).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from runtime.quant import ONLINE_MODES

DEFAULT_OUT = "./eval_out"
ONLINE = ONLINE_MODES  # int8 | fp8 | int4 _per_token_head: scales per token and KV head, no files
DTYPE_ALIASES = {
    "fp16": "fp16",
    "int8": "int8",
    "fp8": "fp8_e4m3",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
    **{m: m for m in ONLINE},
}
VARIANTS = ("tensor", "head", "dynamic", "unit")  # static modes
ONLINE_VARIANTS = ("rot", "norot")
ROWS_PER_CHUNK = 256  # positions per metric chunk: bounds the (rows, V) temporaries


class EvalError(ValueError):
    """Bad arguments or a workspace that cannot serve a requested mode; the message says the fix."""


# ----------------------------------------------------------------------------------------------
# Metrics


@dataclass
class Metrics:
    """Running sums over predicted positions of one mode against the fp16 reference."""

    nll_sum: float = 0.0
    kl_sum: float = 0.0
    agree: int = 0
    count: int = 0
    max_abs_logit_diff: float = 0.0

    def update(self, logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits, ref_logits (N, V) fp32 at positions whose next tokens are targets (N,)."""
        for lo in range(0, targets.numel(), ROWS_PER_CHUNK):
            z, zr, t = (x[lo : lo + ROWS_PER_CHUNK] for x in (logits, ref_logits, targets))
            logp, ref_logp = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)  # (n, V)
            self.nll_sum += float(nll(logp, t).sum())
            self.kl_sum += float(kl_divergence(ref_logp, logp).sum())
            self.agree += int(top1_matches(z, zr).sum())
            self.count += t.numel()
            self.max_abs_logit_diff = max(self.max_abs_logit_diff, float((z - zr).abs().max()))

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.count)


def nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row: logp (N, V) log-probabilities, targets (N,)."""
    return -logp.gather(-1, targets.view(-1, 1)).squeeze(-1)


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per row in nats = sum_v p_ref (log p_ref - log p); inputs (N, V) log-probabilities."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def top1_matches(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Per row: does the argmax agree with the reference argmax (bool (N,))."""
    return logits.argmax(-1) == ref_logits.argmax(-1)


def perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """exp(mean NLL of token t+1 given logits t) over a (B, T, V) block and its (B, T) tokens."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1).flatten(0, 1)
    return math.exp(float(nll(logp, tokens[:, 1:].flatten()).mean()))


# ----------------------------------------------------------------------------------------------
# Modes


@dataclass
class ModeSpec:
    name: str  # exactly as given on the command line
    kv_dtype: str  # fp16 | int8 | fp8_e4m3 | fp8_e5m2 | *_per_token_head
    variant: str  # "" (fp16) | tensor | head | dynamic | unit | rot | norot (online)

    @property
    def scales(self) -> str:
        return {
            "": "-",
            "tensor": "calibrated (tensor)",
            "head": "calibrated (head)",
            "dynamic": "calculated on the fly",
            "unit": "unit (1.0)",
            "rot": "per token-head, rotated",
            "norot": "per token-head",
        }[self.variant]


def parse_modes(text: str, granularity: str, calculate_kv_scales: bool = False) -> list[ModeSpec]:
    """`fp16,int8,fp8:dynamic,...` -> specs, fp16 first (added when missing). Unknown/invalid -> EvalError."""
    specs: list[ModeSpec] = []
    for name in (m.strip() for m in text.split(",")):
        if not name:
            continue
        dtype, _, variant = name.partition(":")
        if dtype not in DTYPE_ALIASES:
            raise EvalError(
                f"--modes: unknown mode {name!r}; a mode is DTYPE[:VARIANT] with DTYPE in "
                f"{', '.join(DTYPE_ALIASES)} and VARIANT in {', '.join(VARIANTS)} (static modes) or "
                f"{', '.join(ONLINE_VARIANTS)} (*_per_token_head)"
            )
        kv = DTYPE_ALIASES[dtype]
        if kv == "fp16":
            if variant:
                raise EvalError(f"--modes: {name!r}: fp16 takes no variant (it is the unquantized reference)")
        elif kv in ONLINE:
            from runtime.kv_cache import DEFAULT_ROTATION

            variant = variant or ("rot" if DEFAULT_ROTATION[kv] else "norot")
            if variant not in ONLINE_VARIANTS:
                raise EvalError(
                    f"--modes: {name!r}: {kv} takes no calibrated scales; its variant is {' or '.join(ONLINE_VARIANTS)}"
                )
        else:
            variant = variant or ("dynamic" if calculate_kv_scales and kv.startswith("fp8") else granularity)
            if variant not in VARIANTS:
                raise EvalError(
                    f"--modes: {name!r}: unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}"
                )
            if variant in ("dynamic", "unit") and kv == "int8":
                raise EvalError(f"--modes: {name!r}: {variant} scales exist for FP8 only; use int8:tensor or int8:head")
        if any(s.name == name for s in specs):
            raise EvalError(f"--modes: {name!r} is given twice")
        specs.append(ModeSpec(name, kv, variant))
    if not any(s.kv_dtype == "fp16" for s in specs):
        specs.insert(0, ModeSpec("fp16", "fp16", ""))
    specs.sort(key=lambda s: s.kv_dtype != "fp16")  # stable: fp16 first, the rest in the given order
    return specs


def mode_params(spec: ModeSpec, wdir: Path, cfg):
    """The KVParams a mode runs with: read from the workspace (validated, with the fix in the error), unit, or None."""
    from runtime import kv_params

    if spec.variant in ("tensor", "head"):
        return kv_params.read(wdir, cfg, spec.kv_dtype, spec.variant)
    if spec.variant == "unit":
        ones, zeros = torch.ones(cfg.num_layer, cfg.kv_head_num), torch.zeros(cfg.num_layer, cfg.kv_head_num)
        return kv_params.KVParams(spec.kv_dtype, "tensor", ones, zeros, ones.clone(), zeros.clone())
    return None


def build_engine(
    workspace,
    spec: ModeSpec,
    params,
    *,
    dtype: str,
    batch_size: int,
    seqlen: int,
    use_context_fmha: int,
    model=None,
    cache_max_entry_count: float | None = None,
    kv_cache_gib: float | None = None,
):
    """One runtime Engine in this mode (model: weights to share). Its pool holds one batch of windows
    (max_batch_size x session_len caps it) unless the budget is smaller; score then runs fewer rows a pass."""
    from runtime.engine import Engine

    kw = dict(
        model=model,
        calculate_kv_scales=spec.variant == "dynamic",
        dtype=dtype,
        max_batch_size=batch_size,
        session_len=seqlen,
        use_context_fmha=use_context_fmha,
        cache_max_entry_count=cache_max_entry_count,
        kv_cache_gib=kv_cache_gib,
    )
    if params is not None:
        kw.update(kv_params=params, kv_granularity=params.granularity)
    if spec.variant in ONLINE_VARIANTS:
        kw.update(kv_rotation="on" if spec.variant == "rot" else "off")
    return Engine(workspace, kv_cache_dtype=spec.kv_dtype, **kw)


def check_cache_bytes(engine, kv_dtype: str) -> dict:
    """Bytes/token from the formula against what the engine allocated: blocks * block_size * bytes/token plus
    its fp32 parameters (4 per layer and KV head, as `runtime.kv_cache.StaticQuantizer` holds them; none for the
    online modes, whose per-row parameters are in the bytes/token)."""
    from lite.memory import bytes_per_token

    cfg = engine.config
    per_token = bytes_per_token(cfg, kv_dtype)
    held = 0 if kv_dtype in ONLINE else 16 * cfg.num_layer * cfg.kv_head_num
    expected = round(engine.kv_cache_tokens * per_token) + held
    if engine.cache_bytes() != expected:
        warnings.warn(
            f"{kv_dtype}: engine.cache_bytes() = {engine.cache_bytes()}, formula {expected} ({engine.num_kv_blocks}"
            f" blocks x {engine.block_size} tokens x {per_token} B + parameters)",
            stacklevel=2,
        )
    return {
        "bytes_per_token": per_token,
        "engine_cache_bytes": engine.cache_bytes(),
        "formula_cache_bytes": expected,
        "kv_cache_tokens": engine.kv_cache_tokens,
        "scale_bytes": 0 if kv_dtype == "fp16" else held,
    }


def _text_files(spec: str) -> set[Path]:
    """The local files a dataset argument names (empty for hub names and unreadable specs)."""
    from lite.datasets import HUB_NAMES, DatasetError, local_files

    if spec in HUB_NAMES and not Path(spec).exists():
        return set()
    try:
        return {p.resolve() for p in local_files(spec)}
    except DatasetError:
        return set()


def same_text(dataset: str, calib: str | None) -> bool:
    """Is the eval dataset the calibration dataset (same name, or any local file in common)?"""
    if not calib:
        return False
    summary = Path(calib) / "calib_summary.json"
    if summary.is_file():  # a calibration work dir: the dataset it recorded
        calib = str(json.loads(summary.read_text()).get("dataset", calib))
    return dataset == calib or bool(_text_files(dataset) & _text_files(calib))


# ----------------------------------------------------------------------------------------------
# The run


def evaluate(
    workspace,
    dataset: str,
    *,
    modes: str = "fp16,int8,fp8_e4m3",
    samples: int = 8,
    seqlen: int = 512,
    granularity: str = "tensor",
    use_context_fmha: int = 0,
    calculate_kv_scales: bool = False,
    dtype: str = "float32",
    batch_size: int = 2,
    seed: int = 0,
    calib_dataset: str | None = None,
    progress: bool = True,
    cache_max_entry_count: float | None = None,
    kv_cache_gib: float | None = None,
) -> dict:
    """Score the seeded windows with one runtime Engine per mode; the eval.json document."""
    from tqdm import tqdm

    from lite.datasets import get_calib_windows
    from runtime.workspace import load_config, weights_dir

    if granularity not in ("tensor", "head"):
        raise EvalError(f"--granularity {granularity!r}: expected tensor or head")
    if min(samples, seqlen, batch_size) <= 0 or seqlen < 2:
        raise EvalError(
            f"--samples ({samples}), --batch-size ({batch_size}) must be positive and --seqlen ({seqlen}) >= 2"
        )
    specs = parse_modes(modes, granularity, calculate_kv_scales)
    wdir = weights_dir(workspace)
    cfg = load_config(wdir)
    params = {s.name: mode_params(s, wdir, cfg) for s in specs}  # fails early, naming the missing file and fix
    notes = []
    if use_context_fmha:
        notes.append(
            "--use-context-fmha 1: prefill attention uses unquantized K/V, so the KV cache dtype never "
            "reaches the scored logits; every mode then reflects only rounding noise and matches fp16. "
            "Use 0 to measure what decode steps see."
        )
    if same_text(dataset, calib_dataset):
        notes.append(f"the eval dataset {dataset!r} is the calibration text ({calib_dataset}): numbers are optimistic")
    for note in notes:
        warnings.warn(note, stacklevel=2)

    engines = {}
    for s in specs:  # one copy of the weights, shared by every mode's engine
        shared = next(iter(engines.values())).model if engines else None
        engines[s.name] = build_engine(
            workspace,
            s,
            params[s.name],
            dtype=dtype,
            batch_size=batch_size,
            seqlen=seqlen,
            use_context_fmha=use_context_fmha,
            model=shared,
            cache_max_entry_count=cache_max_entry_count,
            kv_cache_gib=kv_cache_gib,
        )
    cache = {s.name: {"kv_dtype": s.kv_dtype, **check_cache_bytes(engines[s.name], s.kv_dtype)} for s in specs}
    ref = engines[specs[0].name]
    windows = get_calib_windows(dataset, ref.tokenizer, samples, seqlen, seed)  # (n, seqlen)
    metrics = {s.name: Metrics() for s in specs}
    bar = tqdm(total=len(windows) * len(specs), unit="window", desc="eval", disable=not progress)
    for lo in range(0, len(windows), batch_size):
        tokens = windows[lo : lo + batch_size]  # (B, T)
        targets = tokens[:, 1:].flatten()  # (B (T-1),)
        ref_logits = None
        for s in specs:  # fp16 first: its logits are the reference for this batch
            logits = engines[s.name].score(tokens)[:, :-1].flatten(0, 1)  # (B (T-1), V) fp32
            ref_logits = logits if ref_logits is None else ref_logits
            metrics[s.name].update(logits, ref_logits, targets)
            bar.update(len(tokens))
        del ref_logits, logits
    bar.close()

    base = metrics[specs[0].name].ppl
    rows = {}
    for s in specs:
        m = metrics[s.name]
        rows[s.name] = {
            "ppl": m.ppl,
            "ppl_change_pct": 100.0 * (m.ppl / base - 1.0),
            "top1_agreement": m.agree / m.count,
            "kl": m.kl_sum / m.count,
            "max_abs_logit_diff": m.max_abs_logit_diff,
            "bytes_per_token": cache[s.name]["bytes_per_token"],
        }
    return {
        "modes": rows,
        "dataset": dataset,
        "samples": len(windows),
        "seqlen": seqlen,
        "scales": {s.name: s.scales for s in specs},
        "positions": metrics[specs[0].name].count,
        "workspace": str(workspace),
        "model_name": cfg.model_name,
        "seed": seed,
        "granularity": granularity,
        "use_context_fmha": use_context_fmha,
        "dtype": dtype,
        "batch_size": batch_size,
        "calib_dataset": calib_dataset,
        "cache": cache,
        "warnings": notes,
        "specs": {s.name: asdict(s) for s in specs},
    }


def format_table(doc: dict) -> str:
    lines = [
        f"{doc['model_name']}: {doc['samples']} windows x {doc['seqlen']} tokens of {doc['dataset']} "
        f"({doc['positions']} predicted positions, seed {doc['seed']}, use_context_fmha {doc['use_context_fmha']})",
        f"{'mode':<25} {'scales':<23} {'ppl':>9} {'change %':>9} {'top-1 agr':>9} {'KL':>10} "
        f"{'max |dz|':>9} {'B/token':>8}",
    ]
    for name, r in doc["modes"].items():
        lines.append(
            f"{name:<25} {doc['scales'][name]:<23} {r['ppl']:>9.4f} {r['ppl_change_pct']:>+9.3f} "
            f"{r['top1_agreement']:>9.4f} {r['kl']:>10.2e} {r['max_abs_logit_diff']:>9.4f} "
            f"{r['bytes_per_token']:>8}"
        )
    return "\n".join(lines)


def dataset_label(spec: str | None, parts: int = 3) -> str:
    """A dataset as a reader recognises it: a hub name as is, a path by its last few components
    (/usr/share/doc/debian/FAQ/*.en.html -> .../debian/FAQ/*.en.html), a calibration work dir by its dataset."""
    if not spec:
        return "-"
    summary = Path(spec) / "calib_summary.json"
    if summary.is_file():
        spec = str(json.loads(summary.read_text()).get("dataset", spec))
    path = Path(spec)
    if len(path.parts) <= parts:
        return spec
    return ".../" + "/".join(path.parts[-parts:])


def plot_title(doc: dict) -> str:
    title = (
        f"{doc['model_name']}: {doc['samples']} x {doc['seqlen']} tokens of {dataset_label(doc['dataset'])}"
        f" (use_context_fmha {doc['use_context_fmha']})"
    )
    if doc.get("calib_dataset"):
        title += f"\nscales calibrated on {dataset_label(doc['calib_dataset'])}"
    return title


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lite.eval",
        description=__doc__.split("\n")[0],
        epilog="A mode is DTYPE[:VARIANT]: DTYPE fp16 | int8 | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2; VARIANT tensor | "
        "head (calibrated scale files at that granularity), dynamic (FP8 scales from the first batch), unit (FP8 "
        "with scale 1.0). Online DTYPE int8_per_token_head | fp8_per_token_head | int4_per_token_head (scales per "
        "token and KV head, no files); VARIANT rot | norot (with / without the Hadamard rotation; default: the "
        "runtime's choice per mode), e.g. int4_per_token_head:norot. fp16 is the reference and always runs first.",
    )
    p.add_argument("workspace", metavar="WORKSPACE", help="workspace written by python -m deploy")
    p.add_argument(
        "--dataset",
        required=True,
        help="evaluation text: c4 | ptb | wikitext2 | pileval (need `datasets` + network), or a local .txt / .jsonl / "
        ".html file, directory or quoted glob (required)",
    )
    p.add_argument("--samples", type=int, default=8, help="windows to score (default: 8)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument(
        "--modes",
        default="fp16,int8,fp8_e4m3",
        help="comma-separated DTYPE[:VARIANT], see below (default: fp16,int8,fp8_e4m3)",
    )
    p.add_argument(
        "--granularity",
        default="tensor",
        choices=["tensor", "head"],
        help="the variant of a quantized mode given without one (default: tensor)",
    )
    p.add_argument(
        "--use-context-fmha",
        type=int,
        default=0,
        choices=[0, 1],
        help="0: prefill attention reads the quantized cache, as decoding does; 1: it uses unquantized K/V, so "
        "every mode matches fp16 (default: 0)",
    )
    p.add_argument(
        "--calculate-kv-scales",
        action="store_true",
        help="FP8 modes given without a variant use :dynamic (default: their calibrated files)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (default: float32)"
    )
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward pass (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window draw (default: 0)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"directory for eval.json and eval.png (default: {DEFAULT_OUT})")
    p.add_argument(
        "--calib-dataset",
        default=None,
        help="the calibration text, or the lite.calibrate work dir (its calib_summary.json names the text): warns "
        "when it is the evaluation text and names it in the plot (default: none)",
    )
    p.add_argument(
        "--cache-max-entry-count",
        type=float,
        help="each mode's KV pool = this fraction of free memory (default: what one batch of windows needs, or "
        "0.2 of MemAvailable on cpu / 0.8 of free GPU memory if that is smaller)",
    )
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        help="each mode's KV pool in GiB, wins over --cache-max-entry-count (default: see --cache-max-entry-count)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime import interrupts

    interrupts.reset()
    out = Path(args.out)
    try:
        with warnings.catch_warnings():  # warnings print at once, as one line each
            warnings.simplefilter("always")
            warnings.showwarning = _print_warning
            doc = evaluate(
                args.workspace,
                args.dataset,
                modes=args.modes,
                samples=args.samples,
                seqlen=args.seqlen,
                granularity=args.granularity,
                use_context_fmha=args.use_context_fmha,
                calculate_kv_scales=args.calculate_kv_scales,
                dtype=args.dtype,
                batch_size=args.batch_size,
                seed=args.seed,
                calib_dataset=args.calib_dataset,
                cache_max_entry_count=args.cache_max_entry_count,
                kv_cache_gib=args.kv_cache_gib,
            )
        print(format_table(doc))
        write_report(doc, out)
    except (ValueError, OSError) as e:  # WorkspaceError, KVParamsError, DatasetError and EvalError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if str(out / "eval.json") in interrupts.written():
            return interrupts.interrupted(f"after the report was written: {out / 'eval.json'}, eval.png", True)
        return interrupts.interrupted(
            f"nothing was written to {out} (the report is written once every mode has scored every window)"
        )
    print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")
    return 0


def write_report(doc: dict, out: Path) -> list[Path]:
    """OUT/eval.json and OUT/eval.png, renamed into place together."""
    from lite.plots import eval_plot
    from runtime.atomic import staged_files

    out.mkdir(parents=True, exist_ok=True)
    with staged_files() as stage:
        stage(out / "eval.json").write_text(json.dumps(doc, indent=2) + "\n")
        eval_plot(doc["modes"], stage(out / "eval.png"), plot_title(doc))
    return [out / "eval.json", out / "eval.png"]


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
