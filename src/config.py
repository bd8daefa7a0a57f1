"""Typed settings, grouped by concern; each group checks its values when it is built.

Every field has a default and help text (`python -m src.cli --help`); every command reads its settings through
`src.cli.parse_groups`. What a run makes of them once it has seen its data is src/plan.py's, never written back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from src.errors import UsageError
from src.settings import Settings, check_minimum, check_option, comma_list, help_field

DEFAULT_MODEL = "intfloat/multilingual-e5-small"
# Pairs built from documents alone (src/document_pairs.py), in the order `--dev_construction auto` prefers them.
DOCUMENT_CONSTRUCTIONS = ("crop", "lead", "ict", "keys")
# Random streams drawn from one --seed: development pairs (and noise) and the distractor pool must not repeat the
# training draws, so each stream offsets the seed by its position here.
SEED_STREAMS = ("train", "development", "distractors", "negatives")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass
class DataConfig(Settings):
    train_file: str = help_field("Training corpus (CSV/TSV/Parquet/JSONL/JSON/TXT).",
                                 default=str(DATA_DIR / "ru_catalog" / "train.jsonl"))
    text_column: str = help_field("Column holding the text (ignored for .txt).", default="text")
    pair_columns: str = help_field("Two columns 'query,document' of the same item (e.g. title,description): pairs "
                                   "to train (mnrl) and select on, when the file has them.",
                                   default="title,description")
    min_words: int = help_field("Drop texts with fewer words than this.", default=3)
    max_chars: int = help_field("Truncate longer texts to this many characters (against megabyte rows).", default=2000)
    split_mode: Literal["none", "sentences", "windows"] = help_field(
        "Split long texts into sentences or fixed word windows before training.", default="none")
    window_words: int = help_field("Words per window when split_mode=windows.", default=64)
    max_train_texts: int = help_field("Use at most this many training texts (0 = all).", default=0)
    validation_fraction: float = help_field("Fraction of rows held out as a development split (at least 100 rows, or "
                                            "a fifth of a smaller file; 0 = none).", default=0.05)

    def validate(self):
        for option, minimum in (("min_words", 1), ("max_chars", 10), ("window_words", 4), ("max_train_texts", 0)):
            check_minimum(self, minimum, option)
        check_option(0.0 <= self.validation_fraction < 0.5, "validation_fraction", "must be in [0, 0.5)")
        check_option(len(self.pair_column_names()) in (0, 2), "pair_columns",
                     "must name two columns 'query,document' (or be '')")

    def pair_column_names(self) -> list[str]:
        return comma_list(self.pair_columns)


@dataclass
class NoiseConfig(Settings):
    deletion_ratio: float = help_field("TSDAE: fraction of words deleted from the encoder's input (paper: 0.6).",
                                       default=0.6)
    swap_ratio: float = help_field("Optional extra noise: fraction of adjacent word pairs swapped.", default=0.0)
    insertion_ratio: float = help_field("Optional extra noise: fraction of words duplicated at random places.",
                                        default=0.0)

    def validate(self):
        for name in ("deletion_ratio", "swap_ratio", "insertion_ratio"):
            check_option(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")


@dataclass
class ModelConfig(Settings):
    model_name_or_path: str = help_field("Encoder: hub name or local folder (sentence-transformers or plain HF "
                                         "BERT/XLM-R).", default=DEFAULT_MODEL)
    precision: Literal["auto", "nf4", "none", "full"] = help_field(
        "nf4: QLoRA (4-bit NF4 base + LoRA); none: LoRA on a full-precision base; full: full fine-tuning; auto: nf4 "
        "where 4-bit saves memory (100M+ weights in the encoder layers: BERT/XLM-R large), else none.",
        default="auto")
    lora_r: int = help_field("LoRA rank.", default=16)
    lora_alpha: int = help_field("LoRA alpha (scale = alpha / r).", default=32)
    lora_dropout: float = help_field("LoRA dropout. At 0 peft skips the op, a faster step (random masks over every "
                                     "adapted layer's input cost time; docs/RESULTS.md).", default=0.0)
    attention_dropout: float = help_field(
        "Dropout on attention weights while training (e5 and BERT were trained with 0.1). At 0 PyTorch runs its "
        "fused attention kernel instead of materialising the weights: a faster step.", default=0.0)
    lora_target_modules: str = help_field("Comma-separated module names to adapt, or 'auto' (all attention and "
                                          "feed-forward projections of the encoder layers).", default="auto")
    lora_layers: int = help_field("Adapt the top N encoder layers only (0 = all): backward stops at the lowest, a "
                                  "faster step, at a cost in quality (docs/RESULTS.md).", default=0)
    max_seq_length: int = help_field("Maximum tokens per text in training (saved models keep their own limit, 512 "
                                     "for e5); 0 = auto: 256 for the documents default, else 128.", default=0)
    trust_remote_code: bool = help_field("Allow code shipped with a model folder to run (off: safe).", default=False)
    allow_pickle: bool = help_field("Allow pickle (.bin) weights; by default only safetensors load.", default=False)

    def validate(self):
        check_minimum(self, 1, "lora_r", "lora_alpha")
        check_minimum(self, 0, "lora_layers")
        check_option(not (self.lora_layers and self.precision == "full"), "lora_layers", "applies to LoRA only")
        check_option(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        check_option(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "must be in [0, 1)")
        check_option(self.max_seq_length == 0 or 8 <= self.max_seq_length <= 8192, "max_seq_length",
                     "must be 0 (auto) or in [8, 8192]")


@dataclass
class TrainConfig(Settings):
    objective: str = help_field(
        "auto: mnrl when the training file has --pair_columns, else lead on 640 pairs without selection. Or one "
        "of the objectives `python -m src.objectives` lists (mnrl, lead, ict, crop, keys, simcse, tsdae), or "
        "several joined by '+' (e.g. tsdae+lead). Measured: docs/RESULTS.md.", default="auto")
    adapt: Literal["auto", "both", "queries", "queries+map"] = help_field(
        "auto: queries for the documents-alone default on a training file of 5,000 rows or more, both otherwise "
        "(measured: docs/RESULTS.md, 'Query side only'; the log says which and why). "
        "both: the adapted model encodes queries and documents (an index built with the base must be encoded "
        "again). queries: only the query side trains, against the base model's stored embeddings of the training "
        "documents (the kit's cache), and merged/ encodes documents exactly as the base does: an existing index "
        "stays valid, only the query encoder changes. queries+map: also one linear map of the stored document "
        "vectors (rewrite the index with one matrix product; no text encoded again). For mnrl and lead, ict, crop, "
        "keys.", default="auto")
    learning_rate: float = help_field("Peak learning rate; 0 = auto: the objective's own, as `python -m "
                                      "src.objectives` lists it (several parts: the shared default).", default=0.0)
    batch_size: int = help_field("Texts (or pairs) per device per step; mnrl/simcse use the rest of the batch as "
                                 "negatives, so larger is better for them.", default=32)
    gradient_accumulation_steps: int = help_field("Steps to accumulate before an optimizer update.", default=1)
    epochs: float = help_field("Passes over the training texts (ignored when max_steps > 0); 0 = auto: 1, or 3 for "
                               "pairs with --adapt queries.", default=0.0)
    max_steps: int = help_field("Stop after this many optimizer steps (0 = use epochs).", default=0)
    warmup_ratio: float = help_field("Fraction of steps for linear warm-up.", default=0.1)
    lr_scheduler: Literal["constant_with_warmup", "linear", "cosine"] = help_field(
        "Learning-rate schedule after warm-up.", default="constant_with_warmup")
    weight_decay: float = help_field("AdamW weight decay.", default=0.0)
    gradient_checkpointing: bool = help_field(
        "Recompute activations in backward: less peak memory (far less for large encoders), a slower step. Off "
        "when memory is plentiful; always off with LoRA on at most half the layers (theirs alone are kept).",
        default=True)
    checkpoint_every: int = help_field("With --gradient_checkpointing: recompute every Nth encoder layer (1 = all, "
                                       "the least memory; 2 = every other: faster, between the two).", default=2)
    decoder_vocab: Literal["corpus", "full"] = help_field("Decoder softmax over the token ids of the training texts "
                                                          "(all targets lie there; faster) or all.", default="corpus")
    decoder_warmup_steps: int = help_field("TSDAE: optimizer steps during which only the decoder's new weights learn "
                                           "(the encoder's adapters wait).", default=0)
    mnrl_scale: float = help_field("mnrl/simcse: similarity scale (inverse temperature) of the in-batch softmax; "
                                   "0 = auto: 100 for the documents default and --adapt queries, else the "
                                   "objective's own (`python -m src.objectives`).", default=0.0)
    loss_chunk_tokens: int = help_field("Reconstruction loss over this many target tokens at a time, logits "
                                        "recomputed in backward: batch x length x vocab is never held.", default=512)
    device: Literal["auto", "cpu", "cuda"] = help_field("Where to train.", default="auto")
    bf16: Literal["auto", "yes", "no"] = help_field(
        "bf16 mixed precision (weights and optimizer stay fp32). auto: on GPUs that support it and on CPUs with "
        "native bf16 (AVX512-BF16/AMX), where it is faster; no: fp32 throughout.", default="auto")
    logging_steps: int = help_field("Log the loss every N steps.", default=10)
    save_steps: int = help_field("Write a resumable checkpoint every N steps.", default=50)
    eval_steps: int = help_field("Evaluate on the development split every N steps (and step 0, the base model); "
                                 "0 = auto: pairs at each epoch's end, other objectives four times a run.", default=0)
    select_best: bool = help_field("Keep the state with the best development nDCG@10 (step 0 = the base model): "
                                   "held-out items' --pair_columns, or pairs of held-out documents.", default=True)
    dev_construction: str = help_field(
        "How development pairs are built from held-out documents when the file has no pair columns: auto, "
        f"{', '.join(DOCUMENT_CONSTRUCTIONS)}. auto: the first of those that the objective does not train on.",
        default="auto")
    monitor_data: str = help_field("Labelled held-out data (as --eval_data) scored and logged at every development "
                                   "evaluation, never selected on. '' = off.", default="")
    lora_scales: str = help_field("After selection, also try the adapter at these fractions of its strength (comma-"
                                  "separated, between 0 = the base and 1 = as trained) on the development pairs, "
                                  "and keep the best; '' = off; auto: the objective's own (`python -m "
                                  "src.objectives`).", default="auto")
    hard_negatives: int = help_field("mnrl, pairs from documents: negatives per pair mined by the base model among "
                                     "the training documents, near-duplicates of the pair's own document filtered out "
                                     "(src/hard_negatives.py). 0 = in-batch negatives only.", default=0)
    negative_margin: float = help_field("Mining: skip a candidate scoring within this fraction of the positive's "
                                        "own score (relative_margin): likely an unlabelled positive.", default=0.05)
    negative_skip: int = help_field("Mining: skip the base model's top N candidates (range_min).", default=0)
    round_trip_top_k: int = help_field("Pairs from documents: train on the documents whose pair's query finds "
                                       "them in the base's top K of 2,048 (src/round_trip.py); 0 = off.", default=0)
    mini_batch_size: int = help_field("Contrastive parts: compute the loss over each batch in mini-batches of this "
                                      "many (CachedMultipleNegativesRankingLoss, GradCache): a large --batch_size at "
                                      "the activation memory of a small one. 0 = the plain loss.", default=0)
    anchor_weight: float = help_field("Guard against forgetting for the contrastive parts: weight of a term keeping "
                                      "each text's embedding near the base model's, computed by the same model with "
                                      "its adapter disabled (no second model in memory). 0 = off.", default=0.0)
    dev_distractors: int = help_field("Training documents added to the development collection, so that telling "
                                      "checkpoints apart is as hard as the real search.", default=1000)
    seed: int = help_field("Seed for data split, noise, initialisation and order.", default=42)
    resume: bool = help_field("Resume from the last checkpoint in output_dir (same settings only).", default=False)
    threads: int = help_field("CPU threads for torch (0 = torch's default).", default=0)

    def validate(self):
        check_option(self.learning_rate >= 0 and math.isfinite(self.learning_rate), "learning_rate",
                     "must be >= 0 (0 = auto)")
        check_minimum(self, 1, "batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                      "checkpoint_every")
        check_minimum(self, 0, "max_steps", "eval_steps", "weight_decay", "dev_distractors", "decoder_warmup_steps",
                      "threads", "anchor_weight", "hard_negatives", "negative_skip", "mini_batch_size",
                      "round_trip_top_k")
        check_option(0.0 <= self.negative_margin < 1.0, "negative_margin", "must be in [0, 1)")
        check_option(not (self.mini_batch_size and self.anchor_weight), "mini_batch_size",
                     "cannot be combined with --anchor_weight (the anchor needs the whole batch's embeddings at once)")
        check_minimum(self, 16, "loss_chunk_tokens")
        check_option(self.epochs >= 0, "epochs", "must be >= 0 (0 = auto)")
        check_option(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        check_option(self.mnrl_scale >= 0, "mnrl_scale", "must be >= 0 (0 = auto)")
        check_option(all(0 < s < 1 for s in self.lora_scale_values()), "lora_scales",
                     "must be numbers between 0 and 1, comma-separated")
        check_option(self.select_best or not self.monitor_data, "monitor_data", "needs --select_best true")
        check_option(self.dev_construction in ("auto", *DOCUMENT_CONSTRUCTIONS), "dev_construction",
                     f"must be auto or one of {', '.join(DOCUMENT_CONSTRUCTIONS)}")

    def seed_for(self, stream: str) -> int:
        """The seed of one of SEED_STREAMS."""
        return self.seed + SEED_STREAMS.index(stream)

    def lora_scale_values(self) -> list[float]:
        try:
            return [] if self.lora_scales == "auto" else [float(s) for s in comma_list(self.lora_scales)]
        except ValueError:
            raise UsageError(f"option --lora_scales: '{self.lora_scales}' is not a comma-separated list of numbers")


@dataclass
class EvalConfig(Settings):
    eval_data: str = help_field("Held-out retrieval data: a pairs file (CSV/TSV/JSONL/Parquet), a BEIR-style folder, "
                                "or '' to skip evaluation.", default=str(DATA_DIR / "ru_catalog" / "test"))
    query_column: str = help_field("Pairs file: column with the query.", default="query")
    document_column: str = help_field("Pairs file: column with the relevant document.", default="document")
    index: Literal["flat", "ivf", "hnsw"] = help_field(
        "FAISS index: exact inner product (flat), or approximate (ivf, hnsw) for millions.", default="flat")
    eval_batch_size: int = help_field("Texts per encoding batch.", default=64)
    eval_max_seq_length: int = help_field("Encode every compared model with this many tokens at most (0 = each "
                                          "model's own limit, 512 for e5).", default=0)
    eval_bf16: Literal["auto", "yes", "no"] = help_field(
        "Encode under bf16 autocast (weights stay fp32). auto: where the hardware computes bf16 natively, as --bf16; "
        "no: fp32 throughout. Every compared model is encoded alike.", default="auto")
    bootstrap_samples: int = help_field("Bootstrap resamples for confidence intervals.", default=1000)
    max_eval_queries: int = help_field("Evaluate at most this many queries (0 = all).", default=0)
    no_cache: bool = help_field("Compute every embedding afresh instead of reading the kit's cache of unchanged "
                                "models' embeddings.", default=False)

    def validate(self):
        for option, minimum in (("eval_batch_size", 1), ("bootstrap_samples", 100), ("max_eval_queries", 0)):
            check_minimum(self, minimum, option)
        check_option(self.eval_max_seq_length == 0 or self.eval_max_seq_length >= 8, "eval_max_seq_length",
                     "must be 0 or >= 8")


@dataclass
class OutputConfig(Settings):
    output_dir: str = help_field("Run folder (written atomically).", default="runs/e5-small-ru")
    overwrite: bool = help_field("Replace an existing, finished output_dir.", default=False)
    export: Literal["", "openvino"] = help_field(
        "After training, also export merged/ for CPU serving: openvino = an int8 OpenVINO model in openvino/ "
        "(NNCF static quantization calibrated on the training texts; loads with SentenceTransformer(path, "
        "trust_remote_code=True)), scored by the evaluation beside the PyTorch model. '' = none.", default="")

    def validate(self):
        check_option(bool(self.output_dir.strip()), "output_dir", "must not be empty")


@dataclass
class PreprocessConfig(Settings):
    """Settings of `python -m src.preprocess` (raw catalog records -> training texts)."""

    input_file: str = help_field("Raw records (CSV/TSV/Parquet/JSONL/JSON).", default="")
    output_file: str = help_field("Where to write the texts (.parquet or .jsonl, column `text`).", default="")
    title_field: str = help_field("Name/title column.", default="title")
    attributes_field: str = help_field("Column holding a JSON or dict-like mapping of attributes ('' = none).",
                                       default="")
    attribute_columns: str = help_field("Comma-separated flat columns used as attributes ('' = none).", default="")
    description_field: str = help_field("Optional description column ('' = none).", default="description")
    template: str = help_field("How one item becomes one text; placeholders {title}, {attributes}, {description}.",
                               default="{title}. {attributes}. {description}")
    min_chars: int = help_field("Drop texts shorter than this after cleaning.", default=10)
    keep_columns: str = help_field("Comma-separated input columns copied to the output (e.g. id).", default="")

    def validate(self):
        for option in ("input_file", "output_file"):
            check_option(bool(getattr(self, option)), option, "is required")
        check_option(any(p in self.template for p in ("{title}", "{attributes}", "{description}")), "template",
                     "must use at least one of {title}, {attributes}, {description}")
        check_minimum(self, 1, "min_chars")


@dataclass
class EvaluationArguments(Settings):
    """Settings of `python -m src.evaluation` besides EvalConfig."""

    model: str = help_field("Model to evaluate (folder or hub name; an adapter/ folder works too).", default="")
    baseline: str = help_field("Optional model to compare against (e.g. the base model).", default="")
    output_dir: str = help_field("Where to write metrics.json, report.md and metrics.png.", default="evaluation")
    overwrite: bool = help_field("Replace reports already in output_dir.", default=False)
    seed: int = help_field("Seed for query sampling and the bootstrap (0, as the trainer's evaluation uses, so both "
                           "give the same intervals).", default=0)

    def validate(self):
        check_option(bool(self.model), "model", "is required")


GROUPS = {"data": DataConfig, "noise": NoiseConfig, "model": ModelConfig, "train": TrainConfig,
          "eval": EvalConfig, "output": OutputConfig}  # the trainer's settings: Config
ALL_GROUPS = {**GROUPS, "preprocess": PreprocessConfig, "evaluation": EvaluationArguments}  # every command's


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
