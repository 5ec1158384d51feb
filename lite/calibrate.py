"""`python -m lite.calibrate`: observe K/V statistics of an HF model on calibration text.

    python -m lite.calibrate --model HF_PATH --calib-dataset NAME|PATH --calib-samples 128 \\
        --calib-seqlen 2048 --work-dir W [--device cpu|cuda] [--batch-size B] [--seed 0]

(upstream spellings --calib_dataset, --calib_samples, --calib_seqlen, --work_dir also work.)

The model runs (fp32 on CPU, fp16 on CUDA, torch.no_grad) over the windows of `lite.datasets` in
batches. A `DynamicCache` subclass is passed as `past_key_values`: every attention layer hands it
its post-RoPE K and its V as (B, H_kv, T, D), before any GQA repeat, which is exactly what a KV
cache stores. The capture cache folds them into `lite.stats.StatsAccumulator` and keeps nothing,
so memory is one batch of activations. Output: work_dir/{key,value}_stats.pth + calib_summary.json,
written together at the end (nothing before): Ctrl-C says whether they were written (exit 130 if not).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from lite import stats as stats_mod
from lite.datasets import DatasetError, FewerWindows, get_calib_windows
from lite.stats import CalibSummary, KVStats, StatsAccumulator
from runtime import interrupts


def capture_cache(on_kv):
    """A transformers DynamicCache that calls on_kv(layer_idx, k, v) with K/V (B, H_kv, T, D) and stores nothing.

    Attention then attends over exactly the new tokens, so it must be used for a single full forward
    from position 0 (one fresh cache per batch).
    """
    from transformers import DynamicCache

    class CaptureCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            on_kv(layer_idx, key_states, value_states)
            return key_states, value_states

    return CaptureCache()


def model_dims(config) -> tuple[int, int, int]:
    """(num_layer, kv_heads, head_dim) from an HF config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


@torch.no_grad()
def collect_stats(model, windows: torch.Tensor, batch_size: int = 1, on_kv=None, progress: bool = False) -> KVStats:
    """Run `model` over windows (n, seqlen) in batches and return the K/V statistics of every layer.

    on_kv, if given, is called too with each (layer_idx, k, v) (tests use it to see the raw states).
    """
    from tqdm import tqdm

    acc = StatsAccumulator(*model_dims(model.config))
    device = next(model.parameters()).device

    def observe(layer_idx, k, v):
        acc.update(layer_idx, k, v)
        if on_kv is not None:
            on_kv(layer_idx, k, v)

    n, seqlen = windows.shape
    bar = tqdm(total=n, unit="win", desc="calibrate", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    for b in range(0, n, batch_size):
        ids = windows[b : b + batch_size].to(device)  # (B, seqlen)
        # logits_to_keep=1: the lm_head over every position would be (B, T, vocab) of wasted memory
        model(input_ids=ids, past_key_values=capture_cache(observe), use_cache=True, logits_to_keep=1)
        bar.update(ids.shape[0])
        bar.set_postfix(tok_s=f"{(b + ids.shape[0]) * seqlen / (time.perf_counter() - start):.0f}")
    bar.close()
    return acc.result()


def load_model(model_path: str | Path, device: str = "cpu"):
    """(model, tokenizer): fp32 on CPU, fp16 on CUDA, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but torch sees no CUDA device; use --device cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model_path}: no config.json there; pass a HF checkpoint directory")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def calibrate(
    model_path: str | Path,
    dataset: str,
    nsamples: int = 128,
    seqlen: int = 2048,
    work_dir: str | Path = "./work_dir",
    device: str = "cpu",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> tuple[KVStats, CalibSummary]:
    """Calibrate and write work_dir/{key,value}_stats.pth + calib_summary.json (atomically; overwrites)."""
    if batch_size <= 0:
        raise ValueError(f"--batch-size {batch_size} must be positive")
    model, tokenizer = load_model(model_path, device)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and seqlen > max_pos:
        raise ValueError(f"--calib-seqlen {seqlen} exceeds the model's max_position_embeddings {max_pos}")
    windows = get_calib_windows(dataset, tokenizer, nsamples, seqlen, seed)  # (n, seqlen)
    kv = collect_stats(model, windows, batch_size, progress=progress)
    summary = CalibSummary(
        model=str(model_path),
        dataset=str(dataset),
        samples=windows.shape[0],
        seqlen=seqlen,
        seed=seed,
        tokens=windows.numel(),
    )
    stats_mod.save(work_dir, kv, summary)
    return kv, summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lite.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory (required)")
    p.add_argument(
        "--calib-dataset",
        "--calib_dataset",
        dest="calib_dataset",
        default="c4",
        help="c4|ptb|wikitext2|pileval (needs `datasets` + network) or a local .txt/.jsonl/.html file, "
        "directory or quoted glob (default: c4)",
    )
    p.add_argument(
        "--calib-samples", "--calib_samples", dest="calib_samples", type=int, default=128, help="windows (default: 128)"
    )
    p.add_argument(
        "--calib-seqlen",
        "--calib_seqlen",
        dest="calib_seqlen",
        type=int,
        default=2048,
        help="tokens per window (default: 2048)",
    )
    p.add_argument(
        "--work-dir",
        "--work_dir",
        dest="work_dir",
        default="./work_dir",
        help="where key_stats.pth, value_stats.pth and calib_summary.json go (default: ./work_dir)",
    )
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (fp16) (default: cpu)")
    p.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, default=1, help="windows per forward (default: 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the window draw (default: 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupts.reset()
    try:
        with warnings.catch_warnings():  # "too little text": one clean line, not a warning with a source line
            warnings.simplefilter("always", FewerWindows)
            warnings.showwarning = _note_or_warning(warnings.showwarning)
            kv, summary = calibrate(
                args.model,
                args.calib_dataset,
                args.calib_samples,
                args.calib_seqlen,
                args.work_dir,
                device=args.device,
                batch_size=args.batch_size,
                seed=args.seed,
            )
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stats = Path(args.work_dir) / stats_mod.KEY_FILE
        if str(stats) in interrupts.written():  # the interrupt came after the statistics were saved
            return interrupts.interrupted(f"after the statistics were written: {args.work_dir} is complete", True)
        return interrupts.interrupted(
            f"no statistics were written ({args.work_dir} is as it was); they are saved only once every window "
            "has run: re-run the command"
        )
    k_amax, v_amax = kv.key.absmax.amax(dim=(1, 2)), kv.value.absmax.amax(dim=(1, 2))  # (L,)
    print(
        f"{summary.samples} windows x {summary.seqlen} tokens ({summary.tokens} tokens) from {summary.dataset}; "
        f"{kv.num_layer} layers, {kv.kv_heads} kv heads, head_dim {kv.head_dim}"
    )
    print(
        f"K absmax per layer: min {k_amax.min():.4g} max {k_amax.max():.4g}; "
        f"V absmax per layer: min {v_amax.min():.4g} max {v_amax.max():.4g}"
    )
    print(f"wrote {Path(args.work_dir) / stats_mod.KEY_FILE}, {stats_mod.VALUE_FILE}, {stats_mod.SUMMARY_FILE}")
    print(f"next: python -m lite.kv_qparams --work-dir {args.work_dir} --turbomind-dir WORKSPACE/triton_models/weights")
    return 0


def _note_or_warning(show):
    """showwarning that prints our FewerWindows as a note; other warnings (e.g. transformers') as before."""

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, FewerWindows):
            print(f"note: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


if __name__ == "__main__":
    sys.exit(main())
