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


# Per KV mode: INT8 and FP8 take the same bytes, so their lines coincide; distinct dashes and markers (hollow
# squares around filled triangles) keep both visible, and the legend says which modes share a line.
MODE_STYLES = {
    "fp16": dict(linestyle="-", marker="o", color="tab:blue"),
    "int8": dict(linestyle="--", marker="s", markersize=9, markerfacecolor="none", color="tab:orange"),
    "fp8_e4m3": dict(linestyle=":", marker="^", markersize=5, color="tab:green", linewidth=2),
    "fp8_e5m2": dict(linestyle="-.", marker="v", markersize=5, color="tab:red"),
    "int8_per_token_head": dict(linestyle="--", marker="D", markersize=5, color="tab:purple"),
    "fp8_per_token_head": dict(linestyle=":", marker="x", color="tab:brown"),
    "int4_per_token_head": dict(linestyle="-", marker="P", color="tab:gray"),
}


def memory_plot(
    rows, batches: list[int], weights: int, path: Path, *, budget_gib: float | None = None, title: str = ""
) -> Path:
    """Total memory (weights + KV, GiB) against batch size, one line per KV mode (rows: lite.memory.ModeMemory)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    draw_memory(ax, rows, batches, weights, budget_gib)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # explicit: the path may be a staged *.tmp name
    plt.close(fig)
    return path


def draw_memory(ax, rows, batches: list[int], weights: int, budget_gib: float | None = None) -> None:
    """The memory lines on a matplotlib Axes (separate from the figure so tests can inspect the lines)."""
    for i, r in enumerate(rows):
        same = [o.mode for o in rows[:i] if o.totals == r.totals]  # drawn already: this line lies on top of it
        label = f"{r.mode} ({r.bytes_per_token} B/token{', same as ' + ', '.join(same) if same else ''})"
        ax.plot(batches, [t / GiB for t in r.totals], label=label, **MODE_STYLES.get(r.mode, {"marker": "o"}))
    if weights:
        ax.axhline(weights / GiB, color="grey", linestyle=":", label=f"weights {weights / GiB:.2f} GiB")
    if budget_gib is not None:
        ax.axhline(budget_gib, color="red", linestyle="--", label=f"budget {budget_gib:g} GiB")
    ax.set_xlabel("batch size (sessions)")
    ax.set_ylabel("memory (GiB)")
    ax.set_xticks(batches)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
