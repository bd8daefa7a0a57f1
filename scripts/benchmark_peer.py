"""The kit against its peer: plain sentence-transformers fine-tuning of the same base model, on the same training
file, with the same prompts and the same evaluation, in one table with the paired difference kit - peer.

    python -m scripts.benchmark_peer                                   # ru and en: base, peer, qlora, kit
    python -m scripts.benchmark_peer --catalogs ru --systems base,peer,kit --threads 1
    python -m scripts.benchmark_peer --systems kit --kit_args "--lora_r 32" --tag r32   # one lever, its own row

Rows (systems), per catalog (data/<catalog>_catalog/train.jsonl: title -> description pairs):
    base        intfloat/multilingual-e5-small as it is, no training
    peer        plain sentence-transformers full fine-tuning, fp32, as its users run it: every row of train.jsonl
                as a (title, description) pair, e5 prompts (`query: ` on the title, `passage: ` on the
                description), MultipleNegativesRankingLoss (scale 20), learning rate 5e-5, 1 epoch, batch 32,
                max_seq_length 128, BatchSamplers.NO_DUPLICATES, warmup_ratio 0.1 (linear decay), seed 42
    peer50      the same at MNRL scale 50 (the kit's pairs scale; the peer's best setting on the catalogs)
    linear      what a user who keeps the base's index does instead of `--adapt queries`: a linear map of the
                base's query embeddings fitted against the stored descriptions (scripts/linear_peer.py)
    qlora       the kit's command with `--precision nf4`: 4-bit NF4 base + LoRA whatever the encoder's size
    kit         the kit's default command (`--precision auto`: for e5-small LoRA on the full-precision base, where
                4-bit saves nothing), with its model selection
`--kit_args` are added to the kit's command in the qlora and kit rows; `--tag NAME` names those rows (and
their folders) `<system>-NAME`, so a lever is measured beside the default rows.

Each training runs in its own subprocess, so its peak memory (ru_maxrss after saving the model: everything the
process held) is its own. 'training s' is the whole training process from loading the model to the saved model:
for the kit, run.json's total_seconds (model selection, merge and saving included; `--eval_data ''`, so no
evaluation inside); for the peer, the same span measured in its process. The training loop alone is in brackets.
Every model (the kit's merged/, the peer's saved folder) is then evaluated on data/<catalog>_catalog/test with
src.evaluation.evaluate_model, as `python -m src.evaluation` does (each model's own 512 tokens, flat index), and
compared with src.metrics.compare (paired bootstrap over queries, seed 0): each row against the base, and each
row after the peer against the peer ('kit - peer' = the row minus the peer). Finished rows are reused (delete a
row's folder to redo it), so the table accumulates across invocations. Writes results.json and results.md to
--output_dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from scripts.linear_peer import linear_command, train_linear_peer
from scripts.peer import PEER_SCALES, peer_command, peer_dataset, test_folder, train_file, train_peer
from scripts.scoring import base_result, model_result
from src.config import EvalConfig
from src.metrics import MAIN_METRIC, compare, format_p
from src.settings import comma_list

SYSTEMS = ("base", "peer", "peer50", "linear", "qlora", "kit")
PEERS = (*PEER_SCALES, "linear")  # the rows trained by a peer's own process (`--one`)
KIT_OPTIONS = {"qlora": ["--precision", "nf4"], "kit": []}  # the rows that run the kit's own command
# --------------------------------------------------------------------------------------------------------
# Training, one subprocess per row


def kit_command(catalog: str, system: str, folder: Path, threads: int, kit_args: str) -> list[str]:
    return ["-m", "src.trainer", "--train_file", str(train_file(catalog)), "--eval_data", "", "--output_dir",
            str(folder / "run"), "--threads", str(threads), *KIT_OPTIONS[system], *shlex.split(kit_args)]


def child_env(threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def train(catalog: str, system: str, folder: Path, threads: int, kit_args: str) -> tuple[dict, str, Path]:
    """Train one row in its own process (unless its record exists): (record, command, model folder)."""
    if system in PEERS:
        args = ["-m", "scripts.benchmark_peer", "--one", system, "--catalogs", catalog, "--output_dir",
                str(folder), "--threads", str(threads)]
        record, model = folder / "peer.json", folder / "model"
    else:
        args = kit_command(catalog, system, folder, threads, kit_args)
        record, model = folder / "run" / "run.json", folder / "run" / "merged"
    command = "python " + shlex.join(args)
    if not record.exists():
        print(f"--- {catalog} / {folder.name}: {command}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, *args], check=True, env=child_env(threads))
    run = json.loads(record.read_text())
    if system in PEER_SCALES:
        command = peer_command(scale=PEER_SCALES[system])
    elif system == "linear":
        command = linear_command()
    return run, command, model


# --------------------------------------------------------------------------------------------------------
# Evaluation, in this process


def evaluate(model_path: str, data, cfg: EvalConfig) -> tuple[dict, dict]:
    """The model's per-query metrics on `data`, as `python -m src.evaluation` computes them; how it was encoded."""
    started = time.time()
    result = model_result(model_path, data, cfg)
    return result["per_query"], {"eval_seconds": round(time.time() - started, 1),
                                 "eval_max_seq_length": result["max_seq_length"], "eval_prompts": result["prompts"]}


def base_row(catalog: str, data, cfg: EvalConfig, out: Path) -> dict:
    folder = out / catalog / "base"
    if not (folder / "row.json").exists():
        started = time.time()
        per_query = base_result(catalog, data, cfg, folder)
        save_row(folder, {"catalog": catalog, "row": "base", "system": "base", "command": "-",
                          "eval_seconds": round(time.time() - started, 1)}, per_query)
    return json.loads((folder / "row.json").read_text())


def save_row(folder: Path, row: dict, per_query: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    row[MAIN_METRIC] = 100 * float(per_query[MAIN_METRIC].mean())
    (folder / "per_query.json").write_text(json.dumps({m: v.tolist() for m, v in per_query.items()}) + "\n")
    (folder / "row.json").write_text(json.dumps(row, indent=2) + "\n")


def trained_row(catalog: str, system: str, name: str, data, cfg: EvalConfig, out: Path, args) -> dict:
    """Train (its own process) and evaluate one row, unless its folder already holds the result."""
    folder = out / catalog / name
    if not (folder / "row.json").exists():
        kit_args = args.kit_args if system in KIT_OPTIONS else ""
        run, command, model = train(catalog, system, folder, args.threads, kit_args)
        per_query, encoded = evaluate(str(model), data, cfg)
        save_row(folder, {"catalog": catalog, "row": name, "system": system, "command": command,
                          "kit_args": kit_args, "threads": args.threads, **encoded,
                          "training_seconds": run["total_seconds"], "train_loop_seconds": run["train_seconds"],
                          "peak_memory_gb": run["peak_memory_gb"], "steps": run["steps"],
                          "selected_step": (run.get("selected") or {}).get("step"),
                          "lora_scale": run.get("lora_scale")}, per_query)
    return json.loads((folder / "row.json").read_text())


# --------------------------------------------------------------------------------------------------------
# The table


def per_query(out: Path, row: dict) -> dict:
    import numpy as np

    path = out / row["catalog"] / row["row"] / "per_query.json"
    return {m: np.array(v) for m, v in json.loads(path.read_text()).items()}


def difference(candidate: dict, baseline: dict, samples: int) -> dict:
    c = compare(candidate, baseline, samples, seed=0)[MAIN_METRIC]
    return {"difference": 100 * c["difference"], "ci95": [100 * x for x in c["ci95"]], "p_value": c["p_value"]}


def order(name: str) -> tuple[int, str]:
    """Rows in SYSTEMS' order, a tagged row after its system's default row."""
    system = max((s for s in SYSTEMS if name == s or name.startswith(s + "-")), key=len, default=None)
    return (SYSTEMS.index(system) if system else len(SYSTEMS)), name


def finished_rows(out: Path, samples: int) -> list[dict]:
    """Every finished row under `out` (this invocation's and earlier ones'), with its paired differences against
    the base and against the peer of its catalog."""
    rows = sorted((json.loads(p.read_text()) for p in out.glob("*/*/row.json")),
                  key=lambda r: (r["catalog"], order(r["row"])))
    found = {(r["catalog"], r["row"]): per_query(out, r) for r in rows}
    for r in rows:
        mine = found[(r["catalog"], r["row"])]
        for other, key in (("base", "vs_base"), ("kit", "vs_kit"), ("peer", "vs_peer"), ("peer50", "vs_peer50"),
                           ("linear", "vs_linear")):
            if r["row"] not in ("base", other) and (r["catalog"], other) in found:
                r[key] = difference(mine, found[(r["catalog"], other)], samples)
    return rows


def cell(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['difference']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] p {format_p(d['p_value'])}"


def markdown(rows: list[dict]) -> str:
    lines = ["| catalog | system | nDCG@10 | vs base [95% CI] | - kit [95% CI] | - peer (scale 20) [95% CI] | "
             "- peer50 [95% CI] | - linear [95% CI] | training s (loop) | peak GB | command |", "|---" * 11 + "|"]
    for r in rows:
        seconds = (f"{r['training_seconds']:.0f} ({r['train_loop_seconds']:.0f})" if "training_seconds" in r
                   else "-")
        lines.append(f"| {r['catalog']} | {r['row']} | {r[MAIN_METRIC]:.2f} | {cell(r.get('vs_base'))} | "
                     f"{cell(r.get('vs_kit'))} | {cell(r.get('vs_peer'))} | {cell(r.get('vs_peer50'))} | "
                     f"{cell(r.get('vs_linear'))} | {seconds} | "
                     f"{r.get('peak_memory_gb', '-')} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--catalogs", default="ru,en", help="comma-separated, of: ru, en")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of: {', '.join(SYSTEMS)}")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per job (0 = torch's default)")
    parser.add_argument("--output_dir", default="runs/benchmark_peer")
    parser.add_argument("--kit_args", default="", help="extra options for the kit's command (qlora, kit rows), "
                        "e.g. --kit_args '--lora_r 32' (one word alone needs '=': --kit_args=--OPTION)")
    parser.add_argument("--tag", default="", help="names the qlora and kit rows <system>-TAG (needed with "
                        "--kit_args, so that a lever's rows do not take the default rows' places)")
    parser.add_argument("--one", choices=list(PEERS), help=argparse.SUPPRESS)  # a peer's own process
    args = parser.parse_args(argv)
    unknown = [s for s in comma_list(args.systems) if s not in SYSTEMS]
    unknown += [c for c in comma_list(args.catalogs) if not train_file(c).exists()]
    if unknown:
        parser.error(f"unknown system or catalog without {train_file('<catalog>')}: {unknown[0]}")
    if args.kit_args and not args.tag:
        parser.error("--kit_args needs --tag, a name for the rows it changes")
    return args


def row_name(system: str, tag: str) -> str:
    return f"{system}-{tag}" if tag and system in KIT_OPTIONS else system


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    if args.one:
        pairs = train_file(comma_list(args.catalogs)[0])
        if args.one == "linear":
            record = train_linear_peer(pairs, out, args.threads)
        else:
            record = train_peer(peer_dataset(pairs), out, args.threads, scale=PEER_SCALES[args.one])
        (out / "peer.json").write_text(json.dumps(record, indent=2) + "\n")
        return
    import torch

    from src.retrieval_data import load_retrieval_data

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EvalConfig()
    for catalog in comma_list(args.catalogs):
        data = load_retrieval_data(str(test_folder(catalog)))
        for system in comma_list(args.systems):
            if system == "base":
                base_row(catalog, data, cfg, out)
            else:
                trained_row(catalog, system, row_name(system, args.tag), data, cfg, out, args)
            print(markdown(finished_rows(out, cfg.bootstrap_samples)), flush=True)
    rows = finished_rows(out, cfg.bootstrap_samples)
    (out / "results.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
