"""Retrieval metrics per query, and the paired comparison of two models over the same queries.

Written out here (not taken from sentence-transformers' InformationRetrievalEvaluator) because that evaluator
treats relevance as binary and returns only means; the paired comparison needs per-query values and graded
gains. Conventions follow trec_eval (linear gain, log2 discount); tests check them against pytrec_eval.
"""

from __future__ import annotations

import numpy as np

METRICS = ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@5", "recall@10", "recall@100")
MAIN_METRIC = "ndcg@10"
DEPTH = 100  # ranks retrieved per query: the deepest cut-off any metric needs
# every query's scores, per model, beside an evaluation's metrics.json: what src/compare.py pairs
PER_QUERY = "per_query.json"


def query_metrics(ranking: list[str], relevant: dict[str, int]) -> dict[str, float]:
    """All metrics for one query: `ranking` is doc ids best first, `relevant` maps doc id -> grade > 0."""
    gains = np.array([relevant.get(d, 0) for d in ranking[:DEPTH]], dtype=float)
    hits = gains > 0
    n_rel = sum(1 for g in relevant.values() if g > 0)
    discounts = 1.0 / np.log2(np.arange(2, DEPTH + 2))
    ideal = np.sort(np.array([g for g in relevant.values() if g > 0], dtype=float))[::-1]
    idcg = float((ideal[:10] * discounts[: min(10, len(ideal))]).sum())
    dcg = float((gains[:10] * discounts[: len(gains[:10])]).sum())
    first = int(np.argmax(hits[:10])) if hits[:10].any() else None
    precision_at_hit = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    out = {
        "ndcg@10": dcg / idcg if idcg else 0.0,
        "mrr@10": 1.0 / (first + 1) if first is not None else 0.0,
        "map@100": float(precision_at_hit[hits].sum() / n_rel) if n_rel else 0.0,
    }
    for k in (1, 5, 10, 100):
        out[f"recall@{k}"] = float(hits[:k].sum() / n_rel) if n_rel else 0.0
    return out


def score_rankings(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, np.ndarray]:
    """Per-query metric arrays, queries in sorted id order."""
    ids = sorted(qrels)
    rows = [query_metrics(rankings.get(q, []), qrels[q]) for q in ids]
    return {m: np.array([r[m] for r in rows]) for m in METRICS}


def compare(candidate: dict[str, np.ndarray], baseline: dict[str, np.ndarray], samples: int = 1000,
            seed: int = 0) -> dict[str, dict]:
    """Per metric: mean difference, 95% paired-bootstrap interval, and a two-sided paired randomization
    (sign-flip) test p-value over queries."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(candidate.values())))
    resample = rng.integers(n, size=(samples, n))
    signs = rng.choice([-1.0, 1.0], size=(max(samples, 2000), n))
    out = {}
    for metric in METRICS:
        diff = candidate[metric] - baseline[metric]
        boot = diff[resample].mean(1)
        observed = abs(diff.mean())
        p = (np.sum(np.abs((signs * diff).mean(1)) >= observed - 1e-12) + 1) / (len(signs) + 1)
        out[metric] = {"difference": float(diff.mean()), "ci95": [float(np.percentile(boot, 2.5)),
                                                                  float(np.percentile(boot, 97.5))],
                       "p_value": float(p)}
    return out


def verdict(comparison: dict, metric: str = MAIN_METRIC, alpha: float = 0.05) -> str:
    c = comparison[metric]
    low, high = c["ci95"]
    if c["p_value"] < alpha and low > 0:
        return "better"
    if c["p_value"] < alpha and high < 0:
        return "worse"
    return "not distinguishable"


def format_p(p: float, equals: str = "") -> str:
    """`< 0.001` below 0.001 (3 decimals would print 0.000), else 3 decimals after `equals` ('= ' in a sentence)."""
    return "< 0.001" if p < 0.001 else f"{equals}{p:.3f}"


def format_difference(c: dict, label: str = "") -> str:
    """One metric's comparison in points (x100): '+1.23 [+0.45, +2.01]', the difference and its 95% interval;
    `label` goes inside the brackets ('95% CI ' where the reader needs telling)."""
    low, high = (100 * x for x in c["ci95"])
    return f"{100 * c['difference']:+.2f} [{label}{low:+.2f}, {high:+.2f}]"
