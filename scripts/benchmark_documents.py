"""Adaptation from documents alone: every recipe on every development collection, against the base model.

    python -m scripts.benchmark_documents                              # the whole table (hours on 2 CPU cores)
    python -m scripts.benchmark_documents --collections ru_catalog_docs --recipes auto,ict
    python -m scripts.benchmark_documents --recipes auto-128,auto-hn1 --against auto-128   # + paired difference

Each recipe is the kit's own command (`python -m src.trainer`, one subprocess per run, so its peak memory is
its own) trained on a collection's documents alone (`data/dev/<name>/train.jsonl`: `_id` + `text`, no titles,
no queries), then its merged model is evaluated on the collection's held-out title -> document test pairs
(`test/`, or the bundled catalog test set), with the same evaluation code and bootstrap seed as
`python -m src.evaluation`. The peer recipe `st-lead` is what a user of plain sentence-transformers would do
instead: full fine-tuning as scripts.benchmark_peer trains its peer, on the kit's own lead pairs of as many
documents as the default trains (PEERS below), evaluated the same way. The base model is encoded once per
collection. Finished runs are reused (delete
a run folder to redo it), so the table can be built over several sessions.

Agreement of the development signal (what model selection sees) with the test: across all runs, the rank
correlation (Spearman) of the development gain (selected or final development nDCG@10 minus step 0's) with the
held-out test gain; with --monitor, each run also scores the test at every development evaluation
(`--monitor_data`, never selected on), and the rank correlation of development and test gains over every
evaluated checkpoint of every run is reported too. Writes results.json and results.md to --output_dir, with every
finished run found there (this invocation's and earlier ones'), and prints the table. Each run keeps its per-query
scores (per_query.json), so that two recipes can be compared paired over the same queries (`--against`): rows
compared only with the base cannot tell two recipes apart within a point or two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from scripts.peer import PEER, PEER_SCALES, peer_command, train_peer
from scripts.scoring import base_result, per_query
from src.config import EvalConfig
from src.metrics import MAIN_METRIC, compare, verdict
from src.retrieval_data import load_retrieval_data
from src.settings import comma_list

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / "data" / "dev"
TEST_FOLDERS = {"ru_catalog_docs": ROOT / "data" / "ru_catalog" / "test"}  # the rest: data/dev/<name>/test
# Recipe -> the trainer's options. "guard" = model selection on development pairs from held-out documents +
# the adapter-scale search (both on by default); "noguard" turns both off and keeps the last step.
NO_GUARD = ["--select_best", "false", "--lora_scales", ""]
EVERY_10 = ["--eval_steps", "10"]  # the recipes with model selection were measured evaluating every 10 steps
Q_BUDGET = ["--max_steps", "20", "--max_seq_length", "256", *NO_GUARD]  # the documents default's budget, by hand
T128 = ["--max_seq_length", "128"]  # the default of before: texts cut at 128 tokens
RECIPES = {
    "auto": [],  # the default command: on documents alone, 640 lead pairs (20 steps) of up to 256 tokens, scale 100
    "auto-top6": ["--lora_layers", "6"],  # ... with LoRA on the top 6 of e5-small's 12 layers alone (a faster step)
    "auto-top8": ["--lora_layers", "8"],  # ... on the top 8
    "auto-128": T128,  # ... of up to 128 tokens (the default before); the levers below were measured on it:
    "auto-320": ["--max_steps", "10", *T128],  # ... on half the pairs
    "auto-960": ["--max_steps", "30", *T128],  # ... on half as many again
    "auto-hn1": ["--hard_negatives", "1", *T128],  # ... each pair with one negative mined by the base model
    "auto-lr2": ["--learning_rate", "2e-4", *T128],  # ... at the learning rate of pairs (twice the default's 1e-4)
    "auto-b64": ["--batch_size", "64", *T128],  # ... in 10 batches of 64 (twice the in-batch negatives per query)
    "auto-rt10": ["--round_trip_top_k", "10", *T128],  # ... on documents whose lead finds them in the base's top 10
    "auto-320-s50": ["--max_steps", "10", "--mnrl_scale", "50", *T128],  # ... at the pairs' similarity scale
    "auto-320-s20": ["--max_steps", "10", "--mnrl_scale", "20", *T128],  # ... at sentence-transformers' (before)
    # the query side alone (--adapt queries): documents keep the base's embeddings, nothing is re-encoded
    "auto-q": ["--adapt", "queries"],  # the default's lead pairs (640, 256 tokens, scale 100) against stored documents
    "auto-q-1920": ["--adapt", "queries", "--max_steps", "60"],  # ... on three times the pairs (cheaper steps)
    "auto-q-lr2": ["--adapt", "queries", "--learning_rate", "2e-4"],  # ... at the learning rate of pairs
    "auto-qmap": ["--adapt", "queries+map"],  # ... with a linear map of the stored document vectors trained too
    # ... the same budget (20 steps of 32, 256 tokens, scale 100, no selection) with other pseudo-queries
    "auto-q-ict": ["--adapt", "queries", "--objective", "ict", *Q_BUDGET],  # a sentence of the document
    "auto-q-crop": ["--adapt", "queries", "--objective", "crop", *Q_BUDGET],  # a random span
    "auto-q-keys": ["--adapt", "queries", "--objective", "keys", *Q_BUDGET],  # its most distinctive words
    "auto-320-s20-rt10": ["--max_steps", "10", "--mnrl_scale", "20", "--round_trip_top_k", "10", *T128],
    # the budget of before (10 steps of 32, no selection) on keyword queries (scale 20, as other objectives)
    "keys-320": ["--objective", "keys", "--max_steps", "10", *NO_GUARD],
    "lead": ["--objective", "lead", *EVERY_10],  # one epoch, selected on crop pairs (the default before)
    "ict": ["--objective", "ict", *EVERY_10],
    "crop": ["--objective", "crop", *EVERY_10],
    "lead+anchor": ["--objective", "lead", "--anchor_weight", "1.0", *EVERY_10],
    "lead-noguard": ["--objective", "lead", *NO_GUARD],
    "lead+anchor-noguard": ["--objective", "lead", "--anchor_weight", "1.0", *NO_GUARD],  # the anchor alone
    "ict-noguard": ["--objective", "ict", *NO_GUARD],
    "tsdae": ["--objective", "tsdae", "--learning_rate", "2e-5", "--batch_size", "8", *EVERY_10],
    "simcse": ["--objective", "simcse", "--learning_rate", "2e-5", *EVERY_10],
}
# What a user of plain sentence-transformers would do instead, on the same documents: scripts.benchmark_peer's peer
# (full fine-tuning, MNRL at its scale 20, lr 5e-5, batch 32, length 128, 10% warm-up, e5 prompts) on the kit's own
# pairs (this construction) of as many documents as the default trains (DOCUMENTS_PAIRS, one epoch); st-lead-256: the
# same at the default's 256 tokens per text; st-lead-s50: at MNRL scale 50 (the catalog peer's best setting).
PEERS = {"st-lead": ("lead", 128, PEER_SCALES["peer"]), "st-lead-256": ("lead", 256, PEER_SCALES["peer"]),
         "st-lead-s50": ("lead", 128, PEER_SCALES["peer50"])}
NAMES = [*RECIPES, *PEERS]


def collections(names: str) -> list[str]:
    found = sorted(p.parent.name for p in DEV.glob("*/train.jsonl"))
    wanted = comma_list(names) or found
    unknown = [n for n in wanted if n not in found]
    if unknown:
        sys.exit(f"error: no collection '{unknown[0]}' in {DEV} (have: {', '.join(found)}); build them with "
                 f"python -m scripts.build_dev_collections")
    return wanted


def test_folder(collection: str) -> Path:
    return TEST_FOLDERS.get(collection, DEV / collection / "test")


def peer_pairs(collection: str, construction: str):
    """The kit's `construction` pairs of DOCUMENTS_PAIRS documents of the collection, drawn with the peer's seed
    (every document of a smaller file), as a dataset of (anchor, positive)."""
    import numpy as np
    from datasets import Dataset

    from src.document_pairs import DocumentPairs
    from src.plan import DOCUMENTS_PAIRS

    lines = (DEV / collection / "train.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    pairs = DocumentPairs(construction, PEER["seed"])
    chosen = np.random.default_rng(PEER["seed"]).permutation(len(texts))[:DOCUMENTS_PAIRS]
    drawn = [pairs(texts[i], int(i)) for i in chosen]
    return Dataset.from_dict({"anchor": [q for q, _ in drawn], "positive": [d for _, d in drawn]})


def train_peer_run(collection: str, recipe: str, folder: Path) -> None:
    """A peer recipe's training (its own process): the model in `folder`/model, its record in run.json."""
    folder.mkdir(parents=True, exist_ok=True)
    construction, length, scale = PEERS[recipe]
    # threads=0: as OMP_NUM_THREADS says
    record = train_peer(peer_pairs(collection, construction), folder, threads=0, max_seq_length=length, scale=scale)
    record["objective"] = f"{construction}, {peer_command(length, scale)}"
    (folder / "run.json").write_text(json.dumps(record, indent=2) + "\n")


def train_command(collection: str, recipe: str, folder: Path, monitor: bool) -> list[str]:
    if recipe in PEERS:
        return [sys.executable, "-m", "scripts.benchmark_documents", "--peer_run", recipe, "--collections",
                collection, "--output_dir", str(folder)]
    # the monitor needs model selection: the default (auto) and the recipes with --select_best false have none
    selects = "--select_best" not in RECIPES[recipe] and not recipe.startswith("auto")
    watch = ["--monitor_data", str(test_folder(collection))] if monitor and selects else []
    return [sys.executable, "-m", "src.trainer", "--train_file", str(DEV / collection / "train.jsonl"),
            "--eval_data", "", "--output_dir", str(folder), "--overwrite", *RECIPES[recipe], *watch]


def train(collection: str, recipe: str, folder: Path, monitor: bool) -> dict:
    """The kit's command (or a peer's training) for one recipe on one collection's documents; its run.json."""
    if not (folder / "run.json").exists():
        command = train_command(collection, recipe, folder, monitor)
        print(f"--- {collection} / {recipe}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads((folder / "run.json").read_text())


def run_result(recipe: str, folder: Path, data, cfg: EvalConfig) -> dict:
    """A finished run's per-query metrics (its saved model encoded once, for runs from before they were kept)."""
    return per_query(str(folder / ("model" if recipe in PEERS else "merged")), data, cfg, folder / "per_query.json")


def dev_gain(run: dict) -> float | None:
    """Development nDCG@10 of the shipped state minus the base's (step 0), as model selection saw them."""
    history = run.get("dev_ndcg@10_by_step") or []
    if not history:
        return None
    shipped = run["selected"]["dev_ndcg@10"] if run.get("selected") else history[-1][1]
    return shipped - history[0][1]


def checkpoint_gains(run: dict) -> list[tuple[float, float]]:
    """(development gain, monitored test gain) over step 0 at every evaluated checkpoint of a monitored run."""
    dev, test = dict(map(tuple, run.get("dev_ndcg@10_by_step") or [])), run.get("monitor_ndcg@10_by_step") or []
    test = dict(map(tuple, test))
    return [(dev[s] - dev[0], test[s] - test[0]) for s in sorted(set(dev) & set(test)) if s] if 0 in test else []


def row_command(collection: str, recipe: str) -> str:
    """The command a recipe's row reproduces: the kit's trainer with the recipe's options, or the peer's script."""
    if recipe in PEERS:
        return f"python -m scripts.benchmark_documents --recipes {recipe}"
    return " ".join(["python -m src.trainer --train_file", f"data/dev/{collection}/train.jsonl",
                     *(repr(a) if not a else a for a in RECIPES[recipe])])


def finished_row(folder: Path, command: str) -> dict | None:
    """A finished run's row, when it ran `command`; a run of other options under the recipe's name (a recipe or a
    default changed since) would put another run's scores in the table: a one-line error."""
    cache = folder / "benchmark_row.json"
    if not cache.exists():
        return None
    row = json.loads(cache.read_text())
    if row["command"] != command:
        sys.exit(f"error: {folder} holds a run of '{row['command']}', not of '{command}'; move or delete the folder "
                 f"to run the recipe as it is now")
    return row


def evaluate(collection: str, recipe: str, folder: Path, data, base, cfg: EvalConfig, monitor: bool) -> dict:
    command = row_command(collection, recipe)
    row = finished_row(folder, command)
    if row is not None:
        return row
    run = train(collection, recipe, folder, monitor)
    scores = run_result(recipe, folder, data, cfg)
    c = compare(scores, base, cfg.bootstrap_samples, seed=0)
    row = {"collection": collection, "recipe": recipe, "objective": run["objective"],
           "ndcg@10": 100 * float(scores[MAIN_METRIC].mean()), "base": 100 * float(base[MAIN_METRIC].mean()),
           "difference": 100 * c[MAIN_METRIC]["difference"], "ci95": [100 * x for x in c[MAIN_METRIC]["ci95"]],
           "p_value": c[MAIN_METRIC]["p_value"], "verdict": verdict(c), "train_seconds": run["train_seconds"],
           "total_seconds": run.get("total_seconds"),  # the whole command: loading, mining, training, saving
           "peak_memory_gb": run.get("peak_memory_gb"), "selected_step": (run.get("selected") or {}).get("step"),
           "steps": run["steps"], "lora_scale": run.get("lora_scale"), "dev_gain": dev_gain(run),
           "checkpoint_gains": [[100 * d, 100 * t] for d, t in checkpoint_gains(run)], "command": command}
    (folder / "benchmark_row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


PAIRED_HEADER = ["| collection | recipe | minus {against}, nDCG@10 [95% CI] | p | verdict |", "|---|---|---|---|---|"]


def paired_lines(collection: str, recipes: list[str], against: str, folder: Path, data, cfg: EvalConfig) -> list:
    """Each finished run of `recipes` minus `against`'s on one collection, paired over the same test queries: the
    interval of a difference between two recipes, which their separate comparisons with the base cannot give."""
    finished = [r for r in recipes if (folder / r / "benchmark_row.json").exists()]
    if against not in finished:
        return []
    reference = run_result(against, folder / against, data, cfg)
    lines = []
    for recipe in [r for r in finished if r != against]:
        c = compare(run_result(recipe, folder / recipe, data, cfg), reference, cfg.bootstrap_samples, seed=0)
        main = c[MAIN_METRIC]
        shown = interval(100 * main["difference"], [100 * x for x in main["ci95"]])
        lines.append(f"| {collection} | {recipe} | {shown} | {main['p_value']:.3f} | {verdict(c)} |")
    return lines


def finished_rows(out: Path) -> list[dict]:
    """Every finished run under `out`, this invocation's and earlier ones', so the table grows across sessions."""
    rows = [json.loads(p.read_text()) for p in out.glob("*/*/benchmark_row.json")]
    rows = [r for r in rows if r["recipe"] in NAMES]
    return sorted(rows, key=lambda r: (r["collection"], NAMES.index(r["recipe"])))


def spearman(points: list) -> tuple[float | None, int]:
    from scipy.stats import spearmanr

    if len(points) < 3:
        return None, len(points)
    return float(spearmanr(*zip(*points)).statistic), len(points)


def mean_difference(rows: list[dict]) -> str:
    """The mean of the collections' differences, with a 95% interval from theirs (normal approximation: each
    collection's bootstrap interval read as +-1.96 standard errors; the collections are independent)."""
    import math

    mean = sum(r["difference"] for r in rows) / len(rows)
    se = math.sqrt(sum(((r["ci95"][1] - r["ci95"][0]) / 3.92) ** 2 for r in rows)) / len(rows)
    return interval(mean, [mean - 1.96 * se, mean + 1.96 * se])


def interval(difference: float, ci95: list[float]) -> str:
    return f"{difference:+.2f} [{ci95[0]:+.2f}, {ci95[1]:+.2f}]"


def markdown(rows: list[dict], agreement: dict) -> str:
    lines = ["| collection | recipe | nDCG@10 | base | difference [95% CI] | verdict | selected step / steps | "
             "adapter scale | train s | run s | peak GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['collection']} | {r['recipe']} ({r['objective']}) | {r['ndcg@10']:.2f} | "
                     f"{r['base']:.2f} | "
                     f"{interval(r['difference'], r['ci95'])} | {r['verdict']} | "
                     f"{'last' if r['selected_step'] is None else r['selected_step']} / {r['steps']} | "
                     f"{r['lora_scale']} | {r['train_seconds']:.0f} | {r.get('total_seconds') or '-'} | "
                     f"{r['peak_memory_gb']} |")
    by_recipe = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    names = sorted({r["collection"] for r in rows})
    cell = {(r["recipe"], r["collection"]): interval(r["difference"], r["ci95"]) for r in rows}
    lines += ["", "| recipe | " + " | ".join(names) + " | mean difference [95% CI] | worst |",
              "|---" * (len(names) + 3) + "|"]
    lines += [f"| {k} | " + " | ".join(cell.get((k, n), "-") for n in names)
              + f" | {mean_difference(v)} ({len(v)}) | {min(r['difference'] for r in v):+.2f} |"
              for k, v in sorted(by_recipe.items(), key=lambda kv: NAMES.index(kv[0]))]
    for what, (rho, n) in agreement.items():
        lines += ["", f"Development gain vs test gain, Spearman rho over {n} {what}: "
                  + (f"{rho:+.2f}" if rho is not None else "n/a (fewer than 3)")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collections", default="", help="comma-separated names under data/dev/ ('' = all)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(NAMES)}")
    parser.add_argument("--output_dir", default="runs/bench-documents")
    parser.add_argument("--monitor", action="store_true", help="score the test at every development evaluation of "
                        "each run (slower), for the agreement over checkpoints")
    parser.add_argument("--against", choices=NAMES, help="also compare the recipes with this one, paired over "
                        "the same queries (paired-<recipe>.md; runs from before per-query scores were kept are "
                        "encoded again)")
    parser.add_argument("--peer_run", choices=list(PEERS), help=argparse.SUPPRESS)  # a peer's training process
    args = parser.parse_args()
    if args.peer_run:
        return train_peer_run(args.collections, args.peer_run, Path(args.output_dir))
    recipes = comma_list(args.recipes)
    unknown = [r for r in recipes if r not in NAMES]
    if unknown:
        sys.exit(f"error: unknown recipe '{unknown[0]}' (have: {', '.join(NAMES)})")
    out, cfg, pairs = ROOT / args.output_dir, EvalConfig(), []
    for collection in collections(args.collections):
        data = load_retrieval_data(str(test_folder(collection)))
        base = base_result(collection, data, cfg, out / collection)
        for recipe in recipes:
            row = evaluate(collection, recipe, out / collection / recipe, data, base, cfg, args.monitor)
            print(markdown([row], {}).splitlines()[2], flush=True)
        if args.against:
            pairs += paired_lines(collection, recipes, args.against, out / collection, data, cfg)
    rows = finished_rows(out)
    agreement = {"runs (shipped state)": spearman([(r["dev_gain"], r["difference"]) for r in rows
                                                   if r["dev_gain"] is not None]),
                 "checkpoints (monitored runs)": spearman([p for r in rows for p in r.get("checkpoint_gains", [])])}
    (out / "results.json").write_text(json.dumps({"rows": rows, "spearman_dev_vs_test": agreement}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, agreement))
    print(markdown(rows, agreement))
    if args.against:
        table = "\n".join([line.format(against=args.against) for line in PAIRED_HEADER] + pairs) + "\n"
        (out / f"paired-{args.against}.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
