"""The run folder: built as `<output_dir>.partial/`, renamed into place only when everything is written, its
settings (config.json: the requested groups and the resolved plan) and the models saved into it (adapter/ and
merged/)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from src import run_lock
from src.checkpoints import CHECKPOINTS, SAVE_TOTAL_LIMIT
from src.cli import RESOLVED
from src.config import Config, ModelConfig, OutputConfig
from src.errors import KitError, UsageError, free_bytes, megabytes, writing
from src.model_builder import load_sentence_transformer
from src.provision import resolve_model
from src.query_side import QUERY_SIDE_MODES
from src.selection import BEST_FILE

SETTINGS_FILE = "config.json"


def partial_folder(output: OutputConfig) -> Path:
    return Path(output.output_dir + ".partial")


def prepare_run_folder(cfg: Config) -> Path:
    """`<output_dir>.partial/`: refuses to touch a finished run without --overwrite, and a partial one
    without --resume (or --overwrite)."""
    final, partial = Path(cfg.output.output_dir), partial_folder(cfg.output)
    if partial.exists():
        run_lock.check_free(partial)  # before anything touches it: --overwrite would delete a live run
    if final.exists() and not cfg.output.overwrite:
        raise KitError(f"output folder {final} already exists; pass --overwrite to replace it, or choose "
                       f"another --output_dir")
    if partial.exists() and not (cfg.train.resume or cfg.output.overwrite):
        raise KitError(f"an unfinished run is in {partial}; pass --resume to continue it or --overwrite to "
                       f"start again")
    if partial.exists() and cfg.output.overwrite and not cfg.train.resume:
        shutil.rmtree(partial)
    if cfg.train.resume and (partial / SETTINGS_FILE).exists():
        check_resumable(json.loads((partial / SETTINGS_FILE).read_text(encoding="utf-8")), cfg.to_dict(), partial)
    with writing("the run folder", partial, then="run the same command again"):
        partial.mkdir(parents=True, exist_ok=True)
        run_lock.acquire(partial)
    return partial


# What --resume may change: where and how fast it runs, what it logs and watches, the evaluation after training,
# and the split of the effective batch (after running out of memory). Anything else would continue one run's
# checkpoints and best development score under another's settings, or be ignored: the optimizer and scheduler
# come from the checkpoint, so a new --learning_rate would not even apply.
RESUMABLE = {"train.resume", "train.threads", "train.device", "train.logging_steps", "train.save_steps",
             "train.monitor_data", "train.gradient_checkpointing", "train.checkpoint_every", "model.trust_remote_code",
             "model.allow_pickle", "train.batch_size", "train.gradient_accumulation_steps"}


# A query-side run trains against the base's document embeddings computed with these evaluation settings (and taken
# from the evaluation corpus's where it holds the document): a resumed run must train (and compare its development
# scores) against the same vectors.
QUERY_SIDE_FIXED = ("eval_max_seq_length", "eval_bf16", "eval_batch_size", "eval_data", "no_cache")


def check_resumable(saved: dict, current: dict, partial: Path) -> None:
    """Refuse to resume a run under settings other than those it started with (its config.json)."""
    was, now = (t.get("batch_size", 0) * t.get("gradient_accumulation_steps", 0)
                for t in (saved.get("train", {}), current["train"]))
    if was != now:
        raise UsageError(f"option --batch_size: the run in {partial} was started with an effective batch of {was} "
                         f"(--batch_size x --gradient_accumulation_steps), not {now}; keep the product to resume")
    # the mode the run resolved (`--adapt auto` may have chosen the query side), as its config.json records it
    adapt = saved.get(RESOLVED, {}).get("adapt", current["train"].get("adapt"))
    fixed = {f"eval.{o}" for o in QUERY_SIDE_FIXED} if adapt in QUERY_SIDE_MODES else set()
    for group in ("data", "noise", "model", "train", "eval"):
        for option in sorted(set(saved.get(group, {})) | set(current[group])):
            was, now = saved.get(group, {}).get(option, "(not recorded)"), current[group].get(option)
            checked = f"{group}.{option}" in fixed if group == "eval" else f"{group}.{option}" not in RESUMABLE
            if checked and was != now:
                raise UsageError(f"option --{option}: the run in {partial} was started with {was!r}, not {now!r}; "
                                 f"resume with the same settings, or start again with --overwrite")


def save_settings(folder: Path, cfg: Config, resolved: dict) -> None:
    """config.json: the settings as requested (usable as a --config file) and, under `resolved`, the run's plan."""
    settings = {**cfg.to_dict(), RESOLVED: resolved}
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# A checkpoint holds the trainable weights about four times: the trainer's save of the model's trainable part, the
# kit's trainable-state file, and the optimizer's two moments (AdamW).
CHECKPOINT_COPIES = 4


def expected_bytes(model: SentenceTransformer, model_cfg: ModelConfig, queries_only: bool, export: bool) -> int:
    """About what a run writes at most: SAVE_TOTAL_LIMIT + 1 checkpoints (the next is written before the oldest
    goes), the adapter, the merged model (the base's weights; twice for a query-side run's two encoders) and an
    `export` (int8: about a quarter of the weights; a query-side run's also copies the base that encodes its
    documents)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    base = sum(f.stat().st_size for f in resolve_model(model_cfg.model_name_or_path).rglob("*.safetensors"))
    merged = base * (2 if queries_only else 1)
    exported = (base // 4 + (base if queries_only else 0)) if export else 0
    return (SAVE_TOTAL_LIMIT + 1) * CHECKPOINT_COPIES * trainable + trainable + merged + exported


def check_space(folder: Path, needed: int, fresh: bool) -> None:
    """Refuse before training when the disk cannot hold what the run will write; a `fresh` run's folder (nothing
    in it but its settings) is removed, so that the same command can simply run again."""
    free = free_bytes(folder)
    if free < needed:
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        raise KitError(f"not enough space for this run in {folder}: about {megabytes(needed)} needed (checkpoints, "
                       f"adapter, merged model, any export), {megabytes(free)} free; free some space or choose "
                       f"another --output_dir")


def finalize_run_folder(partial: Path, final: Path) -> None:
    run_lock.release(partial)
    shutil.rmtree(partial / CHECKPOINTS, ignore_errors=True)
    (partial / BEST_FILE).unlink(missing_ok=True)  # already folded into adapter/ and merged/
    if final.exists():  # only reachable with --overwrite
        trash = final.with_name(final.name + ".old")
        os.replace(final, trash)
        os.replace(partial, final)
        shutil.rmtree(trash)
    else:
        os.replace(partial, final)


def save_models(model: SentenceTransformer, model_cfg: ModelConfig, folder: Path, queries_only: bool = False,
                document_map: torch.nn.Linear | None = None) -> None:
    """adapter/ (LoRA runs) and merged/ (always). The merge goes into a freshly loaded full-precision base,
    never into the 4-bit one, which would re-quantize and lose precision. Both keep the base model's own
    maximum length: --max_seq_length is a training setting, and evaluation must compare like with like.
    `queries_only` (a query-side run): adapter/ is the query encoder's adapter alone, and merged/ routes queries
    to the adapted encoder and documents to an untouched copy of the base (`query_document_model`), followed by
    the `document_map` where one trained."""
    base = load_sentence_transformer(model_cfg, device="cpu", quantize=False)
    model.max_seq_length = base.max_seq_length
    if model_cfg.precision == "full":
        merged = model
    else:
        model.save(str(folder / "adapter"))
        base[0].auto_model = merge_adapter(base[0].auto_model, folder / "adapter")
        merged = base
    if queries_only:
        document = load_sentence_transformer(model_cfg, device="cpu", quantize=False)
        merged = query_document_model(merged, document, document_map)
    merged.save(str(folder / "merged"))


def query_document_model(query: SentenceTransformer, document: SentenceTransformer,
                         document_map: torch.nn.Linear | None = None) -> SentenceTransformer:
    """One model of two encoders (sentence-transformers' Router): `encode_query` runs `query`, `encode_document`
    (and plain `encode`) runs `document`, then `document_map` and a normalization where there is one, with the
    same prompts. It loads with `SentenceTransformer(path)`."""
    from sentence_transformers.base.modules import Dense, Normalize, Router

    documents = list(document.children())
    if document_map is not None:
        weight = document_map.weight.detach().float().cpu()
        documents += [Dense(weight.shape[1], weight.shape[0], bias=False, activation_function=None,
                            init_weight=weight), Normalize()]
    router = Router.for_query_document(query_modules=list(query.children()), document_modules=documents)
    return SentenceTransformer(modules=[router], prompts=dict(document.prompts), device="cpu",
                               default_prompt_name=document.default_prompt_name,
                               similarity_fn_name=document.similarity_fn_name)


def merge_adapter(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Fold the saved LoRA adapter into the weights of a full-precision `base`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
