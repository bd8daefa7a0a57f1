"""--adapt queries: the loss over stored document embeddings, the saved query/document model, its evaluation
(no document re-encoded), resume and model selection in this mode, and the combinations it refuses."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, RU_TRAIN, read_texts, run_config
from sentence_transformers import SentenceTransformer
from transformers import TrainerCallback

from src import trainer as trainer_module
from src.config import Config, EvalConfig, TrainConfig
from src.errors import UsageError
from src.plan import plan_run
from src.query_side import StoredEmbeddingsLoss

GIMP_TRAIN = ROOT / "data" / "dev" / "ru_gimp_help" / "train.jsonl"


def test_loss_over_stored_embeddings_is_the_softmax_over_the_whole_bank(tiny_xlmr):
    model = SentenceTransformer(str(tiny_xlmr), device="cpu")
    queries = read_texts(RU_TRAIN, 3)
    bank = torch.nn.functional.normalize(torch.randn(7, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.tensor([4, 0, 6])
    loss = StoredEmbeddingsLoss(model, bank, scale=100.0)([model.tokenize(queries)], labels)

    q = model.encode(queries, normalize_embeddings=True)  # the reference, in numpy
    logits = 100.0 * q @ bank.numpy().T
    peak = logits.max(1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(1)) + peak[:, 0]
    expected = float(np.mean(log_z - logits[np.arange(3), labels.numpy()]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def query_side_config(tmp_path, model, name, eval_data="", **train):
    """Pairs of 120 Russian catalog items, four steps, model selection at 0, 2 and 4, the query side only."""
    train = {"objective": "auto", "adapt": "queries", "max_steps": 4, "save_steps": 2, "eval_steps": 2,
             "select_best": True, "dev_distractors": 20, **train}
    cfg = run_config(tmp_path, model, name, **train)
    cfg.data.max_train_texts = 120
    cfg.eval = EvalConfig(eval_data=eval_data, max_eval_queries=40, bootstrap_samples=100)
    return cfg


@pytest.fixture(scope="module")
def query_run(tmp_path_factory, tiny_xlmr):
    test = str(ROOT / "data" / "ru_catalog" / "test")
    return trainer_module.train(query_side_config(tmp_path_factory.mktemp("queries"), tiny_xlmr, "run", test))


def test_saved_model_encodes_documents_exactly_as_the_base_and_queries_adapted(query_run, tiny_xlmr):
    texts = read_texts(RU_TRAIN, 5)
    base = SentenceTransformer(str(tiny_xlmr), device="cpu")
    merged = SentenceTransformer(str(query_run / "merged"), device="cpu")  # sentence-transformers alone, no kit
    assert (query_run / "merged" / "router_config.json").is_file()
    np.testing.assert_allclose(merged.encode_document(texts), base.encode(texts, prompt="passage: "), atol=1e-6)
    np.testing.assert_allclose(merged.encode(texts), base.encode(texts), atol=1e-6)  # plain encode: document side
    queries = merged.encode_query(texts)
    assert np.abs(queries - base.encode(texts, prompt="query: ")).max() > 1e-4  # the query side did train
    adapter = SentenceTransformer(str(query_run / "adapter"), device="cpu")  # the query encoder's adapter alone
    np.testing.assert_allclose(adapter.encode_query(texts), queries, atol=1e-5)


def test_evaluation_encodes_the_corpus_with_the_base_only(query_run):
    run = json.loads((query_run / "run.json").read_text())
    assert run["plan"]["adapt"] == "queries" and run["evaluation"]["documents_reencoded"] is False
    models = json.loads((query_run / "evaluation" / "metrics.json").read_text())["models"]
    assert models["adapted"]["embeddings"]["documents"] == "those of base: no document re-encoded"
    assert models["base"]["embeddings"]["documents"] in ("computed", "cache")
    assert "no document re-encoded" in (query_run / "evaluation" / "report.md").read_text()


def test_model_selection_scores_the_query_side_against_stored_documents(query_run):
    run = json.loads((query_run / "run.json").read_text())
    assert [step for step, _ in run["dev_ndcg@10_by_step"]] == [0, 2, 4]
    assert run["plan"]["mnrl_scale"] == 100.0 and run["plan"]["epochs"] == 3.0


def test_crash_then_resume_reaches_the_same_query_adapter(tmp_path, tiny_xlmr, query_run, monkeypatch):
    from test_faults import assert_same_adapter, with_callback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt  # dies right after writing checkpoint-2

    test = str(ROOT / "data" / "ru_catalog" / "test")  # as query_run's: its documents' stored vectors come from it
    with monkeypatch.context() as m:
        with_callback(m, Crash())
        with pytest.raises(KeyboardInterrupt):
            trainer_module.train(query_side_config(tmp_path, tiny_xlmr, "broken", test))
    resumed = trainer_module.train(query_side_config(tmp_path, tiny_xlmr, "broken", test, resume=True))
    assert_same_adapter(query_run, resumed)


def test_documents_alone_train_their_pseudo_queries_against_the_stored_documents(tmp_path, tiny_xlmr):
    cfg = run_config(tmp_path, tiny_xlmr, "lead", objective="lead", adapt="queries", max_steps=3)
    cfg.data.train_file, cfg.data.max_train_texts = str(GIMP_TRAIN), 60
    folder = trainer_module.train(cfg)
    texts = read_texts(GIMP_TRAIN, 3)
    merged = SentenceTransformer(str(folder / "merged"), device="cpu")
    base = SentenceTransformer(str(tiny_xlmr), device="cpu")
    np.testing.assert_allclose(merged.encode_document(texts), base.encode(texts, prompt="passage: "), atol=1e-6)
    assert json.loads((folder / "run.json").read_text())["steps"] == 3


@pytest.mark.parametrize("train, message", [
    ({"objective": "tsdae"}, "--adapt queries: needs one objective with a query side"),
    ({"objective": "tsdae+lead"}, "--adapt queries: needs one objective with a query side"),
    ({"objective": "mnrl", "hard_negatives": 3}, "--hard_negatives: cannot be combined with --adapt queries"),
    ({"objective": "lead", "anchor_weight": 0.1}, "--anchor_weight: cannot be combined with --adapt queries"),
])
def test_combinations_without_a_query_side_are_one_line_errors(train, message):
    with pytest.raises(UsageError, match=message):
        plan_run(Config(train=TrainConfig(adapt="queries", **train)), ["title", "description", "text"])


def test_query_side_development_queries_search_the_whole_held_out_documents():
    from src.create_dataset import TrainingData
    from src.selection import development_pairs

    texts = [f"Heading {i}\nBody sentence number {i} about topic {i % 7}. Another sentence {i}." for i in range(30)]
    data = TrainingData(texts=texts[:20], dev_texts=texts[20:])
    pairs, pool = development_pairs(data, "crop", TrainConfig(seed=0), whole=True)
    assert [d for _, d in pairs] == texts[20:] and pool == texts[:20]  # as the index stores them: whole


def test_a_resumed_query_side_run_keeps_the_settings_its_stored_embeddings_were_computed_with(tmp_path):
    from src.run_folder import check_resumable

    started = Config(train=TrainConfig(adapt="queries")).to_dict()
    longer = Config(train=TrainConfig(adapt="queries", resume=True), eval=EvalConfig(eval_max_seq_length=256))
    with pytest.raises(UsageError, match="--eval_max_seq_length: the run in .* was started with 0, not 256"):
        check_resumable(started, longer.to_dict(), tmp_path)
    both = Config(train=TrainConfig(resume=True), eval=EvalConfig(eval_max_seq_length=256))
    check_resumable(Config().to_dict(), both.to_dict(), tmp_path)  # the evaluation after training may change
    chosen = {**Config().to_dict(), "resolved": {"adapt": "queries"}}  # --adapt auto chose the query side
    other_data = Config(train=TrainConfig(resume=True), eval=EvalConfig(eval_data="other.jsonl"))
    with pytest.raises(UsageError, match="--eval_data: the run in .* was started with '.*test', not 'other.jsonl'"):
        check_resumable(chosen, other_data.to_dict(), tmp_path)


def test_a_document_map_rewrites_the_stored_vectors_as_the_saved_model_encodes_documents(tmp_path, tiny_xlmr):
    from src.encoding import rewrite_stored

    cfg = run_config(tmp_path, tiny_xlmr, "map", objective="auto", adapt="queries+map", max_steps=3,
                     learning_rate=1e-2)
    cfg.data.max_train_texts = 80
    folder = trainer_module.train(cfg)
    texts = read_texts(RU_TRAIN, 6)
    merged = SentenceTransformer(str(folder / "merged"), device="cpu")
    stored = SentenceTransformer(str(tiny_xlmr), device="cpu").encode(texts, prompt="passage: ")
    assert np.abs(merged.encode_document(texts) - stored).max() > 1e-4  # the map trained: documents moved
    np.testing.assert_allclose(rewrite_stored(merged, stored), merged.encode_document(texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rewrite_stored(merged, stored), axis=1), 1.0, atol=1e-5)


def test_the_query_side_on_documents_alone_is_a_warned_last_resort(caplog):
    plan_run(Config(train=TrainConfig(adapt="queries")), ["_id", "text"])
    assert "--adapt queries on documents alone" in caplog.text and "judge it with --eval_data" in caplog.text
    caplog.clear()
    plan_run(Config(train=TrainConfig(adapt="queries")), ["title", "description"])
    assert "documents alone" not in caplog.text


@pytest.mark.parametrize("columns, rows, train, expected", [
    (["_id", "text"], 5000, {}, "queries"),  # the documents default on a large file: the index stays valid
    (["_id", "text"], 4999, {}, "both"),
    (["_id", "text"], 9000, {"hard_negatives": 1}, "both"),  # a lever on the documents' side keeps both
    (["_id", "text"], 9000, {"objective": "lead"}, "both"),  # measured for the documents default only
    (["title", "description"], 9000, {}, "both"),  # pairs: both sides gained more on the catalogs
    (["_id", "text"], 9000, {"adapt": "both"}, "both"),  # an explicit choice stays
    (["_id", "text"], 10, {"adapt": "queries"}, "queries"),
])
def test_adapt_auto_trains_the_query_side_alone_on_large_document_collections(columns, rows, train, expected,
                                                                              caplog):
    caplog.set_level("INFO", logger="src.plan")
    plan = plan_run(Config(train=TrainConfig(**train)), columns, rows=rows)
    assert plan.adapt == expected
    assert (f"adapt auto -> {expected}: " in caplog.text) == ("adapt" not in train)
    assert ("--adapt queries on documents alone" in caplog.text) == (train.get("adapt") == "queries")
