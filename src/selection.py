"""Model selection: the development signal that decides which training state is kept (step 0, the base, included).

With pair columns, the held-out items' own pairs (a catalog's title -> description) search among the training
documents. Documents alone have no queries: development pairs are built from held-out documents by a
construction of src/document_pairs.py, and `auto` picks one the objective does NOT train on. Pairs built like
the training pairs reward the training task itself: they kept rising while real queries fell, where pairs of
another construction fell with the real queries (README, "Documents alone", measured with the monitor).

`--monitor_data` scores labelled held-out data beside the development pairs at every evaluation. It is logged
(training_log.json, run.json, loss.png) and never selected on: it measures whether the development signal agrees
with real queries.
"""

from __future__ import annotations

import logging

import numpy as np
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, SequentialEvaluator

from src.config import Config
from src.create_dataset import TrainingData
from src.document_pairs import DocumentPairs
from src.objectives import parts
from src.retrieval_data import RetrievalData, pairs_to_retrieval

logger = logging.getLogger(__name__)

DEV_NAME, MONITOR_NAME = "dev", "monitor"  # evaluator names: metrics dev_cosine_ndcg@10, monitor_cosine_ndcg@10
AUTO_CONSTRUCTIONS = ("crop", "lead", "ict")  # --dev_construction auto: the first the objective does not train on


def dev_construction(cfg: Config) -> str:
    """--dev_construction auto: crop, or the next construction of AUTO_CONSTRUCTIONS the objective does not train
    on (lead when it trains crop)."""
    if cfg.train.dev_construction != "auto":
        return cfg.train.dev_construction
    trained = parts(cfg.train.objective)
    return next((c for c in AUTO_CONSTRUCTIONS if c not in trained), AUTO_CONSTRUCTIONS[0])


def development_pairs(data: TrainingData, construction: str, seed: int) -> tuple[list, list[str]]:
    """The development pairs and the pool of distractor documents: the held-out items' pair columns when the
    file has them; for documents alone, pairs built by `construction` from held-out documents (which never
    train), among the positive sides built the same way from training documents."""
    if data.dev_pairs:
        return data.dev_pairs, sorted({d for _, d in data.pairs})
    dev = DocumentPairs(construction, seed + 1)
    pool = DocumentPairs(construction, seed + 2)
    pairs = [dev(t, i) for i, t in enumerate(data.dev_texts)]
    return [(q, d) for q, d in pairs if q != d], [pool(t, i)[1] for i, t in enumerate(data.texts)]


class MonitorEvaluator(InformationRetrievalEvaluator):
    """The evaluator, leaving nothing in the saved model's card: the monitor's data (often the very test set) is
    watched, and its scores must not read as the model's own evaluation."""

    def store_metrics_in_model_card_data(self, *args, **kwargs) -> None:
        """Not stored (see the class docstring)."""


def retrieval_evaluator(name: str, data: RetrievalData, model: SentenceTransformer, batch_size: int,
                        kind: type = InformationRetrievalEvaluator):
    """sentence-transformers' evaluator over queries, corpus and qrels (binary: relevant or not), with the model's
    e5 prompts."""
    prompts = model.prompts or {}
    return kind(
        data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()}, name=name, batch_size=batch_size,
        query_prompt=prompts.get("query"), corpus_prompt=prompts.get("passage"), ndcg_at_k=[10], mrr_at_k=[10],
        accuracy_at_k=[1], precision_recall_at_k=[10], map_at_k=[100])


def dev_evaluator(model: SentenceTransformer, data: TrainingData, cfg: Config):
    """nDCG@10 of the development queries against their documents, among up to --dev_distractors others
    (without them, ~100 documents make the task too easy to tell checkpoints apart): the model-selection
    signal. Development items are excluded from training, and the held-out test pairs are never looked at."""
    construction = dev_construction(cfg)
    pairs, pool = development_pairs(data, construction, cfg.train.seed)
    if len(pairs) < 10:
        return None
    dev = pairs_to_retrieval(pairs, "development pairs")
    others = sorted(set(pool) - set(dev.corpus.values()))
    chosen = np.random.default_rng(cfg.train.seed).permutation(len(others))[: cfg.train.dev_distractors]
    dev.corpus = dict(dev.corpus) | {f"t{i}": others[i] for i in chosen}
    built = "" if data.dev_pairs else f" ({construction} pairs of held-out documents)"
    logger.info("model selection: %d development queries%s among %d documents", len(dev.queries), built,
                len(dev.corpus))
    if not data.dev_pairs and construction in parts(cfg.train.objective):
        logger.warning("model selection uses %s pairs of held-out documents, built like the training pairs: they "
                       "reward the training task itself, not real queries (README, \"Documents alone\"); use "
                       "--dev_construction auto, and judge the result with --eval_data", construction)
    return retrieval_evaluator(DEV_NAME, dev, model, cfg.eval.eval_batch_size)


def selection_evaluator(model: SentenceTransformer, data: TrainingData, cfg: Config, monitor: RetrievalData | None):
    """The development evaluator, followed by the monitor when --monitor_data is given (its score never selects)."""
    dev = dev_evaluator(model, data, cfg)
    if dev is None or monitor is None:
        if monitor is not None:
            logger.warning("--monitor_data is not scored: too few development pairs for model selection")
        return dev
    logger.info("monitoring %s: %d queries among %d documents, scored at every development evaluation, never "
                "selected on", cfg.train.monitor_data, len(monitor.queries), len(monitor.corpus))
    watched = retrieval_evaluator(MONITOR_NAME, monitor, model, cfg.eval.eval_batch_size, MonitorEvaluator)
    return SequentialEvaluator([dev, watched], main_score_function=lambda scores: scores[0])


def development_part(evaluator):
    """The development evaluator alone, without the monitor (for the adapter-scale search)."""
    return evaluator.evaluators[0] if isinstance(evaluator, SequentialEvaluator) else evaluator
