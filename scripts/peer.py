"""The peer: what a user of plain sentence-transformers does instead of the kit, full fine-tuning of the same base
model on (anchor, positive) pairs as its documentation trains an e5 model. scripts.benchmark_peer trains it on the
catalogs' title -> description pairs, scripts.benchmark_documents on the kit's own pairs from documents.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

BASE_MODEL = "intfloat/multilingual-e5-small"
PEER_SCALES = {"peer": 20.0, "peer50": 50.0}  # MNRL's similarity scale: sentence-transformers' default, the kit's
PEER = {"learning_rate": 5e-5, "epochs": 1, "batch_size": 32, "max_seq_length": 128, "warmup_ratio": 0.1,
        "seed": 42}


def peer_command(length: int = PEER["max_seq_length"], scale: float = PEER_SCALES["peer"]) -> str:
    """The peer's training in words, as its rows record it (at `length` tokens per text, MNRL at `scale`)."""
    return (f"sentence-transformers full fine-tuning: MNRL (scale {scale:g}), lr 5e-5, 1 epoch, batch 32, length "
            f"{length}, NO_DUPLICATES, warmup_ratio 0.1, seed 42")


def peak_memory_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux reports KiB


def train_file(catalog: str) -> Path:
    return Path("data") / f"{catalog}_catalog" / "train.jsonl"


def test_folder(catalog: str) -> Path:
    return Path("data") / f"{catalog}_catalog" / "test"


def catalog_rows(path: Path) -> list[dict]:
    """A catalog's training rows (title, description, ...), as written."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def peer_dataset(path: Path):
    from datasets import Dataset

    rows = catalog_rows(path)
    return Dataset.from_dict({"anchor": [r["title"] for r in rows], "positive": [r["description"] for r in rows]})


def train_peer(dataset, folder: Path, threads: int, max_seq_length: int = PEER["max_seq_length"],
               scale: float = PEER_SCALES["peer"]) -> dict:
    """Plain sentence-transformers full fine-tuning on (anchor, positive) pairs, as its documentation trains an e5
    model; saved to `folder`/model."""
    import torch
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import set_seed

    from src.encoding import load_model

    started = time.time()
    if threads:
        torch.set_num_threads(threads)
    set_seed(PEER["seed"])
    model = load_model(BASE_MODEL)
    own_length, model.max_seq_length = model.max_seq_length, max_seq_length
    # warmup_steps=0.1 is warmup_ratio=0.1 (its spelling since transformers v5, which deprecates warmup_ratio)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "checkpoints"), num_train_epochs=PEER["epochs"], seed=PEER["seed"],
        per_device_train_batch_size=PEER["batch_size"], learning_rate=PEER["learning_rate"],
        warmup_steps=PEER["warmup_ratio"], batch_sampler=BatchSamplers.NO_DUPLICATES, use_cpu=True,
        prompts={"anchor": model.prompts["query"], "positive": model.prompts["passage"]},
        save_strategy="no", logging_steps=10, report_to="none")
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model, scale=scale))
    result = trainer.train()
    model.max_seq_length = own_length  # trained shorter, saved with the base's own length, as the kit saves
    model.save(str(folder / "model"))
    return {"train_seconds": round(result.metrics["train_runtime"], 1), "steps": trainer.state.global_step,
            "final_train_loss": result.metrics.get("train_loss"), "peak_memory_gb": peak_memory_gb(),
            "total_seconds": round(time.time() - started, 1)}
