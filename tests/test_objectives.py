"""Objectives (tsdae, simcse, mnrl, tsdae+mnrl), model selection on development pairs, and the guard that
reports a worse model as worse."""

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, RU_TRAIN

from src.config import Config, DataConfig, EvalConfig, ModelConfig, OutputConfig, TrainConfig
from src.create_dataset import load_training_data
from src.errors import KitError, UsageError
from src.tables import read_table
from src.text import normalized_key


def test_pairs_come_from_training_items_and_development_items_never_train():
    data = load_training_data(DataConfig(train_file=str(RU_TRAIN), validation_fraction=0.1), seed=0,
                              need_pairs=True)
    rows = len(read_table(RU_TRAIN))
    assert 0.85 * rows < len(data.pairs) + len(data.dev_pairs) <= rows  # repeated (title, description) dropped
    assert len(data.dev_pairs) > 0.08 * rows
    train_texts = {normalized_key(t) for pair in data.pairs for t in pair}
    assert not any(normalized_key(q) in train_texts or normalized_key(d) in train_texts for q, d in data.dev_pairs)
    assert not set(data.texts) & set(data.dev_texts)
    texts = set(data.texts)  # the same items: "title. description" is the training text
    assert sum(f"{q}. {d}" in texts for q, d in data.pairs) > 0.95 * len(data.pairs)


def test_pair_objective_names_the_missing_column(tmp_path):
    path = tmp_path / "texts.jsonl"
    pd.DataFrame({"text": ["one two three four"] * 3}).to_json(path, orient="records", lines=True)
    with pytest.raises(KitError, match=f"{path}: missing column 'title'"):
        load_training_data(DataConfig(train_file=str(path)), seed=0, need_pairs=True)


def tiny_run(tmp_path, model, objective, **train):
    train = {"objective": objective, "batch_size": 8, "learning_rate": 1e-3, "max_steps": 6, "eval_steps": 3,
             "save_steps": 50, "dev_distractors": 50, "decoder_warmup_steps": 2, **train}
    return Config(data=DataConfig(train_file=str(RU_TRAIN), max_train_texts=160, validation_fraction=0.15),
                  model=ModelConfig(model_name_or_path=str(model), max_seq_length=48), train=TrainConfig(**train),
                  eval=EvalConfig(eval_data=""), output=OutputConfig(output_dir=str(tmp_path / objective)))


@pytest.mark.parametrize("objective", ["tsdae", "simcse", "mnrl", "tsdae+mnrl"])
def test_every_objective_trains_selects_and_saves(tmp_path, tiny_xlmr, objective):
    from src.trainer import train

    folder = train(tiny_run(tmp_path, tiny_xlmr, objective))
    run = json.loads((folder / "run.json").read_text())
    steps = [step for step, _ in run["dev_ndcg@10_by_step"]]
    assert steps == [0, 3, 6]  # the base model, then every eval_steps
    best_step, best_score = max(run["dev_ndcg@10_by_step"], key=lambda x: (x[1], -x[0]))
    assert run["selected"] == {"step": best_step, "dev_ndcg@10": best_score}
    assert (folder / "merged" / "model.safetensors").is_file() and (folder / "adapter").is_dir()
    assert not (folder / "best_state.safetensors").exists()


# ---- the guard, on the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_test_pairs(tmp_path_factory):
    """60 held-out Russian test pairs (title -> description) as a pairs file: a quick evaluation set."""
    folder = ROOT / "data" / "ru_catalog" / "test"
    queries = read_table(folder / "queries.jsonl").set_index("_id")["text"]
    corpus = read_table(folder / "corpus.jsonl").set_index("_id")["text"]
    qrels = pd.read_csv(folder / "qrels" / "test.tsv", sep="\t").head(60)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    pd.DataFrame({"query": queries[qrels["query-id"]].values, "document": corpus[qrels["corpus-id"]].values}
                 ).to_json(path, orient="records", lines=True, force_ascii=False)
    return path


def hurtful_run(tmp_path, e5_cache, pairs, select_best):
    cfg = tiny_run(tmp_path, e5_cache, "tsdae", learning_rate=2e-2, max_steps=8, eval_steps=8,
                   decoder_warmup_steps=0, select_best=select_best)
    cfg.eval = EvalConfig(eval_data=str(pairs), bootstrap_samples=200)
    return cfg


def test_guard_reports_a_run_built_to_hurt_as_worse_after_freeing_the_training_state(tmp_path, e5_cache,
                                                                                     small_test_pairs, caplog,
                                                                                     monkeypatch):
    import gc

    import src.trainer as trainer_module

    alive, evaluate_run = [], trainer_module.evaluate_run

    def counting_evaluate_run(*args, **kwargs):  # trainers alive when the evaluation starts
        alive.append(sum(isinstance(o, trainer_module.KitTrainer) for o in gc.get_objects()))
        return evaluate_run(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_run", counting_evaluate_run)
    with caplog.at_level(logging.WARNING):
        folder = trainer_module.train(hurtful_run(tmp_path, e5_cache, small_test_pairs, select_best=False))
    assert alive == [0]  # the training model, optimizer and batches are gone: the evaluation's memory is its own
    evaluation = json.loads((folder / "run.json").read_text())["evaluation"]
    assert evaluation["verdict"] == "worse"
    assert evaluation["adapted"]["ndcg@10"] < evaluation["base"]["ndcg@10"] - 0.05
    report = (folder / "evaluation" / "report.md").read_text()
    assert "adapted is worse than base" in report and "WARNING: the adapted model is not better" in report
    assert "the adapted model is NOT better than the base" in caplog.text


def test_model_selection_keeps_the_base_when_training_only_hurts(tmp_path, e5_cache, small_test_pairs, caplog):
    from sentence_transformers import SentenceTransformer

    from src.trainer import train

    with caplog.at_level(logging.WARNING):
        folder = train(hurtful_run(tmp_path, e5_cache, small_test_pairs, select_best=True))
    run = json.loads((folder / "run.json").read_text())
    assert run["selected"]["step"] == 0
    assert "saved model is the base model unchanged" in caplog.text
    texts = read_table(small_test_pairs)["document"].tolist()[:8]
    merged = SentenceTransformer(str(folder / "merged"), device="cpu")
    assert merged.max_seq_length == 512  # trained at 48 tokens, saved with the base model's own limit
    merged = merged.encode(texts, prompt_name="passage")
    base = SentenceTransformer(str(e5_cache), device="cpu").encode(texts, prompt_name="passage")
    assert np.allclose(merged, base, atol=1e-4)
    assert run["evaluation"]["verdict"] == "not distinguishable"


def test_every_registered_objective_is_named_in_the_help_and_unknown_ones_are_refused():
    from src.objectives import OBJECTIVES
    from src.plan import plan_run

    help_text = TrainConfig.__dataclass_fields__["objective"].metadata["help"]
    assert [name for name in OBJECTIVES if name not in help_text] == []
    for objective in ("nope", "lead+lead", "lead+"):
        with pytest.raises(UsageError, match=f"option --objective {re.escape(objective)}: must be auto or distinct"):
            plan_run(Config(train=TrainConfig(objective=objective)), ["_id", "text"])


TOY_OBJECTIVE = """
from src.create_dataset import pairs_dataset
from src.objectives import register
from src.objectives.base import BuildInputs, Objective, ObjectiveSpec, contrastive_loss, query_passage_prompts


def build(inputs: BuildInputs) -> Objective:
    pairs = [(text.split(".")[0], text) for text in inputs.data.texts]  # a text's first sentence -> the text
    return Objective(pairs_dataset(pairs), None, contrastive_loss(inputs), query_passage_prompts(inputs.prompts))


SPEC = register(ObjectiveSpec("toy", "a text's first sentence -> the text", build, learning_rate=3e-4, scale=30.0))
"""


def test_a_new_objective_is_one_file_the_plan_and_trainer_take_as_it_declares(tmp_path, tiny_xlmr):
    import importlib.util

    from src.objectives import OBJECTIVES
    from src.trainer import train

    path = tmp_path / "toy.py"
    path.write_text(TOY_OBJECTIVE)
    spec = importlib.util.spec_from_file_location("toy_objective", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    try:
        cfg = tiny_run(tmp_path, tiny_xlmr, "toy", learning_rate=0.0, max_steps=1, select_best=False)
        folder = train(cfg)
    finally:
        del OBJECTIVES["toy"]
    run = json.loads((folder / "run.json").read_text())
    assert run["objective"] == "toy" and run["steps"] == 1
    assert run["plan"]["learning_rate"] == 3e-4 and run["plan"]["mnrl_scale"] == 30.0  # its own defaults
    assert (folder / "merged" / "model.safetensors").is_file()
