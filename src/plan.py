"""The run's plan: what the requested settings and the training file resolve to, decided once and never rewritten.

    requested (src/config.py) + the file's columns, rows -> plan_run    -> RunPlan (objective, adapt, selection)
    RunPlan + the number of training texts               -> with_budget -> RunPlan (steps)

`--objective auto` trains `mnrl` when the file has --pair_columns, and on documents alone DOCUMENTS_DEFAULT on
DOCUMENTS_PAIRS pairs without model selection (docs/RESULTS.md, "Documents alone"). Without model selection
nothing is held out: a development split that nothing selects on would only take documents away from training.
`--adapt auto` trains that default's query side alone on a file of AUTO_QUERIES_ROWS rows or more (the base's
document embeddings, so the user's index, stay as they are), both sides otherwise.
Every later step reads the plan, never a rewritten setting; the run folder's config.json keeps the requested
groups and the plan (`resolved`) side by side, and `--resume` compares the requested ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from src.config import DOCUMENT_CONSTRUCTIONS, Config, ModelConfig, TrainConfig
from src.errors import UsageError
from src.model_builder import TRAIN_MAX_SEQ_LENGTH, bf16_enabled, checkpointed_every, resolve_precision
from src.objectives import OBJECTIVES, alone, check_objective, examples_per_step, needs_pairs, needs_texts, parts
from src.objectives.base import LEARNING_RATE, LEVERS, LORA_SCALES, SCALE
from src.query_side import QUERY_SIDE_MODES, QUERY_SIDE_PARTS

logger = logging.getLogger(__name__)

DOCUMENTS_DEFAULT = "lead"  # what `auto` trains on documents alone: the best measured recipe
# ... on this many pairs, with no model selection. At scale 100, 640 pairs beat 320 on five of six development
# collections (docs/RESULTS.md); at scale 20 one epoch on the largest lost up to 6 points. No label-free
# development signal ranked checkpoints as the held-out titles did, and selecting on crop pairs vetoed a +3 gain.
DOCUMENTS_PAIRS = 640
# A file of fewer documents trains them again (one pair each, redrawn each pass), up to this many passes: on the two
# collections under 640 documents (301 and 424), 640 pairs gained more than one pass; past 2.1 passes is unmeasured.
DOCUMENTS_MAX_EPOCHS = 3
# `--learning_rate 0`, `--mnrl_scale 0`, `--lora_scales auto`: each objective's own defaults (its spec in
# src/objectives/), the shared ones for several parts. The documents default's similarity scale: e5 was trained at
# temperature 0.01 (scale 100), and it gained more at 100 than at 50 or 20 on the development collections
# (docs/RESULTS.md).
DOCUMENTS_SCALE = 100.0
# `--max_seq_length 0`: tokens per training text. Documents run longer than titles (median 230-360 tokens on the
# development manuals): at 128 the documents default trained on a third of a Python section; at 256 every
# development collection's gain has its interval above zero, more than at 128 on the FAQ and Python, within noise
# elsewhere, in twice the training time (docs/RESULTS.md).
DOCUMENTS_MAX_SEQ_LENGTH = 256
# `--eval_steps 0`: development evaluations per run, besides step 0. Each costs a pass over the development queries
# and their distractors (on the catalog about as long as five training steps). An objective whose spec says so
# (mnrl) is evaluated at each epoch's end only; the others overtrain within an epoch: DEV_EVALUATIONS spread over
# the run.
DEV_EVALUATIONS = 4
# `--adapt queries`: the softmax over the stored documents at e5's own scale 100 (issue 32 measured scale 50, and the
# batch's documents alone as negatives, gaining much less on the Russian catalog), and three epochs over pairs with
# selection at each epoch's end: on the Russian catalog, more than one epoch at the same learning rate
# (docs/RESULTS.md, "Query side only").
QUERY_SIDE_SCALE, QUERY_SIDE_PAIRS_EPOCHS = 100.0, 3.0
# `--adapt auto`: the query side alone for the documents default on a training file of this many rows or more, both
# sides otherwise. Both sides gained more on both catalogs and on four of the five development collections under
# 3,000 documents; from 5,500 documents on (the Linux manual, the 10k and 100k package corpora) the query side gained
# as much or more, and no document is encoded again: the user's index stays valid and the command ends sooner
# (docs/RESULTS.md, "Query side only").
AUTO_QUERIES_ROWS = 5000
# Levers that act on the documents' side: a query-side run refuses them, and `--adapt auto` keeps both sides for them.
DOCUMENT_SIDE_LEVERS = ("hard_negatives", "round_trip_top_k", "mini_batch_size", "anchor_weight")


@dataclass(frozen=True)
class RunPlan:
    """What one run does, resolved from its settings and its training file.

    Args:
        objective: the parts it trains, joined by '+' (never `auto`).
        documents_recipe: `auto` on documents alone (a fixed budget of pairs, no selection).
        select_best: keep the best development state (step 0, the base, included).
        lora_scales: adapter strengths tried after selection (empty: none).
        dev_construction: how development pairs are built from held-out documents (no pair columns).
        holdout_fraction: share of the file's rows held out for model selection (0 without selection).
        max_steps: optimizer steps (0: --epochs decides).
        learning_rate: the peak learning rate.
        mnrl_scale: the in-batch softmax's similarity scale (mnrl, simcse).
        max_seq_length: tokens per training text.
        eval_steps: steps between development evaluations (0 until `with_budget` resolves it).
        adapt: `both` sides, or `queries` alone against the base's stored document embeddings (src/query_side.py).
        epochs: passes over the training examples (when max_steps is 0).
        precision: nf4, none or full ("" until `with_hardware` resolves --precision auto).
        checkpoint_every: every how many encoder layers backward recomputes (0: none).
        bf16: bf16 mixed precision in training.
        device: where it trains (cpu or cuda).
    """

    objective: str
    documents_recipe: bool
    select_best: bool
    lora_scales: tuple[float, ...]
    dev_construction: str
    holdout_fraction: float
    max_steps: int
    learning_rate: float
    mnrl_scale: float
    max_seq_length: int
    eval_steps: int = 0
    adapt: str = "both"
    epochs: float = 1.0
    precision: str = ""
    checkpoint_every: int = 0
    bf16: bool = False
    device: str = ""

    @property
    def queries_only(self) -> bool:
        """Whether only the query side trains (`--adapt queries` or `queries+map`): documents keep the base's."""
        return self.adapt in QUERY_SIDE_MODES

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_budget(self, examples: int, train: TrainConfig, world: int = 1) -> "RunPlan":
        """The steps, once the training examples (texts or pairs) are counted: the documents recipe trains as many
        as DOCUMENTS_PAIRS pairs take, at most DOCUMENTS_MAX_EPOCHS passes over a smaller file (an explicit
        --max_steps wins); and `--eval_steps 0` evaluates pairs at each epoch's end, other objectives
        DEV_EVALUATIONS times a run (the documents recipe: never)."""
        per_step = examples_per_step(train, world)
        max_steps = self.max_steps
        if self.documents_recipe and not max_steps:
            max_steps = math.ceil(min(DOCUMENTS_PAIRS, DOCUMENTS_MAX_EPOCHS * examples) / per_step)
        epoch = math.ceil(examples / per_step)
        steps = max_steps or math.ceil(epoch * self.epochs)
        spec = alone(self.objective)
        spread = epoch if spec and spec.evaluate_each_epoch else max(1, math.ceil(steps / DEV_EVALUATIONS))
        # the documents recipe neither selects nor monitors: nothing is evaluated during its training
        eval_steps = 0 if self.documents_recipe else train.eval_steps or spread
        return dataclasses.replace(self, max_steps=max_steps, eval_steps=eval_steps)

    def with_hardware(self, model: ModelConfig, train: TrainConfig, device: str) -> "RunPlan":
        """What the model and the device (`--device auto`, resolved by model_builder.pick_device) decide: --precision
        auto (4-bit where it saves memory), the layers recomputed in backward, and --bf16 auto (where the device
        computes bf16 natively)."""
        precision = resolve_precision(model)
        requested = train.checkpoint_every if train.gradient_checkpointing else 0
        return dataclasses.replace(self, precision=precision, bf16=bf16_enabled(device, train.bf16), device=device,
                                   checkpoint_every=checkpointed_every(model, precision, requested))


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
    check_objective(objective)
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


def dev_construction(requested: str, objective: str) -> str:
    """--dev_construction auto: the first of DOCUMENT_CONSTRUCTIONS the objective does not train on. Pairs built
    like the training pairs reward the training task itself: they kept rising while real queries fell."""
    if requested != "auto":
        return requested
    trained = parts(objective)
    return next((c for c in DOCUMENT_CONSTRUCTIONS if c not in trained), DOCUMENT_CONSTRUCTIONS[0])


def check_levers(train: TrainConfig, objective: str) -> None:
    """A lever set for an objective that has none of the parts it acts on is a one-line error, never ignored."""
    for option in LEVERS:
        applies_to = [name for name, spec in OBJECTIVES.items() if option in spec.levers]
        if getattr(train, option) and not set(parts(objective)) & set(applies_to):
            raise UsageError(f"option --{option}: acts on {', '.join(applies_to)}, which --objective {objective} "
                             f"does not train on")


def resolve_adapt(train: TrainConfig, recipe: bool, rows: int, path: str) -> str:
    """`--adapt auto` -> `queries` for the documents default (`recipe`) on a file of AUTO_QUERIES_ROWS `rows` or
    more, unless a lever on the documents' side is set; `both` otherwise. An explicit value stays as it is."""
    if train.adapt != "auto":
        return train.adapt
    levers = [option for option in DOCUMENT_SIDE_LEVERS if getattr(train, option)]
    if recipe and rows >= AUTO_QUERIES_ROWS and not levers:
        chosen, reason = "queries", (f"{path} has {rows} rows of documents alone (>= {AUTO_QUERIES_ROWS}): on such "
                                     f"collections the query side alone gained as much as both sides or more, and "
                                     f"your index (the base's document embeddings) stays valid")
    elif recipe and levers:
        chosen, reason = "both", f"--{levers[0]} acts on the documents' side"
    elif recipe:
        chosen, reason = "both", (f"{path} has {rows} rows of documents alone (< {AUTO_QUERIES_ROWS}): on such "
                                  f"collections both sides gained more (the index must then be encoded again)")
    else:
        chosen, reason = "both", (f"objective {train.objective}: both sides gained more on the catalogs' pairs "
                                  f"(--adapt queries keeps your index, at a measured cost)")
    logger.info("adapt auto -> %s: %s (docs/RESULTS.md, 'Query side only')", chosen, reason)
    return chosen


def check_query_side(train: TrainConfig, objective: str, adapt: str) -> None:
    """`--adapt queries` (or queries+map) needs one objective with a query side, and no lever that acts on the
    documents' side."""
    if adapt not in QUERY_SIDE_MODES:
        return
    if objective not in QUERY_SIDE_PARTS:
        raise UsageError(f"option --adapt {adapt}: needs one objective with a query side "
                         f"({', '.join(QUERY_SIDE_PARTS)}), not {objective}; use --adapt both")
    if not needs_pairs(objective) and train.adapt != "auto":  # docs/RESULTS.md, "Query side only"
        logger.warning("--adapt %s on documents alone: the query side gained less than --adapt both on four of the "
                       "five development collections under 3,000 documents (nothing on one), as much or more on one "
                       "and on the larger ones; judge it with --eval_data", adapt)
    for option in DOCUMENT_SIDE_LEVERS:
        if getattr(train, option):
            raise UsageError(f"option --{option}: cannot be combined with --adapt {adapt} (every stored "
                             f"training document is already a negative, and no document passes through the model)")


def plan_run(cfg: Config, columns: list[str], world: int = 1, rows: int = 0) -> RunPlan:
    """The plan before the data is read (the steps come with `with_budget`, once the texts are counted); `rows`:
    the training file's (they decide `--adapt auto`)."""
    t = cfg.train
    objective = resolve_objective(t.objective, columns, cfg.data.pair_column_names(), cfg.data.text_column,
                                  cfg.data.train_file)
    if world > 1 and len(parts(objective)) > 1:
        # DDP would have to find the decoder's unused parameters on mnrl batches, and its unused-parameter search
        # cannot handle TSDAE's second pass through the same (shared) layers.
        raise UsageError(f"option --objective {objective}: not supported under torchrun; run tsdae, then mnrl from "
                         f"its merged/ model, or train on one process")
    check_levers(t, objective)
    recipe = t.objective == "auto" and objective == DOCUMENTS_DEFAULT
    if t.round_trip_top_k and not (recipe or t.max_steps):
        raise UsageError("option --round_trip_top_k: needs a fixed number of steps (the documents default's budget, "
                         "or --max_steps): an epoch counted on the unfiltered file would overtrain the kept documents")
    if recipe and t.monitor_data:
        raise UsageError("option --monitor_data: the documents-alone default trains without model selection; pass "
                         f"--objective {DOCUMENTS_DEFAULT} to select on development pairs and monitor them")
    adapt = resolve_adapt(t, recipe, rows, cfg.data.train_file)
    check_query_side(t, objective, adapt)
    select, spec, queries = t.select_best and not recipe, alone(objective), adapt in QUERY_SIDE_MODES
    learning_rate = t.learning_rate or (spec.learning_rate if spec else LEARNING_RATE)
    scale = t.mnrl_scale or (QUERY_SIDE_SCALE if queries else DOCUMENTS_SCALE if recipe
                             else spec.scale if spec else SCALE)
    epochs = t.epochs or (QUERY_SIDE_PAIRS_EPOCHS if queries and needs_pairs(objective) else 1.0)
    length = cfg.model.max_seq_length or (DOCUMENTS_MAX_SEQ_LENGTH if recipe else TRAIN_MAX_SEQ_LENGTH)
    scales = t.lora_scale_values() if t.lora_scales != "auto" else (spec.lora_scales if spec else LORA_SCALES)
    return RunPlan(objective, recipe, select, tuple(scales) if select else (),
                   dev_construction(t.dev_construction, objective), cfg.data.validation_fraction if select else 0.0,
                   t.max_steps, learning_rate, scale, length, adapt=adapt, epochs=epochs)


def describe(plan: RunPlan, train: TrainConfig, world: int = 1) -> str:
    """The plan in one log line."""
    steps = f"{plan.max_steps} steps" if plan.max_steps else f"{plan.epochs:g} epoch(s)"
    per_step = (f"{examples_per_step(train, world)} per step of up to {plan.max_seq_length} tokens, "
                f"lr {plan.learning_rate:g}")
    trained = plan.objective + (f" (--adapt {plan.adapt}: the query side against the base's stored documents, "
                                f"scale {plan.mnrl_scale:g})" if plan.queries_only else "")
    if plan.select_best:
        return (f"{trained} for {steps} of {per_step}; model selection every {plan.eval_steps} "
                f"steps on {plan.holdout_fraction:.0%} of the rows held out")
    why = ("the documents-alone default: judge it with --eval_data on real queries" if plan.documents_recipe
           else "--select_best false")
    return f"{trained} for {steps} of {per_step}; no model selection, nothing held out ({why})"
