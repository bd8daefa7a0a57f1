"""Per-query metrics of a model on a test collection, computed as the trainer's evaluation computes them, for the
benchmarks' tables (kept as JSON so that a model is encoded once).
"""

from __future__ import annotations

import json
from pathlib import Path

from scripts.peer import BASE_MODEL
from src.config import EvalConfig
from src.encoding import open_encoder
from src.evaluation import evaluate_model


def model_result(model_path: str, data, cfg: EvalConfig) -> dict:
    """evaluate_model's result for one model, as the trainer's evaluation computes it: the base through the kit's
    embedding cache, and a query-side run's model (merged/ routes documents to the base) with the base's corpus
    embeddings, its queries alone encoded."""
    if model_path == BASE_MODEL:
        model, cache, _ = open_encoder(BASE_MODEL, cfg, cached=True)
        return evaluate_model(model, data, cfg, cache=cache)
    documents = None
    if (Path(model_path) / "router_config.json").exists():
        documents = (model_result(BASE_MODEL, data, cfg)["doc_emb"], "base")
    model, _, _ = open_encoder(model_path, cfg, cached=False)
    return evaluate_model(model, data, cfg, documents=documents)


def per_query(model_path: str, data, cfg: EvalConfig, cache: Path) -> dict:
    """A model's per-query metrics on a collection's test, encoded once and kept in `cache` (JSON)."""
    import numpy as np

    if not cache.exists():
        result = model_result(model_path, data, cfg)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({m: v.tolist() for m, v in result["per_query"].items()}))
    return {m: np.array(v) for m, v in json.loads(cache.read_text()).items()}


def base_result(collection: str, data, cfg: EvalConfig, folder: Path) -> dict:
    return per_query(BASE_MODEL, data, cfg, folder / "base_per_query.json")
