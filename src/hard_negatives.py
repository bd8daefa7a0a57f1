"""Hard negatives for (query, document) pairs, mined by the base model among the training documents.

In-batch negatives are mostly easy: 31 random catalog items rarely compete with the right one. A mined negative is
a training document the base model ranks high for the query although it belongs to another item. Catalogs hold
near-duplicate items (a package and its -dev or -doc twin, shared boilerplate), whose documents are not wrong
answers, so two filters guard against teaching such false negatives apart:

- sentence-transformers' `mine_hard_negatives` with a relative margin: a candidate scoring within `margin` of the
  positive's own score is skipped (the "TopK-PercPos" rule of NV-Retriever, Moreira et al. 2024,
  https://arxiv.org/abs/2407.15831), and the item's own document is never a candidate;
- the kit's own check of each candidate against the positive document: equal once normalized, or sharing half
  of its word shingles (`src.text.near_duplicate`), it is dropped.

Mining draws more candidates than it keeps, so that filtered ones leave room; a pair left with fewer clean
candidates is completed with random training documents (never its own or a near-duplicate), so every training
pair keeps its place and every row has the same number of columns.
"""

from __future__ import annotations

import logging

import numpy as np

from src.config import TrainConfig
from src.create_dataset import pairs_dataset
from src.text import near_duplicate

logger = logging.getLogger(__name__)
CANDIDATES_PER_NEGATIVE = 3  # candidates mined per negative kept: room for the near-duplicates dropped


def mine(model, pairs: list[tuple[str, str]], train: TrainConfig, prompts: dict, batch_size: int = 64) -> dict:
    """(query, document) -> the base model's candidate negatives, best first (margin-filtered, own document
    excluded). `model` must still be the base model: a fresh LoRA adapter is a no-op."""
    from sentence_transformers.util import mine_hard_negatives

    wanted = min(train.hard_negatives * CANDIDATES_PER_NEGATIVE, max(1, len({d for _, d in pairs}) - 1))
    mined = mine_hard_negatives(
        pairs_dataset(pairs), model, range_min=train.negative_skip, relative_margin=train.negative_margin,
        num_negatives=wanted, sampling_strategy="top", query_prompt=prompts.get("query"),
        corpus_prompt=prompts.get("passage"), output_format="n-tuple", batch_size=batch_size, verbose=False)
    columns = mined.column_names
    return {(row[columns[0]], row[columns[1]]): [row[c] for c in columns[2:]] for row in mined}


def choose(candidates: list[str], positive: str, count: int, documents: list[str], rng: np.random.Generator) -> list:
    """The first `count` candidates that are no near-duplicate of `positive`, completed by random `documents`."""
    kept = [c for c in dict.fromkeys(candidates) if not near_duplicate(c, positive)][:count]
    for i in rng.permutation(len(documents)):
        if len(kept) == count:
            break
        if documents[i] not in kept and not near_duplicate(documents[i], positive):
            kept.append(documents[i])
    return kept


def with_hard_negatives(model, pairs: list[tuple[str, str]], train: TrainConfig, prompts: dict):
    """The pairs as a `datasets.Dataset` (anchor, positive, negative_1 ... negative_N), N = --hard_negatives."""
    from datasets import Dataset

    mined = mine(model, pairs, train, prompts)
    documents = sorted({d for _, d in pairs})
    rng = np.random.default_rng(train.seed_for("negatives"))
    rows = [[q, d, *choose(mined.get((q, d), []), d, train.hard_negatives, documents, rng)] for q, d in pairs]
    complete = [r for r in rows if len(r) == 2 + train.hard_negatives]
    mined_share = sum(1 for q, d in pairs if len(mined.get((q, d), [])) >= train.hard_negatives) / max(1, len(pairs))
    logger.info("hard negatives: %d per pair for %d pairs (%.0f%% had enough mined candidates before filtering)",
                train.hard_negatives, len(complete), 100 * mined_share)
    columns = ["anchor", "positive", *(f"negative_{i + 1}" for i in range(train.hard_negatives))]
    return Dataset.from_dict({c: [r[i] for r in complete] for i, c in enumerate(columns)})
