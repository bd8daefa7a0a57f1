"""One command: data -> model -> training (the objectives of src/objectives.py) -> model selection on development
pairs (src/selection.py, src/callbacks.py) -> saved adapter and merged model (src/run_folder.py) -> retrieval
evaluation against the base model (src/evaluation.py).

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
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import ProgressCallback, set_seed

from src.callbacks import (
    CHECKPOINTS,
    TRAINABLE_FILE,
    BestStateCallback,
    DecoderWarmupCallback,
    EpochCallback,
    StopOnSignalCallback,
    TrainableStateCallback,
    TrainingBarOnly,
    choose_lora_scale,
    last_complete_checkpoint,
    load_trainable_state,
)
from src.cli import parse_config
from src.config import Config
from src.create_dataset import TrainingData, load_training_data
from src.errors import KitError, UsageError, run_cli
from src.model_builder import bf16_enabled, build_model, pick_device, world_rank, world_size
from src.objectives import (
    DOCUMENTS_DEFAULT,
    apply_documents_recipe,
    build_objective,
    needs_pairs,
    needs_texts,
    parts,
    resolve_objective,
    uses_in_batch_negatives,
)
from src.plots import plot_loss
from src.retrieval_data import RetrievalData, load_retrieval_data
from src.run_folder import finalize_run_folder, partial_folder, prepare_run_folder, save_models
from src.run_summary import summary_lines, training_counts
from src.selection import development_part, selection_evaluator
from src.tables import read_table

logger = logging.getLogger(__name__)


class KitTrainer(SentenceTransformerTrainer):
    """The sentence-transformers trainer, resuming the kit's trainable state from its own checkpoint file and
    refusing to take an optimizer step on a non-finite loss."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not torch.isfinite(loss).all():
            # Raised before the optimizer step: the weights and the checkpoints on disk are still good.
            raise KitError(f"the training loss became {loss.item()} at step {self.state.global_step + 1}: stopped. "
                           f"Checkpoints up to step {self.state.global_step} are kept in {self.args.output_dir}; "
                           f"start again with --overwrite and a lower --learning_rate (a resumed run keeps its own)")
        return loss

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


def training_arguments(cfg: Config, folder: Path, device: str, has_dev: bool, prompts: dict):
    t = cfg.train
    return SentenceTransformerTrainingArguments(
        output_dir=str(folder / CHECKPOINTS), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        warmup_steps=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay,
        logging_steps=t.logging_steps, save_steps=t.save_steps, save_total_limit=2, seed=t.seed,
        data_seed=t.seed, bf16=bf16_enabled(device, t.bf16), use_cpu=device == "cpu", report_to="none",
        eval_strategy="steps" if has_dev else "no", eval_steps=t.eval_steps if has_dev else None,
        prompts=prompts or None, dataloader_num_workers=0,
        # The duplicate check reads every row: for TSDAE alone that would compute each text's noise twice.
        batch_sampler=(BatchSamplers.NO_DUPLICATES if uses_in_batch_negatives(t.objective)
                       else BatchSamplers.BATCH_SAMPLER),
        ddp_backend="gloo" if device == "cpu" and world_size() > 1 else None,
        ddp_find_unused_parameters=False, disable_tqdm=False, logging_first_step=True,
    )


def build_trainer(cfg: Config, model, data: TrainingData, folder: Path, device: str, monitor: RetrievalData | None):
    """The objective's datasets and loss, the development evaluator (and monitor) and the kit's callbacks, in one
    trainer."""
    objective = build_objective(cfg, model, data)
    if objective.decoder is not None:
        # Registered under the Transformer module, so data-parallel wrappers see (and all-reduce) its weights
        # and the checkpoints include them.
        model[0].tsdae_decoder = objective.decoder
    evaluator = selection_evaluator(model, data, cfg, monitor) if cfg.train.select_best else None
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
        raise KitError(f"out of memory at batch size {cfg.train.batch_size}: continue with --resume and a smaller "
                       f"--batch_size times a larger --gradient_accumulation_steps (the same effective batch) or "
                       f"--gradient_checkpointing; or start again with --overwrite and --precision nf4 or a shorter "
                       f"--max_seq_length") from exc
    finally:
        stop.uninstall()
    if stop.received:
        raise KitError(f"stopped by {stop.received} at step {trainer.state.global_step}; a checkpoint is saved "
                       f"in {trainer.args.output_dir}: run the same command with --resume to continue")
    return result


def read_inputs(cfg: Config) -> tuple[str, TrainingData, RetrievalData | None, RetrievalData | None]:
    """The training file (read once: its columns decide `--objective auto`, which this resolves in `cfg`), the
    evaluation data and the monitor's, all checked before any folder or model exists, so that bad data fails in
    seconds, not after the training. Returns the objective as requested, the training, evaluation and monitor data."""
    requested = cfg.train.objective
    frame = read_table(cfg.data.train_file, cfg.data.text_column)
    cfg.train.objective = resolve_objective(requested, [str(c) for c in frame.columns],
                                            cfg.data.pair_column_names(), cfg.data.text_column, cfg.data.train_file)
    if world_size() > 1 and len(parts(cfg.train.objective)) > 1:
        # DDP would have to find the decoder's unused parameters on mnrl batches, and its unused-parameter search
        # cannot handle TSDAE's second pass through the same (shared) layers.
        raise UsageError(f"option --objective {cfg.train.objective}: not supported under torchrun; run tsdae, then "
                         f"mnrl from its merged/ model, or train on one process")
    data = load_training_data(cfg.data, cfg.train.seed, needs_texts(cfg.train.objective),
                              needs_pairs(cfg.train.objective), frame)
    if requested == "auto" and cfg.train.objective == DOCUMENTS_DEFAULT:
        apply_documents_recipe(cfg.train, len(data.texts), world_size())
    logger.info("objective %s: %s", cfg.train.objective, training_counts(cfg.train.objective, len(data.texts),
                len(data.pairs), len(data.dev_texts), len(data.dev_pairs)))
    eval_data, monitor = (load_retrieval_data(path, cfg.eval.query_column, cfg.eval.document_column) if path else None
                          for path in (cfg.eval.eval_data, cfg.train.monitor_data))
    return requested, data, eval_data, monitor


def select_state(trainer: KitTrainer, best: BestStateCallback | None, cfg: Config) -> dict:
    """Model selection once training is over: the final state competes too, the best development state is
    restored (step 0 = the base model unchanged), then the adapter scale is chosen (main process only)."""
    if best is None:
        return {"selected": None, "lora_scale": 1.0, "dev_ndcg@10_by_step": None}
    step, main_process = trainer.state.global_step, trainer.is_world_process_zero()
    if not best.history or best.history[-1][0] != step:
        best.consider(step, trainer.evaluator(trainer.model), main_process)
    history = {"dev_ndcg@10_by_step": best.history, "monitor_ndcg@10_by_step": best.monitor or None}
    if not main_process:
        return {"selected": None, "lora_scale": 1.0, **history}
    selected = best.restore()
    if selected is not None and selected["step"] == 0:
        logger.warning("no training step beat the base model on the development pairs: the saved model is the "
                       "base model unchanged")
    scale = choose_lora_scale(trainer.model, development_part(trainer.evaluator), best, cfg.train.lora_scale_values())
    return {"selected": selected, "lora_scale": scale, **history}


def run_record(cfg: Config, requested: str, data: TrainingData, trainer: KitTrainer, result, selection: dict,
               device: str) -> dict:
    """run.json: what was trained, what was kept (`selection`), how long it took."""
    return {"objective": cfg.train.objective, "objective_requested": requested, "train_texts": len(data.texts),
            "train_pairs": len(data.pairs), "dev_texts": len(data.dev_texts), "dev_pairs": len(data.dev_pairs),
            "steps": trainer.state.global_step, "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
            "train_samples_per_second": result.metrics.get("train_samples_per_second"),
            "final_train_loss": result.metrics.get("train_loss"), "device": device, "bf16": trainer.args.bf16,
            **selection}


def write_outputs(cfg: Config, folder: Path, trainer: KitTrainer, summary: dict) -> None:
    """training_log.json, loss.png, adapter/ and merged/, in the `.partial` folder."""
    history = trainer.state.log_history
    (folder / "training_log.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
    selected = summary["selected"]
    plot_loss(folder / "loss.png", history, cfg.train.objective, Path(cfg.output.output_dir).name,
              summary["dev_ndcg@10_by_step"], selected["step"] if selected else None, summary["lora_scale"],
              summary.get("monitor_ndcg@10_by_step"))
    save_models(trainer.model, cfg, folder)


def train(cfg: Config) -> Path:
    started = time.time()
    set_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    requested, data, eval_data, monitor = read_inputs(cfg)
    folder = prepare_run_folder(cfg) if world_rank() == 0 else partial_folder(cfg)
    if world_rank() == 0:
        cfg.save(folder / "config.json")
    model = build_model(cfg.model, device, cfg.train.gradient_checkpointing)
    trainer, best = build_trainer(cfg, model, data, folder, device, monitor)
    checkpoint = last_complete_checkpoint(Path(trainer.args.output_dir)) if cfg.train.resume else None
    if cfg.train.resume and checkpoint is None:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", trainer.args.output_dir)
    if best is not None:
        best.resume_at(int(checkpoint.rsplit("-", 1)[1]) if checkpoint else -1)
        if checkpoint is None:  # step 0, the base model: the bar training has to clear
            best.consider(0, trainer.evaluator(model), trainer.is_world_process_zero())
    result = run_training(trainer, checkpoint, cfg)
    if hasattr(model[0], "tsdae_decoder"):
        del model[0].tsdae_decoder
    selection = select_state(trainer, best, cfg)
    if not trainer.is_world_process_zero():
        return folder
    summary = run_record(cfg, requested, data, trainer, result, selection, device)
    write_outputs(cfg, folder, trainer, summary)
    summary["peak_memory_gb"] = peak_memory_gb(device)  # after saving: the merge into a full-precision base counts
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
