"""One command: data -> model -> TSDAE training -> saved adapter and merged model -> retrieval evaluation.

    python -m src.trainer                      # bundled default: multilingual-e5-small, QLoRA, Russian catalog
    python -m src.trainer --config my.yaml --learning_rate 5e-5 --output_dir runs/mine
    torchrun --nproc_per_node 2 -m src.trainer ...   # data-parallel (gloo on CPU, nccl on GPU)

The run folder is built as `<output_dir>.partial/` (checkpoints live there, so `--resume` continues a broken
run) and renamed to `<output_dir>/` only when everything is written:

    adapter/   PEFT adapter + sentence-transformers files (needs the base model at load time)
    merged/    adapter merged into a full-precision base: a standalone sentence-transformers model
    config.json  training_log.json  loss.png  run.json  [evaluation/ when eval data is configured]
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from src.config import Config, parse_config
from src.create_dataset import WordNoise, load_corpus, noisy_dataset
from src.errors import KitError, run_cli
from src.model_builder import build_model, load_sentence_transformer, pick_device
from src.tsdae import TSDAELoss, corpus_vocabulary

logger = logging.getLogger(__name__)
TRAINABLE_FILE = "trainable_state.safetensors"  # LoRA + decoder weights, beside each checkpoint


class NoiseEpochCallback(TrainerCallback):
    """Tell the noise which epoch it is, so every epoch sees a fresh corruption of each text."""

    def __init__(self, noise: WordNoise):
        self.noise = noise

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.noise.epoch = int(math.floor(state.epoch or 0))


class TrainableStateCallback(TrainerCallback):
    """Write every trainable weight (adapters and the decoder, which the Trainer does not know about) into
    each checkpoint, so that a resumed run continues from exactly the same state."""

    def __init__(self, loss: torch.nn.Module):
        self.loss = loss

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_file(trainable_state(self.loss), str(folder / TRAINABLE_FILE))


def trainable_state(module: torch.nn.Module) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


class TSDAETrainer(SentenceTransformerTrainer):
    """The sentence-transformers trainer, resuming the kit's trainable state from its own checkpoint file."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        state = load_file(str(Path(resume_from_checkpoint) / TRAINABLE_FILE))
        params = dict(self.loss.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device))
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
    never into the 4-bit one, which would re-quantize and lose precision."""
    if cfg.model.precision == "full":
        model.save(str(folder / "merged"))
        return
    model.save(str(folder / "adapter"))
    merged = load_sentence_transformer(cfg.model, device="cpu", quantize=False)
    merged[0].auto_model = merge_adapter(merged[0].auto_model, folder / "adapter")
    merged.save(str(folder / "merged"))


def merge_adapter(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Fold the saved LoRA adapter into the weights of a full-precision `base`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def plot_loss(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("eval_loss", "development")):
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("TSDAE reconstruction loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------


def training_arguments(cfg: Config, folder: Path, device: str, has_dev: bool, prompt: str):
    t = cfg.train
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported() and t.bf16 != "no"
    return SentenceTransformerTrainingArguments(
        output_dir=str(folder / "checkpoints"), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
        warmup_steps=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay,
        logging_steps=t.logging_steps, save_steps=t.save_steps, save_total_limit=2, seed=t.seed,
        data_seed=t.seed, bf16=bf16, use_cpu=device == "cpu", report_to="none",
        eval_strategy="steps" if has_dev else "no", eval_steps=t.save_steps if has_dev else None,
        prompts={"noisy": prompt} if prompt else None, dataloader_num_workers=0,
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=False, logging_first_step=True,
    )


def train(cfg: Config) -> Path:
    started = time.time()
    set_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    train_texts, dev_texts = load_corpus(cfg.data, cfg.train.seed)  # bad data fails before any folder exists
    logger.info("training texts: %d, development texts: %d", len(train_texts), len(dev_texts))
    world_rank = int(os.environ.get("RANK", "0"))
    folder = prepare_run_folder(cfg) if world_rank == 0 else Path(cfg.output.output_dir + ".partial")
    cfg.save(folder / "config.json")
    model = build_model(cfg.model, device, cfg.train.gradient_checkpointing)
    vocab = corpus_vocabulary(model, train_texts + dev_texts) if cfg.train.decoder_vocab == "corpus" else None
    if vocab is not None:
        logger.info("decoder softmax over %d corpus tokens (of %d)", len(vocab), model[0].auto_model.config.vocab_size)
    loss = TSDAELoss(model, vocab, cfg.train.loss_chunk_tokens, cfg.train.gradient_checkpointing)
    # Registered under the Transformer module, so data-parallel wrappers see (and all-reduce) its weights.
    model[0].tsdae_decoder = loss.decoder

    noise = WordNoise(cfg.noise, cfg.train.seed)
    dev_noise = WordNoise(cfg.noise, cfg.train.seed + 1)  # fixed noise: comparable development losses
    prompt = (model.prompts or {}).get("passage", "")
    args = training_arguments(cfg, folder, device, bool(dev_texts), prompt)
    trainer = TSDAETrainer(model=model, args=args, train_dataset=noisy_dataset(train_texts, noise),
                           eval_dataset=noisy_dataset(dev_texts, dev_noise) if dev_texts else None, loss=loss,
                           callbacks=[NoiseEpochCallback(noise), TrainableStateCallback(loss)])
    checkpoint = get_last_checkpoint(args.output_dir) if cfg.train.resume and Path(args.output_dir).is_dir() else None
    if cfg.train.resume and checkpoint is None:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", args.output_dir)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    del model[0].tsdae_decoder
    if not trainer.is_world_process_zero():
        return folder

    history = trainer.state.log_history
    (folder / "training_log.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
    plot_loss(history, folder / "loss.png")
    save_models(model, cfg, folder)
    summary = {"train_texts": len(train_texts), "dev_texts": len(dev_texts), "steps": trainer.state.global_step,
               "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
               "train_samples_per_second": result.metrics.get("train_samples_per_second"),
               "final_train_loss": result.metrics.get("train_loss"), "device": device,
               "decoder_vocab": None if vocab is None else len(vocab)}
    if cfg.eval.eval_data:
        from src.evaluation import evaluate_run

        summary["evaluation"] = evaluate_run(cfg, folder)
    summary["total_seconds"] = round(time.time() - started, 1)
    (folder / "run.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    finalize_run_folder(folder, Path(cfg.output.output_dir))
    logger.info("run finished: %s", cfg.output.output_dir)
    return Path(cfg.output.output_dir)


def main(argv=None) -> None:
    train(parse_config(argv))


if __name__ == "__main__":
    run_cli(main)
