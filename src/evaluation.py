"""Retrieval evaluation that tells the truth: every query searched against the whole collection with FAISS.

    python -m src.evaluation --model runs/e5-small-ru/merged --baseline intfloat/multilingual-e5-small \
        --eval_data data/ru_catalog/test --output_dir runs/e5-small-ru/evaluation

Metrics per query (graded relevance, several relevant documents allowed): nDCG@10, MRR@10, MAP@100,
Recall@1/5/10/100. Two models are compared on the same queries: differences with 95% paired-bootstrap
confidence intervals, a paired randomization test, and a verdict in words (computed in src/metrics.py). Writes
metrics.json, report.md and metrics.png (src/plots.py). The mean cosine of random pairs is reported only as an
anisotropy diagnostic. Embeddings of models that the evaluation does not change are read from, or stored in, the
kit's cache (src/embedding_cache.py; --no_cache turns it off); metrics.json says, per model, which were read.
per_query.json keeps every query's scores, so that two evaluations can be paired later (src/compare.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from src.cli import parse_groups
from src.config import EvalConfig, EvaluationArguments
from src.embedding_cache import EmbeddingCache
from src.encoding import encode, encoding_bf16, open_encoder, prompt_names, rewrite_stored
from src.errors import KitError, run_cli
from src.metrics import (
    DEPTH,
    MAIN_METRIC,
    METRICS,
    PER_QUERY,
    compare,
    format_difference,
    format_p,
    score_rankings,
    verdict,
)
from src.plots import plot_metrics
from src.retrieval_data import RetrievalData, load_retrieval_data

logger = logging.getLogger(__name__)
# FAISS trains IVF centroids by k-means and warns below 39 training points per centroid (faiss/Clustering.h):
# fewer lists on a small collection, rather than centroids fitted to a handful of documents.
IVF_MIN_POINTS_PER_LIST = 39


# --------------------------------------------------------------------------------------------------------
# Encoding and search


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


def score_search(top: np.ndarray, doc_ids: list[str], qrels: dict[str, dict[str, int]]) -> dict[str, np.ndarray]:
    """Per-query metrics of `search`'s rows (one per query, in sorted query-id order) of document row numbers."""
    rankings = {q: [doc_ids[i] for i in row if i >= 0] for q, row in zip(sorted(qrels), top)}
    return score_rankings(rankings, qrels)


def approximate_recall(top: np.ndarray, doc_emb, query_emb, k: int = 10) -> float:
    """Share of the exact top-k that the approximate ranking `top` (the search already run) also returns."""
    exact = search(doc_emb, query_emb, "flat", k)
    return float(np.mean([len(set(a[:k]) & set(e)) / len(e) for a, e in zip(top, exact)]))


def anisotropy(doc_emb: np.ndarray, pairs: int = 2000, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    i, j = rng.integers(len(doc_emb), size=(2, pairs))
    cos = (doc_emb[i] * doc_emb[j]).sum(1)[i != j]
    return {"mean": round(float(cos.mean()), 4), "std": round(float(cos.std()), 4)}


def evaluate_model(model, data: RetrievalData, cfg: EvalConfig, use_prompts: bool = True,
                   cache: EmbeddingCache | None = None, documents: tuple[np.ndarray, str] | None = None) -> dict:
    """Encode (or read from `cache`), search, score: per-query metrics, means, throughput (None where the
    documents' embeddings were read from the cache), and diagnostics for one model. `documents`: the corpus
    embeddings of another model and its name, where this model's document side is that model (a query-side run):
    then only the queries are encoded. The corpus embeddings come back under `doc_emb`."""
    query_prompt, doc_prompt = prompt_names(model) if use_prompts else (None, None)
    doc_ids, query_ids = list(data.corpus), sorted(data.qrels)
    bf16 = cache.bf16 if cache is not None else encoding_bf16(model, cfg.eval_bf16)  # encoded as its key says
    if documents is None:
        doc_emb, doc_rate = encode(model, [data.corpus[d] for d in doc_ids], doc_prompt, cfg.eval_batch_size,
                                   cache, bf16, task="document")
        doc_source = "cache" if doc_rate is None else "computed"
    else:
        (doc_emb, source), doc_rate = documents, None
        rewritten = rewrite_stored(model, doc_emb)
        through = " through the document map" if rewritten is not doc_emb else ""
        doc_emb, doc_source = rewritten, f"those of {source}{through}: no document re-encoded"
    query_emb, query_rate = encode(model, [data.queries[q] for q in query_ids], query_prompt, cfg.eval_batch_size,
                                   cache, bf16, task="query")
    top = search(doc_emb, query_emb, cfg.index)
    per_query = score_search(top, doc_ids, data.qrels)
    result = {"metrics": {m: float(v.mean()) for m, v in per_query.items()}, "per_query": per_query,
              "documents_per_second": None if doc_rate is None else round(doc_rate, 1),
              "queries_per_second": None if query_rate is None else round(query_rate, 1),
              "embeddings": {"documents": doc_source, "queries": "cache" if query_rate is None else "computed"},
              "prompts": [query_prompt, doc_prompt], "bf16_autocast": bf16,
              "max_seq_length": model.max_seq_length,
              "anisotropy_diagnostic": anisotropy(doc_emb), "doc_emb": doc_emb}
    if cfg.index != "flat":
        result["index_recall@10_vs_exact"] = approximate_recall(top, doc_emb, query_emb)
    return result


# --------------------------------------------------------------------------------------------------------
# Reports


def _fmt(x: float) -> str:
    return f"{100 * x:.2f}"


def export_comparisons(results: dict[str, dict], samples: int, seed: int) -> dict:
    """Each model after the first two (an export of the first, the candidate): its nDCG@10 paired against the
    candidate (what the export costs) and against the baseline (whether it keeps the gain), with the verdict."""
    names = list(results)
    out = {}
    for name in names[2:]:
        against = {other: compare(results[name]["per_query"], results[other]["per_query"], samples, seed)
                   for other in names[:2]}
        out[name] = {f"vs_{other}": c[MAIN_METRIC] for other, c in against.items()}
        out[name]["verdict_vs_" + names[1]] = verdict(against[names[1]])
    return out


def write_reports(results: dict[str, dict], comparison: dict | None, data: RetrievalData, settings: dict,
                  folder: Path, exports: dict | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(results)
    summary = {"data": data.describe(), "settings": settings,
               "models": {n: {k: v for k, v in r.items() if k != "per_query"} for n, r in results.items()}}
    if comparison:
        summary["comparison"] = {"candidate": names[0], "baseline": names[1], "metrics": comparison,
                                 "verdict": verdict(comparison)}
    if exports:
        summary["exports"] = exports
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_per_query(results, data, folder / PER_QUERY)
    (folder / "report.md").write_text(markdown_report(summary), encoding="utf-8")
    d = summary["data"]
    plot_metrics(results, folder / "metrics.png", comparison,
                 f"{d['source']}: {d['queries']} queries, {d['documents']} documents")
    return summary


def write_per_query(results: dict[str, dict], data: RetrievalData, path: Path) -> None:
    """Every query's scores, per model: what `python -m src.compare` pairs two evaluations with, encoding nothing.
    Queries in score_rankings' order (sorted ids)."""
    models = {name: {m: np.round(v, 6).tolist() for m, v in r["per_query"].items()} for name, r in results.items()}
    saved = {"data": data.describe(), "query_ids": sorted(data.qrels), "models": models}
    path.write_text(json.dumps(saved, ensure_ascii=False) + "\n", encoding="utf-8")


def encoding_cell(result: dict) -> str:
    """A model's documents/s, or where its documents' embeddings came from when it encoded none."""
    if result.get("documents_per_second"):
        return str(result["documents_per_second"])
    source = result.get("embeddings", {}).get("documents", "cache")
    return "cached" if source == "cache" else source


def export_lines(summary: dict) -> list[str]:
    """The report's paragraph on each exported model: what it costs against the candidate, and whether it keeps
    the candidate's gain over the baseline."""
    if not summary.get("exports"):
        return []
    candidate, baseline = list(summary["models"])[:2]
    lines = []
    for name, c in summary["exports"].items():
        kept = c[f"verdict_vs_{baseline}"]
        said = {"better": f"it keeps a gain over {baseline}", "worse": f"it is WORSE than {baseline}"}.get(
            kept, f"it is not distinguishable from {baseline}")
        score = _fmt(summary["models"][name]["metrics"][MAIN_METRIC])
        lines += [f"**{name}** (an export of {candidate}): {MAIN_METRIC} {score}; minus {candidate} "
                  f"{format_difference(c['vs_' + candidate])}, minus {baseline} "
                  f"{format_difference(c['vs_' + baseline])}: {said}.", ""]
    return lines


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
    lines += export_lines(summary)
    lines += ["| model | max tokens | documents/s (encoding) | queries/s | prompts (query, document) | "
              "random-pair cosine mean ± std* |",
              "|---|---|---|---|---|---|"]
    for n in names:
        r = models[n]
        a = r["anisotropy_diagnostic"]
        lines.append(f"| {n} | {r['max_seq_length']} | {encoding_cell(r)} | {r.get('queries_per_second') or 'cached'} "
                     f"| {r['prompts']} | {a['mean']} ± {a['std']} |")
    lines += ["", "*Mean cosine of random document pairs is a diagnostic of anisotropy (how crowded the "
              "embedding space is), not a measure of retrieval quality.", "",
              "Settings: `" + json.dumps(summary["settings"], ensure_ascii=False) + "`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Entry points


def evaluate_named(name: str, path: str, data: RetrievalData, cfg: EvalConfig, cached: bool,
                   documents: tuple[np.ndarray, str] | None = None) -> dict:
    """Load one model as every compared model is configured, and evaluate it (through the cache if `cached`)."""
    logger.info("encoding with %s (%s)%s", name, path,
                f": queries only, the documents' embeddings are {documents[1]}'s" if documents else "")
    model, cache, _ = open_encoder(path, cfg, cached)
    return evaluate_model(model, data, cfg, cache=cache, documents=documents)


def evaluate_all(models: dict[str, str], data: RetrievalData, cfg: EvalConfig, cached: set[str] | None,
                 documents_from: dict[str, str]) -> dict[str, dict]:
    """Each model's result, in the order of `models`; a model named in `documents_from` is evaluated after the
    model it takes its documents' embeddings from, and encodes its queries only."""
    order = sorted(models, key=lambda name: name in documents_from)
    results = {}
    for name in order:
        source = documents_from.get(name)
        documents = (results[source]["doc_emb"], source) if source else None
        results[name] = evaluate_named(name, models[name], data, cfg, cached is None or name in cached, documents)
    return {name: results[name] for name in models}


def run_evaluation(models: dict[str, str], cfg: EvalConfig, folder: Path, seed: int = EvaluationArguments.seed,
                   data: RetrievalData | None = None, report_paths: dict[str, str] | None = None,
                   cached: set[str] | None = None, documents_from: dict[str, str] | None = None) -> dict:
    """Evaluate named models (first = candidate, second = baseline) and write the reports into `folder`. `data`:
    already loaded evaluation data (else read from cfg.eval_data); `report_paths`: how the report names the
    models, where they will not stay where they are evaluated; `cached`: the models whose embeddings may be
    read from and stored in the kit's cache (None = all; cfg.no_cache = none); `documents_from`: models whose
    document side is another model's (name -> that model's name), whose corpus embeddings they reuse."""
    if data is None:
        data = load_retrieval_data(cfg.eval_data, cfg.query_column, cfg.document_column)
    data = data.subset(cfg.max_eval_queries, seed)
    logger.info("evaluating on %s: %d queries, %d documents", data.source, len(data.queries), len(data.corpus))
    results = evaluate_all(models, data, cfg, cached, documents_from or {})
    for result in results.values():
        del result["doc_emb"]
    names = list(results)
    comparison = (compare(results[names[0]]["per_query"], results[names[1]]["per_query"], cfg.bootstrap_samples, seed)
                  if len(names) >= 2 else None)
    settings = {"index": cfg.index, "batch_size": cfg.eval_batch_size, "models": report_paths or models}
    exports = export_comparisons(results, cfg.bootstrap_samples, seed)
    summary = write_reports(results, comparison, data, settings, folder, exports)
    for name in names:
        logger.info("%s: %s", name, ", ".join(f"{m} {100 * v:.2f}" for m, v in results[name]["metrics"].items()))
    if comparison:
        v, c = summary["comparison"]["verdict"], comparison[MAIN_METRIC]
        message = (f"{names[0]} vs {names[1]}: {MAIN_METRIC} {format_difference(c)} points, "
                   f"p {format_p(c['p_value'], '= ')}: {v}")
        (logger.info if v == "better" else logger.warning)(
            message + ("" if v == "better" else " -- the adapted model is NOT better than the base"))
    for line in export_lines(summary):
        if line:
            logger.info("%s", line.replace("**", ""))
    return summary


def evaluate_run(cfg: EvalConfig, base: str, output_dir: str, folder: Path, data: RetrievalData,
                 queries_only: bool = False, exports: tuple[str, ...] = ()) -> dict:
    """Called by the trainer: the merged model of this run, still in its `.partial` folder (`folder`, to become
    `output_dir`), against the `base` model. Seeded as `python -m src.evaluation` is by default, so that rerunning
    it gives the same intervals. Only the base's embeddings go through the cache: the merged model is new in every
    run. `queries_only` (a query-side run, whose document side is the base): the corpus is encoded by the base
    alone, and the adapted model encodes the queries. `exports`: the run's exported models (folders named after
    them: openvino/), each scored beside the adapted model."""
    models = {"adapted": folder / "merged", "base": base, **{f"adapted-{name}": folder / name for name in exports}}
    shown = {name: str(Path(output_dir) / Path(path).relative_to(folder)) if name != "base" else base
             for name, path in models.items()}
    # a query-side run: the merged model and its exports all route documents to the base
    documents_from = {name: "base" for name in models if name != "base"} if queries_only else None
    summary = run_evaluation({name: str(path) for name, path in models.items()}, cfg, folder / "evaluation",
                             data=data, report_paths=shown, cached={"base"}, documents_from=documents_from)
    comp = summary["comparison"]
    return {"verdict": comp["verdict"], MAIN_METRIC: comp["metrics"][MAIN_METRIC],
            "adapted": summary["models"]["adapted"]["metrics"], "base": summary["models"]["base"]["metrics"],
            "documents_reencoded": not queries_only, **({"exports": summary["exports"]} if exports else {})}


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
