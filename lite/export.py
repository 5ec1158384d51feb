"""`python -m lite.export`: calibrated K/V statistics -> an HF checkpoint with FP8 KV scales that vLLM serves.

    python -m lite.export --model HF_PATH --work-dir W --out DIR [--kv-dtype fp8_e4m3] [--granularity tensor|head]
    vllm serve DIR --kv-cache-dtype fp8

The scales come from W/key_stats.pth and W/value_stats.pth (lite.stats) through the same function and
formula as `python -m lite.kv_qparams --kv-dtype fp8_e4m3 --granularity G --num-tp 1`
(lite.kv_qparams.compute_params; runtime.quant.fp8_scale: scale = absmax / 448 in fp32, reduced over all of a
layer's heads and channels for `tensor`, over a head's channels for `head`). One scale per layer is what
compressed-tensors' strategy `tensor` means, so the export always reduces as a single TP rank. Deploying DIR
imports the scales again and writes the same parameter files as kv_qparams, bit for bit.
The checkpoint format (config.json quantization_config, tensor names and shapes) belongs to
runtime.compressed_tensors. INT8, E5M2 or asymmetric parameters are refused: vLLM accepts only symmetric FP8 E4M3.
"""

from __future__ import annotations

import argparse
import sys

from lite import stats as stats_mod
from lite.kv_qparams import GRANULARITIES, compute_params, format_table
from runtime import compressed_tensors as ct
from runtime.kv_params import QUANTIZED_DTYPES


def export(
    model: str,
    work_dir: str,
    out: str,
    kv_dtype: str = ct.KV_DTYPE,
    granularity: str = "tensor",
    progress: bool = True,
    echo=print,
) -> ct.ExportResult:
    """Compute the FP8 scales from the stats and write the checkpoint `out` (nothing is written on error)."""
    kv_dtype = "fp8_e4m3" if kv_dtype == "fp8" else kv_dtype  # vLLM's alias
    if kv_dtype not in QUANTIZED_DTYPES:
        raise ct.CompressedTensorsError(f"--kv-dtype {kv_dtype!r}: expected fp8_e4m3 (or fp8)")
    if granularity not in GRANULARITIES:
        raise ct.CompressedTensorsError(f"--granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    kv = stats_mod.load(work_dir)
    # tp = 1: compressed-tensors' `tensor` is one scale for all of a layer's heads; symmetric: vLLM's only kind.
    params = compute_params(kv, 1, kv_dtype, granularity, symmetric=False)
    result = ct.export_checkpoint(model, out, params, progress=progress)
    echo(format_table(params, kv.layer_names, 1))
    shards = ", ".join(f"{name} (+{n})" for name, n in result.scale_files.items())
    echo(
        f"wrote {out}: {len(result.files)} files; {2 * kv.num_layer} scale tensors "
        f"(model.layers.{{i}}.self_attn.k_scale / v_scale, {ct.STRATEGIES[granularity]}) appended to {shards}"
    )
    echo(f"serve it with: vllm serve {out} --kv-cache-dtype fp8")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lite.export",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="source HF checkpoint directory (safetensors), the calibrated model")
    p.add_argument(
        "--work-dir", "--work_dir", dest="work_dir", required=True, help="dir with key_stats.pth / value_stats.pth"
    )
    p.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")
    p.add_argument(
        "--kv-dtype",
        "--kv_dtype",
        dest="kv_dtype",
        default=ct.KV_DTYPE,
        choices=(*QUANTIZED_DTYPES, "fp8"),
        help="KV cache type of the scales (default fp8_e4m3 = fp8, the only one vLLM serves; the others are refused)",
    )
    p.add_argument(
        "--granularity",
        default="tensor",
        choices=GRANULARITIES,
        help="tensor (default): one scale per layer (strategy tensor); head: one per KV head (strategy attn_head)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar while copying the weights (default: shown)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export(args.model, args.work_dir, args.out, args.kv_dtype, args.granularity, progress=args.progress)
    except (ValueError, OSError) as e:  # CompressedTensorsError, StatsError, QParamsError derive from ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
