"""Metrics against hand-worked cases and pytrec_eval, comparison statistics, loaders, prompts, reports."""

import json

import numpy as np
import pytest

from conftest import ROOT
from src.config import EvalConfig
from src.create_dataset import RetrievalData, load_beir, load_pairs, load_retrieval_data
from src.errors import KitError
from src.evaluation import METRICS, compare, evaluate_model, load_model, query_metrics, score_rankings, verdict


def test_hand_worked_single_relevant():
    m = query_metrics(["a", "b", "c"], {"b": 1})
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["ndcg@10"] == pytest.approx(1 / np.log2(3))
    assert m["map@100"] == pytest.approx(0.5)
    assert (m["recall@1"], m["recall@5"]) == (0.0, 1.0)


def test_hand_worked_graded_and_several_relevant():
    # relevant: x (grade 2) at rank 3, y (grade 1) at rank 1, z (grade 1) not retrieved
    m = query_metrics(["y", "n1", "x", "n2"], {"x": 2, "y": 1, "z": 1})
    dcg = 1 / np.log2(2) + 2 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    assert m["mrr@10"] == 1.0
    assert m["map@100"] == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@5"] == pytest.approx(2 / 3)
    assert query_metrics(["n"] * 10 + ["y"], {"y": 1})["mrr@10"] == 0.0


def test_metrics_match_pytrec_eval_on_random_graded_runs():
    import pytrec_eval

    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, run, rankings = {}, {}, {}
    for q in range(200):
        qid = f"q{q}"
        relevant = rng.choice(300, size=rng.integers(1, 6), replace=False)
        qrels[qid] = {docs[i]: int(rng.integers(1, 4)) for i in relevant}
        ranking = [docs[i] for i in rng.permutation(300)[:100]]
        if q % 3 == 0:  # make some queries easy
            ranking = list(qrels[qid]) + [d for d in ranking if d not in qrels[qid]][:95]
        rankings[qid] = ranking
        run[qid] = {d: float(100 - r) for r, d in enumerate(ranking)}
    ours = score_rankings(rankings, qrels)
    measures = {"ndcg_cut.10", "recip_rank", "map_cut.100", "recall.1", "recall.5", "recall.10", "recall.100"}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    names = {"ndcg@10": "ndcg_cut_10", "map@100": "map_cut_100", "recall@1": "recall_1", "recall@5": "recall_5",
             "recall@10": "recall_10", "recall@100": "recall_100"}
    for metric, trec in names.items():
        expected = np.array([theirs[q][trec] for q in sorted(qrels)])
        np.testing.assert_allclose(ours[metric], expected, atol=1e-6, err_msg=metric)
    # trec's recip_rank has no cut-off: equal to MRR@10 wherever the first hit is in the top 10
    rr = np.array([theirs[q]["recip_rank"] for q in sorted(qrels)])
    np.testing.assert_allclose(ours["mrr@10"], np.where(rr >= 0.1, rr, 0.0), atol=1e-6)


def test_compare_and_verdict():
    rng = np.random.default_rng(1)
    base = {m: rng.random(400) for m in METRICS}
    better = {m: np.clip(v + 0.1 + 0.05 * rng.standard_normal(400), 0, 1) for m, v in base.items()}
    c = compare(better, base)
    assert c["ndcg@10"]["ci95"][0] > 0 and c["ndcg@10"]["p_value"] < 0.01 and verdict(c) == "better"
    assert verdict(compare(base, better)) == "worse"
    same = {m: v + 0.01 * rng.standard_normal(400) for m, v in base.items()}
    assert verdict(compare(same, base)) == "not distinguishable"


def test_pairs_loader_merges_identical_texts(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"q": "красный телефон", "d": "Телефон красного цвета"}, {"q": "красный телефон", "d": "Алый смартфон"},
            {"q": "чехол", "d": "Телефон красного цвета"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    data = load_pairs(str(path), "q", "d")
    assert len(data.queries) == 2 and len(data.corpus) == 2
    assert data.qrels["q0"] == {"d0": 1, "d1": 1} and data.qrels["q1"] == {"d0": 1}
    with pytest.raises(KitError, match="missing column 'query'"):
        load_pairs(str(path), "query", "d")


def _beir(tmp_path, qrels_text):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "one"}\n{"_id": "d2", "text": "two"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "second"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels_text)
    return str(tmp_path)


def test_beir_loader_graded_relevance(tmp_path):
    data = load_retrieval_data(_beir(tmp_path, "q1\td1\t2\nq1\td2\t1\nq2\td2\t0\n"))
    assert data.qrels == {"q1": {"d1": 2, "d2": 1}}  # q2 has no judged-relevant doc in this split
    assert list(data.queries) == ["q1"] and data.corpus["d1"] == "T. one"


@pytest.mark.parametrize("qrels,message", [("q1\td9\t1\n", "document id 'd9'"), ("q7\td1\t1\n", "query id 'q7'")])
def test_dangling_ids_are_reported(tmp_path, qrels, message):
    with pytest.raises(KitError, match=message):
        load_beir(_beir(tmp_path, qrels))


def test_empty_collection_and_missing_model_are_reported(tmp_path):
    with pytest.raises(KitError, match="collection is empty"):
        RetrievalData({"q": "x"}, {}, {"q": {"d": 1}}, source="s").validate()
    with pytest.raises(KitError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


@pytest.fixture(scope="module")
def small_ru_data():
    data = load_retrieval_data(str(ROOT / "data" / "ru_catalog" / "test"))
    queries = dict(list(data.queries.items())[:40])
    qrels = {q: data.qrels[q] for q in queries}
    keep = {d for rel in qrels.values() for d in rel} | set(list(data.corpus)[:160])
    return RetrievalData(queries, {d: data.corpus[d] for d in keep}, qrels, source="ru subset")


def test_e5_prompts_are_applied_and_matter(e5_cache, small_ru_data):
    model = load_model(str(e5_cache))
    cfg = EvalConfig(eval_batch_size=32)
    with_prompts = evaluate_model(model, small_ru_data, cfg)
    without = evaluate_model(model, small_ru_data, cfg, use_prompts=False)
    assert with_prompts["prompts"] == ["query", "passage"] and without["prompts"] == [None, None]
    assert with_prompts["metrics"]["ndcg@10"] > 0.5
    assert with_prompts["metrics"] != without["metrics"]
    approx = evaluate_model(model, small_ru_data, EvalConfig(index="hnsw"))
    assert approx["index_recall@10_vs_exact"] > 0.9
