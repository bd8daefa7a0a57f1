"""Pairs from documents alone (ict, crop, lead), the `auto` objective, the development split of documents, and
the forgetting guards (adapter disabled = base model; adapter scale 0 = base model)."""

import json
import logging

import pandas as pd
import pytest
import torch
from conftest import RU_TRAIN

from src.config import DOCUMENT_CONSTRUCTIONS as CONSTRUCTIONS
from src.config import DataConfig, ModelConfig, TrainConfig
from src.create_dataset import load_training_data
from src.document_pairs import DocumentPairs, document_pairs_dataset
from src.errors import KitError, UsageError
from src.plan import DOCUMENTS_DEFAULT, dev_construction, resolve_objective
from src.round_trip import own_ranks, round_trip_filter
from src.selection import development_pairs
from src.text import normalized_key, tokenize

DOCS = [json.loads(line)["description"] for line in RU_TRAIN.read_text(encoding="utf-8").splitlines()[:200]]


def words(text: str) -> set[str]:
    return {t for t, _ in tokenize(text)}


@pytest.mark.parametrize("kind", CONSTRUCTIONS)
def test_each_construction_pairs_two_different_sides_of_the_same_document(kind):
    pairs = DocumentPairs(kind, seed=0)
    for i, doc in enumerate(DOCS):
        query, positive = pairs(doc, i)
        assert query and positive and query != positive
        assert words(query) <= words(doc) and words(positive) <= words(doc)  # nothing from elsewhere
        assert len(tokenize(query)) <= 32


def test_lead_takes_the_heading_line_when_there_is_one():
    assert DocumentPairs("lead", 0)("Installing printers\nOpen Settings, then Printers.", 0) == (
        "Installing printers", "Open Settings, then Printers.")


@pytest.mark.parametrize("kind", ["ict", "crop"])
def test_random_pairs_are_redrawn_each_epoch_and_repeat_for_the_same_seed(kind):
    first, again, other_seed = DocumentPairs(kind, 7), DocumentPairs(kind, 7), DocumentPairs(kind, 8)
    epoch0 = [first(d, i) for i, d in enumerate(DOCS)]
    assert epoch0 == [again(d, i) for i, d in enumerate(DOCS)]
    assert sum(a != b for a, b in zip(epoch0, [other_seed(d, i) for i, d in enumerate(DOCS)])) > 0.5 * len(DOCS)
    first.epoch = 1
    epoch1 = [first(d, i) for i, d in enumerate(DOCS)]
    assert sum(a != b for a, b in zip(epoch0, epoch1)) > 0.5 * len(DOCS)


def test_the_dataset_draws_each_row_from_its_own_document_afresh_each_epoch():
    pairs = DocumentPairs("ict", 0)
    dataset = document_pairs_dataset(DOCS[:20], pairs)
    before = dataset[:20]
    for query, positive, doc in zip(before["anchor"], before["positive"], DOCS):
        assert words(query) <= words(doc) and words(positive) <= words(doc)
    pairs.epoch = 1
    assert dataset[:20]["anchor"] != before["anchor"]


@pytest.fixture()
def documents_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    pd.DataFrame({"_id": [f"d{i}" for i in range(len(DOCS))], "text": DOCS}).to_json(
        path, orient="records", lines=True, force_ascii=False)
    return path


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
def test_no_development_document_is_trained_on(documents_file, construction):
    data = load_training_data(DataConfig(train_file=str(documents_file), validation_fraction=0.1), seed=0)
    assert not data.pairs and len(data.dev_texts) >= 15
    trained = {normalized_key(t) for t in data.texts}
    assert not any(normalized_key(t) in trained for t in data.dev_texts)
    dev_pairs, pool = development_pairs(data, construction, TrainConfig(seed=0))
    assert len(dev_pairs) == len(data.dev_texts)
    for query, positive in dev_pairs:  # every development pair comes from a held-out document
        assert any(words(query) | words(positive) <= words(t) for t in data.dev_texts)
    if construction == "lead":  # whole-document sides; ict and crop sides can be one sentence two documents share
        assert not {normalized_key(p) for _, p in dev_pairs} & {normalized_key(p) for p in pool}


def test_auto_picks_catalog_pairs_when_the_file_has_them_and_the_documents_recipe_otherwise(caplog):
    caplog.set_level(logging.INFO)
    pair_columns = ["title", "description"]
    assert resolve_objective("auto", ["title", "description", "text"], pair_columns, "text", "cat.jsonl") == "mnrl"
    assert "auto -> mnrl" in caplog.text and "pair columns title,description" in caplog.text
    assert DOCUMENTS_DEFAULT == "lead"  # README: "auto" on documents alone trains the lead recipe
    assert resolve_objective("auto", ["_id", "text"], pair_columns, "text", "docs.jsonl") == "lead"
    assert "auto -> lead" in caplog.text and "documents alone" in caplog.text


def test_development_pairs_are_never_built_like_the_training_pairs_unless_asked(caplog):
    from types import SimpleNamespace

    from src.config import Config
    from src.create_dataset import TrainingData
    from src.plan import plan_run
    from src.selection import dev_evaluator

    def plan(objective, construction="auto"):
        cfg = Config(train=TrainConfig(objective=objective, dev_construction=construction))
        return plan_run(cfg, ["title", "description", "text"])

    # docs/RESULTS.md "Documents alone": lead development pairs rose while real queries fell; crop pairs fell too
    assert [dev_construction("auto", o) for o in ("lead", "ict", "tsdae+lead", "crop", "lead+crop")] == [
        "crop", "crop", "crop", "lead", "ict"]
    assert plan("lead", "ict").dev_construction == "ict"
    docs = [f"Heading {i}\nBody sentence number {i} about topic {i % 7}. Another sentence {i}." for i in range(60)]
    data, model = TrainingData(docs[:40], docs[40:]), SimpleNamespace(prompts={})
    for construction, warned in (("lead", True), ("crop", False), ("auto", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="src.selection"):
            assert dev_evaluator(model, data, plan("lead", construction), TrainConfig(), 8, False, None) is not None
        assert ("built like the training pairs" in caplog.text) == warned


def test_selection_follows_the_development_score_and_only_records_the_monitor(tmp_path):
    from src.selection import ModelSelection, dev_score

    logged = {"eval_dev_cosine_ndcg@10": 0.5, "eval_monitor_cosine_ndcg@10": 0.9, "eval_lead_loss": 1.0}
    assert (dev_score(logged), dev_score(logged, "monitor")) == (0.5, 0.9)
    assert dev_score({"dev_cosine_ndcg@10": 0.4}) == 0.4 and dev_score({"eval_lead_loss": 1.0}) is None
    best = ModelSelection(torch.nn.Linear(2, 2), tmp_path, evaluator=None)
    for step, dev, watched in ((0, 0.40, 0.70), (10, 0.45, 0.60), (20, 0.42, 0.80)):
        best.consider(step, {"dev_cosine_ndcg@10": dev, "monitor_cosine_ndcg@10": watched})
    assert best.step == 10 and json.loads((tmp_path / "best.json").read_text())["step"] == 10
    assert best.monitor == [(0, 0.70), (10, 0.60), (20, 0.80)]


def test_a_resumed_run_keeps_the_selection_history_up_to_its_checkpoint(tmp_path):
    from src.selection import ModelSelection

    first = ModelSelection(torch.nn.Linear(2, 2), tmp_path, evaluator=None)
    for step, dev, watched in ((0, 0.40, 0.70), (10, 0.45, 0.60), (20, 0.42, 0.80)):
        first.consider(step, {"dev_cosine_ndcg@10": dev, "monitor_cosine_ndcg@10": watched})
    resumed = ModelSelection(torch.nn.Linear(2, 2), tmp_path, evaluator=None)
    resumed.resume_at(10)  # continues from checkpoint-10: step 20 is evaluated again
    assert resumed.history == [(0, 0.40), (10, 0.45)] and resumed.monitor == [(0, 0.70), (10, 0.60)]
    assert (resumed.step, resumed.best) == (10, 0.45)
    restarted = ModelSelection(torch.nn.Linear(2, 2), tmp_path, evaluator=None)
    restarted.resume_at(-1)  # no checkpoint: everything is evaluated again, step 0 first
    assert restarted.history == [] and restarted.monitor == []


def test_an_explicit_pair_objective_without_its_columns_says_what_works_for_documents():
    with pytest.raises(UsageError, match=r"--objective mnrl: needs the pair column 'title' .* docs.jsonl lacks "
                                         r"\(has: _id, text\); for plain documents use --objective auto or lead"):
        resolve_objective("mnrl", ["_id", "text"], ["title", "description"], "text", "docs.jsonl")
    with pytest.raises(UsageError, match="--objective ict: needs the text column 'body'"):
        resolve_objective("ict", ["_id", "text"], [], "body", "docs.jsonl")


# ---- forgetting guards -------------------------------------------------------------------------------------


def embed(model, texts):
    return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)


@pytest.fixture()
def lora_model(tiny_xlmr):
    """A LoRA model whose adapter is no longer a no-op (B matrices randomised), and the plain base model."""
    from src.model_builder import build_model, load_sentence_transformer

    cfg = ModelConfig(model_name_or_path=str(tiny_xlmr), precision="none")
    model, base = build_model(cfg), load_sentence_transformer(cfg)
    model.max_seq_length = base.max_seq_length  # compare like with like (build_model sets the training length)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    return model, base


def test_disabled_adapter_embeddings_equal_the_base_model(lora_model):
    from src.objectives.base import adapters_disabled

    model, base = lora_model
    texts = DOCS[:8]
    adapted = embed(model, texts)
    with adapters_disabled(model):
        disabled = embed(model, texts)
    assert (adapted - disabled).abs().max() > 1e-3  # the adapter does change the embeddings
    assert torch.allclose(disabled, embed(base, texts), atol=1e-5)
    assert torch.equal(embed(model, texts), adapted)  # and it is back on afterwards


def test_adapter_scale_zero_is_the_base_model_and_one_is_as_trained(lora_model):
    from src.selection import choose_lora_scale

    model, base = lora_model
    texts = DOCS[:8]
    adapted = embed(model, texts)
    seen = []

    def evaluator(m):  # development score: highest when the model is the base model
        seen.append(embed(m, texts))
        distance = (seen[-1] - embed(base, texts)).abs().max().item()
        return {"eval_dev_cosine_ndcg@10": 1.0 - distance}

    scale = choose_lora_scale(model, evaluator, 0.5, [0.0, 0.5])  # the adapter as trained scored 0.5
    assert scale == 0.0
    assert torch.allclose(seen[0], embed(base, texts), atol=1e-5)  # scale 0 = the base model
    assert not torch.allclose(seen[1], adapted, atol=1e-3)  # scale 0.5 is in between
    assert torch.allclose(embed(model, texts), embed(base, texts), atol=1e-5)  # the chosen scale stays set
    assert choose_lora_scale(model, evaluator, 0.5, []) == 1.0


def test_adapter_scale_search_keeps_the_trained_adapter_against_a_noise_sized_gain(lora_model):
    from src.selection import MIN_SCALE_GAIN, choose_lora_scale

    model, _ = lora_model
    texts = DOCS[:8]
    adapted = embed(model, texts)

    def slightly_better(m):
        return {"eval_dev_cosine_ndcg@10": 0.5 + MIN_SCALE_GAIN / 2}

    assert choose_lora_scale(model, slightly_better, 0.5, [0.5]) == 1.0
    assert torch.allclose(embed(model, texts), adapted, atol=1e-6)  # the trained adapter is back in place
    clearly_better = {"eval_dev_cosine_ndcg@10": 0.5 + 2 * MIN_SCALE_GAIN}
    assert choose_lora_scale(model, lambda m: clearly_better, 0.5, [0.5]) == 0.5


# ---- the documents-only default, end to end on a tiny model ----------------------------------------------


def test_lead_on_documents_trains_with_selection_scale_search_anchor_and_monitor(tmp_path, tiny_xlmr, documents_file):
    from src.config import Config, EvalConfig, OutputConfig, TrainConfig
    from src.trainer import train

    monitor = tmp_path / "monitor.csv"  # labelled pairs, scored at every evaluation and never selected on
    pd.DataFrame({"query": [d.split(".")[0] for d in DOCS[:30]], "document": DOCS[:30]}).to_csv(monitor, index=False)
    cfg = Config(data=DataConfig(train_file=str(documents_file), validation_fraction=0.1),
                 model=ModelConfig(model_name_or_path=str(tiny_xlmr), max_seq_length=48),
                 train=TrainConfig(objective="lead", batch_size=8, learning_rate=1e-3, max_steps=4, eval_steps=2,
                                   save_steps=50, dev_distractors=50, anchor_weight=1.0, lora_scales="0.5",
                                   monitor_data=str(monitor)),
                 eval=EvalConfig(eval_data=""), output=OutputConfig(output_dir=str(tmp_path / "auto")))
    folder = train(cfg)
    run = json.loads((folder / "run.json").read_text())
    assert (run["objective_requested"], run["objective"]) == ("lead", "lead")
    assert [step for step, _ in run["dev_ndcg@10_by_step"]] == [0, 2, 4]
    assert [step for step, _ in run["monitor_ndcg@10_by_step"]] == [0, 2, 4]
    assert all(0 <= score <= 1 for _, score in run["monitor_ndcg@10_by_step"])
    assert run["selected"]["dev_ndcg@10"] == max(score for _, score in run["dev_ndcg@10_by_step"])
    logged = json.loads((folder / "training_log.json").read_text())
    assert sum("eval_monitor_cosine_ndcg@10" in h for h in logged) == 2  # steps 2 and 4 (step 0 precedes the log)
    card = (folder / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "dev_cosine" in card and "monitor" not in card  # watched data is no result of the model
    assert run["lora_scale"] in (0.5, 1.0) if run["selected"]["step"] else run["lora_scale"] == 1.0
    assert run["peak_memory_gb"] > 0


def test_auto_on_documents_trains_the_measured_budget_without_selection(tmp_path, tiny_xlmr, documents_file,
                                                                        monkeypatch, caplog):
    from src import plan, trainer
    from src.config import Config, EvalConfig, OutputConfig
    from src.model_builder import build_model
    from src.trainer import train

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(plan, "DOCUMENTS_PAIRS", 20)  # 3 steps of 8 pairs on this small file (the default: 640)
    monkeypatch.setattr(plan, "DOCUMENTS_MAX_SEQ_LENGTH", 40)  # under the tiny model's limit (64): trained as planned
    built = []

    def recorded(*args):
        built.append(build_model(*args))
        return built[-1]

    monkeypatch.setattr(trainer, "build_model", recorded)
    cfg = Config(data=DataConfig(train_file=str(documents_file), validation_fraction=0.1),
                 model=ModelConfig(model_name_or_path=str(tiny_xlmr)),
                 train=TrainConfig(batch_size=8, learning_rate=1e-3, save_steps=50),
                 eval=EvalConfig(eval_data=""), output=OutputConfig(output_dir=str(tmp_path / "auto")))
    lengths = []
    monkeypatch.setattr(trainer, "run_training",
                        lambda *args, run=trainer.run_training: lengths.append(built[0].max_seq_length) or run(*args))
    folder = train(cfg)
    run, saved = (json.loads((folder / name).read_text()) for name in ("run.json", "config.json"))
    assert (run["objective_requested"], run["objective"], run["steps"]) == ("auto", "lead", 3)
    assert run["selected"] is None and run["dev_ndcg@10_by_step"] is None and run["lora_scale"] == 1.0
    assert (saved["train"]["max_steps"], saved["train"]["select_best"]) == (0, True)  # as requested ...
    assert (saved["resolved"]["max_steps"], saved["resolved"]["select_best"]) == (3, False)  # ... and as resolved
    assert saved["model"]["max_seq_length"] == 0 and lengths == [40]  # trained at auto's length
    # nothing selects, so nothing is held out and no development loss is computed: every document trains
    every = load_training_data(DataConfig(train_file=str(documents_file), validation_fraction=0.0), seed=42).texts
    assert (run["dev_texts"], run["plan"]["holdout_fraction"], run["train_texts"]) == (0, 0.0, len(every))
    logged = json.loads((folder / "training_log.json").read_text())
    assert logged and not any(key.startswith("eval_") for entry in logged for key in entry)
    assert "no model selection, nothing held out" in caplog.text and (folder / "merged").is_dir()
    assert "8 per step of up to 40 tokens" in caplog.text


def test_documents_budget_repeats_a_small_file_gives_way_to_max_steps_and_refuses_a_monitor():
    from src.config import Config
    from src.plan import DOCUMENTS_PAIRS, plan_run

    def planned(texts=5000, **train):
        cfg = Config(train=TrainConfig(**train))
        return plan_run(cfg, ["_id", "text"]).with_budget(texts, cfg.train), cfg

    budget, cfg = planned()
    assert (budget.max_steps, budget.select_best, budget.lora_scales) == (DOCUMENTS_PAIRS // 32, False, ())
    assert (budget.holdout_fraction, cfg.train.max_steps, cfg.train.select_best) == (0.0, 0, True)  # not rewritten
    assert planned(texts=301)[0].max_steps == DOCUMENTS_PAIRS // 32  # fewer texts: the same pairs again (2.1x)
    assert planned(texts=100)[0].max_steps == 10  # ... at most DOCUMENTS_MAX_EPOCHS (3) passes: 300 pairs
    assert planned(max_steps=7)[0].max_steps == 7
    catalog = plan_run(Config(), ["title", "description", "text"]).with_budget(5000, TrainConfig())
    assert (catalog.objective, catalog.select_best, catalog.holdout_fraction, catalog.max_steps) == (
        "mnrl", True, 0.05, 0)  # pairs: one epoch, selected on 5% of the items held out
    assert catalog.eval_steps == 157  # pairs: evaluated at the epoch's end (157 steps of 32 pairs) only
    two_epochs = Config(train=TrainConfig(epochs=2))
    assert plan_run(two_epochs, ["title", "description"]).with_budget(5000, two_epochs.train).eval_steps == 157
    assert budget.eval_steps == 0  # the documents default evaluates nothing while it trains
    lead_budget = plan_run(Config(train=TrainConfig(objective="lead", max_steps=20)), ["text"])
    assert lead_budget.with_budget(5000, TrainConfig()).eval_steps == 5  # others: four evaluations over 20 steps
    assert catalog.lora_scales == () and plan_run(Config(train=TrainConfig(objective="lead")),
                                                  ["text"]).lora_scales == (0.5,)  # auto: none for pairs
    halves = Config(train=TrainConfig(lora_scales="0.25,0.5"))
    assert plan_run(halves, ["title", "description"]).lora_scales == (0.25, 0.5)
    assert (catalog.learning_rate, budget.learning_rate) == (2e-4, 1e-4)  # auto: as measured for each
    lead = plan_run(Config(train=TrainConfig(objective="lead")), ["text"])
    assert (catalog.mnrl_scale, budget.mnrl_scale, lead.mnrl_scale) == (50.0, 100.0, 20.0)  # as measured
    assert planned(mnrl_scale=30.0)[0].mnrl_scale == 30.0
    assert (catalog.max_seq_length, budget.max_seq_length, lead.max_seq_length) == (128, 256, 128)  # auto
    assert plan_run(Config(model=ModelConfig(max_seq_length=64)), ["text"]).max_seq_length == 64
    every_10 = Config(train=TrainConfig(eval_steps=10))
    assert plan_run(every_10, ["title", "description"]).with_budget(5000, every_10.train).eval_steps == 10
    with pytest.raises(UsageError, match="option --monitor_data: .*--objective lead"):
        planned(monitor_data="titles.csv")


class WordOverlapEncoder:
    """A stand-in retriever: a text is the normalised bag of its words, so a query finds the documents that share
    its words. What `round_trip_filter` needs of a SentenceTransformer: `encode`."""

    def __init__(self, texts):
        self.vocab = {w: i for i, w in enumerate(sorted({w for t in texts for w in t.lower().split()}))}

    def encode(self, texts, prompt=None, **kwargs):
        bags = torch.zeros(len(texts), len(self.vocab))
        for row, text in enumerate(texts):
            for word in text.lower().split():
                bags[row, self.vocab[word]] = 1.0
        return torch.nn.functional.normalize(bags, dim=1)


def test_round_trip_keeps_documents_whose_lead_finds_them_and_drops_generic_leads(caplog):
    docs = ["kernel driver sch5636\nthe sch5636 driver reads sensors", "Note\nplease read the manual first",
            "bootconfig syntax\nbootconfig files hold key value syntax", "Note\nthe manual says more"]
    encoder, lead = WordOverlapEncoder(docs), DocumentPairs("lead", 0)
    # "Note" shares no word with any body: it ties with every document, which counts as not found
    assert own_ranks(encoder, [lead(d, i) for i, d in enumerate(docs)], {}).tolist() == [0, 3, 0, 3]
    with caplog.at_level(logging.INFO, logger="src.round_trip"):
        assert round_trip_filter(encoder, docs, lead, 1, {}, seed=0) == [0, 2]
    assert round_trip_filter(encoder, docs, lead, 4, {}, seed=0) == [0, 1, 2, 3]  # top 4 of 4: everything
    assert "round-trip filter: 2 of 4 sampled documents" in caplog.text
    with pytest.raises(KitError, match="option --round_trip_top_k 1: no training document passed"):
        round_trip_filter(encoder, [docs[1], docs[3]], lead, 1, {}, seed=0)


def test_the_lead_part_trains_only_the_documents_its_round_trip_keeps(tiny_xlmr):
    from src.config import NoiseConfig
    from src.create_dataset import TrainingData
    from src.model_builder import build_model
    from src.objectives import BuildInputs, build_objective

    model, data = build_model(ModelConfig(model_name_or_path=str(tiny_xlmr), precision="none")), TrainingData(DOCS, [])
    sizes = [len(build_objective("lead", BuildInputs(TrainConfig(round_trip_top_k=k), NoiseConfig(), 20.0, 0, model,
                                                     data)).train_dataset)
             for k in (0, 5, len(DOCS))]
    assert sizes[0] == sizes[2] == len(DOCS) and 0 < sizes[1] < len(DOCS)


def test_keys_queries_are_a_documents_rarest_words_in_its_own_order():
    corpus = ["The kernel driver sch5636 reads the sensors of the board.", "The kernel loads the driver.",
              "The board boots the kernel."]
    doc_words = corpus[0].rstrip(".").split()
    queries = {DocumentPairs("keys", seed, corpus)(corpus[0], 0) for seed in range(20)}
    assert {p for _, p in queries} == {corpus[0]}  # the whole document is the positive
    assert len(queries) > 1  # 2-5 words, drawn: about a title's length
    for query, _ in queries:
        words = query.split()
        assert 2 <= len(words) <= 5 and {"sch5636", "reads"} <= set(words)  # words no other document has first
        assert not {"The", "kernel"} & set(words)  # never the words every document has
        assert [doc_words.index(w) for w in words] == sorted(doc_words.index(w) for w in words)
