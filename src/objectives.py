"""Training objectives: each turns TrainingData into datasets + a loss for the sentence-transformers trainer.

An objective is one part or several joined by '+' (`tsdae+lead`): batches are then drawn from each part's data
in proportion (the trainer's multi-dataset mode). The parts:

    mnrl    (query, document) pairs of the same item (--pair_columns, e.g. a catalog's title -> description)
    ict     inverse cloze task on documents: a sentence -> the rest of its document      (src/document_pairs.py)
    crop    independent cropping: two random spans of one document                       (src/document_pairs.py)
    lead    a document's leading line or first sentence -> the rest                      (src/document_pairs.py)
    keys    a document's most distinctive words (tf-idf) -> the document                  (src/document_pairs.py)
    simcse  the same text twice, different dropout masks
    tsdae   denoising auto-encoder on single texts                                       (src/tsdae.py)

All but tsdae use in-batch negatives (MultipleNegativesRankingLoss). What `auto` resolves to is src/plan.py's
decision; model selection, on development pairs, is src/selection.py.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

from src.config import DOCUMENT_CONSTRUCTIONS, NoiseConfig, TrainConfig
from src.create_dataset import TrainingData, pairs_dataset
from src.document_pairs import DocumentPairs, document_pairs_dataset
from src.hard_negatives import with_hard_negatives
from src.model_builder import world_size
from src.noise import WordNoise, noisy_dataset
from src.round_trip import round_trip_filter
from src.tsdae import TSDAELoss, corpus_vocabulary

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Losses


@contextlib.contextmanager
def adapters_disabled(model: SentenceTransformer):
    """The base model, computed by the same (4-bit) weights with the LoRA adapter switched off."""
    hf_model = model[0].auto_model
    hf_model.disable_adapters()
    try:
        yield
    finally:
        hf_model.enable_adapters()


class BaseAnchoredLoss(torch.nn.Module):
    """A contrastive loss plus a guard against forgetting: `weight` x the mean squared distance between each
    text's adapted embedding and its base embedding. The base embeddings come from the same model with its
    adapter disabled, without gradients: no second model in memory, one extra forward pass per batch.

    Args:
        model: the SentenceTransformer being trained (with a LoRA adapter).
        loss: a loss with `compute_loss_from_embeddings` (MultipleNegativesRankingLoss).
        weight: strength of the anchor; 0 leaves `loss` unchanged.

    Inputs: the columns `loss` takes. Reference: the L2 "starting point" regulariser of Li, Grandvalet, Davoine,
    "Explicit Inductive Bias for Transfer Learning with Convolutional Networks", ICML 2018 (L2-SP), applied to
    outputs, as in LwF (Li & Hoiem, "Learning without Forgetting", TPAMI 2017).
    """

    def __init__(self, model: SentenceTransformer, loss: MultipleNegativesRankingLoss, weight: float):
        super().__init__()
        self.model, self.loss, self.weight = model, loss, weight

    def forward(self, sentence_features, labels):
        sentence_features = list(sentence_features)
        embeddings = embed_columns(self.model, sentence_features)
        loss = self.loss.compute_loss_from_embeddings(embeddings, labels)
        with torch.no_grad(), adapters_disabled(self.model), warnings.catch_warnings():
            # gradient checkpointing warns that a pass without gradients has none: true, and wanted here
            warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")
            base = [self.model(f)["sentence_embedding"] for f in sentence_features]
        drift = torch.stack([((e.float() - b.float()) ** 2).sum(-1).mean() for e, b in zip(embeddings, base)]).mean()
        return loss + self.weight * drift


def contrastive_loss(train: TrainConfig, model: SentenceTransformer):
    """MultipleNegativesRankingLoss; its cached (GradCache) form with --mini_batch_size, the same loss and gradients
    (up to float rounding) computed a mini-batch at a time; with --anchor_weight, the forgetting guard around it."""
    if train.mini_batch_size:
        return CachedMultipleNegativesRankingLoss(model, scale=train.mnrl_scale, mini_batch_size=train.mini_batch_size)
    loss = MultipleNegativesRankingLoss(model, scale=train.mnrl_scale)
    return BaseAnchoredLoss(model, loss, train.anchor_weight) if train.anchor_weight else loss


# --------------------------------------------------------------------------------------------------------
# The parts


@dataclass
class Objective:
    """What the trainer needs: training and development datasets, loss and column prompts (for one part; dicts
    keyed by part when there are several), the TSDAE decoder when there is one, and what must hear about each
    new epoch (anything with an `epoch` attribute: WordNoise, DocumentPairs)."""

    train_dataset: object
    eval_dataset: object
    loss: object
    prompts: dict
    decoder: torch.nn.Module | None = None
    epoch_aware: list = field(default_factory=list)


def build_tsdae(train: TrainConfig, noise: NoiseConfig, model, data: TrainingData, prompts: dict) -> Objective:
    vocab = None
    if train.decoder_vocab == "corpus":
        vocab = corpus_vocabulary(model, data.texts + data.dev_texts)
        logger.info("decoder softmax over %d corpus tokens (of %d)", len(vocab), model[0].auto_model.config.vocab_size)
    loss = TSDAELoss(model, vocab, train.loss_chunk_tokens, train.gradient_checkpointing)
    words = WordNoise(noise, train.seed_for("train"))
    # fixed noise on the development texts: comparable losses from one evaluation to the next
    dev = noisy_dataset(data.dev_texts, WordNoise(noise, train.seed_for("development"))) if data.dev_texts else None
    passage = prompts.get("passage")
    prompts = {"noisy": passage} if passage else {}
    return Objective(noisy_dataset(data.texts, words), dev, loss, prompts, loss.decoder, [words])


def build_simcse(train: TrainConfig, noise: NoiseConfig, model, data: TrainingData, prompts: dict) -> Objective:
    # Dropout is the only noise: the two copies of a text differ by their dropout masks (Gao et al. 2021).
    dev = pairs_dataset([(t, t) for t in data.dev_texts]) if data.dev_texts else None
    passage = prompts.get("passage")
    return Objective(pairs_dataset([(t, t) for t in data.texts]), dev, contrastive_loss(train, model),
                     {"anchor": passage, "positive": passage} if passage else {})


def build_mnrl(train: TrainConfig, noise: NoiseConfig, model, data: TrainingData, prompts: dict) -> Objective:
    """(query, document) pairs; with --hard_negatives, each with mined negative documents (src/hard_negatives.py)."""
    dataset = (with_hard_negatives(model, data.pairs, train, prompts) if train.hard_negatives
               else pairs_dataset(data.pairs))
    return Objective(dataset, pairs_dataset(data.dev_pairs) if data.dev_pairs else None,
                     contrastive_loss(train, model), query_passage_prompts(prompts, dataset.column_names))


def examples_per_step(train: TrainConfig, world: int) -> int:
    """The effective batch: examples per optimizer step over every process."""
    return train.batch_size * train.gradient_accumulation_steps * world


def within_budget(documents, train: TrainConfig) -> list[int]:
    """The documents a run with mined negatives trains on: with a fixed number of steps (the documents default, or
    --max_steps), a seeded sample of as many as those steps take, so that mining (the base model encoding every
    candidate and query) costs a fixed share of the training however large the file; otherwise all of them."""
    documents = list(documents)
    budget = train.max_steps * examples_per_step(train, world_size())
    if not budget or budget >= len(documents):
        return documents
    rng = np.random.default_rng(train.seed_for("negatives"))
    logger.info("hard negatives: mined among the %d documents the run's %d steps train on, of %d", budget,
                train.max_steps, len(documents))
    return [documents[i] for i in np.sort(rng.choice(len(documents), size=budget, replace=False))]


def document_part(kind: str) -> Callable:
    def build(train: TrainConfig, noise: NoiseConfig, model, data: TrainingData, prompts: dict) -> Objective:
        pairs = DocumentPairs(kind, train.seed_for("train"), data.texts)
        dev_pairs = DocumentPairs(kind, train.seed_for("development"), data.texts)
        dev = document_pairs_dataset(data.dev_texts, dev_pairs) if data.dev_texts else None
        indices = (round_trip_filter(model, data.texts, pairs, train.round_trip_top_k, prompts,
                                     train.seed_for("train")) if train.round_trip_top_k else None)
        if train.hard_negatives:  # mined for the first epoch's pairs, which then repeat every epoch
            chosen = within_budget(range(len(data.texts)) if indices is None else indices, train)
            dataset = with_hard_negatives(model, [pairs(data.texts[i], i) for i in chosen], train, prompts)
        else:
            dataset = document_pairs_dataset(data.texts, pairs, indices)
        return Objective(dataset, dev, contrastive_loss(train, model),
                         query_passage_prompts(prompts, dataset.column_names),
                         epoch_aware=[] if train.hard_negatives else [pairs])

    return build


def query_passage_prompts(prompts: dict, columns: list[str] = ("anchor", "positive")) -> dict:
    """e5 prompts: `query: ` on the short side (the first column), `passage: ` on the documents (every other)."""
    if not prompts.get("passage"):
        return {}
    return {column: prompts.get("query", "") if i == 0 else prompts["passage"] for i, column in enumerate(columns)}


@dataclass(frozen=True)
class Part:
    needs_pairs: bool  # reads --pair_columns (else the --text_column documents)
    in_batch_negatives: bool  # the rest of the batch are negatives, so a batch must not hold a text twice
    build: Callable[..., Objective]


# Keyed by src/config.py's OBJECTIVE_PARTS (the names' one home; tests/test_objectives.py checks both agree).
PARTS = {
    "tsdae": Part(False, False, build_tsdae),
    "simcse": Part(False, True, build_simcse),
    "mnrl": Part(True, True, build_mnrl),
    **{kind: Part(False, True, document_part(kind)) for kind in DOCUMENT_CONSTRUCTIONS},
}


def parts(objective: str) -> list[str]:
    return objective.split("+")


def needs_pairs(objective: str) -> bool:
    return any(PARTS[p].needs_pairs for p in parts(objective))


def needs_texts(objective: str) -> bool:
    return any(not PARTS[p].needs_pairs for p in parts(objective))


def uses_in_batch_negatives(objective: str) -> bool:
    return any(PARTS[p].in_batch_negatives for p in parts(objective))


# --------------------------------------------------------------------------------------------------------
# The objective, assembled


def build_objective(objective: str, train: TrainConfig, noise: NoiseConfig, model: SentenceTransformer,
                    data: TrainingData) -> Objective:
    """Each part of `objective` built; several parts become one Objective of dicts keyed by part (the trainer's
    multi-dataset mode draws each batch from one part, in proportion to their sizes)."""
    built = {p: PARTS[p].build(train, noise, model, data, model.prompts or {}) for p in parts(objective)}
    if len(built) == 1:
        return next(iter(built.values()))
    dev = {p: b.eval_dataset for p, b in built.items() if b.eval_dataset is not None} or None
    return Objective({p: b.train_dataset for p, b in built.items()}, dev, {p: b.loss for p, b in built.items()},
                     {p: b.prompts for p, b in built.items()},
                     next((b.decoder for b in built.values() if b.decoder is not None), None),
                     [item for b in built.values() for item in b.epoch_aware])
