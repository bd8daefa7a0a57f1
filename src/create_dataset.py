"""Training corpus, TSDAE noise, and held-out retrieval data.

- `load_training_data`: a file -> clean, length-filtered, deduplicated (optionally split) texts, and (query,
  document) pairs where the file has them, with a deterministic train/development split by item.
- `WordNoise` + `noisy_dataset`: TSDAE's input corruption (word deletion, optional swap/insertion), drawn afresh
  every epoch and reproducible by seed, with a tokenizer that needs no nltk data.
- `load_retrieval_data`: a pairs file, or a BEIR-style folder, -> queries, corpus, graded qrels.
- `holdout_split`: a catalog -> training texts and test pairs held out by item.

    python -m src.create_dataset --train_file data/ru_catalog/train.jsonl   # stats + noisy examples
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from src.config import DataConfig, NoiseConfig, parse_config
from src.errors import KitError, run_cli
from src.preprocess import clean_text
from src.tables import read_table, require_columns

logger = logging.getLogger(__name__)

# A word is letters/digits joined by inner hyphens, dots, commas, slashes or apostrophes ("SM-A536",
# "3.5", "1,5", "Wi-Fi", "don't"); any other non-space character is a token of its own. Unicode \w covers
# Cyrillic. Every token remembers whether a space preceded it, so detokenization is exact (see `join`).
_TOKEN = re.compile(r"\w+(?:[-.,/'’]\w+)*|[^\w\s]")
MIN_DEV_ITEMS = 100  # development queries below this make model selection a coin toss
SHINGLE_WORDS = 6  # a document sharing half of its 6-word shingles with another one is a near-duplicate
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+(?=[\"«(\[]?[A-ZА-ЯЁ0-9])")


def tokenize(text: str) -> list[tuple[str, bool]]:
    """Words and punctuation of `text`, each with 'a space preceded it'."""
    return [(m.group(), m.start() > 0 and text[m.start() - 1].isspace()) for m in _TOKEN.finditer(text)]


def join(tokens: list[tuple[str, bool]]) -> str:
    """Inverse of `tokenize`: `join(tokenize(t)) == t` for whitespace-normalized t. Two words that noise made
    neighbours are always separated (the tokenizer never yields two adjacent words without a space)."""
    out = []
    for i, (tok, space) in enumerate(tokens):
        glued_words = i and tok[0].isalnum() and tokens[i - 1][0][-1].isalnum()
        out.append((" " if i and (space or glued_words) else "") + tok)
    return "".join(out)


def count_words(text: str) -> int:
    return len(_TOKEN.findall(text))


def normalized_key(text: str) -> str:
    return re.sub(r"\W+", " ", text.casefold()).strip()


# --------------------------------------------------------------------------------------------------------
# Corpus


def split_text(text: str, mode: str, window_words: int) -> list[str]:
    if mode == "sentences":
        return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]
    if mode == "windows":
        tokens = tokenize(text)
        return [join(tokens[i : i + window_words]) for i in range(0, len(tokens), window_words)]
    return [text]


def clean_corpus(texts, cfg: DataConfig) -> tuple[list[str], dict]:
    """Clean, truncate, split, length-filter and deduplicate (exact and case/space-normalized)."""
    counts = {"read": 0, "empty": 0, "too_short": 0, "duplicates": 0, "truncated": 0}
    seen, kept = set(), []
    for raw in texts:
        counts["read"] += 1
        text = clean_text(raw, keep_lines=True)
        if len(text) > cfg.max_chars:
            text, counts["truncated"] = text[: cfg.max_chars], counts["truncated"] + 1
        if not text:
            counts["empty"] += 1
            continue
        for piece in split_text(text, cfg.split_mode, cfg.window_words):
            if count_words(piece) < cfg.min_words:
                counts["too_short"] += 1
                continue
            key = normalized_key(piece)
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            kept.append(piece)
    counts["kept"] = len(kept)
    return kept, counts


@dataclass
class TrainingData:
    """One training file split by row (item) into training and development parts: texts for the unsupervised
    objectives, and (query, document) pairs of the same items where the file has pair columns."""

    texts: list[str]
    dev_texts: list[str]
    pairs: list[tuple[str, str]] = field(default_factory=list)
    dev_pairs: list[tuple[str, str]] = field(default_factory=list)


def clean_pairs(queries, documents, max_chars: int) -> list[tuple[str, str]]:
    """Cleaned, truncated (query, document) pairs; empty halves and repeated pairs dropped."""
    seen, kept = set(), []
    for query, doc in zip(queries, documents):
        query, doc = clean_text(query)[:max_chars], clean_text(doc)[:max_chars]
        key = (normalized_key(query), normalized_key(doc))
        if query and doc and key not in seen:
            seen.add(key)
            kept.append((query, doc))
    return kept


def load_training_data(cfg: DataConfig, seed: int, need_texts: bool = True, need_pairs: bool = False,
                       frame: pd.DataFrame | None = None) -> TrainingData:
    """Read `cfg.train_file` (or take its already read `frame`) -> TrainingData, split deterministically by seed.
    Pairs are read when the file has `cfg.pair_columns` (required when `need_pairs`)."""
    frame = read_table(cfg.train_file, cfg.text_column) if frame is None else frame
    pair_columns = cfg.pair_column_names()
    if need_pairs:
        require_columns(frame, pair_columns, cfg.train_file)
    if need_texts:
        require_columns(frame, [cfg.text_column], cfg.train_file)
    frame = frame.iloc[np.random.default_rng(seed).permutation(len(frame))]
    if cfg.max_train_texts:
        frame = frame.iloc[: cfg.max_train_texts]
    n_dev = int(round(len(frame) * cfg.validation_fraction))
    if n_dev:  # a small file still gets enough development items to tell checkpoints apart (or a fifth of it)
        n_dev = max(n_dev, min(MIN_DEV_ITEMS, len(frame) // 5))
    dev, train = frame.iloc[:n_dev], frame.iloc[n_dev:]
    data = TrainingData([], [])
    if need_texts:
        data.texts, counts = clean_corpus(train[cfg.text_column].tolist(), cfg)
        logger.info("%s: read %d, dropped %d empty, %d too short, %d duplicates (%d truncated); kept %d",
                    cfg.train_file, counts["read"], counts["empty"], counts["too_short"], counts["duplicates"],
                    counts["truncated"], counts["kept"])
        if not data.texts:
            raise KitError(f"{cfg.train_file}: every text in column '{cfg.text_column}' was filtered away "
                           f"(empty or under --min_words {cfg.min_words})")
        seen = {normalized_key(t) for t in data.texts}
        data.dev_texts = [t for t in clean_corpus(dev[cfg.text_column].tolist(), cfg)[0]
                          if normalized_key(t) not in seen]
    if len(pair_columns) == 2 and all(c in frame for c in pair_columns):
        data.pairs = clean_pairs(train[pair_columns[0]], train[pair_columns[1]], cfg.max_chars)
        # an item whose title or description also belongs to a training item would leak into model selection
        seen = {normalized_key(text) for pair in data.pairs for text in pair}
        data.dev_pairs = [(q, d) for q, d in clean_pairs(dev[pair_columns[0]], dev[pair_columns[1]], cfg.max_chars)
                          if normalized_key(q) not in seen and normalized_key(d) not in seen]
        if need_pairs and not data.pairs:
            raise KitError(f"{cfg.train_file}: no row has both '{pair_columns[0]}' and '{pair_columns[1]}'")
        logger.info("%s: %d training pairs, %d development pairs (%s -> %s)", cfg.train_file, len(data.pairs),
                    len(data.dev_pairs), *pair_columns)
    return data


# --------------------------------------------------------------------------------------------------------
# TSDAE noise


class WordNoise:
    """TSDAE input corruption: delete each word with probability `deletion_ratio` (at least one word is always
    kept), then optionally swap adjacent words and duplicate words. The random stream is a function of
    (seed, epoch, item index), so noise differs between epochs, repeats exactly for the same seed, and is
    the same after resuming from a checkpoint.

    Reference: Wang, Reimers, Gurevych. TSDAE (Findings of EMNLP 2021), https://arxiv.org/abs/2104.06979
    """

    def __init__(self, cfg: NoiseConfig, seed: int):
        self.cfg, self.seed, self.epoch = cfg, seed, 0

    def __call__(self, text: str, index: int) -> str:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        tokens = tokenize(text)
        if not tokens:
            return text
        keep = rng.random(len(tokens)) >= self.cfg.deletion_ratio
        if not keep.any():
            keep[rng.integers(len(tokens))] = True
        tokens = [t for t, k in zip(tokens, keep) if k]
        if self.cfg.swap_ratio and len(tokens) > 1:
            for i in np.flatnonzero(rng.random(len(tokens) - 1) < self.cfg.swap_ratio):
                tokens[i], tokens[i + 1] = (tokens[i + 1][0], tokens[i][1]), (tokens[i][0], tokens[i + 1][1])
        if self.cfg.insertion_ratio:
            for _ in range(int(rng.binomial(len(tokens), self.cfg.insertion_ratio))):
                word = tokens[rng.integers(len(tokens))][0]
                tokens.insert(int(rng.integers(len(tokens) + 1)), (word, True))
        return join(tokens)


def noisy_dataset(texts: list[str], noise: WordNoise):
    """A `datasets.Dataset` with columns (noisy, text); the noise is applied lazily on every access."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": texts, "index": list(range(len(texts)))})

    def transform(batch):
        return {"noisy": [noise(t, i) for t, i in zip(batch["text"], batch["index"])], "text": batch["text"]}

    dataset.set_transform(transform)
    return dataset


# --------------------------------------------------------------------------------------------------------
# Retrieval data


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


# --------------------------------------------------------------------------------------------------------
# Catalog -> training texts + held-out pairs


def near_duplicates(texts: list[str], threshold: float = 0.5) -> np.ndarray:
    """True for texts that share at least `threshold` of their word shingles with some other text (shared
    boilerplate paragraphs, a description contained in another one, exact copies)."""
    shingles = [{tuple(w[i : i + SHINGLE_WORDS]) for i in range(max(1, len(w) - SHINGLE_WORDS + 1))}
                for w in (t.split() for t in texts)]
    owners: dict[tuple, int] = {}
    for s in shingles:
        for sh in s:
            owners[sh] = owners.get(sh, 0) + 1
    return np.array([sum(owners[sh] > 1 for sh in s) >= threshold * len(s) for s in shingles])


def holdout_split(frame: pd.DataFrame, query_field: str, document_field: str, test_items: int, seed: int
                  ) -> tuple[pd.DataFrame, RetrievalData]:
    """Split catalog items into training items (columns query_field, document_field and `text` =
    "query. document") and held-out test data, by item: no test item's query or document text appears in
    the training items. The test collection holds every distinct document (the
    training items' ones act as distractors); a test item is only chosen when its document is unlike every
    other item's (see `near_duplicates`) and its query is unique, since such a pair has one right answer.
    """
    frame = frame.assign(**{c: frame[c].map(clean_text) for c in (query_field, document_field)})
    frame = frame[(frame[query_field] != "") & (frame[document_field] != "")].reset_index(drop=True)
    doc_key = frame[document_field].map(normalized_key)
    unique = ~near_duplicates(doc_key.tolist()) & ~frame[query_field].map(normalized_key).duplicated(keep=False)
    candidates = np.flatnonzero(unique.to_numpy())
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(frame), dtype=bool)
    is_test[rng.choice(candidates, min(test_items, len(candidates)), replace=False)] = True
    train = frame.loc[~is_test, [query_field, document_field]].reset_index(drop=True)
    train["text"] = train[query_field] + ". " + train[document_field]
    keep_doc = ~doc_key.duplicated()  # one copy of each distinct document
    corpus = {f"d{i}": frame[document_field][i] for i in np.flatnonzero(keep_doc.to_numpy())}
    queries = {f"q{i}": frame[query_field][i] for i in np.flatnonzero(is_test)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in np.flatnonzero(is_test)}
    return train, RetrievalData(queries, corpus, qrels, source="holdout").validate()


def save_beir(data: RetrievalData, folder: Path) -> None:
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    for name, items in (("corpus", data.corpus), ("queries", data.queries)):
        rows = [{"_id": i, "text": t} for i, t in items.items()]
        pd.DataFrame(rows).to_json(folder / f"{name}.jsonl", orient="records", lines=True, force_ascii=False)
    rows = [(q, d, g) for q, docs in data.qrels.items() for d, g in docs.items()]
    pd.DataFrame(rows, columns=["query-id", "corpus-id", "score"]).to_csv(folder / "qrels" / "test.tsv",
                                                                          sep="\t", index=False)


def main(argv=None) -> None:
    cfg = parse_config(argv)
    data = load_training_data(cfg.data, cfg.train.seed)
    train, dev = data.texts, data.dev_texts
    noise = WordNoise(cfg.noise, cfg.train.seed)
    words = [count_words(t) for t in train]
    print(json.dumps({"train_texts": len(train), "dev_texts": len(dev), "mean_words": round(float(np.mean(words)), 1),
                      "max_words": int(np.max(words)),
                      "train_pairs": len(data.pairs), "dev_pairs": len(data.dev_pairs)}, ensure_ascii=False))
    for i, text in enumerate(train[:3]):
        print(f"\noriginal: {text[:300]}\nnoisy:    {noise(text, i)[:300]}")


if __name__ == "__main__":
    run_cli(main)
