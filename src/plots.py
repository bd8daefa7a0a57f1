"""The pictures the kit writes beside its JSON and Markdown: metrics.png (evaluation) and loss.png (training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.metrics import MAIN_METRIC, METRICS, verdict


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a training machine), imported on first use
    so that commands which draw nothing never load it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(results: dict[str, dict], path: Path, comparison: dict | None = None, title: str = "") -> None:
    """metrics.png: every metric x100 (the report's scale), values on the bars; with two models, a second panel
    with the difference per metric and its 95% interval (green above zero, red below, grey across it)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if comparison else 1, figsize=(13 if comparison else 8, 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if comparison else [1]})
    ax, names, x = axes[0, 0], list(results), np.arange(len(METRICS))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        bars = ax.bar(x + i * width, [100 * results[name]["metrics"][m] for m in METRICS], width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x + width * (len(names) - 1) / 2, METRICS, rotation=30)
    ax.set_ylim(0, 118)  # room for the labels and the legend above the 100 mark
    ax.set_ylabel("score (x100)")
    ax.legend(loc="upper left", ncols=len(names))
    ax.grid(axis="y", alpha=0.3)
    if comparison:
        _difference_panel(axes[0, 1], comparison, names)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _difference_panel(ax, comparison: dict, names: list[str]) -> None:
    diff = np.array([100 * comparison[m]["difference"] for m in METRICS])
    low, high = (np.array([100 * comparison[m]["ci95"][j] for m in METRICS]) for j in (0, 1))
    colors = ["tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray" for lo, hi in zip(low, high)]
    x = np.arange(len(METRICS))
    bars = ax.bar(x, diff, 0.6, color=colors, yerr=[diff - low, high - diff], capsize=4)
    ax.bar_label(bars, fmt="%+.2f", fontsize=7, padding=2)
    ax.axhline(0, color="k", linewidth=0.8)
    bottom, top = min(low.min(), 0), max(high.max(), 0)  # zero always shown, room for the labels
    pad = 0.12 * (top - bottom) + 0.5
    ax.set_ylim(bottom - pad, top + pad)
    ax.set_xticks(x, METRICS, rotation=30)
    ax.set_ylabel("difference (x100 points)")
    ax.set_title(f"{names[0]} - {names[1]}, 95% CI; {MAIN_METRIC}: {verdict(comparison)}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def plot_loss(path: Path, log_history: list[dict], objective: str, run_name: str,
              dev_history: list | None = None, selected_step: int | None = None, lora_scale: float = 1.0,
              monitor_history: list | None = None) -> None:
    """loss.png, panels sharing the step axis: training loss; development loss (its own panel: another loss, on
    other data, logged at other steps); development nDCG@10, the model-selection signal, with step 0 (the base)
    and the selected step marked, and the --monitor_data nDCG@10 beside it when there is one. Panels without data
    are left out (a run without development evaluation)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    series = {"training loss": [(h["step"], h["loss"]) for h in log_history if "loss" in h]}
    dev_keys = sorted({k for h in log_history for k in h if k.startswith("eval_") and k.endswith("loss")})
    dev_loss = {k: [(h["step"], h[k]) for h in log_history if k in h] for k in dev_keys}  # one per part
    panels = ["train"] + ["dev"] * bool(dev_loss) + ["ndcg"] * bool(dev_history)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 2.6 * len(panels)), sharex=True, squeeze=False)
    axes = dict(zip(panels, axes[:, 0]))
    _line(axes["train"], series["training loss"], "training loss", f"{objective} loss (training batches)", "C0")
    for i, (key, points) in enumerate(dev_loss.items()):
        part = key.removeprefix("eval_").removesuffix("loss").rstrip("_")  # eval_loss, or eval_<part>_loss
        _line(axes["dev"], points, f"development loss{' (' + part + ')' if part else ''}", "development loss",
              f"C{i + 1}", marker="o")
    if dev_history:
        _dev_ndcg_panel(axes["ndcg"], dev_history, selected_step, lora_scale, monitor_history)
    note = "" if dev_history else "\n(no model selection: the last step is saved)"
    fig.suptitle(f"{run_name}: objective {objective}{note}")
    last = axes[panels[-1]]
    last.set_xlabel("optimizer step")
    last.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _line(ax, points: list, label: str, ylabel: str, color: str, marker: str | None = None) -> None:
    if points:
        ax.plot(*zip(*points), marker=marker or ("o" if len(points) < 3 else None), color=color, label=label)
        ax.legend(loc="best")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _dev_ndcg_panel(ax, dev_history: list, selected_step: int | None, lora_scale: float,
                    monitor_history: list | None) -> None:
    """Development nDCG@10 (x100, the report's scale) by step; step 0 is the base model itself."""
    steps, scores = zip(*[(s, 100 * v) for s, v in dev_history])
    ax.plot(steps, scores, marker="o", color="C3", label="development nDCG@10")
    if monitor_history:
        ax.plot(*zip(*[(s, 100 * v) for s, v in monitor_history]), marker="s", color="C4",
                label="monitored nDCG@10 (never selected on)")
    if 0 in steps:
        ax.annotate("base (step 0)", (0, scores[steps.index(0)]), textcoords="offset points", xytext=(6, 6))
    if selected_step is not None:
        scale = f", adapter scale {lora_scale:g}" if lora_scale != 1.0 else ""
        ax.axvline(selected_step, color="k", linestyle="--", label=f"selected: step {selected_step}{scale}")
    ax.set_ylabel("nDCG@10 (x100)")
    ax.set_xlim(left=-0.5)  # step 0 at the edge would hide its marker
    ax.margins(y=0.15)  # room for the labels
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
