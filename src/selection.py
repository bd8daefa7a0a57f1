"""Model selection: which training state a run keeps (step 0, the base model, included), all in one place.

The signal. With pair columns, the held-out items' own pairs (a catalog's title -> description) search among the
training documents. Documents alone have no queries: development pairs are built from held-out documents by a
construction of src/document_pairs.py that the objective does not train on (src/plan.py). Pairs built like the
training pairs reward the training task itself: they kept rising while real queries fell.

`--monitor_data` scores labelled held-out data beside the development pairs at every evaluation. It is logged
(training_log.json, run.json, loss.png) and never selected on: it measures whether the development signal agrees
with real queries.

The bookkeeping. `ModelSelection` follows a run from start to finish:

    start(trainer, checkpoint)  forget evaluations after a resumed checkpoint; score step 0 (the base) when new
    on_evaluate (a callback)    after each development evaluation, keep the best state so far (on disk)
    finish(trainer)             the final state competes, the best one is restored, the adapter scale is chosen

The best state (best_state.safetensors + best.json) lives in the run folder, the score history beside the
checkpoints (removed with them), so a resumed run remembers both.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, SequentialEvaluator
from transformers import TrainerCallback

from src.checkpoints import CHECKPOINTS, checkpoint_step, load_trainable_state, save_trainable_state
from src.config import TrainConfig
from src.create_dataset import TrainingData
from src.document_pairs import DocumentPairs
from src.encoding import StoredEncoder
from src.metrics import MAIN_METRIC, score_rankings
from src.objectives import parts
from src.plan import RunPlan
from src.query_side import mapped
from src.retrieval_data import RetrievalData, pairs_to_retrieval

logger = logging.getLogger(__name__)

DEV_NAME, MONITOR_NAME = "dev", "monitor"  # evaluator names: metrics dev_cosine_ndcg@10, monitor_cosine_ndcg@10
# run.json's and best.json's names for the development score, and the scores by step
DEV_SCORE, DEV_HISTORY, MONITOR_HISTORY = (f"dev_{MAIN_METRIC}", f"dev_{MAIN_METRIC}_by_step",
                                           f"monitor_{MAIN_METRIC}_by_step")
MIN_DEV_PAIRS = 10  # fewer development queries cannot tell checkpoints apart: the run then trains unselected
# A smaller adapter scale must beat the adapter as trained by this much development nDCG@10 to replace it: on
# about a hundred development queries, smaller differences are noise, and following noise costs test quality.
MIN_SCALE_GAIN = 0.005
BEST_FILE = "best_state.safetensors"  # trainable state of the best development evaluation
BEST_RECORD = "best.json"  # its step and score
HISTORY_FILE = "selection_history.json"  # every development (and monitor) score so far, for --resume
NO_SELECTION = {"selected": None, "lora_scale": 1.0, DEV_HISTORY: None}


# --------------------------------------------------------------------------------------------------------
# The development signal


def development_pairs(data: TrainingData, construction: str, train: TrainConfig,
                      whole: bool = False) -> tuple[list, list[str]]:
    """The development pairs and the pool of distractor documents: the held-out items' pair columns when the
    file has them; for documents alone, pairs built by `construction` from held-out documents (which never
    train), among the positive sides built the same way from training documents. `whole` (a query-side run,
    whose documents are stored whole): the held-out documents themselves are the positives, among the training
    documents."""
    if data.dev_pairs:
        return data.dev_pairs, sorted({d for _, d in data.pairs})
    dev = DocumentPairs(construction, train.seed_for("development"))
    if whole:
        pairs = [(dev(t, i)[0], t) for i, t in enumerate(data.dev_texts)]
        return [(q, d) for q, d in pairs if q != d], list(data.texts)
    pool = DocumentPairs(construction, train.seed_for("distractors"))
    pairs = [dev(t, i) for i, t in enumerate(data.dev_texts)]
    return [(q, d) for q, d in pairs if q != d], [pool(t, i)[1] for i, t in enumerate(data.texts)]


class SelectionEvaluator(InformationRetrievalEvaluator):
    """sentence-transformers' retrieval evaluator (its search over the corpus, its place in the trainer's
    evaluation loop), scored by the kit's own metrics (src/metrics.py, graded relevance), so that model selection
    and the final verdict measure alike. It encodes under bf16 autocast when training runs in it (`bf16`): model
    selection's evaluations run outside the trainer's autocast, and in fp32 they took as long as ten training steps
    on the catalog; the embeddings come back as fp32. With `stored` (a query-side run), the corpus is the base
    model's stored embeddings, computed once: only the queries are encoded by the model.

    Args:
        qrels: query id -> {document id: grade}; the parent class gets the relevant ids.
    """

    def __init__(self, queries: dict, corpus: dict, qrels: dict[str, dict[str, int]], *args, bf16: bool = False,
                 stored: StoredEncoder | None = None, **kwargs):
        super().__init__(queries, corpus, {q: set(d) for q, d in qrels.items()}, *args, ndcg_at_k=[10],
                         mrr_at_k=[10], map_at_k=[100], accuracy_at_k=[1], precision_recall_at_k=[10], **kwargs)
        self.qrels, self.bf16 = qrels, bf16
        self.stored_corpus = torch.from_numpy(stored.documents(self.corpus)) if stored is not None else None

    def compute_metrics(self, queries_result_list: list) -> dict:
        """The kit's nDCG@10, MRR@10, MAP@100 and Recall@10 of the rankings (ties broken as the parent class breaks
        them), and the parent's accuracy@1 and precision@10 (which the kit does not report), in the parent's
        layout."""
        rankings = {query: [hit["corpus_id"] for hit in sorted(hits, key=lambda x: (-x["score"], x["corpus_id"]))]
                    for query, hits in zip(self.queries_ids, queries_result_list)}
        means = {name: float(values.mean()) for name, values in score_rankings(rankings, self.qrels).items()}
        hits = [[self.qrels[q].get(d, 0) > 0 for d in ranking[:10]] for q, ranking in rankings.items()]
        return {"accuracy@k": {1: float(np.mean([h[:1] == [True] for h in hits]))},
                "precision@k": {10: float(np.mean([sum(h) / 10 for h in hits]))},
                "recall@k": {10: means["recall@10"]}, "ndcg@k": {10: means["ndcg@10"]},
                "mrr@k": {10: means["mrr@10"]}, "map@k": {100: means["map@100"]}}

    def compute_all_metrics(self, model, corpus_model=None, corpus_embeddings=None, output_path=None):
        if self.stored_corpus is not None:
            document_map = getattr(model[0], "document_map", None)  # as it is now, where one trains
            with torch.no_grad():
                corpus_embeddings = mapped(self.stored_corpus.to(model.device), document_map)
        return super().compute_all_metrics(model, corpus_model, corpus_embeddings, output_path)

    def embed_inputs(self, model, *args, **kwargs):
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return super().embed_inputs(model, *args, **kwargs).float()


class MonitorEvaluator(SelectionEvaluator):
    """The evaluator, leaving nothing in the saved model's card: the monitor's data (often the very test set) is
    watched, and its scores must not read as the model's own evaluation."""

    def store_metrics_in_model_card_data(self, *args, **kwargs) -> None:
        """Not stored (see the class docstring)."""


def retrieval_evaluator(name: str, data: RetrievalData, model: SentenceTransformer, batch_size: int, bf16: bool,
                        stored: StoredEncoder | None, kind: type = SelectionEvaluator):
    """The evaluator over queries, corpus and graded qrels, with the model's e5 prompts; the corpus `stored` by the
    base model in a query-side run."""
    prompts = model.prompts or {}
    return kind(data.queries, data.corpus, data.qrels, name=name, batch_size=batch_size,
                query_prompt=prompts.get("query"), corpus_prompt=prompts.get("passage"), bf16=bf16, stored=stored)


def dev_evaluator(model: SentenceTransformer, data: TrainingData, plan: RunPlan, train: TrainConfig,
                  batch_size: int, bf16: bool, stored: StoredEncoder | None):
    """nDCG@10 of the development queries against their documents, among up to --dev_distractors others
    (without them, ~100 documents make the task too easy to tell checkpoints apart): the model-selection
    signal. Development items are excluded from training, and the held-out test pairs are never looked at."""
    pairs, pool = development_pairs(data, plan.dev_construction, train, whole=stored is not None)
    if len(pairs) < MIN_DEV_PAIRS:
        logger.warning("model selection skipped: %d development pairs (fewer than %d)", len(pairs), MIN_DEV_PAIRS)
        return None
    dev = pairs_to_retrieval(pairs, "development pairs")
    others = sorted(set(pool) - set(dev.corpus.values()))
    chosen = np.random.default_rng(train.seed).permutation(len(others))[: train.dev_distractors]
    dev.corpus = dict(dev.corpus) | {f"t{i}": others[i] for i in chosen}
    built = "" if data.dev_pairs else f" ({plan.dev_construction} pairs of held-out documents)"
    logger.info("model selection: %d development queries%s among %d documents", len(dev.queries), built,
                len(dev.corpus))
    if not data.dev_pairs and plan.dev_construction in parts(plan.objective):
        logger.warning("model selection uses %s pairs of held-out documents, built like the training pairs: they "
                       "reward the training task itself, not real queries; use --dev_construction auto, and judge "
                       "the result with --eval_data", plan.dev_construction)
    return retrieval_evaluator(DEV_NAME, dev, model, batch_size, bf16, stored)


def with_monitor(dev, model: SentenceTransformer, monitor: RetrievalData | None, batch_size: int, bf16: bool,
                 stored: StoredEncoder | None):
    """The development evaluator, followed by the monitor when --monitor_data is given (its score never selects)."""
    if monitor is None:
        return dev
    logger.info("monitoring %s: %d queries among %d documents, scored at every development evaluation, never "
                "selected on", monitor.source, len(monitor.queries), len(monitor.corpus))
    watched = retrieval_evaluator(MONITOR_NAME, monitor, model, batch_size, bf16, stored, MonitorEvaluator)
    return SequentialEvaluator([dev, watched], main_score_function=lambda scores: scores[0])


def development_part(evaluator):
    """The development evaluator alone, without the monitor (for the adapter-scale search)."""
    return evaluator.evaluators[0] if isinstance(evaluator, SequentialEvaluator) else evaluator


def dev_score(metrics: dict, evaluator: str = DEV_NAME) -> float | None:
    """nDCG@10 of one evaluator (model selection's, or the monitor's) in an evaluation's metrics, as the trainer
    logs them (`eval_dev_cosine_ndcg@10`) or as the evaluator returns them (`dev_cosine_ndcg@10`)."""
    prefixes = (f"{evaluator}_", f"eval_{evaluator}_")
    return next((v for k, v in metrics.items() if k.startswith(prefixes) and k.endswith(MAIN_METRIC)), None)


def choose_lora_scale(model: torch.nn.Module, evaluator, trained_score: float, scales: list[float]) -> float:
    """Interpolate between the base model (scale 0) and the selected state (1) by scaling every LoRA B matrix,
    and keep the scale with the best development nDCG@10, if it beats the adapter as trained (`trained_score`)
    by at least MIN_SCALE_GAIN (else scale 1 stays). Fine-tuning that moved too far often does better part of the
    way back (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022: WiSE-FT)."""
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    if not lora_b or not scales:
        return 1.0
    trained = [p.detach().clone() for p in lora_b]

    def set_scale(scale: float) -> None:
        with torch.no_grad():
            for p, t in zip(lora_b, trained):
                p.copy_(t * scale)

    scores = {1.0: trained_score}
    for scale in scales:
        set_scale(scale)
        scores[scale] = dev_score(evaluator(model))
        logger.info("adapter at scale %.2f: development nDCG@10 %.4f", scale, scores[scale])
    chosen = max(scores, key=lambda k: (scores[k], k))
    chosen = chosen if scores[chosen] - scores[1.0] >= MIN_SCALE_GAIN else 1.0
    set_scale(chosen)
    logger.info("adapter scale %.2f kept (development nDCG@10 %.4f; as trained %.4f)", chosen, scores[chosen],
                scores[1.0])
    return chosen


# --------------------------------------------------------------------------------------------------------
# The bookkeeping


class ModelSelection(TrainerCallback):
    """Keeps the trainable state with the best development nDCG@10 of a run (see the module docstring).

    Args:
        model: the SentenceTransformer being trained.
        folder: the run's `.partial` folder (its best state, and its checkpoints' history).
        evaluator: the development evaluator (with the monitor after it, when there is one).
        scales: adapter strengths tried by `finish` (scale 0 already competed as step 0: only those in between).
    """

    def __init__(self, model: torch.nn.Module, folder: Path, evaluator, scales: tuple[float, ...] = ()):
        self.model, self.evaluator, self.scales = model, evaluator, list(scales)
        self.file, self.record = folder / BEST_FILE, folder / BEST_RECORD
        saved = json.loads(self.record.read_text()) if self.record.exists() else {}  # a resumed run's best so far
        self.best, self.step = saved.get(DEV_SCORE, -math.inf), saved.get("step")
        self.history_file = folder / CHECKPOINTS / HISTORY_FILE
        kept = json.loads(self.history_file.read_text()) if self.history_file.exists() else {}
        self.history: list[tuple[int, float]] = [tuple(p) for p in kept.get("dev", [])]
        self.monitor: list[tuple[int, float]] = [tuple(p) for p in kept.get("monitor", [])]

    def start(self, trainer, checkpoint: str | None) -> None:
        """Where the run starts: evaluations after a resumed `checkpoint` are forgotten (they come again); a new run
        scores step 0, the base model, the bar training has to clear."""
        self.resume_at(checkpoint_step(checkpoint) if checkpoint else -1)
        if checkpoint is None:
            self.consider(0, self.evaluator(trainer.model), trainer.is_world_process_zero())

    def resume_at(self, step: int) -> None:
        """Forget the evaluations after `step` (-1: all of them)."""
        self.history = [p for p in self.history if p[0] <= step]
        self.monitor = [p for p in self.monitor if p[0] <= step]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if dev_score(metrics or {}) is not None:  # one call per development dataset; the evaluator runs once
            self.consider(state.global_step, metrics, state.is_world_process_zero)

    def consider(self, step: int, metrics: dict, main_process: bool = True) -> None:
        score, watched = dev_score(metrics), dev_score(metrics, MONITOR_NAME)
        self.history.append((step, score))
        if watched is not None:
            self.monitor.append((step, watched))
        if not main_process:
            return
        self.history_file.parent.mkdir(parents=True, exist_ok=True)
        self.history_file.write_text(json.dumps({"dev": self.history, "monitor": self.monitor}) + "\n")
        if score > self.best:
            self.best, self.step = score, step
            save_trainable_state(self.model, self.file)
            self.record.write_text(json.dumps({"step": step, DEV_SCORE: score}) + "\n")
            logger.info("step %d: development nDCG@10 %.4f, the best so far", step, score)

    def finish(self, trainer) -> dict:
        """The final state competes too, the best development state is restored (step 0 = the base model
        unchanged), then the adapter scale is chosen (main process only). Returns run.json's selection record."""
        step, main_process = trainer.state.global_step, trainer.is_world_process_zero()
        if not self.history or self.history[-1][0] != step:
            self.consider(step, self.evaluator(trainer.model), main_process)
        history = {DEV_HISTORY: self.history, MONITOR_HISTORY: self.monitor or None}
        if not main_process:
            return {**NO_SELECTION, **history}
        selected = self.restore()
        if selected is not None and selected["step"] == 0:
            logger.warning("no training step beat the base model on the development pairs: the saved model is the "
                           "base model unchanged")
        trained = selected is not None and selected["step"] > 0
        scale = choose_lora_scale(trainer.model, development_part(self.evaluator), self.best,
                                  self.scales) if trained else 1.0
        return {"selected": selected, "lora_scale": scale, **history}

    def restore(self) -> dict | None:
        if not self.file.exists():
            return None
        load_trainable_state(self.model, load_file(str(self.file)), strict=False)
        record = json.loads(self.record.read_text())
        logger.info("restored the best development state: step %d (nDCG@10 %.4f)", record["step"],
                    record[DEV_SCORE])
        return record


def model_selection(model: SentenceTransformer, data: TrainingData, plan: RunPlan, train: TrainConfig,
                    batch_size: int, monitor: RetrievalData | None, folder: Path, bf16: bool = False,
                    stored: StoredEncoder | None = None) -> ModelSelection | None:
    """The run's model selection, or None when the plan selects nothing or the data holds too few pairs; `bf16`:
    encode under bf16 autocast, as training does; `stored`: the base's document embeddings (a query-side run)."""
    dev = dev_evaluator(model, data, plan, train, batch_size, bf16, stored) if plan.select_best else None
    if dev is None:
        if monitor is not None:
            logger.warning("--monitor_data is not scored: no model selection in this run")
        return None
    return ModelSelection(model, folder, with_monitor(dev, model, monitor, batch_size, bf16, stored), plan.lora_scales)
