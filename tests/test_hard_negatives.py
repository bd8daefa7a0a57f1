"""The levers for pairs: mined hard negatives (never the item's own document or a near-duplicate of it) and the
cached loss (the plain loss, computed a mini-batch at a time)."""

import json

import numpy as np
import pytest
import torch
from conftest import RU_TRAIN, read_texts
from test_objectives import tiny_run

from src.config import Config, ModelConfig, TrainConfig
from src.errors import UsageError
from src.hard_negatives import choose, with_hard_negatives
from src.text import near_duplicate

BOILERPLATE = "This package contains the documentation files in HTML format for the library described above"
PAIRS = [(f"tool number {i}", f"Tool {i} handles task {i} on files of kind {i % 5} quickly and safely.")
         for i in range(24)]
# near-duplicate items: a -doc package per library, differing in the name only, shared boilerplate
PAIRS += [(f"docs for lib{i}", f"lib{i}: {BOILERPLATE}.") for i in range(8)]


def test_near_duplicates_are_never_chosen_and_short_rows_are_completed_with_random_documents():
    positive = f"lib1: {BOILERPLATE}."
    candidates = [positive, f"lib2: {BOILERPLATE}.", "Tool 3 handles task 3.", f"LIB1:  {BOILERPLATE}"]
    documents = sorted({d for _, d in PAIRS})
    kept = choose(candidates, positive, 3, documents, np.random.default_rng(0))
    assert kept[0] == "Tool 3 handles task 3." and len(kept) == 3 == len(set(kept))
    assert not any(near_duplicate(k, positive) for k in kept)


def test_mined_negatives_are_never_the_items_own_document_nor_a_near_duplicate(tiny_xlmr):
    from src.model_builder import build_model

    model = build_model(ModelConfig(model_name_or_path=str(tiny_xlmr), precision="none"))
    train = TrainConfig(hard_negatives=3, negative_margin=0.0)
    dataset = with_hard_negatives(model, PAIRS, train, model.prompts)
    assert dataset.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert len(dataset) == len(PAIRS)  # every pair keeps its place
    documents = {d for _, d in PAIRS}
    for row in dataset:
        negatives = [row[f"negative_{i}"] for i in (1, 2, 3)]
        assert row["positive"] not in negatives and len(set(negatives)) == 3 and set(negatives) <= documents
        assert not any(near_duplicate(n, row["positive"]) for n in negatives)


def test_the_cached_loss_equals_the_plain_loss_and_its_gradients(tiny_xlmr):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from src.model_builder import build_model

    model = build_model(ModelConfig(model_name_or_path=str(tiny_xlmr), precision="none", max_seq_length=32),
                        checkpoint_every=0)
    model.eval()  # no dropout: both losses see the same forward passes
    features = [model.tokenize([q for q, _ in PAIRS[:12]]), model.tokenize([d for _, d in PAIRS[:12]])]
    results = []
    for loss in (MultipleNegativesRankingLoss(model), CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)):
        model.zero_grad()
        value = loss([dict(f) for f in features], None)
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((value.item(), grads))
    (plain, plain_grads), (cached, cached_grads) = results
    assert plain == pytest.approx(cached, rel=1e-5) and plain > 0
    assert plain_grads.keys() == cached_grads.keys() and plain_grads
    assert all(torch.allclose(plain_grads[n], cached_grads[n], atol=1e-6, rtol=1e-4) for n in plain_grads)


def test_mnrl_trains_with_mined_negatives_and_the_cached_loss(tmp_path, tiny_xlmr, caplog):
    from src.trainer import train

    caplog.set_level("INFO")
    cfg = tiny_run(tmp_path, tiny_xlmr, "mnrl", hard_negatives=2, mini_batch_size=4, max_steps=3)
    folder = train(cfg)
    run = json.loads((folder / "run.json").read_text())
    assert run["steps"] == 3 and "hard negatives: 2 per pair" in caplog.text
    assert (folder / "merged" / "model.safetensors").is_file()


def test_lever_options_that_cannot_apply_are_one_line_errors():
    from src.plan import plan_run

    with pytest.raises(UsageError, match="option --hard_negatives: acts on mnrl, .*--objective tsdae does not"):
        plan_run(Config(train=TrainConfig(objective="tsdae", hard_negatives=3)), ["_id", "text"])
    with pytest.raises(UsageError, match="option --round_trip_top_k: acts on crop, .*--objective mnrl does not"):
        plan_run(Config(train=TrainConfig(round_trip_top_k=3)), ["title", "description"])
    with pytest.raises(UsageError, match="option --round_trip_top_k: needs a fixed number of steps"):
        plan_run(Config(train=TrainConfig(objective="lead", round_trip_top_k=3)), ["_id", "text"])
    plan_run(Config(train=TrainConfig(objective="lead", round_trip_top_k=3, max_steps=5)), ["_id", "text"])
    with pytest.raises(UsageError, match="option --mini_batch_size: acts on mnrl, .*--objective tsdae does not"):
        plan_run(Config(train=TrainConfig(objective="tsdae", mini_batch_size=8)), ["_id", "text"])
    plan_run(Config(train=TrainConfig(objective="tsdae+lead", mini_batch_size=8)), ["_id", "text"])  # lead has it
    with pytest.raises(UsageError, match="option --mini_batch_size: cannot be combined with --anchor_weight"):
        TrainConfig(mini_batch_size=8, anchor_weight=1.0)


def test_pairs_from_documents_train_with_mined_negatives_from_other_documents(tiny_xlmr):
    from src.config import NoiseConfig
    from src.create_dataset import TrainingData
    from src.model_builder import build_model
    from src.objectives import BuildInputs, build_objective

    texts = read_texts(RU_TRAIN, 60)
    model = build_model(ModelConfig(model_name_or_path=str(tiny_xlmr), precision="none"))
    built = build_objective("lead", BuildInputs(TrainConfig(hard_negatives=2), NoiseConfig(), 20.0, 0, model,
                                                TrainingData(texts, [])))
    rows = built.train_dataset
    assert rows.column_names == ["anchor", "positive", "negative_1", "negative_2"] and len(rows) == len(texts)
    positives = set(rows["positive"])
    for row in rows:
        assert row["positive"] not in (row["negative_1"], row["negative_2"])
        assert {row["negative_1"], row["negative_2"]} <= positives  # other documents' (lead-stripped) bodies
    assert built.prompts["negative_2"] == built.prompts["positive"] == "passage: "
    assert built.prompts["anchor"] == "query: "


def test_mined_document_pairs_with_fixed_steps_are_drawn_for_the_documents_those_steps_train(tiny_xlmr):
    from src.config import NoiseConfig
    from src.create_dataset import TrainingData
    from src.model_builder import build_model
    from src.objectives import BuildInputs, build_objective
    from src.objectives.base import within_budget

    texts = read_texts(RU_TRAIN, 60)
    model = build_model(ModelConfig(model_name_or_path=str(tiny_xlmr), precision="none"))
    inputs = BuildInputs(TrainConfig(hard_negatives=1, batch_size=8), NoiseConfig(), 20.0, 2, model,
                         TrainingData(texts, []))  # the plan's 2 steps
    rows = build_objective("lead", inputs).train_dataset
    assert len(rows) == 16 and len(set(rows["positive"])) == 16  # 2 steps of 8, mined among those 16 only
    assert set(rows["negative_1"]) <= set(rows["positive"])
    chosen = within_budget(range(60), inputs)
    assert chosen == sorted(chosen) and len(set(chosen)) == 16 and chosen == within_budget(range(60), inputs)
    assert within_budget(range(10), inputs) == list(range(10))  # a smaller file: every document
    by_epochs = BuildInputs(TrainConfig(hard_negatives=1), NoiseConfig(), 20.0, 0, model, TrainingData(texts, []))
    assert within_budget(range(60), by_epochs) == list(range(60))  # epochs: every document
