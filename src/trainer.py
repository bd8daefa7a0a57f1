"""One command: data -> the run's plan (src/plan.py) -> model -> training (the objectives of src/objectives/) ->
model selection on development pairs (src/selection.py) -> saved adapter and merged model (src/run_folder.py) ->
retrieval evaluation against the base model (src/evaluation.py).

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

import gc
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import load_file
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import ProgressCallback, set_seed

from src.callbacks import (
    EpochCallback,
    StopOnSignalCallback,
    TrainableStateCallback,
    TrainingBarOnly,
)
from src.checkpoints import (
    CHECKPOINTS,
    SAVE_TOTAL_LIMIT,
    TRAINABLE_FILE,
    last_complete_checkpoint,
    load_trainable_state,
)
from src.cli import parse_config
from src.config import Config, TrainConfig
from src.create_dataset import TrainingData, load_training_data
from src.encoding import StoredEncoder
from src.errors import KitError, run_cli, writing
from src.evaluation import evaluate_run
from src.export import check_export, export_openvino
from src.model_builder import build_model, pick_device, trained_precision, world_rank, world_size
from src.objectives import BuildInputs, build_objective, needs_pairs, needs_texts, uses_in_batch_negatives
from src.plan import RunPlan, describe, plan_run
from src.plots import plot_loss
from src.query_side import BANK_DOCUMENTS, detach_document_map, query_side_objective, training_queries
from src.retrieval_data import RetrievalData, load_retrieval_data
from src.run_folder import (
    check_space,
    expected_bytes,
    finalize_run_folder,
    partial_folder,
    prepare_run_folder,
    save_models,
    save_settings,
)
from src.run_lock import release
from src.run_summary import summary_lines, training_counts
from src.selection import DEV_HISTORY, MONITOR_HISTORY, NO_SELECTION, model_selection
from src.tables import read_table

logger = logging.getLogger(__name__)


class KitTrainer(SentenceTransformerTrainer):
    """The sentence-transformers trainer, resuming the kit's trainable state from its own checkpoint file (and no
    step past the end), and refusing to take an optimizer step on a non-finite loss."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not torch.isfinite(loss).all():
            # Raised before the optimizer step: the weights and the checkpoints on disk are still good.
            raise KitError(f"the training loss became {loss.item()} at step {self.state.global_step + 1}: stopped. "
                           f"Checkpoints up to step {self.state.global_step} are kept in {self.args.output_dir}; "
                           f"start again with --overwrite and a lower --learning_rate (a resumed run keeps its own)")
        return loss

    def _run_epoch(self, *args, **kwargs):
        # A run resumed from its last checkpoint (killed while saving its models) has no step left; transformers
        # would still run one more before checking, and end with other weights than the uninterrupted run.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        state = load_file(str(Path(resume_from_checkpoint) / TRAINABLE_FILE))
        load_trainable_state(self.model, state)
        logger.info("resumed %d trainable tensors from %s", len(state), resume_from_checkpoint)


def peak_memory_gb(device: str) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident memory on CPU."""
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux reports KiB


def training_arguments(train: TrainConfig, plan: RunPlan, folder: Path, has_dev: bool, prompts: dict):
    return SentenceTransformerTrainingArguments(
        output_dir=str(folder / CHECKPOINTS), per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size, gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=plan.learning_rate, num_train_epochs=plan.epochs, max_steps=plan.max_steps or -1,
        warmup_steps=train.warmup_ratio, lr_scheduler_type=train.lr_scheduler, weight_decay=train.weight_decay,
        logging_steps=train.logging_steps, save_steps=train.save_steps, save_total_limit=SAVE_TOTAL_LIMIT,
        seed=train.seed, data_seed=train.seed, bf16=plan.bf16, use_cpu=plan.device == "cpu",
        report_to="none", eval_strategy="steps" if has_dev else "no", eval_steps=plan.eval_steps if has_dev else None,
        prompts=prompts or None, dataloader_num_workers=0,
        # The duplicate check reads every row: for TSDAE alone that would compute each text's noise twice.
        # A query-side run's negatives are the stored documents, never the batch's: no batch needs to be unique.
        batch_sampler=(BatchSamplers.NO_DUPLICATES if uses_in_batch_negatives(plan.objective) and not plan.queries_only
                       else BatchSamplers.BATCH_SAMPLER),
        ddp_backend="gloo" if plan.device == "cpu" and world_size() > 1 else None,
        ddp_find_unused_parameters=False, disable_tqdm=False, logging_first_step=True,
    )


def build_trainer(cfg: Config, plan: RunPlan, model, data: TrainingData, folder: Path, monitor: RetrievalData | None,
                  eval_data: RetrievalData | None):
    """The objective's datasets and loss, model selection (with the monitor) and the kit's callbacks, in one
    trainer. A query-side run stores its documents' embeddings from the evaluation corpus's where it holds them."""
    t = cfg.train
    inputs = BuildInputs(t, cfg.noise, plan.mnrl_scale, plan.max_steps, model, data)
    # the query side trains against the base's document embeddings, computed once (and cached) as the index has them
    stored = None
    if plan.queries_only:
        index = list(eval_data.corpus.values()) if eval_data is not None else None  # in the evaluation's order
        stored = StoredEncoder(cfg.model.model_name_or_path, cfg.eval, index)
    objective = (query_side_objective(plan.objective, inputs, stored, plan.adapt == "queries+map")
                 if stored is not None else build_objective(plan.objective, inputs))
    if objective.modules:
        # Registered under the Transformer module while it trains, so data-parallel wrappers see (and all-reduce)
        # their weights and the checkpoints include them; dropped before the models are saved.
        model[0].objective_modules = torch.nn.ModuleDict(objective.modules)
    selection = model_selection(model, data, plan, t, cfg.eval.eval_batch_size, monitor, folder,
                                plan.bf16, stored)
    if stored is not None:
        stored.close()  # the base model is not needed during training
    callbacks = [TrainableStateCallback(model), StopOnSignalCallback(), EpochCallback(objective.epoch_aware),
                 *objective.callbacks]
    if selection is not None:
        callbacks.append(selection)
    # sentence-transformers samples widget examples for a model card at trainer start (its own progress bar; for
    # TSDAE, noise for 1,000 texts); the kit's model cards need none.
    model.model_card_data.set_widget_examples = lambda dataset: None
    has_dev = objective.eval_dataset is not None or selection is not None
    args = training_arguments(t, plan, folder, has_dev, objective.prompts)
    trainer = KitTrainer(model=model, args=args, train_dataset=objective.train_dataset,
                         eval_dataset=objective.eval_dataset, loss=objective.loss,
                         evaluator=selection.evaluator if selection else None, callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)  # its nested bar per development-loss pass: one bar is enough
    trainer.add_callback(TrainingBarOnly())
    return trainer, selection


def run_training(trainer: KitTrainer, checkpoint: str | None, batch_size: int):
    """trainer.train, with signals turned into a checkpoint + stop, and out-of-memory turned into advice."""
    stop = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnSignalCallback))
    stop.install()
    try:
        with writing("a checkpoint", Path(trainer.args.output_dir)):
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError as exc:
        raise KitError(f"out of memory at batch size {batch_size}: continue with --resume and --checkpoint_every 1 "
                       f"(with --gradient_checkpointing), or a smaller --batch_size times a larger "
                       f"--gradient_accumulation_steps (the same effective batch); or start again with --overwrite "
                       f"and --precision nf4 or a shorter --max_seq_length") from exc
    finally:
        stop.uninstall()
    if stop.received:
        raise KitError(f"stopped by {stop.received} at step {trainer.state.global_step}; a checkpoint is saved "
                       f"in {trainer.args.output_dir}: run the same command with --resume to continue")
    return result


def read_inputs(cfg: Config, device: str) -> tuple[RunPlan, TrainingData, RetrievalData | None, RetrievalData | None]:
    """The training file (read once: its columns and size decide the plan), the evaluation data and the monitor's,
    all checked before any folder or model exists, so that bad data fails in seconds, not after the training; then
    what the model and `device` decide. Returns the plan, the training, evaluation and monitor data."""
    frame = read_table(cfg.data.train_file, cfg.data.text_column)
    plan = plan_run(cfg, [str(c) for c in frame.columns], world_size(), len(frame))
    check_export(cfg.output.export)
    data = load_training_data(cfg.data, cfg.train.seed, needs_texts(plan.objective), needs_pairs(plan.objective),
                              frame, plan.holdout_fraction)
    # a query-side run on documents alone trains on its bank's documents only
    texts = min(len(data.texts), BANK_DOCUMENTS) if plan.queries_only else len(data.texts)
    examples = (len(data.pairs) if needs_pairs(plan.objective) else 0) + (texts if needs_texts(plan.objective) else 0)
    plan = plan.with_budget(examples, cfg.train, world_size())
    logger.info("plan: %s", describe(plan, cfg.train, world_size()))
    logger.info("objective %s: %s", plan.objective, training_counts(plan.objective, len(data.texts), len(data.pairs),
                len(data.dev_texts), len(data.dev_pairs)))
    eval_data, monitor = (load_retrieval_data(path, cfg.eval.query_column, cfg.eval.document_column) if path else None
                          for path in (cfg.eval.eval_data, cfg.train.monitor_data))
    return plan.with_hardware(cfg.model, cfg.train, device), data, eval_data, monitor


def run_record(cfg: Config, plan: RunPlan, data: TrainingData, trainer: KitTrainer, result, selection: dict) -> dict:
    """run.json: what was trained (the plan), what was held out, what was kept (`selection`), how long it took."""
    return {"objective": plan.objective, "objective_requested": cfg.train.objective, "plan": plan.to_dict(),
            "train_texts": len(data.texts), "train_pairs": len(data.pairs), "dev_texts": len(data.dev_texts),
            "dev_pairs": len(data.dev_pairs), "steps": trainer.state.global_step,
            "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
            "train_samples_per_second": result.metrics.get("train_samples_per_second"),
            "final_train_loss": result.metrics.get("train_loss"), "device": plan.device, "bf16": trainer.args.bf16,
            "precision": trained_precision(trainer.model),
            **selection}


def write_outputs(cfg: Config, plan: RunPlan, folder: Path, trainer: KitTrainer, summary: dict) -> None:
    """training_log.json, loss.png, adapter/ and merged/, in the `.partial` folder."""
    history = trainer.state.log_history
    with writing("the training log, the models (adapter/, merged/)", folder):
        (folder / "training_log.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
        selected = summary["selected"]
        plot_loss(folder / "loss.png", history, plan.objective, Path(cfg.output.output_dir).name,
                  summary[DEV_HISTORY], selected["step"] if selected else None, summary["lora_scale"],
                  summary.get(MONITOR_HISTORY))
        save_models(trainer.model, cfg.model, folder, queries_only=plan.queries_only,
                    document_map=detach_document_map(trainer.model))


def train_model(cfg: Config, plan: RunPlan, data: TrainingData, folder: Path, monitor: RetrievalData | None,
                eval_data: RetrievalData | None) -> tuple[KitTrainer, object, dict]:
    """Build, train (from the last checkpoint with --resume) and select: the trainer, its result and run.json's
    selection record."""
    model = build_model(cfg.model, plan.device, plan.checkpoint_every, plan.max_seq_length, plan.precision)
    if world_rank() == 0:
        needed = expected_bytes(model, cfg.model, plan.queries_only, export=bool(cfg.output.export))
        check_space(folder, needed, fresh=not cfg.train.resume)
    trainer, selection = build_trainer(cfg, plan, model, data, folder, monitor, eval_data)
    checkpoint = last_complete_checkpoint(Path(trainer.args.output_dir)) if cfg.train.resume else None
    if cfg.train.resume and checkpoint is None:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", trainer.args.output_dir)
    if selection is not None:
        selection.start(trainer, checkpoint)
    result = run_training(trainer, checkpoint, cfg.train.batch_size)
    if torch.distributed.is_initialized():
        # no collective runs after training: each torchrun process shuts its group down itself, rather than
        # leaving gloo's threads to the interpreter's exit (a process then aborted now and then)
        torch.distributed.destroy_process_group()
    if hasattr(model[0], "objective_modules"):
        del model[0].objective_modules
    return trainer, result, selection.finish(trainer) if selection is not None else dict(NO_SELECTION)


def free_memory(device: str) -> None:
    """Collect the training model, its optimizer state and batches (reference cycles included) before the
    evaluation loads the saved model, so that the evaluation's peak is its own, not added to the training's."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def train(cfg: Config) -> Path:
    started = time.time()
    set_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    plan, data, eval_data, monitor = read_inputs(cfg, pick_device(cfg.train.device))
    if world_rank() != 0:  # torchrun's other processes train; the first one writes the run folder
        trained = train_model(cfg, plan, data, partial_folder(cfg.output), monitor, eval_data)
        end_worker_process(trained)
    folder = prepare_run_folder(cfg)
    try:
        return run_job(cfg, plan, data, eval_data, monitor, folder, started)
    finally:
        release(folder)  # a run that failed stays resumable, and unlocked (a finished one is renamed, lock released)


def end_worker_process(trained: tuple) -> NoReturn:
    """A torchrun process other than rank 0 ends here, its trainer (`trained`) still referenced, without Python's
    teardown. Freeing its DDP model frees gloo's process group from the Reducer's destructor, which joins gloo's
    threads while holding the GIL; a thread still freeing the last collective's work (its tensors have Python
    objects) waits for that GIL: a deadlock (pytorch/pytorch#56297), which hung the torchrun test about one run in
    four. Rank 0 frees its trainer seconds after the last collective (merge and save), when the threads are idle."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def calibration_texts(data: TrainingData, plan: RunPlan, seed: int) -> list[str]:
    """What an export's int8 ranges are calibrated on: the texts its encoder will see. Documents for a symmetric
    model (what an index holds); a query-side run exports its query encoder alone: its queries (the pairs'
    queries, or on documents alone the pseudo-queries its objective made of them)."""
    if plan.queries_only:
        return training_queries(plan.objective, data, seed)
    return data.texts or [document for _, document in data.pairs]


def run_job(cfg: Config, plan: RunPlan, data: TrainingData, eval_data: RetrievalData | None,
            monitor: RetrievalData | None, folder: Path, started: float) -> Path:
    """In the locked `.partial` folder: train, save, evaluate, and rename it into place."""
    with writing("config.json", folder):
        save_settings(folder, cfg, plan.to_dict())
    trainer, result, selection = train_model(cfg, plan, data, folder, monitor, eval_data)
    summary = run_record(cfg, plan, data, trainer, result, selection)
    write_outputs(cfg, plan, folder, trainer, summary)
    # after saving: the merge into a full-precision base counts
    summary["peak_memory_gb"] = peak_memory_gb(plan.device)
    del trainer, result
    free_memory(plan.device)
    exports = (cfg.output.export,) if cfg.output.export else ()
    for name in exports:
        with writing(f"the {name} export", folder):
            shutil.rmtree(folder / name, ignore_errors=True)  # a resumed run exports its final model again
            export_openvino(folder / "merged", folder / name,
                            calibration_texts(data, plan, cfg.train.seed_for("train")))
    with writing("the evaluation reports, run.json", folder):
        if eval_data is not None:
            summary["evaluation"] = evaluate_run(cfg.eval, cfg.model.model_name_or_path, cfg.output.output_dir,
                                                 folder, eval_data, plan.queries_only, exports)
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
