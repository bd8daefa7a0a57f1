"""Training objectives: each turns TrainingData into datasets + a loss for the sentence-transformers trainer.

An objective is one part or several joined by '+' (`tsdae+lead`): batches are then drawn from each part's data
in proportion (the trainer's multi-dataset mode). The parts:

    mnrl    (query, document) pairs of the same item (--pair_columns, e.g. a catalog's title -> description)
    ict     inverse cloze task on documents: a sentence -> the rest of its document      (src/document_pairs.py)
    crop    independent cropping: two random spans of one document                       (src/document_pairs.py)
    lead    a document's leading line or first sentence -> the rest                      (src/document_pairs.py)
    simcse  the same text twice, different dropout masks
    tsdae   denoising auto-encoder on single texts                                       (src/tsdae.py)

All but tsdae use in-batch negatives (MultipleNegativesRankingLoss). `auto`, the default, picks `mnrl` when the
training file has the pair columns and DOCUMENTS_DEFAULT otherwise (README: measured on every development
collection). Model selection, on development pairs, is src/selection.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from src.config import OBJECTIVE_PARTS, Config, TrainConfig
from src.create_dataset import TrainingData
from src.document_pairs import DocumentPairs, document_pairs_dataset
from src.errors import UsageError
from src.noise import WordNoise, noisy_dataset
from src.tsdae import TSDAELoss, corpus_vocabulary

logger = logging.getLogger(__name__)

DOCUMENTS_DEFAULT = "lead"  # what `auto` trains on documents alone: the best measured recipe (README)
# ... on this many pairs, with no model selection. On every development collection the held-out titles gained
# within the first few hundred pairs, and one epoch on the largest lost up to 6 points; no label-free development
# signal ranked checkpoints as the titles did, and selecting on crop pairs vetoed a +3 point gain (README).
DOCUMENTS_PAIRS = 320


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


def contrastive_loss(cfg: Config, model: SentenceTransformer):
    loss = MultipleNegativesRankingLoss(model, scale=cfg.train.mnrl_scale)
    return BaseAnchoredLoss(model, loss, cfg.train.anchor_weight) if cfg.train.anchor_weight else loss


# --------------------------------------------------------------------------------------------------------
# The parts


def pairs_dataset(pairs: list[tuple[str, str]]):
    from datasets import Dataset

    return Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})


@dataclass
class Built:
    """One part, built: its training and development datasets, loss, column prompts, and what the trainer must
    know about (the TSDAE decoder, the epoch-dependent randomness)."""

    train: object
    dev: object
    loss: object
    prompts: dict
    decoder: torch.nn.Module | None = None
    epoch_aware: object = None  # anything with an `epoch` attribute: WordNoise, DocumentPairs


def build_tsdae(cfg: Config, model, data: TrainingData, prompts: dict) -> Built:
    vocab = None
    if cfg.train.decoder_vocab == "corpus":
        vocab = corpus_vocabulary(model, data.texts + data.dev_texts)
        logger.info("decoder softmax over %d corpus tokens (of %d)", len(vocab), model[0].auto_model.config.vocab_size)
    loss = TSDAELoss(model, vocab, cfg.train.loss_chunk_tokens, cfg.train.gradient_checkpointing)
    noise = WordNoise(cfg.noise, cfg.train.seed)
    # fixed noise on the development texts: comparable losses from one evaluation to the next
    dev = noisy_dataset(data.dev_texts, WordNoise(cfg.noise, cfg.train.seed + 1)) if data.dev_texts else None
    passage = prompts.get("passage")
    prompts = {"noisy": passage} if passage else {}
    return Built(noisy_dataset(data.texts, noise), dev, loss, prompts, loss.decoder, noise)


def build_simcse(cfg: Config, model, data: TrainingData, prompts: dict) -> Built:
    # Dropout is the only noise: the two copies of a text differ by their dropout masks (Gao et al. 2021).
    dev = pairs_dataset([(t, t) for t in data.dev_texts]) if data.dev_texts else None
    passage = prompts.get("passage")
    return Built(pairs_dataset([(t, t) for t in data.texts]), dev, contrastive_loss(cfg, model),
                 {"anchor": passage, "positive": passage} if passage else {})


def build_mnrl(cfg: Config, model, data: TrainingData, prompts: dict) -> Built:
    return Built(pairs_dataset(data.pairs), pairs_dataset(data.dev_pairs) if data.dev_pairs else None,
                 contrastive_loss(cfg, model), query_passage_prompts(prompts))


def document_part(kind: str) -> Callable:
    def build(cfg: Config, model, data: TrainingData, prompts: dict) -> Built:
        pairs = DocumentPairs(kind, cfg.train.seed)
        dev_pairs = DocumentPairs(kind, cfg.train.seed + 1)
        dev = document_pairs_dataset(data.dev_texts, dev_pairs) if data.dev_texts else None
        return Built(document_pairs_dataset(data.texts, pairs), dev, contrastive_loss(cfg, model),
                     query_passage_prompts(prompts), epoch_aware=pairs)

    return build


def query_passage_prompts(prompts: dict) -> dict:
    """e5 prompts: `query: ` on the short side, `passage: ` on the document side."""
    return {"anchor": prompts.get("query", ""), "positive": prompts["passage"]} if prompts.get("passage") else {}


@dataclass(frozen=True)
class Part:
    needs_pairs: bool  # reads --pair_columns (else the --text_column documents)
    in_batch_negatives: bool  # the rest of the batch are negatives, so a batch must not hold a text twice
    build: Callable[..., Built]


PARTS = {
    "tsdae": Part(False, False, build_tsdae),
    "simcse": Part(False, True, build_simcse),
    "mnrl": Part(True, True, build_mnrl),
    **{kind: Part(False, True, document_part(kind)) for kind in ("ict", "crop", "lead")},
}
assert set(PARTS) == set(OBJECTIVE_PARTS), "src/config.py OBJECTIVE_PARTS names every part registered here"


def parts(objective: str) -> list[str]:
    return objective.split("+")


def needs_pairs(objective: str) -> bool:
    return any(PARTS[p].needs_pairs for p in parts(objective))


def needs_texts(objective: str) -> bool:
    return any(not PARTS[p].needs_pairs for p in parts(objective))


def uses_in_batch_negatives(objective: str) -> bool:
    return any(PARTS[p].in_batch_negatives for p in parts(objective))


def resolve_objective(objective: str, columns, pair_columns: list[str], text_column: str, path: str) -> str:
    """`auto` -> mnrl when the file has the pair columns, else the documents-only default; an explicit objective
    whose columns the file lacks is a one-line error that says what works for plain documents."""
    has_pairs = len(pair_columns) == 2 and all(c in columns for c in pair_columns)
    if objective == "auto":
        chosen = "mnrl" if has_pairs else DOCUMENTS_DEFAULT
        reason = (f"has the pair columns {','.join(pair_columns)}" if has_pairs else
                  f"has no pair columns ({','.join(pair_columns) or '--pair_columns is empty'}): documents alone")
        logger.info("objective auto -> %s: %s %s", chosen, path, reason)
        return chosen
    missing = [c for c in pair_columns if c not in columns] if needs_pairs(objective) else []
    if needs_pairs(objective) and (missing or len(pair_columns) != 2):
        column = missing[0] if missing else "(none given)"
        raise UsageError(f"option --objective {objective}: needs the pair column '{column}' (--pair_columns "
                         f"{','.join(pair_columns)}), which {path} lacks (has: {', '.join(map(str, columns))}); "
                         f"for plain documents use --objective auto or {DOCUMENTS_DEFAULT}")
    if needs_texts(objective) and text_column not in columns:
        raise UsageError(f"option --objective {objective}: needs the text column '{text_column}' (--text_column), "
                         f"which {path} lacks (has: {', '.join(map(str, columns))})")
    return objective


def apply_documents_recipe(train: TrainConfig, texts: int, world: int = 1) -> None:
    """`--objective auto` on documents alone: DOCUMENTS_DEFAULT on DOCUMENTS_PAIRS pairs (as many steps as that
    takes, at most --epochs over the texts; an explicit --max_steps wins), without model selection."""
    if train.monitor_data:
        raise UsageError("option --monitor_data: the documents-alone default trains without model selection; pass "
                         f"--objective {DOCUMENTS_DEFAULT} to select on development pairs and monitor them")
    per_step = train.batch_size * train.gradient_accumulation_steps * world
    if not train.max_steps and DOCUMENTS_PAIRS < texts * train.epochs:
        train.max_steps = math.ceil(DOCUMENTS_PAIRS / per_step)
    train.select_best, train.lora_scales = False, ""
    logger.info("documents alone: %s for %s steps of %d pairs, no model selection (README: measured on four "
                "collections); judge it with --eval_data on real queries", DOCUMENTS_DEFAULT,
                train.max_steps or f"{train.epochs:g} epoch(s)", per_step)


# --------------------------------------------------------------------------------------------------------
# The objective, assembled


@dataclass
class Objective:
    """What the trainer needs: datasets and losses (dicts keyed by part when there are several), the prompt
    of each column, the TSDAE decoder when there is one, and what must hear about each new epoch."""

    train_dataset: object
    eval_dataset: object
    loss: object
    prompts: dict
    decoder: torch.nn.Module | None = None
    epoch_aware: list = None


def build_objective(cfg: Config, model: SentenceTransformer, data: TrainingData) -> Objective:
    built = {p: PARTS[p].build(cfg, model, data, model.prompts or {}) for p in parts(cfg.train.objective)}
    decoder = next((b.decoder for b in built.values() if b.decoder is not None), None)
    epoch_aware = [b.epoch_aware for b in built.values() if b.epoch_aware is not None]
    if len(built) == 1:
        b = next(iter(built.values()))
        return Objective(b.train, b.dev, b.loss, b.prompts, decoder, epoch_aware)
    dev = {p: b.dev for p, b in built.items() if b.dev is not None} or None
    return Objective({p: b.train for p, b in built.items()}, dev, {p: b.loss for p, b in built.items()},
                     {p: b.prompts for p, b in built.items()}, decoder, epoch_aware)
