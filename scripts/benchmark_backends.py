"""CPU inference backends for an e5 encoder: documents/s and retrieval quality against PyTorch fp32 (issue 35).

    pip install -r requirements-backends.txt -c requirements.txt      # OpenVINO, NNCF, ONNX Runtime (not in CI)
    python -m scripts.benchmark_backends                              # both catalogs, two development collections
    python -m scripts.benchmark_backends --collections data/ru_catalog/test --backends torch-fp32,openvino-int8

Why by hand: sentence-transformers' own exports (`export_dynamic_quantized_onnx_model`,
`export_static_quantized_openvino_model`, `SentenceTransformer(path, backend=...)`) go through optimum-onnx
(which requires transformers < 4.58) and optimum-intel (transformers < 5.6, plus torchvision); the kit pins
transformers 5.23, so neither imports. This script converts the same transformer with the backends' own
converters instead: `openvino.convert_model` on the PyTorch module, NNCF's static int8 quantization calibrated on
the collection's own training texts (`--calibration` of them, e5's `passage: ` prompt; src/export.py, as
`--export openvino` does), `torch.onnx.export` and
ONNX Runtime's dynamic int8 quantization. Pooling (mean over tokens) and normalization are done here as the
model's own modules do them.

Per collection (BEIR folder; its training file is the `train.jsonl` beside `test/`), per backend: the corpus
and the queries encoded (e5 prompts, the model's own 512 tokens, `--batch_size` texts per batch sorted by
length), an exact FAISS search, the kit's metrics. Columns:
    documents/s    corpus texts encoded per second, best of --repeats (one process, --threads threads)
    nDCG@10        x100, on the collection's held-out queries
    vs torch fp32  paired difference of nDCG@10 against PyTorch fp32 with its 95% bootstrap interval
    min cos        the smallest cosine between a document's embedding and PyTorch fp32's
    MB             size on disk of the exported model (PyTorch: the safetensors)
Writes <work>/results.json and results.md, and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np

from src.encoding import load_model
from src.evaluation import search
from src.export import hidden_states, quantized_model, token_features
from src.metrics import MAIN_METRIC, compare, format_difference, score_rankings
from src.retrieval_data import load_retrieval_data

COLLECTIONS = ("data/ru_catalog/test", "data/en_catalog/test", "data/dev/ru_gimp_help/test",
               "data/dev/en_python_doc/test")
BACKENDS = ("torch-fp32", "torch-bf16", "openvino-fp32", "openvino-bf16", "openvino-int8", "onnx-fp32", "onnx-int8")


def training_texts(collection: Path, count: int) -> list[str]:
    """The first `count` documents of the collection's training file (`description` or `text` column)."""
    texts = []
    with open(collection.parent / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row.get("description") or row["text"])
            if len(texts) == count:
                break
    return texts


class TokenEncoder:
    """Tokenize length-sorted batches, run a backend's `forward(input_ids, attention_mask) -> hidden states`, mean
    pool over the real tokens and normalize, as the model's Pooling and Normalize modules do."""

    def __init__(self, model, forward, batch_size: int):
        self.model, self.forward, self.batch_size = model, forward, batch_size

    def features(self, texts: list[str]) -> dict:
        return token_features(self.model, texts)

    def encode(self, texts: list[str]) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = None
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            feats = self.features([texts[i] for i in rows])
            hidden = np.asarray(self.forward(feats), dtype=np.float32)
            mask = feats["attention_mask"][..., None].astype(np.float32)
            vectors = (hidden * mask).sum(1) / mask.sum(1)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            out = np.zeros((len(texts), vectors.shape[1]), np.float32) if out is None else out
            out[rows] = vectors
        return out


def openvino_model(model, work: Path, precision: str, calibration: list[str]):
    """Convert (int8: quantize as `--export openvino` does, src/export.py), save, compile."""
    import openvino as ov
    import torch

    if precision == "int8":
        converted = quantized_model(model, calibration, "passage")
    else:
        example = TokenEncoder(model, None, 1).features(["passage: a", "passage: a longer text"])
        converted = ov.convert_model(hidden_states(model),
                                     example_input={k: torch.from_numpy(v) for k, v in example.items()})
    path = work / f"openvino-{precision}" / "openvino_model.xml"
    ov.save_model(converted, path, compress_to_fp16=False)
    # fp32: computed in fp32; bf16 and int8: OpenVINO's default on CPUs with native bf16 (AMX/AVX512-BF16)
    hint = {"fp32": "f32"}.get(precision, "bf16")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return (lambda feats: compiled(feats)[0]), path.with_suffix(".bin")


def onnx_model(model, work: Path, precision: str, threads: int):
    """Export with torch.onnx (dynamic batch and length), quantize int8 dynamically, open an ONNX Runtime session."""
    import onnxruntime as ort
    import torch

    path = work / "onnx" / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        example = TokenEncoder(model, None, 2).features(["passage: a", "passage: a longer text"])
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
        torch.onnx.export(hidden_states(model), tuple(torch.from_numpy(v) for v in example.values()), path,
                          input_names=list(example), output_names=["last_hidden_state"],
                          dynamic_shapes={name: dims for name in example}, dynamo=True)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = path.with_name("model_qint8.onnx")
        quantize_dynamic(path, quantized, weight_type=QuantType.QInt8)
        path = quantized
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return (lambda feats: session.run(None, feats)[0]), path


def torch_encoder(model, bf16: bool, batch_size: int):
    import torch

    def encode(texts: list[str]) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)

    return encode


def build_encoder(backend: str, model, args, work: Path, calibration: list[str]):
    """(encode(texts) -> normalized embeddings, file holding the weights) for one backend."""
    kind, precision = backend.split("-")
    if kind == "torch":
        return torch_encoder(model, precision == "bf16", args.batch_size), Path(args.weights)
    if kind == "openvino":
        forward, path = openvino_model(model, work, precision, calibration)
    else:
        forward, path = onnx_model(model, work, precision, args.threads)
    return TokenEncoder(model, forward, args.batch_size).encode, path


def measure(encode, data, repeats: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Corpus and query embeddings (e5 prompts) and the corpus's documents/s, best of `repeats`."""
    doc_ids, query_ids = list(data.corpus), sorted(data.qrels)
    documents = ["passage: " + data.corpus[d] for d in doc_ids]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        doc_emb = encode(documents)
        best = min(best, time.perf_counter() - started)
    query_emb = encode(["query: " + data.queries[q] for q in query_ids])
    return doc_emb, query_emb, len(documents) / best


def score(data, doc_emb: np.ndarray, query_emb: np.ndarray) -> dict[str, np.ndarray]:
    doc_ids, query_ids = list(data.corpus), sorted(data.qrels)
    top = search(doc_emb, query_emb, "flat")
    return score_rankings({q: [doc_ids[i] for i in row if i >= 0] for q, row in zip(query_ids, top)}, data.qrels)


def benchmark_collection(collection: Path, model, args, work: Path) -> list[dict]:
    data = load_retrieval_data(str(collection))
    calibration = training_texts(collection, args.calibration)  # the prompt is added as --export adds it
    rows, reference = [], None
    for backend in args.backends:
        encode, weights = build_encoder(backend, model, args, work / collection.parent.name, calibration)
        doc_emb, query_emb, rate = measure(encode, data, args.repeats)
        per_query = score(data, doc_emb, query_emb)
        if reference is None:  # the first backend (torch-fp32 by default) is what the others are compared with
            reference = (backend, doc_emb, per_query)
        diff = compare(per_query, reference[2], args.bootstrap)[MAIN_METRIC]
        rows.append({"collection": str(collection), "backend": backend, "documents_per_second": round(rate, 1),
                     MAIN_METRIC: round(100 * float(per_query[MAIN_METRIC].mean()), 2),
                     "vs": reference[0], "difference": diff,
                     "min_cosine": round(float((doc_emb * reference[1]).sum(1).min()), 5),
                     "mb": round(file_megabytes(weights), 1)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "difference"}), flush=True)
    return rows


def file_megabytes(path: Path) -> float:
    """A model file's size with its external weights (torch.onnx writes them beside it, as `<name>.data`)."""
    external = path.with_name(path.name + ".data")
    return (path.stat().st_size + (external.stat().st_size if external.exists() else 0)) / 1e6


def table(rows: list[dict]) -> str:
    lines = ["| collection | backend | documents/s | nDCG@10 | vs torch fp32 [95% CI] | min cos | MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['collection']).parent.name} | {r['backend']} | {r['documents_per_second']} | "
                     f"{r[MAIN_METRIC]:.2f} | {format_difference(r['difference'])} | {r['min_cosine']} | {r['mb']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="intfloat/multilingual-e5-small")
    parser.add_argument("--collections", nargs="+", default=list(COLLECTIONS))
    parser.add_argument("--backends", type=lambda s: s.split(","), default=list(BACKENDS))
    parser.add_argument("--calibration", type=int, default=300, help="training texts NNCF calibrates int8 on")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--work", default="runs/benchmark_backends")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    args.weights = str(next(Path(model[0].auto_model.config._name_or_path).glob("*.safetensors")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [row for c in args.collections for row in benchmark_collection(Path(c), model, args, work)]
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (work / "results.md").write_text(table(rows), encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    main()
