"""Held-out retrieval data: queries, a document collection and graded relevance judgements.

- `load_retrieval_data`: a pairs file, or a BEIR-style folder, -> `RetrievalData`;
- `pairs_to_retrieval`: (query, document) pairs in memory -> `RetrievalData` (model selection's development pairs);
- `save_beir`: `RetrievalData` -> a BEIR-style folder;
- `near_duplicates`: the rule that keeps a held-out query to one right answer (used by the scripts that build
  the bundled collections).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from src.errors import KitError
from src.preprocess import clean_text
from src.tables import read_table, require_columns
from src.text import NEAR_DUPLICATE, shingles

logger = logging.getLogger(__name__)


@dataclass
class RetrievalData:
    """Queries and documents by id, and graded relevance qrels[query_id][doc_id] = grade (> 0)."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def validate(self) -> "RetrievalData":
        if not self.corpus:
            raise KitError(f"{self.source}: the document collection is empty")
        if not self.queries:
            raise KitError(f"{self.source}: there are no queries")
        for qid, docs in self.qrels.items():
            if qid not in self.queries:
                raise KitError(f"{self.source}: qrels name query id '{qid}' that is not among the queries")
            unknown = next((d for d in docs if d not in self.corpus), None)
            if unknown is not None:
                raise KitError(f"{self.source}: qrels name document id '{unknown}' that is not in the corpus")
        missing = next((q for q in self.queries if not any(g > 0 for g in self.qrels.get(q, {}).values())), None)
        if missing is not None:
            raise KitError(f"{self.source}: query id '{missing}' has no relevant document in the qrels")
        return self

    def subset(self, max_queries: int, seed: int) -> "RetrievalData":
        if not max_queries or max_queries >= len(self.queries):
            return self
        ids = sorted(self.queries)
        chosen = sorted(np.random.default_rng(seed).choice(len(ids), max_queries, replace=False))
        queries = {ids[i]: self.queries[ids[i]] for i in chosen}
        return RetrievalData(queries, self.corpus, {q: self.qrels[q] for q in queries}, self.source,
                             self.notes + [f"{max_queries} of {len(ids)} queries sampled (seed {seed})"])

    def describe(self) -> dict:
        rel = [len(v) for v in self.qrels.values()]
        return {"source": self.source, "queries": len(self.queries), "documents": len(self.corpus),
                "relevant_per_query": round(float(np.mean(rel)), 3), "notes": self.notes}


def pairs_to_retrieval(pairs, source: str) -> RetrievalData:
    """(query, relevant document) pairs -> RetrievalData. Identical texts share one id, so a query may have
    several relevant documents and a document may answer several queries."""
    queries, corpus, qrels = {}, {}, {}
    query_ids, doc_ids = {}, {}
    for query, doc in pairs:
        qid = query_ids.setdefault(query, f"q{len(query_ids)}")
        did = doc_ids.setdefault(doc, f"d{len(doc_ids)}")
        queries[qid], corpus[did] = query, doc
        qrels.setdefault(qid, {})[did] = 1
    return RetrievalData(queries, corpus, qrels, source=source).validate()


def load_pairs(path: str, query_column: str, document_column: str) -> RetrievalData:
    """A pairs file: one (query, relevant document) per row."""
    frame = read_table(path)
    require_columns(frame, [query_column, document_column], path)
    pairs = []
    for row_number, (query, doc) in enumerate(zip(frame[query_column], frame[document_column]), 1):
        query, doc = clean_text(query), clean_text(doc)
        if not query or not doc:
            raise KitError(f"{path}: row {row_number} has an empty '{query_column if not query else document_column}'")
        pairs.append((query, doc))
    return pairs_to_retrieval(pairs, str(path))


def _read_beir_jsonl(path: Path, kind: str) -> dict[str, str]:
    frame = read_table(path)
    id_column = "id" if "_id" not in frame and "id" in frame else "_id"  # BEIR writes _id, many exports id
    require_columns(frame, [id_column, "text"], path)
    titles = frame["title"].fillna("") if "title" in frame else [""] * len(frame)
    out = {}
    for _id, title, text in zip(frame[id_column].astype(str), titles, frame["text"].fillna("")):
        out[_id] = clean_text(f"{title}. {text}" if title and kind == "corpus" else text)
    return out


def _is_number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _qrels_file(root: Path) -> Path:
    """qrels/test.tsv, else another split's qrels/<split>.tsv (dev, validation, then the first), else qrels.tsv."""
    files = sorted((root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
    if not files:
        if (root / "qrels.tsv").is_file():
            return root / "qrels.tsv"
        raise KitError(f"{root}: no relevance judgements (expected qrels/test.tsv, qrels/<split>.tsv or qrels.tsv)")
    preferred = {"test": 0, "dev": 1, "validation": 2}
    chosen = min(files, key=lambda p: preferred.get(p.stem, len(preferred)))
    others = [p.stem for p in files if p != chosen]
    logger.info("%s: relevance judgements of split '%s' (%s)%s", root, chosen.stem, chosen.relative_to(root),
                f"; also there: {', '.join(others)}" if others else "")
    return chosen


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query-id, corpus-id, score per line; a first line whose score is not a number is a header, which then
    names the columns."""
    frame = read_table(path, header=False)
    if frame.shape[1] < 3:
        raise KitError(f"{path}: expected tab-separated query-id, corpus-id, score; found {frame.shape[1]} column(s)")
    first = [str(v) for v in frame.iloc[0]]
    if _is_number(first[2]):
        frame = frame.set_axis(["query-id", "corpus-id", "score", *frame.columns[3:]], axis=1)
    else:
        frame = frame.iloc[1:].set_axis(first, axis=1)
        require_columns(frame, ["query-id", "corpus-id", "score"], path)
    qrels = {}
    for qid, did, score in zip(frame["query-id"].astype(str), frame["corpus-id"].astype(str), frame["score"]):
        if not _is_number(score):
            raise KitError(f"{path}: score '{score}' for query '{qid}' is not a number")
        if int(float(score)) > 0:
            qrels.setdefault(qid, {})[did] = int(float(score))
    return qrels


def load_beir(folder: str) -> RetrievalData:
    """A BEIR-style folder: corpus.jsonl and queries.jsonl (id column `_id` or `id`, `title` optional) and
    qrels/<split>.tsv or qrels.tsv (query-id, corpus-id, score; header line optional)."""
    root = Path(folder)
    corpus = _read_beir_jsonl(root / "corpus.jsonl", "corpus")
    queries = _read_beir_jsonl(root / "queries.jsonl", "queries")
    qrels_path = _qrels_file(root)
    qrels = _read_qrels(qrels_path)
    # BEIR ships queries of all splits in one file: keep those this qrels file judges.
    queries = {q: t for q, t in queries.items() if q in qrels}
    unknown_q = next((q for q in qrels if q not in queries), None)
    if unknown_q is not None:
        raise KitError(f"{qrels_path}: query id '{unknown_q}' is not in {root / 'queries.jsonl'}")
    return RetrievalData(queries, corpus, qrels, source=str(root)).validate()


def load_retrieval_data(path: str, query_column: str = "query", document_column: str = "document") -> RetrievalData:
    if not path:
        raise KitError("no evaluation data given (--eval_data)")
    if Path(path).is_dir():
        return load_beir(path)
    return load_pairs(path, query_column, document_column)


def save_beir(data: RetrievalData, folder: Path) -> None:
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    for name, items in (("corpus", data.corpus), ("queries", data.queries)):
        rows = [{"_id": i, "text": t} for i, t in items.items()]
        pd.DataFrame(rows).to_json(folder / f"{name}.jsonl", orient="records", lines=True, force_ascii=False)
    rows = [(q, d, g) for q, docs in data.qrels.items() for d, g in docs.items()]
    pd.DataFrame(rows, columns=["query-id", "corpus-id", "score"]).to_csv(folder / "qrels" / "test.tsv",
                                                                          sep="\t", index=False)


def near_duplicates(texts: list[str], threshold: float = NEAR_DUPLICATE) -> np.ndarray:
    """True for texts that share at least `threshold` of their word shingles with some other text (shared
    boilerplate paragraphs, a description contained in another one, exact copies)."""
    sets = [shingles(t) for t in texts]
    owners: dict[tuple, int] = {}
    for s in sets:
        for sh in s:
            owners[sh] = owners.get(sh, 0) + 1
    return np.array([sum(owners[sh] > 1 for sh in s) >= threshold * len(s) for s in sets])
