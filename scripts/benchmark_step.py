"""Speed and peak memory of one catalog training step (mnrl on title -> description pairs), by precision and by how
many encoder layers gradient checkpointing recomputes: the figures behind `--checkpoint_every`.

    python -m scripts.benchmark_step                                   # nf4 and none x every layer, every other, none
    python -m scripts.benchmark_step --precisions nf4 --checkpoint_every 1,2 --threads 1 --steps 5

Each setting runs in a fresh subprocess (its peak resident memory, ru_maxrss, is its own: Python, torch and the
model included) on the bundled e5-small and the first batches of data/ru_catalog/train.jsonl (batch 32 pairs,
length 128, e5 prompts), with the kit's step: bf16 autocast where the CPU or GPU computes it natively, AdamW over
the LoRA weights, sentence-transformers' MultipleNegativesRankingLoss. The first step is not timed.
Results: a table on stdout, JSON + Markdown in --output_dir.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from src.settings import comma_list

BATCH = 32
TRAIN_FILE = "data/ru_catalog/train.jsonl"


def pair_batches(model, steps: int) -> list:
    """The first `steps` batches of catalog pairs, tokenized with the e5 prompts."""
    from src.tables import read_table

    rows = read_table(TRAIN_FILE).head(BATCH * steps)
    queries = ["query: " + t for t in rows["title"]]
    documents = ["passage: " + t for t in rows["description"]]
    return [[model.tokenize(queries[i:i + BATCH]), model.tokenize(documents[i:i + BATCH])]
            for i in range(0, BATCH * steps, BATCH)]


def measure_one(precision: str, every: int, steps: int) -> dict:
    """Build the kit's model, train `steps` steps, and time all but the first."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from src.config import ModelConfig
    from src.model_builder import bf16_enabled, build_model, pick_device

    device = pick_device("auto")
    model = build_model(ModelConfig(precision=precision), device, checkpoint_every=every).train()
    loss = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = []
    for features in pair_batches(model, steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16_enabled(device)):
            value = loss([{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()} for f in features],
                         None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"precision": precision, "checkpoint_every": every, "device": device,
            "s_per_step": round(sum(seconds[1:]) / max(1, len(seconds) - 1), 2), "peak_gb": round(peak, 2)}


def measure_in_child(precision: str, every: int, steps: int, threads: int) -> dict:
    command = [sys.executable, "-m", "scripts.benchmark_step", "--one", precision, str(every), str(steps),
               "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"precision": precision, "checkpoint_every": every, "error": result.stderr.strip().splitlines()[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| precision | layers recomputed | s/step | peak GB |", "|---|---|---|---|"]
    for r in rows:
        result = f"{r['s_per_step']} | {r['peak_gb']}" if "error" not in r else f"failed: {r['error']} |"
        layers = {0: "none", 1: "all"}.get(r["checkpoint_every"], f"1 in {r['checkpoint_every']}")
        lines.append(f"| {r['precision']} | {layers} | {result} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", default="nf4,none", help="comma-separated, of: nf4, none, full")
    parser.add_argument("--checkpoint_every", default="1,2,0", help="comma-separated; 0 = no checkpointing")
    parser.add_argument("--steps", type=int, default=5, help="training steps per setting (the first is not timed)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per setting (0 = torch's default)")
    parser.add_argument("--output_dir", default="runs/benchmark_step")
    parser.add_argument("--one", nargs=3, metavar=("PRECISION", "EVERY", "STEPS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    rows = [measure_in_child(p, int(e), args.steps, args.threads)
            for p in comma_list(args.precisions) for e in comma_list(args.checkpoint_every)]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
