"""`python -m src.objectives`: every registered objective with what it trains on and its defaults, the one place the
`--objective`, `--learning_rate`, `--mnrl_scale` and `--lora_scales` help texts refer to."""

from src.objectives import OBJECTIVES
from src.objectives.base import LEARNING_RATE, LORA_SCALES, SCALE


def table() -> str:
    lines = ["| objective | trains on | reads | learning rate | scale | adapter scales tried | levers |",
             "|---|---|---|---|---|---|---|"]
    for spec in OBJECTIVES.values():
        scales = ", ".join(f"{s:g}" for s in spec.lora_scales) or "none"
        scale = f"{spec.scale:g}" if spec.in_batch_negatives else "-"
        lines.append(f"| {spec.name} | {spec.summary} | {'pairs' if spec.needs_pairs else 'documents'} | "
                     f"{spec.learning_rate:g} | {scale} | {scales} | {', '.join(spec.levers) or '-'} |")
    shared = ", ".join(f"{s:g}" for s in LORA_SCALES)
    lines.append(f"\nSeveral parts joined by '+': learning rate {LEARNING_RATE:g}, scale {SCALE:g}, adapter scales "
                 f"{shared}. The documents-alone default (`--objective auto`, lead) and `--adapt queries` train at "
                 f"their own scale (src/plan.py).")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
