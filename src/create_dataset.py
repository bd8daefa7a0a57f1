"""The training corpus: a file of records -> training and development texts and (query, document) pairs.

`load_training_data`: clean, length-filtered, deduplicated (optionally split) texts, and (query, document) pairs
where the file has them, with a deterministic train/development split by item. `pairs_dataset`: pairs -> the
(anchor, positive) `datasets.Dataset` the contrastive objectives train on (the documents' own pair datasets are
drawn afresh every epoch: src/document_pairs.py).

    python -m src.create_dataset --train_file data/ru_catalog/train.jsonl   # stats + noisy examples
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from src.cli import parse_config
from src.config import DataConfig
from src.errors import KitError, run_cli
from src.noise import WordNoise
from src.preprocess import clean_text
from src.tables import read_table, require_columns
from src.text import SENTENCE_END, count_words, join, normalized_key, tokenize

logger = logging.getLogger(__name__)
MIN_DEV_ITEMS = 100  # development queries below this make model selection a coin toss


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


def held_out_only(items: list, trained_texts, texts_of) -> list:
    """The development items none of whose texts (`texts_of(item)`) a training item also has: such an item would
    leak into model selection. Nothing held out (the default without selection): no key set is built at all."""
    if not items:
        return []
    seen = {normalized_key(t) for t in trained_texts}
    return [item for item in items if not any(normalized_key(t) in seen for t in texts_of(item))]


def split_rows(frame: pd.DataFrame, cfg: DataConfig, seed: int, holdout: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(development rows, training rows): shuffled by seed, capped at --max_train_texts, `holdout` of them held out."""
    frame = frame.iloc[np.random.default_rng(seed).permutation(len(frame))]
    if cfg.max_train_texts:
        frame = frame.iloc[: cfg.max_train_texts]
    n_dev = int(round(len(frame) * holdout))
    if n_dev:  # a small file still gets enough development items to tell checkpoints apart (or a fifth of it)
        n_dev = max(n_dev, min(MIN_DEV_ITEMS, len(frame) // 5))
    return frame.iloc[:n_dev], frame.iloc[n_dev:]


def load_training_data(cfg: DataConfig, seed: int, need_texts: bool = True, need_pairs: bool = False,
                       frame: pd.DataFrame | None = None, holdout: float | None = None) -> TrainingData:
    """Read `cfg.train_file` (or take its already read `frame`) -> TrainingData, split deterministically by seed,
    `holdout` of the rows (default --validation_fraction; the run's plan passes 0 when nothing selects) held out.
    Pairs are read when the file has `cfg.pair_columns` (required when `need_pairs`)."""
    frame = read_table(cfg.train_file, cfg.text_column) if frame is None else frame
    pair_columns = cfg.pair_column_names()
    if need_pairs:
        require_columns(frame, pair_columns, cfg.train_file)
    if need_texts:
        require_columns(frame, [cfg.text_column], cfg.train_file)
    dev, train = split_rows(frame, cfg, seed, cfg.validation_fraction if holdout is None else holdout)
    data = TrainingData([], [])
    if need_texts:
        data.texts, counts = clean_corpus(train[cfg.text_column].tolist(), cfg)
        logger.info("%s: read %d, dropped %d empty, %d too short, %d duplicates (%d truncated); kept %d",
                    cfg.train_file, counts["read"], counts["empty"], counts["too_short"], counts["duplicates"],
                    counts["truncated"], counts["kept"])
        if not data.texts:
            raise KitError(f"{cfg.train_file}: every text in column '{cfg.text_column}' was filtered away "
                           f"(empty or under --min_words {cfg.min_words})")
        data.dev_texts = held_out_only(clean_corpus(dev[cfg.text_column].tolist(), cfg)[0], data.texts, lambda t: [t])
    if len(pair_columns) == 2 and all(c in frame for c in pair_columns):
        data.pairs = clean_pairs(train[pair_columns[0]], train[pair_columns[1]], cfg.max_chars)
        data.dev_pairs = held_out_only(clean_pairs(dev[pair_columns[0]], dev[pair_columns[1]], cfg.max_chars),
                                       (text for pair in data.pairs for text in pair), lambda pair: pair)
        if need_pairs and not data.pairs:
            raise KitError(f"{cfg.train_file}: no row has both '{pair_columns[0]}' and '{pair_columns[1]}'")
        logger.info("%s: %d training pairs, %d development pairs (%s -> %s)", cfg.train_file, len(data.pairs),
                    len(data.dev_pairs), *pair_columns)
    return data


def pairs_dataset(pairs: list[tuple[str, str]]):
    from datasets import Dataset

    return Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})


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
