"""lead, ict, crop, keys: pairs made from documents alone (src/document_pairs.py builds them), the rest of the batch
as negatives. One objective with four constructions of the pair, each its own `--objective` name:

    lead    a document's leading line or first sentence -> the rest
    ict     inverse cloze task: a sentence -> the rest of its document (Lee et al., ACL 2019)
    crop    independent cropping: two random spans of one document (Izacard et al., Contriever, TMLR 2022)
    keys    a document's most distinctive words (tf-idf) -> the document

Each epoch draws new pairs from the same documents. With --round_trip_top_k, only the documents whose pair's query
finds them in the base model's top K train (src/round_trip.py); with --hard_negatives, each pair gets negatives
mined by the base model (src/hard_negatives.py).
"""

from __future__ import annotations

from typing import Callable

from src.config import DOCUMENT_CONSTRUCTIONS
from src.document_pairs import DocumentPairs, document_pairs_dataset
from src.hard_negatives import with_hard_negatives
from src.objectives.base import (
    CONTRASTIVE_LEVERS,
    BuildInputs,
    Objective,
    ObjectiveSpec,
    contrastive_loss,
    query_passage_prompts,
    within_budget,
)
from src.round_trip import round_trip_filter

SUMMARIES = {"lead": "a document's leading line or first sentence -> the rest",
             "ict": "a sentence -> the rest of its document (inverse cloze task)",
             "crop": "two random spans of one document (independent cropping)",
             "keys": "a document's most distinctive words (tf-idf) -> the document"}


def builder(kind: str) -> Callable[[BuildInputs], Objective]:
    def build(inputs: BuildInputs) -> Objective:
        train, data, model = inputs.train, inputs.data, inputs.model
        pairs = DocumentPairs(kind, train.seed_for("train"), data.texts)
        dev_pairs = DocumentPairs(kind, train.seed_for("development"), data.texts)
        dev = document_pairs_dataset(data.dev_texts, dev_pairs) if data.dev_texts else None
        indices = (round_trip_filter(model, data.texts, pairs, train.round_trip_top_k, inputs.prompts,
                                     train.seed_for("train")) if train.round_trip_top_k else None)
        if train.hard_negatives:  # mined for the first epoch's pairs, which then repeat every epoch
            chosen = within_budget(range(len(data.texts)) if indices is None else indices, inputs)
            dataset = with_hard_negatives(model, [pairs(data.texts[i], i) for i in chosen], train, inputs.prompts)
        else:
            dataset = document_pairs_dataset(data.texts, pairs, indices)
        return Objective(dataset, dev, contrastive_loss(inputs), query_passage_prompts(inputs.prompts,
                                                                                      dataset.column_names),
                         epoch_aware=[] if train.hard_negatives else [pairs])

    return build


SPECS = [ObjectiveSpec(kind, SUMMARIES[kind], builder(kind),
                       levers=("hard_negatives", "round_trip_top_k", *CONTRASTIVE_LEVERS))
         for kind in DOCUMENT_CONSTRUCTIONS]
