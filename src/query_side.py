"""Query-side adaptation (`--adapt queries`): the LoRA adapter trains on queries alone, against the base model's
stored embeddings of the training documents, so that no document is ever encoded by the adapted model and a user's
existing index stays valid (only the query encoder is swapped).

    pairs (--pair_columns)   each title -> the stored embedding of its own description
    documents alone          the part's pseudo-query (lead: the leading line) -> the stored embedding of the whole
                             document, as the index holds it

The loss is a softmax over the stored embeddings of every document of the bank, not only the batch's: each query
sees every other training document as a negative, the hard ones included, at the cost of one matrix product.
Mined negatives add nothing here (and --hard_negatives is refused with this mode, src/plan.py).

Reference: query representations optimized against a fixed document index, as in Sung et al., "Optimizing
Test-Time Query Representations for Dense Retrieval", Findings of ACL 2023 (there per query at test time; here one
adapter, trained once on the domain's queries).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from src.config import DOCUMENT_CONSTRUCTIONS
from src.create_dataset import TrainingData
from src.document_pairs import DocumentPairs
from src.encoding import StoredEncoder
from src.objectives import BuildInputs, Objective

logger = logging.getLogger(__name__)

QUERY_SIDE_PARTS = ("mnrl", *DOCUMENT_CONSTRUCTIONS)  # objectives with a query side (tsdae and simcse have none)
# --adapt values that train the query side alone: `queries` keeps the stored document vectors as they are;
# `queries+map` also learns one linear map of them (the index is then rewritten by one matrix product, no document
# text encoded again).
QUERY_SIDE_MODES = ("queries", "queries+map")
# Documents alone: the bank (and the documents whose pseudo-queries train) is a seeded sample of at most this many
# training documents. The documents recipe trains a fixed number of pairs whatever the file's size, so without a cap
# a 100,000-document file would spend most of a run encoding its bank; 8,192 stored embeddings of 384 dimensions
# are 12.6 million floats, and a batch's logits over them 32 x 8,192. Pairs use every pair's own document: each
# of them trains.
BANK_DOCUMENTS = 8192


class StoredEmbeddingsLoss(torch.nn.Module):
    """Cross-entropy of each query's similarity to every stored document embedding, its own document the target.

    Args:
        model: the SentenceTransformer being trained (its query side).
        bank: normalized, fixed document embeddings (rows), computed once by the base model.
        scale: inverse temperature of the softmax (e5 was trained at 0.01, scale 100).
        document_map: a square Linear applied to every stored vector (then normalized) before the search, trained
            with the adapter (`--adapt queries+map`); None: the stored vectors as they are.

    Inputs: a text column (the queries) and `label`, each query's row in `bank`. Reference: the softmax over a
    fixed index of Sung et al. (module docstring); with `bank` = the batch's documents it is
    MultipleNegativesRankingLoss with the document side frozen.
    """

    def __init__(self, model: SentenceTransformer, bank: torch.Tensor, scale: float,
                 document_map: torch.nn.Linear | None = None):
        super().__init__()
        self.model, self.scale, self.document_map = model, scale, document_map
        self.bank = bank  # a plain attribute, not a buffer: fixed data, never saved into checkpoints or models

    def forward(self, sentence_features, labels: torch.Tensor) -> torch.Tensor:
        queries = self.model(sentence_features[0])["sentence_embedding"]
        if self.bank.device != queries.device:
            self.bank = self.bank.to(queries.device)  # once: the bank stays on the training device
        # fp32 similarities even under bf16 autocast: bf16 rounds a cosine near 0.8 by about 0.004, a logit by 0.4
        with torch.autocast(queries.device.type, enabled=False):
            documents = mapped(self.bank, self.document_map)
            logits = self.scale * F.normalize(queries.float(), dim=-1) @ documents.T
        return F.cross_entropy(logits, labels.to(queries.device))

    @property
    def citation(self) -> str:
        return "Sung et al., Optimizing Test-Time Query Representations for Dense Retrieval, Findings of ACL 2023"


def mapped(vectors: torch.Tensor, document_map: torch.nn.Linear | None) -> torch.Tensor:
    """Stored document vectors as the search sees them: through the document map and normalized again, if any."""
    if document_map is None:
        return vectors
    return F.normalize(document_map(vectors.to(document_map.weight.dtype)), dim=-1)


def attach_document_map(model: SentenceTransformer, dimension: int) -> torch.nn.Linear:
    """A `dimension` x `dimension` map starting as the identity (so step 0 is the base), registered under the
    model's first module, as the TSDAE decoder is: the optimizer, data-parallel wrappers, the checkpoints and model
    selection's best state all see its weight. `detach_document_map` takes it off before the model is saved."""
    document_map = torch.nn.Linear(dimension, dimension, bias=False, device=model.device)
    with torch.no_grad():
        document_map.weight.copy_(torch.eye(dimension))
    model[0].document_map = document_map
    return document_map


def detach_document_map(model: SentenceTransformer) -> torch.nn.Linear | None:
    """The trained document map, taken off the model (None when the run trains none)."""
    document_map = getattr(model[0], "document_map", None)
    if document_map is not None:
        del model[0].document_map
    return document_map


def pairs_bank(data: TrainingData) -> tuple[list[str], list[tuple[str, int]]]:
    """The distinct documents of the training pairs, and each pair as (query, its document's row)."""
    rows: dict[str, int] = {}
    for _, document in data.pairs:
        rows.setdefault(document, len(rows))
    return list(rows), [(query, rows[document]) for query, document in data.pairs]


def documents_bank(texts: list[str], seed: int) -> list[int]:
    """The training documents the bank holds (and whose pseudo-queries train): all, or a seeded sample of
    BANK_DOCUMENTS in file order."""
    if len(texts) <= BANK_DOCUMENTS:
        return list(range(len(texts)))
    chosen = np.sort(np.random.default_rng(seed).choice(len(texts), size=BANK_DOCUMENTS, replace=False))
    logger.info("query side: a bank of %d of the %d training documents (a seeded sample)", BANK_DOCUMENTS, len(texts))
    return chosen.tolist()


def bank_queries(objective: str, texts: list[str], seed: int) -> tuple[list[int], DocumentPairs]:
    """On documents alone: the training documents of the bank, and the construction of their pseudo-queries."""
    return documents_bank(texts, seed), DocumentPairs(objective, seed, texts)


def training_queries(objective: str, data: TrainingData, seed: int) -> list[str]:
    """The queries a query-side run sees: the pairs' queries, or on documents alone the pseudo-queries `objective`
    makes of the bank's documents (those of the first epoch)."""
    if objective == "mnrl":
        return [query for query, _ in data.pairs]
    indices, construction = bank_queries(objective, data.texts, seed)
    return [construction(data.texts[i], i)[0] for i in indices]


def pairs_queries_dataset(pairs: list[tuple[str, int]]):
    from datasets import Dataset

    return Dataset.from_dict({"anchor": [q for q, _ in pairs], "label": [row for _, row in pairs]})


def document_queries_dataset(texts: list[str], indices: list[int], construction: DocumentPairs):
    """(pseudo-query, bank row) of each document at `indices`, the query drawn lazily from the document's own
    stream (its index in `texts`): redrawn every epoch, as the symmetric objectives' pairs are."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": [texts[i] for i in indices], "index": indices,
                                 "label": list(range(len(indices)))})

    def transform(batch):
        return {"anchor": [construction(t, i)[0] for t, i in zip(batch["text"], batch["index"])],
                "label": batch["label"]}

    dataset.set_transform(transform)
    return dataset


def query_side_objective(objective: str, inputs: BuildInputs, stored: StoredEncoder,
                         with_map: bool = False) -> Objective:
    """The training dataset (queries and their documents' rows in the bank) and StoredEmbeddingsLoss over the
    base model's embeddings of the bank, for one part of QUERY_SIDE_PARTS; `with_map`: a document map trains too.
    Model selection's development data is src/selection.py's (its corpus stored the same way)."""
    model, data, seed, prompts = inputs.model, inputs.data, inputs.train.seed_for("train"), inputs.prompts
    epoch_aware = []
    if objective == "mnrl":
        documents, pairs = pairs_bank(data)
        dataset = pairs_queries_dataset(pairs)
    else:
        indices, construction = bank_queries(objective, data.texts, seed)
        documents, epoch_aware = [data.texts[i] for i in indices], [construction]
        dataset = document_queries_dataset(data.texts, indices, construction)
    bank = torch.from_numpy(stored.documents(documents))
    logger.info("query side: %d training queries against %d stored document embeddings", len(dataset), len(bank))
    query_prompt = {"anchor": prompts["query"]} if prompts.get("query") else {}
    document_map = attach_document_map(model, bank.shape[1]) if with_map else None
    return Objective(dataset, None, StoredEmbeddingsLoss(model, bank, inputs.scale, document_map), query_prompt,
                     epoch_aware=epoch_aware)
