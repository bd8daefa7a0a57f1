"""simcse: the same text twice, the two copies differing only by their dropout masks, the rest of the batch as
negatives.

Reference: Gao, Yao, Chen, "SimCSE: Simple Contrastive Learning of Sentence Embeddings", EMNLP 2021 (unsupervised).
"""

from __future__ import annotations

from src.create_dataset import pairs_dataset
from src.objectives.base import CONTRASTIVE_LEVERS, BuildInputs, Objective, ObjectiveSpec, contrastive_loss


def build(inputs: BuildInputs) -> Objective:
    data = inputs.data
    dev = pairs_dataset([(t, t) for t in data.dev_texts]) if data.dev_texts else None
    passage = inputs.prompts.get("passage")
    return Objective(pairs_dataset([(t, t) for t in data.texts]), dev, contrastive_loss(inputs),
                     {"anchor": passage, "positive": passage} if passage else {})


SPEC = ObjectiveSpec("simcse", "each text twice, two dropout masks, in-batch negatives", build,
                     levers=CONTRASTIVE_LEVERS)
