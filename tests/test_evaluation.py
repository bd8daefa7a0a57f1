"""Metrics against hand-worked cases and pytrec_eval, comparison statistics, loaders, prompts, reports."""

import json

import numpy as np
import pytest
from conftest import ROOT, RU_TRAIN

from src.config import EvalConfig
from src.encoding import load_model
from src.errors import KitError
from src.evaluation import approximate_recall, evaluate_model, markdown_report, search
from src.metrics import METRICS, compare, format_p, query_metrics, score_rankings, verdict
from src.retrieval_data import RetrievalData, load_beir, load_pairs, load_retrieval_data


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
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "one"}\n'
                                           '{"_id": "d2", "text": "two"}\n')
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


def _beir_variant(root, id_key, qrels_at, header):
    root.mkdir()
    (root / "corpus.jsonl").write_text(f'{{"{id_key}": "d1", "text": "one"}}\n{{"{id_key}": 2, "text": "two"}}\n')
    (root / "queries.jsonl").write_text(f'{{"{id_key}": "q1", "text": "first"}}\n{{"{id_key}": "q2", "text": "x"}}\n')
    lines = ("query-id\tcorpus-id\tscore\n" if header else "") + "q1\td1\t2\nq1\t2\t1\nq2\td1\t0\n"
    qrels = root / qrels_at
    qrels.parent.mkdir(exist_ok=True)
    qrels.write_text(lines)
    return str(root)


@pytest.mark.parametrize("id_key", ["_id", "id"])
@pytest.mark.parametrize("qrels_at", ["qrels/test.tsv", "qrels/dev.tsv", "qrels.tsv"])
@pytest.mark.parametrize("header", [True, False])
def test_beir_variants_load_alike(tmp_path, caplog, id_key, qrels_at, header):
    with caplog.at_level("INFO", logger="src.retrieval_data"):
        data = load_retrieval_data(_beir_variant(tmp_path / "beir", id_key, qrels_at, header))
    assert data.qrels == {"q1": {"d1": 2, "2": 1}} and data.corpus == {"d1": "one", "2": "two"}  # no title: text
    assert list(data.queries) == ["q1"]
    if qrels_at.startswith("qrels/"):
        split = qrels_at.split("/")[1].removesuffix(".tsv")
        assert f"relevance judgements of split '{split}' ({qrels_at})" in caplog.text


def test_beir_picks_the_test_split_and_names_the_others(tmp_path, caplog):
    root = _beir_variant(tmp_path / "beir", "_id", "qrels/test.tsv", True)
    (tmp_path / "beir" / "qrels" / "train.tsv").write_text("q2\td2\t1\n")
    with caplog.at_level("INFO", logger="src.retrieval_data"):
        assert list(load_retrieval_data(root).queries) == ["q1"]
    assert "split 'test' (qrels/test.tsv); also there: train" in caplog.text


@pytest.mark.parametrize("qrels,message", [
    ("q1\td1\n", "expected tab-separated query-id, corpus-id, score; found 2 column"),
    ("q1\td1\t1\nq1\t2\thigh\n", "score 'high' for query 'q1' is not a number"),
    ("qid\tdocid\trel\nq1\td1\t1\n", "missing column 'query-id'"),
])
def test_beir_bad_qrels_name_the_file(tmp_path, qrels, message):
    root = _beir_variant(tmp_path / "beir", "_id", "qrels.tsv", False)
    (tmp_path / "beir" / "qrels.tsv").write_text(qrels)
    with pytest.raises(KitError, match=message):
        load_beir(root)
    (tmp_path / "beir" / "qrels.tsv").unlink()
    with pytest.raises(KitError, match="no relevance judgements"):
        load_beir(root)


def _summary(p_values):
    models = {n: {"metrics": {m: 0.5 for m in METRICS}, "max_seq_length": 64, "documents_per_second": 1.0,
                  "prompts": [None, None], "anisotropy_diagnostic": {"mean": 0.1, "std": 0.1}} for n in ("a", "b")}
    metrics = {m: {"difference": 0.01, "ci95": [0.0, 0.02], "p_value": p} for m, p in zip(METRICS, p_values)}
    return {"data": {"source": "s", "queries": 10, "documents": 10, "relevant_per_query": 1.0, "notes": []},
            "settings": {"index": "flat"}, "models": models,
            "comparison": {"candidate": "a", "baseline": "b", "metrics": metrics, "verdict": "better"}}


def test_p_values_below_a_thousandth_are_not_printed_as_zero():
    p_values = [0.0004, 0.001, 0.25, 0.0, 1.0, 0.0499, 0.00099]
    rows = {line.split(" | ")[0].strip("| "): line.rstrip(" |").split(" | ")[-1]
            for line in markdown_report(_summary(p_values)).splitlines() if line.startswith(("| ndcg", "| mrr",
                                                                                             "| map", "| recall"))}
    assert list(rows.values()) == ["< 0.001", "0.001", "0.250", "< 0.001", "1.000", "0.050", "< 0.001"]
    assert (format_p(0.0004, "= "), format_p(0.03, "= ")) == ("< 0.001", "= 0.030")


def _pairs_file(path, n=30):
    with RU_TRAIN.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(n), fh)]
    path.write_text("".join(json.dumps({"query": r["title"], "document": r["description"]}, ensure_ascii=False) + "\n"
                            for r in rows), encoding="utf-8")
    return str(path)


def test_trainer_and_command_line_evaluations_agree_and_name_the_final_folder(tmp_path, tiny_bert, tiny_xlmr):
    from src.evaluation import evaluate_run, main

    cfg = EvalConfig(eval_data=_pairs_file(tmp_path / "pairs.jsonl"), bootstrap_samples=200, eval_batch_size=16)
    partial = tmp_path / "run.partial"  # where the trainer evaluates, before the rename
    partial.mkdir()
    (partial / "merged").symlink_to(tiny_bert)
    evaluate_run(cfg, str(tiny_xlmr), str(tmp_path / "run"), partial, load_retrieval_data(cfg.eval_data))
    main(["--model", str(tiny_bert), "--baseline", str(tiny_xlmr), "--eval_data", cfg.eval_data,
          "--bootstrap_samples", "200", "--eval_batch_size", "16", "--output_dir", str(tmp_path / "cli")])
    trainer_side = json.loads((partial / "evaluation" / "metrics.json").read_text())
    cli_side = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    intervals = [[s["comparison"]["metrics"][m]["ci95"] for m in METRICS] for s in (trainer_side, cli_side)]
    assert intervals[0] == intervals[1] and intervals[0][0][0] < intervals[0][0][1]
    assert trainer_side["settings"]["models"] == {"adapted": str(tmp_path / "run" / "merged"), "base": str(tiny_xlmr)}
    assert ".partial" not in (partial / "evaluation" / "report.md").read_text()


@pytest.mark.parametrize("two", [True, False], ids=["compared", "one model"])
def test_metrics_plot_is_written(tmp_path, two):
    from src.plots import plot_metrics

    rng = np.random.default_rng(0)
    per_query = {n: {m: rng.random(50) for m in METRICS} for n in ("adapted", "base")[: 1 + two]}
    results = {n: {"metrics": {m: float(v.mean()) for m, v in pq.items()}} for n, pq in per_query.items()}
    comparison = compare(per_query["adapted"], per_query["base"], samples=200) if two else None
    plot_metrics(results, tmp_path / "metrics.png", comparison, "data/ru_catalog/test: 50 queries, 80 documents")
    data = (tmp_path / "metrics.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_several_gpus_encode_with_one_process_each_and_one_device_encodes_alone(monkeypatch):
    import torch

    from src.encoding import encode

    seen = {}

    class Model:
        def encode(self, texts, **kwargs):
            seen.update(kwargs)
            return np.ones((len(texts), 4), dtype=np.float64)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    emb, _ = encode(Model(), ["a", "b"], None, 8)
    assert seen["device"] == ["cuda:0", "cuda:1"] and emb.dtype == np.float32 and emb.shape == (2, 4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    encode(Model(), ["a"], None, 8)
    assert seen["device"] is None  # the model's own device


def test_approximate_recall_scores_the_ranking_already_searched_against_exact_search():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((500, 16)).astype("float32")
    queries = rng.standard_normal((20, 16)).astype("float32")
    exact = search(docs, queries, "flat")
    assert approximate_recall(exact, docs, queries) == 1.0
    half = exact.copy()
    half[:, 5:10] = exact[:, 40:45]  # five of every exact top 10 replaced by documents ranked 41-45
    assert approximate_recall(half, docs, queries) == pytest.approx(0.5)


def test_two_runs_evaluations_are_paired_without_encoding(tmp_path, tiny_bert, tiny_xlmr):
    """src.compare pairs two runs' adapted models over the queries both evaluations kept in per_query.json: here
    run B's adapted model is the base itself, so A minus B is A's own difference from the base."""
    from src.compare import main
    from src.evaluation import evaluate_run

    cfg = EvalConfig(eval_data=_pairs_file(tmp_path / "pairs.jsonl"), bootstrap_samples=200, eval_batch_size=16)
    data = load_retrieval_data(cfg.eval_data)
    for run, merged in (("a", tiny_bert), ("b", tiny_xlmr)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "merged").symlink_to(merged)
        evaluate_run(cfg, str(tiny_xlmr), str(tmp_path / run), tmp_path / run, data)
    main(["--runs", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--output_dir", str(tmp_path / "a-vs-b")])
    paired = json.loads((tmp_path / "a-vs-b" / "comparison.json").read_text())
    own = json.loads((tmp_path / "a" / "evaluation" / "metrics.json").read_text())["comparison"]["metrics"]
    assert paired["metrics"]["ndcg@10"]["difference"] == pytest.approx(own["ndcg@10"]["difference"], abs=1e-6)
    assert paired["data"]["queries"] == 30
    assert "Verdict on ndcg@10" in (tmp_path / "a-vs-b" / "comparison.md").read_text()
    with pytest.raises(KitError, match="already holds a comparison"):
        main(["--runs", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--output_dir", str(tmp_path / "a-vs-b")])


def test_evaluations_that_cannot_be_paired_are_refused_in_one_line(tmp_path):
    from src.compare import main
    from src.errors import UsageError
    from src.evaluation import write_per_query

    def evaluation(name: str, queries: int) -> str:
        data = RetrievalData({f"q{i}": "x" for i in range(queries)}, {"d": "y"},
                             {f"q{i}": {"d": 1} for i in range(queries)}, source="pairs.jsonl")
        folder = tmp_path / name / "evaluation"
        folder.mkdir(parents=True)
        write_per_query({"adapted": {"per_query": {m: np.zeros(queries) for m in METRICS}}}, data,
                        folder / "per_query.json")
        return str(tmp_path / name)

    ten, five = evaluation("ten", 10), evaluation("five", 5)
    with pytest.raises(KitError, match="scored different queries of pairs.jsonl .10 vs 5.*cannot be paired"):
        main(["--runs", f"{ten},{five}"])
    with pytest.raises(KitError, match="no model 'model' .it has adapted.; choose one with --model"):
        main(["--runs", f"{ten},{ten}", "--model", "model"])
    with pytest.raises(KitError, match="no per_query.json in it or in its evaluation/"):
        main(["--runs", f"{ten},{tmp_path}"])
    with pytest.raises(UsageError, match="option --runs: two folders"):
        main(["--runs", ten])
