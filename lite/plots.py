"""PNG charts for `lite.eval` (quality change per KV mode) and `lite.memory` (memory vs batch size).

matplotlib is imported inside each function with the non-interactive Agg backend, so importing
this module (and the CLIs) needs no display and no matplotlib until a chart is drawn.
"""

from __future__ import annotations

from pathlib import Path

GiB = 2**30


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def eval_plot(modes: dict[str, dict], path: Path, title: str) -> Path:
    """Two bar panels per mode: perplexity change (%) and 1 - top-1 agreement (%) against fp16."""
    plt = _pyplot()
    names = list(modes)
    ppl_change = [modes[m]["ppl_change_pct"] for m in names]
    disagree = [100.0 * (1.0 - modes[m]["top1_agreement"]) for m in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.4 * len(names) + 3), 4))
    for ax, values, label in (
        (axes[0], ppl_change, "perplexity change vs fp16 (%)"),
        (axes[1], disagree, "top-1 disagreement with fp16 (%)"),
    ):
        bars = ax.bar(names, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_ylabel(label)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # explicit: the path may be a staged *.tmp name
    plt.close(fig)
    return path


def memory_plot(
    rows, batches: list[int], weights: int, path: Path, *, budget_gib: float | None = None, title: str = ""
) -> Path:
    """Total memory (weights + KV, GiB) against batch size, one line per KV mode (rows: lite.memory.ModeMemory)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        ax.plot(batches, [t / GiB for t in r.totals], marker="o", label=f"{r.mode} ({r.bytes_per_token} B/token)")
    if weights:
        ax.axhline(weights / GiB, color="grey", linestyle=":", label=f"weights {weights / GiB:.2f} GiB")
    if budget_gib is not None:
        ax.axhline(budget_gib, color="red", linestyle="--", label=f"budget {budget_gib:g} GiB")
    ax.set_xlabel("batch size (sessions)")
    ax.set_ylabel("memory (GiB)")
    ax.set_xticks(batches)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
