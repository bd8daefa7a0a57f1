"""Queries/s of a query-side run's query encoder in steady state: merged/ (PyTorch fp32, and under bf16 autocast as
the kit's evaluation encodes) against its `--export openvino` (int8); then the export with batches padded to a
multiple of 8, 16 and 32 tokens (repeated shapes, which OpenVINO could reuse).

    python -m src.trainer --adapt queries --export openvino --output_dir runs/export-ru-q
    python -m scripts.benchmark_query_encoder runs/export-ru-q

Why a script beside the run's own evaluation: the evaluation encodes its 600 test queries once, a few batches, so
its queries/s include OpenVINO's first calls on new shapes. Here: --queries titles of the training file, batch 64,
after one warm-up batch, the best of --repeats passes. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from src.encoding import load_model

PAD_MULTIPLES = (8, 16, 32)


def queries_per_second(model, titles: list[str], bf16: bool, repeats: int) -> float:
    model.encode_query(titles[:64], batch_size=64)  # warm-up
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.encode_query(titles, batch_size=64)
        best = max(best, len(titles) / (time.perf_counter() - started))
    return best


def pad_to_multiple(encoder, multiple: int) -> None:
    """Make the OpenVINO encoder pad each batch to a multiple of `multiple` tokens (the attention mask keeps the
    embeddings those of the unpadded texts)."""
    def preprocess(inputs, prompt=None, **kwargs):
        texts = [prompt + t for t in inputs] if prompt else list(inputs)
        return dict(encoder.tokenizer(texts, padding=True, truncation=True, max_length=encoder.max_seq_length,
                                      pad_to_multiple_of=multiple, return_tensors="pt"))

    encoder.preprocess = preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run folder of --adapt queries --export openvino")
    parser.add_argument("--train_file", default="data/ru_catalog/train.jsonl", help="titles to encode ('title')")
    parser.add_argument("--queries", type=int, default=2400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.train_file, encoding="utf-8") as fh:
        titles = [json.loads(line)["title"] for _, line in zip(range(args.queries), fh)]
    merged, exported = load_model(str(Path(args.run) / "merged")), load_model(str(Path(args.run) / "openvino"))
    rows = [("torch fp32", merged, False), ("torch bf16 (the kit's evaluation)", merged, True),
            ("openvino int8 (--export openvino)", exported, False)]
    print("| query encoder | queries/s |\n|---|---|")
    for name, model, bf16 in rows:
        print(f"| {name} | {queries_per_second(model, titles, bf16, args.repeats):.1f} |")
    for multiple in PAD_MULTIPLES:
        pad_to_multiple(exported[0].sub_modules["query"][0], multiple)
        print(f"| openvino int8, padded to a multiple of {multiple} | "
              f"{queries_per_second(exported, titles, False, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
