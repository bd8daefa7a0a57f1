"""Retrieval evaluation that tells the truth: every query searched against the whole collection with FAISS.

    python -m src.evaluation --model runs/e5-small-ru/merged --baseline intfloat/multilingual-e5-small \
        --eval_data data/ru_catalog/test --output_dir runs/e5-small-ru/evaluation

Metrics per query (graded relevance, several relevant documents allowed): nDCG@10, MRR@10, MAP@100,
Recall@1/5/10/100. Two models are compared on the same queries: differences with 95% paired-bootstrap
confidence intervals, a paired randomization test, and a verdict in words (computed in src/metrics.py). Writes
metrics.json, report.md and metrics.png (src/plots.py). The mean cosine of random pairs is reported only as an
anisotropy diagnostic. Embeddings of models that the evaluation does not change are read from, or stored in, the
kit's cache (src/embedding_cache.py; --no_cache turns it off); metrics.json says, per model, which were read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from src.cli import parse_groups
from src.config import EvalConfig, EvaluationArguments
from src.embedding_cache import EmbeddingCache
from src.errors import KitError, first_line, run_cli
from src.metrics import DEPTH, MAIN_METRIC, METRICS, compare, format_difference, format_p, score_rankings, verdict
from src.plots import plot_metrics
from src.retrieval_data import RetrievalData, load_retrieval_data

logger = logging.getLogger(__name__)
# FAISS trains IVF centroids by k-means and warns below 39 training points per centroid (faiss/Clustering.h):
# fewer lists on a small collection, rather than centroids fitted to a handful of documents.
IVF_MIN_POINTS_PER_LIST = 39


# --------------------------------------------------------------------------------------------------------
# Encoding and search


def encoding_bf16(model, setting: str) -> bool:
    """Whether to encode under bf16 autocast: as training decides (`setting` auto: where bf16 is native), and
    never across several GPUs, whose worker processes this process's autocast does not reach."""
    from src.model_builder import bf16_enabled

    return bf16_enabled(model.device.type, setting) and encoding_devices() is None


def encode(model, texts: list[str], prompt_name: str | None, batch_size: int,
           cache: EmbeddingCache | None = None, bf16: bool = False) -> tuple[np.ndarray, float | None]:
    """Normalized float32 embeddings (sentence-transformers sorts by length and batches) and texts/second: read
    from `cache` where it holds them (the speed is then None), else computed (and stored there)."""
    import torch

    if cache is not None and (emb := cache.load(texts, prompt_name)) is not None:
        return emb, None
    started = time.perf_counter()
    with torch.autocast(model.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        emb = model.encode(texts, prompt_name=prompt_name, batch_size=batch_size, show_progress_bar=True,
                           convert_to_numpy=True, normalize_embeddings=True, device=encoding_devices())
    emb = emb.astype(np.float32, copy=False)
    rate = len(texts) / max(time.perf_counter() - started, 1e-9)
    if cache is not None:
        cache.store(texts, prompt_name, emb)
    return emb, rate


def build_index(doc_emb: np.ndarray, kind: str):
    import faiss

    dim = doc_emb.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:  # ivf: about 4*sqrt(N) lists, searched 1/8 of them at a time
        nlist = max(1, min(int(4 * np.sqrt(len(doc_emb))), len(doc_emb) // IVF_MIN_POINTS_PER_LIST))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(doc_emb)
        index.nprobe = max(1, nlist // 8)
    index.add(doc_emb)
    return index


def search(doc_emb: np.ndarray, query_emb: np.ndarray, kind: str, k: int = DEPTH) -> np.ndarray:
    """Top-k document row numbers per query (-1 where fewer exist)."""
    return build_index(doc_emb, kind).search(query_emb, min(k, len(doc_emb)))[1]


def approximate_recall(top: np.ndarray, doc_emb, query_emb, k: int = 10) -> float:
    """Share of the exact top-k that the approximate ranking `top` (the search already run) also returns."""
    exact = search(doc_emb, query_emb, "flat", k)
    return float(np.mean([len(set(a[:k]) & set(e)) / len(e) for a, e in zip(top, exact)]))


def anisotropy(doc_emb: np.ndarray, pairs: int = 2000, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    i, j = rng.integers(len(doc_emb), size=(2, pairs))
    cos = (doc_emb[i] * doc_emb[j]).sum(1)[i != j]
    return {"mean": round(float(cos.mean()), 4), "std": round(float(cos.std()), 4)}


def prompt_names(model) -> tuple[str | None, str | None]:
    prompts = model.prompts or {}
    return ("query" if "query" in prompts else None), ("passage" if "passage" in prompts else None)


def evaluate_model(model, data: RetrievalData, cfg: EvalConfig, use_prompts: bool = True,
                   cache: EmbeddingCache | None = None) -> dict:
    """Encode (or read from `cache`), search, score: per-query metrics, means, throughput (None where the
    documents' embeddings were read from the cache), and diagnostics for one model."""
    query_prompt, doc_prompt = prompt_names(model) if use_prompts else (None, None)
    doc_ids, query_ids = list(data.corpus), sorted(data.qrels)
    bf16 = cache.bf16 if cache is not None else encoding_bf16(model, cfg.eval_bf16)  # encoded as its key says
    doc_emb, doc_rate = encode(model, [data.corpus[d] for d in doc_ids], doc_prompt, cfg.eval_batch_size, cache,
                               bf16)
    query_emb, query_rate = encode(model, [data.queries[q] for q in query_ids], query_prompt, cfg.eval_batch_size,
                                   cache, bf16)
    top = search(doc_emb, query_emb, cfg.index)
    rankings = {q: [doc_ids[i] for i in row if i >= 0] for q, row in zip(query_ids, top)}
    per_query = score_rankings(rankings, data.qrels)
    result = {"metrics": {m: float(v.mean()) for m, v in per_query.items()}, "per_query": per_query,
              "documents_per_second": None if doc_rate is None else round(doc_rate, 1),
              "embeddings": {part: "cache" if rate is None else "computed"
                             for part, rate in (("documents", doc_rate), ("queries", query_rate))},
              "prompts": [query_prompt, doc_prompt], "bf16_autocast": bf16,
              "max_seq_length": model.max_seq_length,
              "anisotropy_diagnostic": anisotropy(doc_emb)}
    if cfg.index != "flat":
        result["index_recall@10_vs_exact"] = approximate_recall(top, doc_emb, query_emb)
    return result


# --------------------------------------------------------------------------------------------------------
# Reports


def _fmt(x: float) -> str:
    return f"{100 * x:.2f}"


def write_reports(results: dict[str, dict], comparison: dict | None, data: RetrievalData, settings: dict,
                  folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(results)
    summary = {"data": data.describe(), "settings": settings,
               "models": {n: {k: v for k, v in r.items() if k != "per_query"} for n, r in results.items()}}
    if comparison:
        summary["comparison"] = {"candidate": names[0], "baseline": names[1], "metrics": comparison,
                                 "verdict": verdict(comparison)}
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(markdown_report(summary), encoding="utf-8")
    d = summary["data"]
    plot_metrics(results, folder / "metrics.png", comparison,
                 f"{d['source']}: {d['queries']} queries, {d['documents']} documents")
    return summary


def markdown_report(summary: dict) -> str:
    models, d = summary["models"], summary["data"]
    names = list(models)
    lines = ["# Retrieval evaluation", "",
             f"Data: `{d['source']}`: {d['queries']} queries, {d['documents']} documents, "
             f"{d['relevant_per_query']} relevant per query; every query searched against the whole collection "
             f"({summary['settings']['index']} FAISS index). " + " ".join(d["notes"]), "",
             "| metric (x100) | " + " | ".join(names)
             + (" | difference [95% CI] | p |" if "comparison" in summary else " |"),
             "|---|" + "---|" * len(names) + ("---|---|" if "comparison" in summary else "")]
    for m in METRICS:
        row = f"| {m} | " + " | ".join(_fmt(models[n]["metrics"][m]) for n in names) + " |"
        if "comparison" in summary:
            c = summary["comparison"]["metrics"][m]
            row += f" {format_difference(c)} | {format_p(c['p_value'])} |"
        lines.append(row)
    lines.append("")
    if "comparison" in summary:
        comp = summary["comparison"]
        v = comp["verdict"]
        lines += [f"**Verdict on {MAIN_METRIC}: {comp['candidate']} is {v} than {comp['baseline']}**"
                  if v != "not distinguishable" else
                  f"**Verdict on {MAIN_METRIC}: {comp['candidate']} and {comp['baseline']} are not distinguishable**",
                  "", "(95% paired bootstrap over queries; two-sided paired randomization test, alpha 0.05.)", ""]
        if v != "better":
            lines += ["WARNING: the adapted model is not better than the base model on these held-out pairs. "
                      "Keep using the base model, or change the recipe.", ""]
    lines += ["| model | max tokens | documents/s (encoding) | prompts (query, document) | "
              "random-pair cosine mean ± std* |",
              "|---|---|---|---|---|"]
    for n in names:
        r = models[n]
        a = r["anisotropy_diagnostic"]
        speed = "cached" if r.get("documents_per_second") is None else r["documents_per_second"]
        lines.append(f"| {n} | {r['max_seq_length']} | {speed} | {r['prompts']} | "
                     f"{a['mean']} ± {a['std']} |")
    lines += ["", "*Mean cosine of random document pairs is a diagnostic of anisotropy (how crowded the "
              "embedding space is), not a measure of retrieval quality.", "",
              "Settings: `" + json.dumps(summary["settings"], ensure_ascii=False) + "`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Entry points


def encoding_devices() -> list[str] | None:
    """Every GPU when there are several (sentence-transformers then encodes with one process per GPU); else None:
    the model's own device (on CPU, with the threads torch is given)."""
    import torch

    count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(count)] if count > 1 else None


def load_model(name_or_path: str, device: str | None = None):
    """A model for encoding, on the GPU when there is one (`device` None), with e5's document prompt."""
    from sentence_transformers import SentenceTransformer

    from src.provision import e5_document_prompt, resolve_model

    path = resolve_model(name_or_path)
    try:
        return e5_document_prompt(SentenceTransformer(str(path), device=device))
    except (OSError, ValueError) as exc:
        raise KitError(f"model {path}: cannot load as a sentence-transformers model "
                       f"({first_line(exc)})") from exc


def evaluate_named(name: str, path: str, data: RetrievalData, cfg: EvalConfig, cached: bool) -> dict:
    """Load one model as every compared model is configured, and evaluate it (through the cache if `cached`)."""
    from src.provision import resolve_model

    logger.info("encoding with %s (%s)", name, path)
    folder = resolve_model(path)
    model = load_model(str(folder))
    if cfg.eval_max_seq_length:
        model.max_seq_length = cfg.eval_max_seq_length
    cache = (EmbeddingCache(model, folder, cfg.eval_batch_size, encoding_bf16(model, cfg.eval_bf16))
             if cached and not cfg.no_cache else None)
    return evaluate_model(model, data, cfg, cache=cache)


def run_evaluation(models: dict[str, str], cfg: EvalConfig, folder: Path, seed: int = EvaluationArguments.seed,
                   data: RetrievalData | None = None, report_paths: dict[str, str] | None = None,
                   cached: set[str] | None = None) -> dict:
    """Evaluate named models (first = candidate, second = baseline) and write the reports into `folder`. `data`:
    already loaded evaluation data (else read from cfg.eval_data); `report_paths`: how the report names the
    models, where they will not stay where they are evaluated; `cached`: the models whose embeddings may be
    read from and stored in the kit's cache (None = all; cfg.no_cache = none)."""
    if data is None:
        data = load_retrieval_data(cfg.eval_data, cfg.query_column, cfg.document_column)
    data = data.subset(cfg.max_eval_queries, seed)
    logger.info("evaluating on %s: %d queries, %d documents", data.source, len(data.queries), len(data.corpus))
    results = {name: evaluate_named(name, path, data, cfg, cached is None or name in cached)
               for name, path in models.items()}
    names = list(results)
    comparison = (compare(results[names[0]]["per_query"], results[names[1]]["per_query"], cfg.bootstrap_samples, seed)
                  if len(names) == 2 else None)
    settings = {"index": cfg.index, "batch_size": cfg.eval_batch_size, "models": report_paths or models}
    summary = write_reports(results, comparison, data, settings, folder)
    for name in names:
        logger.info("%s: %s", name, ", ".join(f"{m} {100 * v:.2f}" for m, v in results[name]["metrics"].items()))
    if comparison:
        v, c = summary["comparison"]["verdict"], comparison[MAIN_METRIC]
        message = (f"{names[0]} vs {names[1]}: {MAIN_METRIC} {format_difference(c)} points, "
                   f"p {format_p(c['p_value'], '= ')}: {v}")
        (logger.info if v == "better" else logger.warning)(
            message + ("" if v == "better" else " -- the adapted model is NOT better than the base"))
    return summary


def evaluate_run(cfg: EvalConfig, base: str, output_dir: str, folder: Path, data: RetrievalData) -> dict:
    """Called by the trainer: the merged model of this run, still in its `.partial` folder (`folder`, to become
    `output_dir`), against the `base` model. Seeded as `python -m src.evaluation` is by default, so that rerunning
    it gives the same intervals. Only the base's embeddings go through the cache: the merged model is new in every
    run."""
    summary = run_evaluation({"adapted": str(folder / "merged"), "base": base}, cfg, folder / "evaluation",
                             data=data, report_paths={"adapted": str(Path(output_dir) / "merged"), "base": base},
                             cached={"base"})
    comp = summary["comparison"]
    return {"verdict": comp["verdict"], MAIN_METRIC: comp["metrics"][MAIN_METRIC],
            "adapted": summary["models"]["adapted"]["metrics"], "base": summary["models"]["base"]["metrics"]}


def main(argv=None) -> None:
    settings = parse_groups({"evaluation": EvaluationArguments, "eval": EvalConfig}, argv)
    args, cfg = settings["evaluation"], settings["eval"]
    folder = Path(args.output_dir)
    if (folder / "metrics.json").exists() and not args.overwrite:
        raise KitError(f"{folder} already holds a report; pass --overwrite or choose another --output_dir")
    models = {"model": args.model} if not args.baseline else {"model": args.model, "baseline": args.baseline}
    run_evaluation(models, cfg, folder, args.seed)
    print(f"wrote {folder}/metrics.json, report.md, metrics.png")


if __name__ == "__main__":
    run_cli(main)
