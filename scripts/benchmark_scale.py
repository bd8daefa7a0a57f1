"""Large corpora: wall time and peak memory of the kit's default command on 1k, 10k and 100k documents alone.

    python -m scripts.benchmark_scale                        # build the corpora, then 1k, 10k, 100k: first + repeated
    python -m scripts.benchmark_scale --sizes 1000           # one size (a few minutes on one thread)
    python -m scripts.benchmark_scale --build_only           # only the corpora
    python -m scripts.benchmark_scale --reading --sizes 100000   # memory of merely reading the files, no model

Corpora (built once under <work>/corpora/n<N>/, reused while their build.json matches): from the Debian package
texts in --shared (../shared/data/debian_packages_en.jsonl and _ru.jsonl; provenance in its README.md), both
languages together. The held-out split is `holdout_split` of scripts.build_sample_data (seed 0): --queries test
items (500) among the packages whose description is unlike every other one (`near_duplicates`) and whose title
is unique; query = the package's title, relevant document = its own description. The same queries for every
size: only the corpus grows. Every package sharing a test item's Description-md5 (its translation in the other
language) is removed too. The training documents (`train.jsonl`: `_id`, `text`, no titles) are a seed-0
shuffle of one pool, each size a prefix of the next: every other distinct description (at least 3 words, line
breaks kept) PLUS, because the two files hold only ~63k distinct descriptions, the paragraphs of the
multi-paragraph descriptions as documents of their own (at least 15 words, distinct from every other document;
id `<description id>#<paragraph>`): a pool of 110,133 documents, 57-59% of them whole descriptions at every size
(build.json counts them; no generator is needed). Texts are deduplicated as the trainer does (cut at its
--max_chars, normalized), so it trains on exactly N. No paragraph of a test description is a training document,
and no other description shares half of a test description's 6-word shingles, so no training document (a
description or a part of one) contains a test document (checked on the normalized texts). The test folder
is BEIR-style (corpus.jsonl, queries.jsonl, qrels/test.tsv), its corpus = the test documents plus all N
training documents as distractors, like data/dev/*/ (data/dev/README.md).

Benchmark: per size, the kit's default command in a subprocess, twice:
    python -m src.trainer --train_file <N>/train.jsonl --eval_data <N>/test --output_dir <run> --threads 1
    (+ --index ivf from --index_from documents on, its recall against exact search reported; + --kit_args)
`first` runs with a fresh embedding cache (E5KIT_CACHE=<work>/cache/n<N>, its models/ linked to the kit's, its
embeddings/ deleted): the base's embeddings are computed; `repeated` reruns the command with that cache into a
new folder: they are read from it. Children run with OMP_NUM_THREADS=--threads and HF_HUB_OFFLINE=1, their output
in <work>/runs/<run>.log. Finished rows are reused (--rerun redoes them); results.json and results.md in <work>
hold every finished row.

Columns:
    documents           training documents N (the test corpus holds N + the test documents)
    run                 first (base embeddings computed) or repeated (read from the cache), and the --tag
    wall s              the whole command, process start to exit (time.perf_counter around the child)
    training s          run.json train_seconds (the training loop) and its optimizer steps
    peak GB (process)   the child's own peak resident memory (os.wait4 rusage ru_maxrss: reading, training, merging,
                        evaluation); in brackets run.json peak_memory_gb (the same, before evaluation)
    base embeddings     the base model's documents embeddings in metrics.json: computed, or read from the cache
    nDCG@10             held-out nDCG@10 x100 of the base and the adapted (merged) model
    index               the FAISS index; for an approximate one, its recall@10 against exact (base / adapted)
    command             the command run (paths relative to the repository root)
`--reading` measures, per size, a child that only reads the files as the trainer does (src.tables.read_table +
src.create_dataset.load_training_data, then src.retrieval_data.load_retrieval_data of the test folder): peak
resident memory after the imports, after the training file, after the test folder (<work>/corpora/n<N>/reading.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scripts.build_sample_data import holdout_split
from src.config import DataConfig, comma_list
from src.errors import KitError, run_cli
from src.preprocess import clean_text
from src.retrieval_data import RetrievalData, save_beir
from src.tables import read_table, write_table
from src.text import count_words, normalized_key

ROOT = Path(__file__).resolve().parent.parent
FILES = {"en": "debian_packages_en.jsonl", "ru": "debian_packages_ru.jsonl"}
SEED = 0
MIN_WORDS = 3  # the trainer's --min_words default: every training document is kept by the trainer
MIN_PARAGRAPH_WORDS = 15  # a paragraph as a document of its own: as data/dev's shortest bodies
MAX_CHARS = DataConfig().max_chars  # the trainer cuts texts here before deduplicating: so does the pool
RUNS = ("first", "repeated")
GB = 2**20  # ru_maxrss is in KiB on Linux


# --------------------------------------------------------------------------------------------------------
# Corpora


def read_items(shared: Path) -> pd.DataFrame:
    """Both files' packages with a non-empty title and description; `doc_id` = `<lang>:<package>` (unique)."""
    frames = [read_table(shared / name).assign(lang=lang) for lang, name in FILES.items()]
    frame = pd.concat(frames, ignore_index=True)
    usable = (frame["title"].map(clean_text) != "") & (frame["description"].map(clean_text) != "")
    frame = frame[usable].reset_index(drop=True)  # holdout_split's own filter then keeps every row: same index
    ids = frame["lang"] + ":" + frame["id"].astype(str)
    repeated = ids.duplicated(keep=False)
    return frame.assign(doc_id=ids.where(~repeated, ids + "~" + frame.index.astype(str)))


def hold_out(frame: pd.DataFrame, n_queries: int) -> tuple[np.ndarray, RetrievalData]:
    """The test items (rows of `frame`) and their queries, documents and qrels, by holdout_split's rules."""
    _, split = holdout_split(frame, "title", "description", n_queries, SEED)
    rows = np.array(sorted(int(q[1:]) for q in split.queries))
    ids = frame["doc_id"]
    queries = {f"q-{ids[i]}": split.queries[f"q{i}"] for i in rows}
    corpus = {ids[i]: split.corpus[f"d{i}"] for i in rows}
    qrels = {f"q-{ids[i]}": {ids[i]: 1} for i in rows}
    return rows, RetrievalData(queries, corpus, qrels, source="benchmark_scale")


def lines(text: str) -> list[str]:
    return clean_text(text, keep_lines=True).split("\n")


def document_pool(frame: pd.DataFrame, test_rows: np.ndarray) -> list[tuple[str, str]]:
    """(id, text) of every possible training document, shuffled (seed 0): distinct descriptions, then their
    paragraphs; nothing of a test item or of its translation."""
    held = set(frame["md5"].iloc[test_rows])
    seen = {normalized_key(t) for i in test_rows for t in [clean_text(frame["description"][i]),
                                                              *lines(frame["description"][i])]}
    whole = []
    for doc_id, md5, description in zip(frame["doc_id"], frame["md5"], frame["description"]):
        text = clean_text(description, keep_lines=True)
        key = normalized_key(text[:MAX_CHARS])
        if md5 not in held and key not in seen and count_words(text) >= MIN_WORDS:
            seen.add(key)
            whole.append((doc_id, text))
    parts = []
    for doc_id, text in whole:
        paragraphs = text.split("\n")
        for number, paragraph in enumerate(paragraphs if len(paragraphs) > 1 else [], 1):
            key = normalized_key(paragraph[:MAX_CHARS])
            if count_words(paragraph) >= MIN_PARAGRAPH_WORDS and key not in seen:
                seen.add(key)
                parts.append((f"{doc_id}#{number}", paragraph))
    pool = whole + parts
    return [pool[j] for j in np.random.default_rng(SEED).permutation(len(pool))]


def check_no_leak(pool: list[tuple[str, str]], test: RetrievalData) -> None:
    """No test document occurs in a training document (normalized text, as a substring), as data/dev checks."""
    joined = "\n".join(normalized_key(text) for _, text in pool)
    leaked = next((doc_id for doc_id, text in test.corpus.items() if normalized_key(text) in joined), None)
    if leaked is not None:
        raise KitError(f"test document {leaked} occurs in a training document: the split is broken")


def build_settings(size: int, n_queries: int) -> dict:
    return {"documents": size, "test_queries": n_queries, "seed": SEED, "min_words": MIN_WORDS,
            "min_paragraph_words": MIN_PARAGRAPH_WORDS, "max_chars": MAX_CHARS, "sources": list(FILES.values())}


def corpus_folder(work: Path, size: int) -> Path:
    return work / "corpora" / f"n{size}"


def is_built(folder: Path, settings: dict) -> bool:
    record = folder / "build.json"
    return record.exists() and json.loads(record.read_text())["settings"] == settings


def write_collection(folder: Path, docs: list[tuple[str, str]], test: RetrievalData, settings: dict) -> dict:
    """train.jsonl, test/ (the test documents + every training document) and build.json of one size."""
    write_table(pd.DataFrame(docs, columns=["_id", "text"]), folder / "train.jsonl")
    corpus = {**dict(docs), **test.corpus}
    save_beir(RetrievalData(test.queries, corpus, test.qrels, source=str(folder)).validate(), folder / "test")
    paragraphs = sum("#" in doc_id for doc_id, _ in docs)
    record = {"settings": settings, "training_documents": len(docs), "descriptions": len(docs) - paragraphs,
              "paragraphs": paragraphs, "test_queries": len(test.queries), "test_corpus": len(corpus),
              "russian_queries": sum(q.startswith("q-ru:") for q in test.queries),
              "mean_words_per_document": round(float(np.mean([len(t.split()) for _, t in docs])), 1)}
    (folder / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def build_corpora(shared: Path, work: Path, sizes: list[int], n_queries: int) -> None:
    """Every size not built yet with these settings (the split and pool are computed once for all of them)."""
    missing = [s for s in sizes if not is_built(corpus_folder(work, s), build_settings(s, n_queries))]
    if not missing:
        return
    print(f"building corpora of {', '.join(map(str, missing))} documents from {shared}", flush=True)
    frame = read_items(shared)
    test_rows, test = hold_out(frame, n_queries)
    pool = document_pool(frame, test_rows)
    check_no_leak(pool, test)
    print(f"  pool: {len(pool)} documents", flush=True)
    if max(missing) > len(pool):
        raise KitError(f"the Debian texts give {len(pool)} documents (descriptions and paragraphs), fewer than "
                       f"{max(missing)}: choose smaller --sizes")
    for size in missing:
        record = write_collection(corpus_folder(work, size), pool[:size], test, build_settings(size, n_queries))
        print(f"  n{size}: {json.dumps({k: v for k, v in record.items() if k != 'settings'})}", flush=True)


# --------------------------------------------------------------------------------------------------------
# Runs


def shown(path: Path) -> str:
    """A path as the command shows it: relative to the repository root where it lies under it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def trainer_args(corpus: Path, out: Path, size: int, args) -> list[str]:
    command = ["-m", "src.trainer", "--train_file", shown(corpus / "train.jsonl"), "--eval_data",
               shown(corpus / "test"), "--output_dir", shown(out), "--threads", str(args.threads)]
    return command + (["--index", args.index] if size >= args.index_from else []) + shlex.split(args.kit_args)


def child_env(cache: Path, threads: int) -> dict:
    """The children's environment: one kit cache per size (its models/ linked to the kit's models), threads."""
    from src.provision import cache_root

    models = cache_root().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(models, target_is_directory=True)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "E5KIT_CACHE": str(cache), "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads)}


def run_child(args: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run `python <args>` from the repository root: (wall seconds, the child's own peak resident GB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as fh:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if proc.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise KitError(f"python {shlex.join(args)} failed (exit {proc.returncode}); {log}: {' / '.join(tail)}")
    return wall, usage.ru_maxrss / GB


def run_record(out: Path) -> dict:
    """What the run says of itself: run.json and evaluation/metrics.json."""
    run = json.loads((out / "run.json").read_text())
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    models = metrics["models"]
    return {"train_texts": run["train_texts"], "steps": run["steps"], "train_seconds": run["train_seconds"],
            "total_seconds": run["total_seconds"], "peak_memory_gb_before_evaluation": run["peak_memory_gb"],
            "test_queries": metrics["data"]["queries"], "test_documents": metrics["data"]["documents"],
            "index": metrics["settings"]["index"],
            "embeddings": {name: m["embeddings"] for name, m in models.items()},
            "documents_per_second": {name: m["documents_per_second"] for name, m in models.items()},
            "ndcg@10": {name: m["metrics"]["ndcg@10"] for name, m in models.items()},
            "index_recall@10_vs_exact": {name: m.get("index_recall@10_vs_exact") for name, m in models.items()},
            "verdict": metrics["comparison"]["verdict"]}


def benchmark_run(work: Path, size: int, run: str, args) -> dict:
    """One run of the default command (its row is reused unless --rerun): the row of the table."""
    out = work / "runs" / (f"n{size}-{run}" + (f"-{args.tag}" if args.tag else ""))
    if (out / "benchmark_row.json").exists() and not args.rerun:
        return json.loads((out / "benchmark_row.json").read_text())
    cache = work / "cache" / f"n{size}"
    if run == "first":
        shutil.rmtree(cache / "embeddings", ignore_errors=True)
    for folder in (out, out.with_name(out.name + ".partial")):
        shutil.rmtree(folder, ignore_errors=True)
    command = trainer_args(corpus_folder(work, size), out, size, args)
    print(f"--- n{size} {run}: python {shlex.join(command)}", flush=True)
    wall, peak = run_child(command, child_env(cache, args.threads), out.with_name(out.name + ".log"))
    row = {"documents": size, "run": run, "tag": args.tag, "wall_seconds": round(wall, 1),
           "peak_gb_process": round(peak, 2), **run_record(out), "threads": args.threads,
           "command": "python " + shlex.join(command)}
    (out / "benchmark_row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


# --------------------------------------------------------------------------------------------------------
# Reading alone


def rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GB, 3)


def read_check(corpus: Path) -> None:
    """In a child (`--read_check`): read the files as the trainer does, print the peak RSS after each stage."""
    from src.config import DataConfig, TrainConfig
    from src.create_dataset import load_training_data
    from src.retrieval_data import load_retrieval_data

    settings = DataConfig(train_file=str(corpus / "train.jsonl"))
    imports = rss_gb()
    started = time.perf_counter()
    frame = read_table(settings.train_file, settings.text_column)
    data = load_training_data(settings, TrainConfig().seed, True, False, frame, 0.0)
    read_train, seconds = rss_gb(), time.perf_counter() - started
    del frame
    test = load_retrieval_data(str(corpus / "test"))
    print(json.dumps({"train_texts": len(data.texts), "test_documents": len(test.corpus),
                      "peak_gb_after_imports": imports, "peak_gb_after_training_file": read_train,
                      "training_file_seconds": round(seconds, 1), "peak_gb_after_test_folder": rss_gb()}))


def reading_memory(work: Path, size: int, threads: int) -> dict:
    corpus = corpus_folder(work, size)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-m", "scripts.benchmark_scale", "--read_check", str(corpus)],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    record = {"documents": size, **json.loads(result.stdout.strip().splitlines()[-1])}
    (corpus / "reading.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# --------------------------------------------------------------------------------------------------------
# The table


HEADER = ("| documents | run | wall s | training s | peak GB (process) | base embeddings | nDCG@10 base -> adapted "
          "| index (recall@10 vs exact) | command |")


def table_line(r: dict) -> str:
    emb = r["embeddings"]["base"]
    base = emb["documents"] if emb["documents"] == emb["queries"] else f"documents {emb['documents']}, " \
                                                                       f"queries {emb['queries']}"
    recall = r["index_recall@10_vs_exact"]
    index = (f"{r['index']} ({recall['base']:.3f} / {recall['adapted']:.3f})" if r["index"] != "flat"
             else "flat (exact)")
    ndcg = r["ndcg@10"]
    run = r["run"] + (f" ({r['tag']})" if r.get("tag") else "")
    return (f"| {r['documents']:,} | {run} | {r['wall_seconds']:.0f} | {r['train_seconds']:.0f} "
            f"({r['steps']} steps) | {r['peak_gb_process']:.2f} ({r['peak_memory_gb_before_evaluation']:.2f}) | "
            f"{base} | {100 * ndcg['base']:.2f} -> {100 * ndcg['adapted']:.2f} | {index} | `{r['command']}` |")


def reading_lines(records: list[dict]) -> list[str]:
    if not records:
        return []
    lines_ = ["", "Reading alone (read_table + load_training_data, then load_retrieval_data of test/), peak RSS GB:",
              "", "| documents | after imports | after the training file (s) | after the test folder |",
              "|---|---|---|---|"]
    return lines_ + [f"| {r['documents']:,} | {r['peak_gb_after_imports']:.2f} | "
                     f"{r['peak_gb_after_training_file']:.2f} ({r['training_file_seconds']:.0f} s) | "
                     f"{r['peak_gb_after_test_folder']:.2f} |" for r in records]


def write_results(work: Path) -> str:
    """results.json and results.md from every finished row and reading check under `work`; the Markdown."""
    rows = [json.loads(p.read_text()) for p in (work / "runs").glob("n*-*/benchmark_row.json")]
    rows.sort(key=lambda r: (r["documents"], r.get("tag", ""), RUNS.index(r["run"])))
    reading = sorted((json.loads(p.read_text()) for p in (work / "corpora").glob("n*/reading.json")),
                     key=lambda r: r["documents"])
    builds = {p.parent.name: json.loads(p.read_text()) for p in (work / "corpora").glob("n*/build.json")}
    (work / "results.json").write_text(json.dumps({"rows": rows, "reading": reading, "corpora": builds,
                                                   "cpus": os.cpu_count()}, indent=2) + "\n")
    table = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"] + [table_line(r) for r in rows] if rows else []
    text = "\n".join(table + reading_lines(reading)) + "\n"
    (work / "results.md").write_text(text)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--sizes", default="1000,10000,100000", help="training documents per corpus, comma-separated")
    parser.add_argument("--work", default="runs/benchmark_scale", help="corpora, runs, cache, results (relative: "
                        "to the repository root)")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="the Debian package texts")
    parser.add_argument("--queries", type=int, default=500, help="test queries, the same for every size")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each child")
    parser.add_argument("--index", choices=["ivf", "hnsw"], default="ivf", help="approximate FAISS index ...")
    parser.add_argument("--index_from", type=int, default=100_000, help="... used from this many documents on")
    parser.add_argument("--build_only", action="store_true", help="build the corpora, run nothing")
    parser.add_argument("--reading", action="store_true", help="measure reading the files (no model), no runs")
    parser.add_argument("--rerun", action="store_true", help="redo finished runs instead of reusing their rows")
    parser.add_argument("--kit_args", default="", help="options added to the kit's command (needs --tag)")
    parser.add_argument("--tag", default="", help="names the rows (and run folders) of --kit_args")
    parser.add_argument("--read_check", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kit_args and not args.tag:
        parser.error("--kit_args needs --tag, a name for the rows it runs")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.read_check:
        return read_check(Path(args.read_check))
    work = Path(args.work) if Path(args.work).is_absolute() else ROOT / args.work
    sizes = sorted(int(s) for s in comma_list(args.sizes))
    build_corpora(Path(args.shared), work, sizes, args.queries)
    for size in sizes:
        if args.reading:
            print(json.dumps(reading_memory(work, size, args.threads)), flush=True)
        elif not args.build_only:
            for run in RUNS:
                print(table_line(benchmark_run(work, size, run, args)), flush=True)
    if not args.build_only:
        print(write_results(work))


if __name__ == "__main__":
    run_cli(main)
