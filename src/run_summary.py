"""What a run says when it ends: what it trained on, which state it kept, where it is saved, whether it helped."""

from __future__ import annotations

from pathlib import Path

from src.metrics import MAIN_METRIC, format_difference
from src.objectives import needs_pairs, needs_texts
from src.selection import DEV_HISTORY, DEV_SCORE


def training_counts(objective: str, texts: int, pairs: int, dev_texts: int, dev_pairs: int) -> str:
    """What the objective trains on, and the development data that selects the model. Counts of what it does not
    load are left out: '0 training texts' for a pairs objective would read as 'nothing to train on'."""
    trained = []
    if needs_texts(objective):
        trained.append(f"{texts} training texts")
    if needs_pairs(objective):
        trained.append(f"{pairs} training pairs")
    dev = (f"{dev_pairs} held-out pairs" if dev_pairs else f"{dev_texts} held-out texts" if dev_texts
           else "none, nothing held out")
    return f"{' and '.join(trained)}; development: {dev}"


VERDICT_WORDS = {"better": "better than the base model",
                 "worse": "WORSE than the base model: keep using the base model",
                 "not distinguishable": "not distinguishable from the base model: no measurable gain"}


def summary_lines(summary: dict, final: Path) -> list[str]:
    """The few lines that end a run, from run.json's summary: what was trained and kept, where it is, whether it
    helped, what it cost. `final` is the finished run folder (not the .partial one it was built in)."""
    auto = " (chosen by --objective auto)" if summary.get("objective_requested") == "auto" else ""
    counts = training_counts(summary["objective"], summary["train_texts"], summary["train_pairs"],
                             summary["dev_texts"], summary["dev_pairs"]).split(";")[0]
    lines = [f"objective {summary['objective']}{auto}: {counts}, {summary['steps']} steps",
             kept_line(summary), saved_line(final)]
    ev = summary.get("evaluation")
    if ev:
        c, base, adapted = ev[MAIN_METRIC], 100 * ev["base"][MAIN_METRIC], 100 * ev["adapted"][MAIN_METRIC]
        lines.append(f"held-out nDCG@10: base {base:.2f} -> adapted {adapted:.2f}, "
                     f"{format_difference(c, '95% CI ')}: {VERDICT_WORDS[ev['verdict']]}")
    else:
        lines.append("held-out evaluation: not run (no --eval_data)")
    memory = "GPU memory" if summary.get("device") == "cuda" else "resident memory"
    lines.append(f"time {duration(summary['total_seconds'])} in all ({duration(summary['train_seconds'])} training); "
                 f"peak {memory} {summary['peak_memory_gb']:.2f} GB (before evaluation)")
    return lines


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def kept_line(summary: dict) -> str:
    selected, scale = summary.get("selected"), summary.get("lora_scale", 1.0)
    if selected is None:
        return f"kept: the last step ({summary['steps']}), no model selection"
    if selected["step"] == 0:
        return f"kept: step 0, the base model unchanged (development nDCG@10 {100 * selected[DEV_SCORE]:.2f})"
    base = dict(map(tuple, summary.get(DEV_HISTORY) or [])).get(0)
    start = f"{100 * base:.2f} at step 0 -> " if base is not None else ""
    return (f"kept: step {selected['step']} (development nDCG@10 {start}{100 * selected[DEV_SCORE]:.2f}), "
            f"adapter scale {scale:g}")


def saved_line(final: Path) -> str:
    kinds = {"merged": "merged/ (standalone model)", "adapter": "adapter/ (LoRA adapter)"}
    if (final / "merged" / "router_config.json").exists():  # a query-side run (src/run_folder.py)
        kinds = {"merged": "merged/ (encode_query adapted, encode_document exactly the base: keep your index)",
                 "adapter": "adapter/ (the LoRA adapter: load it for queries only)"}
    return f"saved: {final}/ " + ", ".join(v for k, v in kinds.items() if (final / k).is_dir())
