"""Training objectives: each turns TrainingData into datasets + a loss for the sentence-transformers trainer.

    tsdae        denoising auto-encoder on single texts (src/tsdae.py), unsupervised
    simcse       the same text twice, different dropout masks, in-batch negatives; unsupervised
    mnrl         (query, document) pairs of the same training item, in-batch negatives
    tsdae+mnrl   both at once, batches drawn from each in proportion (the trainer's multi-dataset mode)

The mnrl objectives use the structure a catalog already has (an item's title and its description) and are
what moves an already retrieval-trained encoder such as e5 in the right direction; TSDAE and SimCSE need no
structure at all. The development pairs of held-out training items drive model selection for every objective
(see `dev_evaluator`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from src.config import Config
from src.create_dataset import TrainingData, WordNoise, noisy_dataset, pairs_to_retrieval
from src.tsdae import TSDAELoss, corpus_vocabulary

logger = logging.getLogger(__name__)

OBJECTIVE_PARTS = {"tsdae": ["tsdae"], "simcse": ["simcse"], "mnrl": ["mnrl"], "tsdae+mnrl": ["tsdae", "mnrl"]}
DEV_METRIC = "eval_dev_cosine_ndcg@10"  # InformationRetrievalEvaluator(name="dev"), as the trainer logs it


def needs_pairs(objective: str) -> bool:
    return "mnrl" in OBJECTIVE_PARTS[objective]


def needs_texts(objective: str) -> bool:
    return any(p in ("tsdae", "simcse") for p in OBJECTIVE_PARTS[objective])


def uses_in_batch_negatives(objective: str) -> bool:
    """mnrl and simcse treat the rest of the batch as negatives, so a batch must not hold a text twice."""
    return any(p != "tsdae" for p in OBJECTIVE_PARTS[objective])


@dataclass
class Objective:
    """What the trainer needs: datasets and losses (dicts keyed by part when there are several), the prompt
    of each column, the TSDAE decoder and noise when there is one."""

    train_dataset: object
    eval_dataset: object
    loss: object
    prompts: dict
    decoder: torch.nn.Module | None = None
    noise: WordNoise | None = None


def pairs_dataset(pairs: list[tuple[str, str]]):
    from datasets import Dataset

    return Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})


def build_objective(cfg: Config, model: SentenceTransformer, data: TrainingData) -> Objective:
    prompts = model.prompts or {}
    query, passage = prompts.get("query", ""), prompts.get("passage", "")
    train, dev, losses, column_prompts = {}, {}, {}, {}
    decoder = noise = None
    for part in OBJECTIVE_PARTS[cfg.train.objective]:
        if part == "tsdae":
            vocab = None
            if cfg.train.decoder_vocab == "corpus":
                vocab = corpus_vocabulary(model, data.texts + data.dev_texts)
                logger.info("decoder softmax over %d corpus tokens (of %d)", len(vocab),
                            model[0].auto_model.config.vocab_size)
            losses[part] = TSDAELoss(model, vocab, cfg.train.loss_chunk_tokens, cfg.train.gradient_checkpointing)
            decoder, noise = losses[part].decoder, WordNoise(cfg.noise, cfg.train.seed)
            train[part] = noisy_dataset(data.texts, noise)
            # fixed noise on the development texts: comparable losses from one evaluation to the next
            dev[part] = noisy_dataset(data.dev_texts, WordNoise(cfg.noise, cfg.train.seed + 1)) if data.dev_texts else None
            column_prompts[part] = {"noisy": passage} if passage else {}
        elif part == "simcse":
            # Dropout is the only noise: the two copies of a text differ by their dropout masks (Gao et al. 2021).
            losses[part] = MultipleNegativesRankingLoss(model, scale=cfg.train.mnrl_scale)
            train[part] = pairs_dataset([(t, t) for t in data.texts])
            dev[part] = pairs_dataset([(t, t) for t in data.dev_texts]) if data.dev_texts else None
            column_prompts[part] = {"anchor": passage, "positive": passage} if passage else {}
        else:
            losses[part] = MultipleNegativesRankingLoss(model, scale=cfg.train.mnrl_scale)
            train[part] = pairs_dataset(data.pairs)
            dev[part] = pairs_dataset(data.dev_pairs) if data.dev_pairs else None
            column_prompts[part] = {"anchor": query, "positive": passage} if passage else {}
    dev = {k: v for k, v in dev.items() if v is not None} or None
    if len(losses) == 1:
        part = next(iter(losses))
        return Objective(train[part], (dev or {}).get(part), losses[part], column_prompts[part], decoder, noise)
    return Objective(train, dev, losses, column_prompts, decoder, noise)


def dev_evaluator(model: SentenceTransformer, data: TrainingData, batch_size: int, distractors: int, seed: int):
    """nDCG@10 of the development items' queries against their documents, among up to `distractors` training
    documents (without them, ~100 documents make the task too easy to tell checkpoints apart): the
    model-selection signal. Development items are excluded from training, and the held-out test pairs are
    never looked at during training."""
    if len(data.dev_pairs) < 10:
        return None
    dev = pairs_to_retrieval(data.dev_pairs, "development pairs")
    dev_docs = set(dev.corpus.values())
    others = sorted({d for _, d in data.pairs} - dev_docs)
    chosen = np.random.default_rng(seed).permutation(len(others))[:distractors]
    corpus = dict(dev.corpus) | {f"t{i}": others[i] for i in chosen}
    prompts = model.prompts or {}
    return InformationRetrievalEvaluator(
        dev.queries, corpus, {q: set(d) for q, d in dev.qrels.items()}, name="dev", batch_size=batch_size,
        query_prompt=prompts.get("query"), corpus_prompt=prompts.get("passage"), ndcg_at_k=[10],
        mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10], map_at_k=[100])
