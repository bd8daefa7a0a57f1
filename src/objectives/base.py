"""What an objective declares (`ObjectiveSpec`), what it is given (`BuildInputs`) and what it builds for the
trainer (`Objective`), with the pieces the contrastive objectives share: the in-batch loss, the guard against
forgetting, e5's prompts per column.
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

from src.config import NoiseConfig, TrainConfig
from src.create_dataset import TrainingData
from src.model_builder import world_size

logger = logging.getLogger(__name__)

# An objective's defaults where it declares none (and for several parts joined by '+'): every objective but the
# pairs' was measured at learning rate 1e-4 and similarity scale 20 (docs/RESULTS.md); after model selection, the
# adapter at half strength competes too.
LEARNING_RATE, SCALE, LORA_SCALES = 1e-4, 20.0, (0.5,)
# Options shared by several objectives, off (0) by default; each objective names those that act on it.
LEVERS = ("hard_negatives", "round_trip_top_k", "anchor_weight", "mini_batch_size")
CONTRASTIVE_LEVERS = ("anchor_weight", "mini_batch_size")


@dataclass(frozen=True)
class BuildInputs:
    """What an objective's builder reads: the settings, the values the run's plan resolved, the model being trained
    and the training data.

    Args:
        train, noise: the requested settings (levers, seeds, TSDAE's noise).
        scale: the in-batch softmax's similarity scale, as the plan resolved it.
        max_steps: the run's optimizer steps, as the plan resolved them (0: epochs decide).
        model: the SentenceTransformer being trained (with its LoRA adapter).
        data: the training and development texts and pairs.
    """

    train: TrainConfig
    noise: NoiseConfig
    scale: float
    max_steps: int
    model: SentenceTransformer
    data: TrainingData

    @property
    def prompts(self) -> dict:
        return self.model.prompts or {}


@dataclass
class Objective:
    """What the trainer needs: training and development datasets, loss and column prompts (for one part; dicts
    keyed by part when there are several); `modules`: trainable modules besides the encoder (TSDAE's decoder),
    attached to the model while it trains so that data-parallel wrappers and checkpoints include them;
    `callbacks`: the objective's own trainer callbacks; `epoch_aware`: what must hear about each new epoch
    (anything with an `epoch` attribute: WordNoise, DocumentPairs)."""

    train_dataset: object
    eval_dataset: object
    loss: object
    prompts: dict
    modules: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)
    epoch_aware: list = field(default_factory=list)


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective, as `--objective NAME` trains it and src/plan.py plans it.

    Args:
        name: its `--objective` name.
        summary: what it trains on, in one line (`--objective` help, the log).
        build: BuildInputs -> Objective.
        needs_pairs: it reads the --pair_columns (else the --text_column documents).
        in_batch_negatives: the rest of the batch are negatives, so a batch must not hold a text twice.
        levers: the shared options, off by default, that act on it (LEVERS; one set for an objective without it is
            a one-line error, never ignored).
        learning_rate, scale: its defaults for `--learning_rate 0` and `--mnrl_scale 0`, trained alone.
        lora_scales: adapter strengths tried after model selection for `--lora_scales auto`, trained alone.
        evaluate_each_epoch: `--eval_steps 0` evaluates at each epoch's end (else a few times a run).
    """

    name: str
    summary: str
    build: Callable[[BuildInputs], Objective]
    needs_pairs: bool = False
    in_batch_negatives: bool = True
    levers: tuple[str, ...] = ()
    learning_rate: float = LEARNING_RATE
    scale: float = SCALE
    lora_scales: tuple[float, ...] = LORA_SCALES
    evaluate_each_epoch: bool = False


# --------------------------------------------------------------------------------------------------------
# Shared by the contrastive objectives


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


def contrastive_loss(inputs: BuildInputs):
    """MultipleNegativesRankingLoss; its cached (GradCache) form with --mini_batch_size, the same loss and gradients
    (up to float rounding) computed a mini-batch at a time; with --anchor_weight, the forgetting guard around it."""
    train, model = inputs.train, inputs.model
    if train.mini_batch_size:
        return CachedMultipleNegativesRankingLoss(model, scale=inputs.scale, mini_batch_size=train.mini_batch_size)
    loss = MultipleNegativesRankingLoss(model, scale=inputs.scale)
    return BaseAnchoredLoss(model, loss, train.anchor_weight) if train.anchor_weight else loss


def query_passage_prompts(prompts: dict, columns: list[str] = ("anchor", "positive")) -> dict:
    """e5 prompts: `query: ` on the short side (the first column), `passage: ` on the documents (every other)."""
    if not prompts.get("passage"):
        return {}
    return {column: prompts.get("query", "") if i == 0 else prompts["passage"] for i, column in enumerate(columns)}


def examples_per_step(train: TrainConfig, world: int) -> int:
    """The effective batch: examples per optimizer step over every process."""
    return train.batch_size * train.gradient_accumulation_steps * world


def within_budget(documents, inputs: BuildInputs) -> list[int]:
    """The documents a run with mined negatives trains on: with a fixed number of steps (the documents default, or
    --max_steps), a seeded sample of as many as those steps take, so that mining (the base model encoding every
    candidate and query) costs a fixed share of the training however large the file; otherwise all of them."""
    documents = list(documents)
    budget = inputs.max_steps * examples_per_step(inputs.train, world_size())
    if not budget or budget >= len(documents):
        return documents
    rng = np.random.default_rng(inputs.train.seed_for("negatives"))
    logger.info("hard negatives: mined among the %d documents the run's %d steps train on, of %d", budget,
                inputs.max_steps, len(documents))
    return [documents[i] for i in np.sort(rng.choice(len(documents), size=budget, replace=False))]
