"""`python -m lite.kv_qparams`: K/V statistics → KV-cache quantization parameter files in the workspace.

    python -m lite.kv_qparams --work-dir W --turbomind-dir WORKSPACE/triton_models/weights \\
        [--kv-sym False] [--num-tp 1] [--kv-bits 8] [--kv-dtype int8|fp8_e4m3|fp8_e5m2] \\
        [--granularity tensor|head] [--update-config] [--quiet]

(upstream spellings --work_dir, --turbomind_dir, --kv_sym True/False, --num_tp also work;
--turbomind-dir may also be the workspace root.)

Per layer and TP rank r, the stats (kv_heads, head_dim) are chunked along kv heads into num_tp
parts; rank r reduces its own heads:
    granularity tensor: over heads and channels -> one (scale, zp) per layer and rank
    granularity head:   over channels only       -> one (scale, zp) per KV head
    reduce: max of max, min of min, max of absmax (K and V separately)
INT8 (runtime.quant.int8_params, fp32): asym scale = (max - min)/255, zp = (max + min)/2;
                                        sym  scale = absmax/127,      zp = 0
FP8  (runtime.quant.fp8_scale):         scale = absmax/448 (E4M3) or absmax/57344 (E5M2), zp = 0
Files and their layout belong to runtime.kv_params; config.ini edits go through runtime.workspace.
Everything is validated before the first byte is written, so an error leaves the workspace as it was;
the parameter files are renamed into place together, then config.ini (Ctrl-C says which were written).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lite import stats as stats_mod
from lite.stats import KVStats, Stats
from runtime import interrupts, kv_params
from runtime.quant import FP8_MAX, fp8_scale, int8_params
from runtime.workspace import QUANT_POLICY_INT8, WorkspaceConfig, load_config, replace, save_config, weights_dir

GRANULARITIES = ("tensor", "head")


class QParamsError(ValueError):
    """Inputs of kv_qparams are inconsistent; the message names the layer/head/key and the fix."""


@dataclass
class QParamsResult:
    params: kv_params.KVParams
    files: list[Path]
    config_edits: dict[str, tuple[str, str]]  # key -> (old, new) for config.ini
    config_updated: bool


def reduce_stats(s: Stats, tp: int, granularity: str) -> Stats:
    """Reduce (L, H_kv, D) stats to (L, H_kv): per head over channels, or per rank over its heads and channels
    (the rank's value is then repeated for each of its heads)."""
    mx, mn, amax = s.max.amax(dim=2), s.min.amin(dim=2), s.absmax.amax(dim=2)  # (L, H_kv)
    if granularity == "head":
        return Stats(mx, mn, amax)
    L, H = mx.shape

    def per_rank(t: torch.Tensor, op) -> torch.Tensor:  # (L, H) -> (L, tp, H/tp) reduced per rank -> (L, H)
        return op(t.view(L, tp, H // tp), dim=2, keepdim=True).expand(L, tp, H // tp).reshape(L, H)

    return Stats(per_rank(mx, torch.amax), per_rank(mn, torch.amin), per_rank(amax, torch.amax))


def compute_params(kv: KVStats, tp: int, kv_dtype: str, granularity: str, symmetric: bool) -> kv_params.KVParams:
    """KVParams (each (num_layer, kv_heads), fp32) from the stats; raises on a zero or non-finite range."""
    out = []
    for which, s in (("K", kv.key), ("V", kv.value)):
        r = reduce_stats(s, tp, granularity)
        if kv_dtype == "int8":
            scale, zp = int8_params(r.max, r.min, r.absmax, symmetric)
        else:
            scale = fp8_scale(r.absmax, kv_dtype)
            zp = torch.zeros_like(scale)
        bad = ~(torch.isfinite(scale) & torch.isfinite(zp) & (scale > 0))
        if bad.any():
            i, h = bad.nonzero()[0].tolist()
            heads_r = kv.kv_heads // tp
            r0 = h // heads_r * heads_r
            where = f"head {h}" if granularity == "head" else f"rank {h // heads_r} (kv heads {r0}-{r0 + heads_r - 1})"
            raise QParamsError(
                f"{which} of {kv.layer_names[i]} {where}: max {r.max[i, h].item():.6g}, min {r.min[i, h].item():.6g}, "
                f"absmax {r.absmax[i, h].item():.6g} gives scale {scale[i, h].item():.6g} (needs a finite, nonzero "
                "range); re-run python -m lite.calibrate with more or longer --calib-samples/--calib-seqlen"
                + (", or use --granularity tensor" if granularity == "head" else "")
            )
        out += [scale, zp]
    return kv_params.KVParams(kv_dtype, granularity, *out)


def check_compatible(kv: KVStats, cfg: WorkspaceConfig, num_tp: int, wdir: Path, work_dir: Path) -> None:
    """Stats and num_tp must match the workspace's config.ini."""
    ini = wdir / "config.ini"
    if num_tp != cfg.tensor_para_size:
        raise QParamsError(
            f"--num-tp {num_tp} differs from tensor_para_size = {cfg.tensor_para_size} in {ini}; "
            f"pass --num-tp {cfg.tensor_para_size}"
        )
    fix = (
        f"the stats in {work_dir} come from a different model; re-run python -m lite.calibrate --model HF_PATH "
        f"--work-dir {work_dir} on the model deployed in {wdir.parent.parent}"
    )
    for what, got, want in (
        ("layers", kv.num_layer, cfg.num_layer),
        ("kv heads", kv.kv_heads, cfg.kv_head_num),
        ("head_dim", kv.head_dim, cfg.size_per_head),
    ):
        if got != want:
            key = {"layers": "num_layer", "kv heads": "kv_head_num", "head_dim": "size_per_head"}[what]
            raise QParamsError(f"stats have {got} {what} but {ini} has {key} = {want}; {fix}")


def config_changes(cfg: WorkspaceConfig, kv_dtype: str, granularity: str) -> WorkspaceConfig:
    """config.ini for this KV mode: int8 sets the quant_policy bit 4, fp8 clears it (FP8 has no bit)."""
    policy = cfg.quant_policy | QUANT_POLICY_INT8 if kv_dtype == "int8" else cfg.quant_policy & ~QUANT_POLICY_INT8
    return replace(cfg, quant_policy=policy, kv_cache_dtype=kv_dtype, kv_granularity=granularity)


def format_table(p: kv_params.KVParams, names: list[str], tp: int) -> str:
    """Per-layer (and per rank or head) table of the parameters, like upstream's printout."""
    L, H = p.k_scale.shape
    unit = "head" if p.granularity == "head" else "rank"
    rows = [f"{'layer':<18}{unit:>5}{'k_scale':>14}{'k_zp':>14}{'v_scale':>14}{'v_zp':>14}"]
    for i in range(L):
        cols = range(H) if p.granularity == "head" else range(0, H, H // tp)
        for j, h in enumerate(cols):
            rows.append(
                f"{names[i]:<18}{j:>5}"
                + "".join(f"{t[i, h].item():>14.6g}" for t in (p.k_scale, p.k_zp, p.v_scale, p.v_zp))
            )
    return "\n".join(rows)


def write_kv_qparams(
    work_dir: str | Path,
    turbomind_dir: str | Path,
    kv_sym: bool = False,
    num_tp: int = 1,
    kv_bits: int = 8,
    kv_dtype: str = "int8",
    granularity: str = "tensor",
    update_config: bool = False,
    echo=print,
    quiet: bool = False,
) -> QParamsResult:
    """Validate everything, then write the parameter files (and config.ini when update_config).

    quiet: leave out the per-layer table (30-90 rows for a 7B); the summary lines are still echoed."""
    if kv_bits != 8:
        raise QParamsError(f"--kv-bits {kv_bits} is not supported: only 8-bit KV caches (int8, fp8_e4m3, fp8_e5m2)")
    kv_dtype = "fp8_e4m3" if kv_dtype == "fp8" else kv_dtype  # vLLM's alias
    if kv_dtype not in kv_params.QUANTIZED_DTYPES:
        raise QParamsError(f"--kv-dtype {kv_dtype!r}: expected one of {', '.join(kv_params.QUANTIZED_DTYPES)}")
    if granularity not in GRANULARITIES:
        raise QParamsError(f"--granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    if kv_sym and kv_dtype != "int8":
        raise QParamsError(
            f"--kv-sym applies to int8 only; {kv_dtype} is always symmetric (scale = absmax / "
            f"{FP8_MAX[kv_dtype]:g}), drop --kv-sym"
        )
    wdir = weights_dir(turbomind_dir)
    cfg = load_config(wdir)
    kv = stats_mod.load(work_dir)
    check_compatible(kv, cfg, num_tp, wdir, Path(work_dir))
    params = compute_params(kv, num_tp, kv_dtype, granularity, kv_sym)
    new_cfg = config_changes(cfg, kv_dtype, granularity)  # validated before any file is written
    edits = {
        k: (str(getattr(cfg, k)), str(getattr(new_cfg, k)))
        for k in ("quant_policy", "kv_cache_dtype", "kv_granularity")
    }

    files = kv_params.write(wdir, cfg, params)
    if not quiet:
        echo(format_table(params, kv.layer_names, num_tp))
    mode = f"{kv_dtype} {'symmetric' if kv_sym or kv_dtype != 'int8' else 'asymmetric'}, {granularity} granularity"
    echo(f"wrote {len(files)} files ({mode}) to {wdir}, e.g. {files[0].name}")
    changed = {k: v for k, v in edits.items() if v[0] != v[1]}
    if update_config and changed:
        save_config(new_cfg, wdir)
        echo(f"updated {wdir / 'config.ini'}: " + ", ".join(f"{k} {o} -> {n}" for k, (o, n) in changed.items()))
    elif changed:
        echo(f"to use these parameters, edit [llama] in {wdir / 'config.ini'} (or re-run with --update-config):")
        echo("\n".join(f"    {k} = {n}    (now {o})" for k, (o, n) in changed.items()))
    else:
        echo(f"{wdir / 'config.ini'} already selects {kv_dtype} / {granularity}")
    return QParamsResult(params, files, edits, update_config and bool(changed))


def str2bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lite.kv_qparams", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work-dir",
        "--work_dir",
        dest="work_dir",
        required=True,
        help="directory with key_stats.pth and value_stats.pth from python -m lite.calibrate (required)",
    )
    p.add_argument(
        "--turbomind-dir",
        "--turbomind_dir",
        dest="turbomind_dir",
        required=True,
        help="WORKSPACE/triton_models/weights or the workspace root (required)",
    )
    p.add_argument(
        "--kv-sym",
        "--kv_sym",
        dest="kv_sym",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="symmetric int8 (zp = 0); takes an optional True/False (default: False, asymmetric)",
    )
    p.add_argument(
        "--num-tp",
        "--num_tp",
        dest="num_tp",
        type=int,
        default=1,
        help="tensor-parallel ranks; must equal config.ini tensor_para_size (default: 1)",
    )
    p.add_argument("--kv-bits", "--kv_bits", dest="kv_bits", type=int, default=8, help="only 8 (default: 8)")
    p.add_argument(
        "--kv-dtype",
        "--kv_dtype",
        dest="kv_dtype",
        default="int8",
        choices=(*kv_params.QUANTIZED_DTYPES, "fp8"),
        help="cache dtype the parameters are for; fp8 = fp8_e4m3 (default: int8)",
    )
    p.add_argument(
        "--granularity",
        default="tensor",
        choices=GRANULARITIES,
        help="tensor: one scale per layer and TP rank; head: one per KV head (default: tensor)",
    )
    p.add_argument(
        "--update-config",
        "--update_config",
        dest="update_config",
        action="store_true",
        help="set quant_policy / kv_cache_dtype / kv_granularity in config.ini (default: print the edits)",
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", help="leave out the per-layer parameter table (default: print it)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupts.reset()
    try:
        write_kv_qparams(
            args.work_dir,
            args.turbomind_dir,
            kv_sym=args.kv_sym,
            num_tp=args.num_tp,
            kv_bits=args.kv_bits,
            kv_dtype=args.kv_dtype,
            granularity=args.granularity,
            update_config=args.update_config,
            quiet=args.quiet,
        )
    except ValueError as e:  # QParamsError, StatsError, WorkspaceError, KVParamsError all derive from it
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = interrupts.written()
        files = [f for f in done if not f.endswith("config.ini")]
        if not files:
            return interrupts.interrupted("no parameter files were written; the workspace is as it was")
        what = f"wrote {len(files)} parameter files ({Path(files[0]).name} ...)"
        if not args.update_config:
            return interrupts.interrupted(f"after the work was done: {what}", True)
        if any(f.endswith("config.ini") for f in done):
            return interrupts.interrupted(f"after the work was done: {what} and updated config.ini", True)
        return interrupts.interrupted(f"{what} but config.ini was not updated: re-run the command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
