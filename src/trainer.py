"""One command: data -> model -> training (TSDAE / SimCSE / MNRL, see src/objectives.py) -> model selection on
development pairs -> saved adapter and merged model -> retrieval evaluation against the base model.

    python -m src.trainer                      # bundled default: multilingual-e5-small, QLoRA, Russian catalog
    python -m src.trainer --config my.yaml --learning_rate 5e-5 --output_dir runs/mine
    torchrun --nproc_per_node 2 -m src.trainer ...   # data-parallel (gloo on CPU, nccl on GPU)

The run folder is built as `<output_dir>.partial/` (checkpoints live there, so `--resume` continues a broken
run) and renamed to `<output_dir>/` only when everything is written:

    adapter/   PEFT adapter + sentence-transformers files (needs the base model at load time)
    merged/    adapter merged into a full-precision base: a standalone sentence-transformers model
    config.json  training_log.json  loss.png  run.json  [best.json]  [evaluation/ when eval data is configured]
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import ProgressCallback, TrainerCallback, set_seed

from src.config import Config, parse_config
from src.create_dataset import TrainingData, load_retrieval_data, load_training_data
from src.errors import KitError, UsageError, run_cli
from src.model_builder import bf16_enabled, build_model, load_sentence_transformer, pick_device
from src.objectives import (build_objective, dev_evaluator, needs_pairs, needs_texts, parts, resolve_objective,
                            uses_in_batch_negatives)
from src.tables import read_table

logger = logging.getLogger(__name__)
TRAINABLE_FILE = "trainable_state.safetensors"  # LoRA + decoder weights, beside each checkpoint
BEST_FILE = "best_state.safetensors"  # trainable state of the best development evaluation


class EpochCallback(TrainerCallback):
    """Tell the noise and the document pairs which epoch it is, so every epoch draws them afresh."""

    def __init__(self, epoch_aware: list):
        self.epoch_aware = epoch_aware

    def on_epoch_begin(self, args, state, control, **kwargs):
        for item in self.epoch_aware:
            item.epoch = int(math.floor(state.epoch or 0))


class TrainableStateCallback(TrainerCallback):
    """Write every trainable weight (adapters, and the TSDAE decoder, which the Trainer does not save) into
    each checkpoint, so that a resumed run continues from exactly the same state."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_trainable_state(self.model, folder / TRAINABLE_FILE)  # written last: marks the checkpoint complete


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint whose writing finished (a kill -9 can interrupt the newest one)."""
    candidates = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in candidates:
        if (checkpoint / TRAINABLE_FILE).exists():
            return str(checkpoint)
        logger.warning("skipping %s: it was not completely written", checkpoint)
    return None


class DecoderWarmupCallback(TrainerCallback):
    """For the first `steps` optimizer steps only the decoder's new weights learn. Its cross-attention starts
    random, so the encoder's early gradients would chase a decoder that cannot yet read a sentence vector."""

    def __init__(self, encoder_params: list[torch.nn.Parameter], steps: int):
        self.encoder_params, self.steps = encoder_params, steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step < self.steps:
            for p in self.encoder_params:
                p.grad = None  # AdamW skips parameters without a gradient


class BestStateCallback(TrainerCallback):
    """Model selection: after each development evaluation, keep the trainable state with the best development
    nDCG@10 (on disk, so a resumed run remembers it). Step 0 is the base model itself (LoRA starts as a no-op),
    so when training never beats the base on development data, the base is what gets restored."""

    def __init__(self, model: torch.nn.Module, folder: Path):
        self.model, self.file, self.record = model, folder / BEST_FILE, folder / "best.json"
        self.best = json.loads(self.record.read_text())["dev_ndcg@10"] if self.record.exists() else -math.inf
        self.history: list[tuple[int, float]] = []
        self.step = json.loads(self.record.read_text())["step"] if self.record.exists() else None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        score = dev_score(metrics or {})
        if score is not None:
            self.consider(state.global_step, score, state.is_world_process_zero)

    def consider(self, step: int, score: float, main_process: bool = True) -> None:
        self.history.append((step, score))
        if score > self.best and main_process:
            self.best, self.step = score, step
            save_trainable_state(self.model, self.file)
            self.record.write_text(json.dumps({"step": step, "dev_ndcg@10": score}) + "\n")
            logger.info("step %d: development nDCG@10 %.4f, the best so far", step, score)

    def restore(self) -> dict | None:
        if not self.file.exists():
            return None
        load_trainable_state(self.model, load_file(str(self.file)), strict=False)
        record = json.loads(self.record.read_text())
        logger.info("restored the best development state: step %d (nDCG@10 %.4f)", record["step"],
                    record["dev_ndcg@10"])
        return record


def choose_lora_scale(model: torch.nn.Module, evaluator, best: BestStateCallback, scales: list[float]) -> float:
    """Interpolate between the base model (scale 0) and the selected state (1) by scaling every LoRA B matrix,
    and keep the scale with the best development nDCG@10. Fine-tuning that moved too far often does better
    part of the way back (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022: WiSE-FT).
    Scale 0 already competed as step 0, so only the scales in between are tried."""
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    if not lora_b or not scales or not best.step:
        return 1.0
    trained = [p.detach().clone() for p in lora_b]

    def set_scale(scale: float) -> None:
        with torch.no_grad():
            for p, t in zip(lora_b, trained):
                p.copy_(t * scale)

    scores = {1.0: best.best}
    for scale in scales:
        set_scale(scale)
        scores[scale] = dev_score(evaluator(model))
        logger.info("adapter at scale %.2f: development nDCG@10 %.4f", scale, scores[scale])
    chosen = max(scores, key=lambda k: (scores[k], k))
    set_scale(chosen)
    logger.info("adapter scale %.2f kept (development nDCG@10 %.4f; as trained %.4f)", chosen, scores[chosen],
                scores[1.0])
    return chosen


def peak_memory_gb(device: str) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident memory on CPU."""
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux reports KiB


def dev_score(metrics: dict) -> float | None:
    return next((v for k, v in metrics.items() if "dev_" in k and k.endswith("ndcg@10")), None)


def trainable_state(module: torch.nn.Module) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save_trainable_state(module: torch.nn.Module, path: Path) -> None:
    """Written to a temporary name and renamed into place, so a kill never leaves half a file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(trainable_state(module), str(tmp))
    os.replace(tmp, path)


def load_trainable_state(module: torch.nn.Module, state: dict, strict: bool = True) -> None:
    """Copy `state` into `module`'s parameters; strict=False skips names the module no longer has (the TSDAE
    decoder, once training is over)."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if not strict and name not in params:
                continue
            params[name].copy_(value.to(params[name].device))


class StopOnSignalCallback(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, write a resumable checkpoint, stop. A second signal
    stops at once (the last regular checkpoint is still there)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("%s received: writing a checkpoint after this step, then stopping", self.received)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = control.should_training_stop = True


class TrainingBarOnly(ProgressCallback):
    """The Trainer's training bar without the nested bar it opens for every development-loss pass."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass


class KitTrainer(SentenceTransformerTrainer):
    """The sentence-transformers trainer, resuming the kit's trainable state from its own checkpoint file and
    refusing to take an optimizer step on a non-finite loss."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not torch.isfinite(loss).all():
            # Raised before the optimizer step: the weights and the checkpoints on disk are still good.
            raise KitError(f"the training loss became {loss.item()} at step {self.state.global_step + 1}: stopped. "
                           f"Checkpoints up to step {self.state.global_step} are kept in {self.args.output_dir}; "
                           f"lower --learning_rate and continue with --resume, or start again with --overwrite")
        return loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        state = load_file(str(Path(resume_from_checkpoint) / TRAINABLE_FILE))
        load_trainable_state(self.model, state)
        logger.info("resumed %d trainable tensors from %s", len(state), resume_from_checkpoint)


# --------------------------------------------------------------------------------------------------------
# Output folder handling


def prepare_run_folder(cfg: Config) -> Path:
    """`<output_dir>.partial/`: refuses to touch a finished run without --overwrite, and a partial one
    without --resume (or --overwrite)."""
    final, partial = Path(cfg.output.output_dir), Path(cfg.output.output_dir + ".partial")
    if final.exists() and not cfg.output.overwrite:
        raise KitError(f"output folder {final} already exists; pass --overwrite to replace it, or choose "
                       f"another --output_dir")
    if partial.exists() and not (cfg.train.resume or cfg.output.overwrite):
        raise KitError(f"an unfinished run is in {partial}; pass --resume to continue it or --overwrite to "
                       f"start again")
    if partial.exists() and cfg.output.overwrite and not cfg.train.resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def finalize_run_folder(partial: Path, final: Path) -> None:
    shutil.rmtree(partial / "checkpoints", ignore_errors=True)
    (partial / BEST_FILE).unlink(missing_ok=True)  # already folded into adapter/ and merged/
    if final.exists():  # only reachable with --overwrite
        trash = final.with_name(final.name + ".old")
        os.replace(final, trash)
        os.replace(partial, final)
        shutil.rmtree(trash)
    else:
        os.replace(partial, final)


# --------------------------------------------------------------------------------------------------------
# Saving


def save_models(model: SentenceTransformer, cfg: Config, folder: Path) -> None:
    """adapter/ (LoRA runs) and merged/ (always). The merge goes into a freshly loaded full-precision base,
    never into the 4-bit one, which would re-quantize and lose precision. Both keep the base model's own
    maximum length: --max_seq_length is a training setting, and evaluation must compare like with like."""
    base = load_sentence_transformer(cfg.model, device="cpu", quantize=False)
    model.max_seq_length = base.max_seq_length
    if cfg.model.precision == "full":
        model.save(str(folder / "merged"))
        return
    model.save(str(folder / "adapter"))
    base[0].auto_model = merge_adapter(base[0].auto_model, folder / "adapter")
    base.save(str(folder / "merged"))


def merge_adapter(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Fold the saved LoRA adapter into the weights of a full-precision `base`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def plot_loss(path: Path, log_history: list[dict], objective: str, run_name: str,
              dev_history: list | None = None, selected_step: int | None = None, lora_scale: float = 1.0) -> None:
    """loss.png, panels sharing the step axis: training loss; development loss (its own panel: another loss, on
    other data, logged at other steps); development nDCG@10, the model-selection signal, with step 0 (the base)
    and the selected step marked. Panels without data are left out (a run without development evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = {"training loss": [(h["step"], h["loss"]) for h in log_history if "loss" in h]}
    dev_keys = sorted({k for h in log_history for k in h if k.startswith("eval_") and k.endswith("loss")})
    dev_loss = {k: [(h["step"], h[k]) for h in log_history if k in h] for k in dev_keys}  # one per part
    panels = ["train"] + ["dev"] * bool(dev_loss) + ["ndcg"] * bool(dev_history)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 2.6 * len(panels)), sharex=True, squeeze=False)
    axes = dict(zip(panels, axes[:, 0]))
    _line(axes["train"], series["training loss"], "training loss", f"{objective} loss (training batches)", "C0")
    for i, (key, points) in enumerate(dev_loss.items()):
        part = key.removeprefix("eval_").removesuffix("loss").rstrip("_")  # eval_loss, or eval_<part>_loss
        _line(axes["dev"], points, f"development loss{' (' + part + ')' if part else ''}", "development loss",
              f"C{i + 1}", marker="o")
    if dev_history:
        _dev_ndcg_panel(axes["ndcg"], dev_history, selected_step, lora_scale)
    note = "" if dev_history else "\n(no model selection: the last step is saved)"
    fig.suptitle(f"{run_name}: objective {objective}{note}")
    last = axes[panels[-1]]
    last.set_xlabel("optimizer step")
    last.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _line(ax, points: list, label: str, ylabel: str, color: str, marker: str | None = None) -> None:
    if points:
        ax.plot(*zip(*points), marker=marker or ("o" if len(points) < 3 else None), color=color, label=label)
        ax.legend(loc="best")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _dev_ndcg_panel(ax, dev_history: list, selected_step: int | None, lora_scale: float) -> None:
    """Development nDCG@10 (x100, the report's scale) by step; step 0 is the base model itself."""
    steps, scores = zip(*[(s, 100 * v) for s, v in dev_history])
    ax.plot(steps, scores, marker="o", color="C3", label="development nDCG@10")
    if 0 in steps:
        ax.annotate("base (step 0)", (0, scores[steps.index(0)]), textcoords="offset points", xytext=(6, 6))
    if selected_step is not None:
        scale = f", adapter scale {lora_scale:g}" if lora_scale != 1.0 else ""
        ax.axvline(selected_step, color="k", linestyle="--", label=f"selected: step {selected_step}{scale}")
    ax.set_ylabel("development nDCG@10 (x100)")
    ax.set_xlim(left=-0.5)  # step 0 at the edge would hide its marker
    ax.margins(y=0.15)  # room for the labels
    ax.legend(loc="best")
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------------------------------------
# What the log says


def training_counts(objective: str, texts: int, pairs: int, dev_texts: int, dev_pairs: int) -> str:
    """What the objective trains on, and the development data that selects the model. Counts of what it does not
    load are left out: '0 training texts' for a pairs objective would read as 'nothing to train on'."""
    trained = [f"{texts} training texts"] * needs_texts(objective) + [f"{pairs} training pairs"] * needs_pairs(objective)
    dev = f"{dev_pairs} held-out pairs" if dev_pairs else f"{dev_texts} held-out texts"
    return f"{' and '.join(trained)}; development: {dev}"


VERDICT_WORDS = {"better": "better than the base model",
                 "worse": "WORSE than the base model: keep using the base model",
                 "not distinguishable": "not distinguishable from the base model: no measurable gain"}


def summary_lines(summary: dict, final: Path) -> list[str]:
    """The few lines that end a run, from run.json's summary: what was trained and kept, where it is, whether it
    helped, what it cost. `final` is the finished run folder (not the .partial one it was built in)."""
    auto = " (chosen by --objective auto)" if summary.get("objective_requested") == "auto" else ""
    counts = training_counts(summary["objective"], summary["train_texts"], summary["train_pairs"],
                             summary["dev_texts"], summary["dev_pairs"]).split(";")[0]
    lines = [f"objective {summary['objective']}{auto}: {counts}, {summary['steps']} steps",
             kept_line(summary), saved_line(final)]
    ev = summary.get("evaluation")
    if ev:
        c, base, adapted = ev["ndcg@10"], 100 * ev["base"]["ndcg@10"], 100 * ev["adapted"]["ndcg@10"]
        low, high = (100 * x for x in c["ci95"])
        lines.append(f"held-out nDCG@10: base {base:.2f} -> adapted {adapted:.2f}, {100 * c['difference']:+.2f} "
                     f"[95% CI {low:+.2f}, {high:+.2f}]: {VERDICT_WORDS[ev['verdict']]}")
    else:
        lines.append("held-out evaluation: not run (no --eval_data)")
    memory = "GPU memory" if summary.get("device") == "cuda" else "resident memory"
    lines.append(f"time {duration(summary['total_seconds'])} in all ({duration(summary['train_seconds'])} training); "
                 f"peak {memory} {summary['peak_memory_gb']:.2f} GB (before evaluation)")
    return lines


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def kept_line(summary: dict) -> str:
    selected, scale = summary.get("selected"), summary.get("lora_scale", 1.0)
    if selected is None:
        return f"kept: the last step ({summary['steps']}), no model selection"
    if selected["step"] == 0:
        return f"kept: step 0, the base model unchanged (development nDCG@10 {100 * selected['dev_ndcg@10']:.2f})"
    base = dict(map(tuple, summary.get("dev_ndcg@10_by_step") or [])).get(0)
    start = f"{100 * base:.2f} at step 0 -> " if base is not None else ""
    return (f"kept: step {selected['step']} (development nDCG@10 {start}{100 * selected['dev_ndcg@10']:.2f}), "
            f"adapter scale {scale:g}")


def saved_line(final: Path) -> str:
    kinds = {"merged": "merged/ (standalone model)", "adapter": "adapter/ (LoRA adapter)"}
    return f"saved: {final}/ " + ", ".join(v for k, v in kinds.items() if (final / k).is_dir())


# --------------------------------------------------------------------------------------------------------


def training_arguments(cfg: Config, folder: Path, device: str, has_dev: bool, prompts: dict):
    t = cfg.train
    return SentenceTransformerTrainingArguments(
        output_dir=str(folder / "checkpoints"), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        warmup_steps=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay,
        logging_steps=t.logging_steps, save_steps=t.save_steps, save_total_limit=2, seed=t.seed,
        data_seed=t.seed, bf16=bf16_enabled(device, t.bf16), use_cpu=device == "cpu", report_to="none",
        eval_strategy="steps" if has_dev else "no", eval_steps=t.eval_steps if has_dev else None,
        prompts=prompts or None, dataloader_num_workers=0,
        # The duplicate check reads every row: for TSDAE alone that would compute each text's noise twice.
        batch_sampler=BatchSamplers.NO_DUPLICATES if uses_in_batch_negatives(t.objective) else BatchSamplers.BATCH_SAMPLER,
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False, disable_tqdm=False, logging_first_step=True,
    )


def build_trainer(cfg: Config, model, data: TrainingData, folder: Path, device: str):
    """The objective's datasets and loss, the development evaluator and the kit's callbacks, in one trainer."""
    objective = build_objective(cfg, model, data)
    if objective.decoder is not None:
        # Registered under the Transformer module, so data-parallel wrappers see (and all-reduce) its weights
        # and the checkpoints include them.
        model[0].tsdae_decoder = objective.decoder
    evaluator = dev_evaluator(model, data, cfg) if cfg.train.select_best else None
    callbacks = [TrainableStateCallback(model), StopOnSignalCallback(), EpochCallback(objective.epoch_aware)]
    if objective.decoder is not None and cfg.train.decoder_warmup_steps:
        decoder_ids = {id(p) for p in objective.decoder.parameters()}
        encoder_params = [p for p in model.parameters() if p.requires_grad and id(p) not in decoder_ids]
        callbacks.append(DecoderWarmupCallback(encoder_params, cfg.train.decoder_warmup_steps))
    best = BestStateCallback(model, folder) if evaluator is not None else None
    if best is not None:
        callbacks.append(best)
    # sentence-transformers samples widget examples for a model card at trainer start (its own progress bar; for
    # TSDAE, noise for 1,000 texts); the kit's model cards need none.
    model.model_card_data.set_widget_examples = lambda dataset: None
    args = training_arguments(cfg, folder, device, objective.eval_dataset is not None or evaluator is not None,
                              objective.prompts)
    trainer = KitTrainer(model=model, args=args, train_dataset=objective.train_dataset,
                         eval_dataset=objective.eval_dataset, loss=objective.loss, evaluator=evaluator,
                         callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)  # its nested bar per development-loss pass: one bar is enough
    trainer.add_callback(TrainingBarOnly())
    return trainer, best


def run_training(trainer: KitTrainer, checkpoint: str | None, cfg: Config):
    """trainer.train, with signals turned into a checkpoint + stop, and out-of-memory turned into advice."""
    stop = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnSignalCallback))
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError as exc:
        raise KitError(f"out of memory at batch size {cfg.train.batch_size}: try a smaller --batch_size (with "
                       f"--gradient_accumulation_steps to keep the effective batch), --gradient_checkpointing, "
                       f"--precision nf4, or a shorter --max_seq_length; continue with --resume") from exc
    finally:
        stop.uninstall()
    if stop.received:
        raise KitError(f"stopped by {stop.received} at step {trainer.state.global_step}; a checkpoint is saved "
                       f"in {trainer.args.output_dir}: run the same command with --resume to continue")
    return result


def train(cfg: Config) -> Path:
    started = time.time()
    set_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    requested = cfg.train.objective
    frame = read_table(cfg.data.train_file, cfg.data.text_column)  # read once: its columns decide the objective
    cfg.train.objective = resolve_objective(requested, [str(c) for c in frame.columns],
                                            cfg.data.pair_column_names(), cfg.data.text_column, cfg.data.train_file)
    data = load_training_data(cfg.data, cfg.train.seed, needs_texts(cfg.train.objective),
                              needs_pairs(cfg.train.objective), frame)  # bad data fails before any folder exists
    logger.info("objective %s: %s", cfg.train.objective, training_counts(cfg.train.objective, len(data.texts),
                len(data.pairs), len(data.dev_texts), len(data.dev_pairs)))
    # Bad evaluation data fails now too, not after the training it was to judge.
    eval_data = (load_retrieval_data(cfg.eval.eval_data, cfg.eval.query_column, cfg.eval.document_column)
                 if cfg.eval.eval_data else None)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and len(parts(cfg.train.objective)) > 1:
        # DDP would have to find the decoder's unused parameters on mnrl batches, and its unused-parameter search
        # cannot handle TSDAE's second pass through the same (shared) layers.
        raise UsageError(f"option --objective {cfg.train.objective}: not supported under torchrun; run tsdae, then "
                         f"mnrl from its merged/ model, or train on one process")
    world_rank = int(os.environ.get("RANK", "0"))
    folder = prepare_run_folder(cfg) if world_rank == 0 else Path(cfg.output.output_dir + ".partial")
    if world_rank == 0:
        cfg.save(folder / "config.json")
    model = build_model(cfg.model, device, cfg.train.gradient_checkpointing)
    trainer, best = build_trainer(cfg, model, data, folder, device)

    checkpoint = last_complete_checkpoint(Path(trainer.args.output_dir)) if cfg.train.resume else None
    if cfg.train.resume and checkpoint is None:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", trainer.args.output_dir)
    if best is not None and checkpoint is None:  # step 0, the base model: the bar training has to clear
        best.consider(0, dev_score(trainer.evaluator(model)), trainer.is_world_process_zero())
    result = run_training(trainer, checkpoint, cfg)
    step = trainer.state.global_step
    if best is not None and (not best.history or best.history[-1][0] != step):  # the final state competes too
        best.consider(step, dev_score(trainer.evaluator(model)), trainer.is_world_process_zero())
    if hasattr(model[0], "tsdae_decoder"):
        del model[0].tsdae_decoder
    if not trainer.is_world_process_zero():
        return folder
    selected = best.restore() if best is not None else None
    lora_scale = (choose_lora_scale(model, trainer.evaluator, best, cfg.train.lora_scale_values())
                  if best is not None else 1.0)

    history = trainer.state.log_history
    (folder / "training_log.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
    plot_loss(folder / "loss.png", history, cfg.train.objective, Path(cfg.output.output_dir).name,
              best.history if best is not None else None, selected["step"] if selected else None, lora_scale)
    save_models(model, cfg, folder)
    summary = {"objective": cfg.train.objective, "objective_requested": requested, "train_texts": len(data.texts), "train_pairs": len(data.pairs),
               "dev_texts": len(data.dev_texts), "dev_pairs": len(data.dev_pairs), "steps": trainer.state.global_step,
               "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
               "train_samples_per_second": result.metrics.get("train_samples_per_second"),
               "final_train_loss": result.metrics.get("train_loss"), "device": device, "bf16": trainer.args.bf16,
               "selected": selected, "lora_scale": lora_scale,
               "dev_ndcg@10_by_step": best.history if best is not None else None,
               "peak_memory_gb": peak_memory_gb(device)}
    if selected is not None and selected["step"] == 0:
        logger.warning("no training step beat the base model on the development pairs: the saved model is the "
                       "base model unchanged")
    if eval_data is not None:
        from src.evaluation import evaluate_run

        summary["evaluation"] = evaluate_run(cfg, folder, eval_data)
    summary["total_seconds"] = round(time.time() - started, 1)
    (folder / "run.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    finalize_run_folder(folder, Path(cfg.output.output_dir))
    logger.info("run finished: %s", cfg.output.output_dir)
    for line in summary_lines(summary, Path(cfg.output.output_dir)):
        logger.info("  %s", line)
    return Path(cfg.output.output_dir)


def main(argv=None) -> None:
    train(parse_config(argv))


if __name__ == "__main__":
    run_cli(main)
