"""--export openvino: an int8 OpenVINO model that loads with sentence-transformers, encodes as the PyTorch model
does within int8's error, and is scored by the run's evaluation beside it."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, RU_TRAIN, read_texts, run_config

from src.config import Config, DataConfig, EvalConfig, ModelConfig, OutputConfig, TrainConfig
from src.errors import UsageError


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_xlmr):
    from src.export import export_openvino

    folder = tmp_path_factory.mktemp("export") / "openvino"
    return export_openvino(tiny_xlmr, folder, read_texts(RU_TRAIN, 40))


def test_the_export_loads_in_sentence_transformers_and_encodes_like_the_pytorch_model(exported, tiny_xlmr):
    from sentence_transformers import SentenceTransformer

    from src.encoding import load_model

    assert {p.name for p in exported.iterdir()} >= {"openvino_model.xml", "openvino_model.bin", "modeling_openvino.py",
                                                    "modules.json", "1_Pooling", "tokenizer.json"}
    texts = read_texts(RU_TRAIN, 12)
    torch_model, int8 = load_model(str(tiny_xlmr)), SentenceTransformer(str(exported), trust_remote_code=True)
    assert int8.prompts["passage"] == int8.prompts["document"] == "passage: "  # e5's prompts, encode_document's too
    reference, quantized = (m.encode_document(texts, convert_to_numpy=True) for m in (torch_model, int8))
    assert quantized.shape == reference.shape and np.allclose(np.linalg.norm(quantized, axis=1), 1, atol=1e-5)
    cosines = (reference * quantized).sum(1)
    assert cosines.min() > 0.9 and cosines.mean() > 0.97  # int8 rounding, not another model
    assert not np.allclose(reference, quantized, atol=1e-6)  # ... and really quantized
    assert np.allclose(load_model(str(exported)).encode_document(texts), quantized, atol=1e-6)  # the kit's loader


def test_a_run_with_export_scores_the_export_beside_the_pytorch_model(tmp_path, tiny_xlmr):
    from src.trainer import train

    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in RU_TRAIN.read_text(encoding="utf-8").splitlines()[-40:]]
    pd.DataFrame({"query": [r["title"] for r in rows], "document": [r["description"] for r in rows]}).to_json(
        pairs, orient="records", lines=True, force_ascii=False)
    cfg = Config(data=DataConfig(train_file=str(RU_TRAIN), max_train_texts=64),
                 model=ModelConfig(model_name_or_path=str(tiny_xlmr), max_seq_length=32),
                 train=TrainConfig(max_steps=2, batch_size=8, select_best=False),
                 eval=EvalConfig(eval_data=str(pairs), bootstrap_samples=200),
                 output=OutputConfig(output_dir=str(tmp_path / "run"), export="openvino"))
    folder = train(cfg)
    assert (folder / "openvino" / "openvino_model.xml").is_file() and not (folder / "openvino.tmp").exists()
    metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
    export = metrics["exports"]["adapted-openvino"]
    assert set(export) == {"vs_adapted", "vs_base", "verdict_vs_base"} and len(export["vs_adapted"]["ci95"]) == 2
    assert metrics["models"]["adapted-openvino"]["documents_per_second"] > 0
    assert metrics["settings"]["models"]["adapted-openvino"] == str(folder / "openvino")
    assert "**adapted-openvino** (an export of adapted)" in (folder / "evaluation" / "report.md").read_text()
    run = json.loads((folder / "run.json").read_text())
    assert run["evaluation"]["exports"]["adapted-openvino"]["verdict_vs_base"] == export["verdict_vs_base"]


def test_an_export_that_cannot_work_is_a_one_line_error_before_any_work(monkeypatch, tmp_path):
    import importlib.util

    from src import export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "nncf" else real(name))
    with pytest.raises(UsageError, match=r"option --export openvino: needs the packages nncf \(pip install"):
        export.check_export("openvino")
    Config(output=OutputConfig(export="openvino"))  # a valid choice; anything else fails at parsing
    result = subprocess.run([sys.executable, "-m", "src.trainer", "--export", "onnx"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_a_query_side_export_keeps_the_base_documents_and_runs_the_queries_at_int8(tmp_path, tiny_xlmr):
    from sentence_transformers import SentenceTransformer

    from src.trainer import train

    cfg = run_config(tmp_path, tiny_xlmr, "run", objective="auto", adapt="queries", max_steps=2)
    cfg.data.max_train_texts = 80
    cfg.eval = EvalConfig(eval_data=str(ROOT / "data" / "ru_catalog" / "test"), max_eval_queries=30,
                          bootstrap_samples=100)
    cfg.output.export = "openvino"
    folder = train(cfg)
    texts = read_texts(RU_TRAIN, 8)
    merged = SentenceTransformer(str(folder / "merged"), device="cpu")
    exported = SentenceTransformer(str(folder / "openvino"), trust_remote_code=True)  # sentence-transformers alone
    assert json.loads((folder / "openvino" / "router_config.json").read_text())["types"]["query_0_Transformer"] == (
        "modeling_openvino.OpenVINOEncoder")
    np.testing.assert_allclose(exported.encode_document(texts), merged.encode_document(texts), atol=1e-6)  # the base
    reference, quantized = merged.encode_query(texts), exported.encode_query(texts)
    cosines = (reference * quantized).sum(1)
    assert cosines.min() > 0.9 and not np.allclose(reference, quantized, atol=1e-6)  # int8 queries
    metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
    export = metrics["models"]["adapted-openvino"]
    assert export["embeddings"]["documents"] == "those of base: no document re-encoded"
    assert export["queries_per_second"] > 0 and set(metrics["exports"]["adapted-openvino"]) == {
        "vs_adapted", "vs_base", "verdict_vs_base"}
