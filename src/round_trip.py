"""Round-trip filtering of pairs made from documents: keep a document only when the base model finds it again.

A construction such as `lead` turns every document into a (query, rest) pair, but some queries say nothing about
their document: generic first lines ("Introduction", "Note", "Author:"), boilerplate shared by many pages. Trained
on, such a pair teaches the model to match noise. Round-trip consistency (Alberti et al., "Synthetic QA Corpora
Generation with Roundtrip Consistency", ACL 2019, https://arxiv.org/abs/1906.05416; Dai et al., "Promptagator",
ICLR 2023, https://arxiv.org/abs/2209.11755) keeps a generated pair only when a retriever given its query ranks
its own passage within the top k. Here the retriever is the base model itself and the candidates are the other
documents' positives in a seeded sample of POOL documents, so the cost stays fixed however large the corpus.

Written by hand: sentence-transformers' `mine_hard_negatives` ranks a corpus per query but reports no rank of
the query's own positive, which is all this needs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from src.errors import KitError

logger = logging.getLogger(__name__)
POOL = 2048  # documents judged: enough to keep a few hundred pairs; the rest of a larger corpus is left out


def own_ranks(model, pairs: list[tuple[str, str]], prompts: dict, batch_size: int = 64) -> np.ndarray:
    """For each (query, positive), how many other pairs' positives the model scores at least as high as its own
    (0 = first; a tie counts against: a query equally close to everything has found nothing)."""
    encode = dict(batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    with torch.no_grad():
        queries = model.encode([q for q, _ in pairs], prompt=prompts.get("query"), **encode)
        positives = model.encode([p for _, p in pairs], prompt=prompts.get("passage"), **encode)
    scores = (queries.float() @ positives.float().T).cpu()
    return ((scores >= scores.diagonal()[:, None]).sum(dim=1) - 1).numpy()


def round_trip_filter(model, texts: list[str], make_pair, top_k: int, prompts: dict, seed: int) -> list[int]:
    """The indices, in a seeded sample of at most POOL of `texts`, of the documents whose pair (`make_pair(text,
    index)`, as the first epoch draws it) ranks its own positive within the base model's `top_k` among the
    sample's. `model` must still be the base model: a fresh LoRA adapter is a no-op."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(texts), size=min(POOL, len(texts)), replace=False)).tolist()
    ranks = own_ranks(model, [make_pair(texts[i], i) for i in sample], prompts)
    kept = [i for i, rank in zip(sample, ranks) if rank < top_k]
    logger.info("round-trip filter: %d of %d sampled documents (of %d) find their own pair in the base model's "
                "top %d; median rank %d", len(kept), len(sample), len(texts), top_k, int(np.median(ranks)))
    if not kept:
        raise KitError(f"option --round_trip_top_k {top_k}: no training document passed the round trip; raise it")
    return kept
