"""The kit's cache of unchanged models' embeddings: reused bit for bit, recomputed whenever a key part changes,
never trusted when damaged, and off with no_cache."""

import json
import shutil

import pytest
from conftest import RU_TRAIN, read_texts

from src.config import EvalConfig
from src.embedding_cache import weights_fingerprint
from src.errors import UsageError
from src.evaluation import run_evaluation


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("E5KIT_CACHE", str(tmp_path / "kit"))
    return tmp_path / "kit" / "embeddings"


def _pairs(path, n=30, changed_row=None):
    with RU_TRAIN.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(n), fh)]
    if changed_row is not None:
        rows[changed_row]["description"] += " (изменено)"
    path.write_text("".join(json.dumps({"query": r["title"], "document": r["description"]}, ensure_ascii=False)
                            + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _evaluate(folder, models, pairs, cached=None, **options) -> dict:
    cfg = EvalConfig(eval_data=pairs, bootstrap_samples=100, eval_batch_size=16, **options)
    run_evaluation(models, cfg, folder, cached=cached)
    return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["models"]


def _scores(entry: dict) -> tuple:
    return entry["metrics"], entry["anisotropy_diagnostic"]


def test_repeated_evaluation_reads_the_cache_and_gives_identical_metrics(tmp_path, cache_dir, tiny_bert):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    first = _evaluate(tmp_path / "first", {"model": str(tiny_bert)}, pairs)["model"]
    assert first["embeddings"] == {"documents": "computed", "queries": "computed"}
    assert first["documents_per_second"] > 0
    assert len(list(cache_dir.glob("*.npy"))) == 2 and len(list(cache_dir.glob("*.json"))) == 2
    second = _evaluate(tmp_path / "second", {"model": str(tiny_bert)}, pairs)["model"]
    assert second["embeddings"] == {"documents": "cache", "queries": "cache"}
    assert _scores(second) == _scores(first)  # bit-identical: exact equality of the floats
    assert second["documents_per_second"] is None
    assert "| cached |" in (tmp_path / "second" / "report.md").read_text(encoding="utf-8")
    # the key is the folder's content, not its path; only the models named in `cached` use the cache
    copy = shutil.copytree(tiny_bert, tmp_path / "copy")
    both = _evaluate(tmp_path / "both", {"adapted": str(copy), "base": str(tiny_bert)}, pairs, cached={"base"})
    assert both["adapted"]["embeddings"]["documents"] == "computed"
    assert both["base"]["embeddings"] == {"documents": "cache", "queries": "cache"}
    assert _scores(both["adapted"]) == _scores(first) and len(list(cache_dir.glob("*.npy"))) == 2


def test_a_changed_corpus_or_max_length_recomputes(tmp_path, cache_dir, tiny_bert):
    models = {"model": str(tiny_bert)}
    first = _evaluate(tmp_path / "first", models, _pairs(tmp_path / "pairs.jsonl"))["model"]
    changed = _evaluate(tmp_path / "corpus", models, _pairs(tmp_path / "changed.jsonl", changed_row=3))["model"]
    assert changed["embeddings"] == {"documents": "computed", "queries": "cache"}
    shorter = _evaluate(tmp_path / "short", models, str(tmp_path / "pairs.jsonl"), eval_max_seq_length=16)["model"]
    assert shorter["embeddings"] == {"documents": "computed", "queries": "computed"}
    assert shorter["max_seq_length"] == 16 and _scores(shorter) != _scores(first)
    again = _evaluate(tmp_path / "again", models, str(tmp_path / "pairs.jsonl"), eval_max_seq_length=16)["model"]
    assert again["embeddings"] == {"documents": "cache", "queries": "cache"} and _scores(again) == _scores(shorter)
    assert len(list(cache_dir.glob("*.npy"))) == 5


def _garbage(cache_dir):
    for npy in cache_dir.glob("*.npy"):
        npy.write_bytes(b"\x00not an array\xff" * 10)


def _foreign_header(cache_dir):
    a, b = sorted(cache_dir.glob("*.json"))
    a_text = a.read_text()
    a.write_text(b.read_text())
    b.write_text(a_text)


def _changed_value(cache_dir):
    for npy in cache_dir.glob("*.npy"):
        data = bytearray(npy.read_bytes())
        data[-3] ^= 0x40  # a float of the last row: the file still loads, its checksum no longer matches
        npy.write_bytes(bytes(data))


def _truncated(cache_dir):
    for npy in cache_dir.glob("*.npy"):
        npy.write_bytes(npy.read_bytes()[:200])


@pytest.mark.parametrize("damage", [_garbage, _foreign_header, _changed_value, _truncated],
                         ids=["garbage", "foreign header", "changed value", "truncated"])
def test_a_damaged_entry_is_recomputed_with_a_warning(tmp_path, cache_dir, tiny_bert, caplog, damage):
    pairs, models = _pairs(tmp_path / "pairs.jsonl"), {"model": str(tiny_bert)}
    first = _evaluate(tmp_path / "first", models, pairs)["model"]
    damage(cache_dir)
    with caplog.at_level("WARNING", logger="src.embedding_cache"):
        again = _evaluate(tmp_path / "again", models, pairs)["model"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "src.embedding_cache"]
    assert len(warnings) == 2 and all("computing these embeddings afresh" in w for w in warnings)
    assert again["embeddings"] == {"documents": "computed", "queries": "computed"}
    assert _scores(again) == _scores(first)
    caplog.clear()
    repaired = _evaluate(tmp_path / "repaired", models, pairs)["model"]  # the damaged entries were overwritten
    assert repaired["embeddings"] == {"documents": "cache", "queries": "cache"} and not caplog.records


def test_no_cache_computes_and_writes_nothing(tmp_path, cache_dir, tiny_bert):
    pairs, models = _pairs(tmp_path / "pairs.jsonl"), {"model": str(tiny_bert)}
    first = _evaluate(tmp_path / "first", models, pairs, no_cache=True)["model"]
    assert first["embeddings"] == {"documents": "computed", "queries": "computed"} and not cache_dir.exists()
    cached = _evaluate(tmp_path / "cached", models, pairs)["model"]
    again = _evaluate(tmp_path / "again", models, pairs, no_cache=True)["model"]
    assert again["embeddings"]["documents"] == "computed" and _scores(again) == _scores(first) == _scores(cached)


def test_the_fingerprint_follows_the_weights_not_the_path(tmp_path, tiny_bert):
    copy = shutil.copytree(tiny_bert, tmp_path / "copy")
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_bert)
    (copy / "README.md").write_text("notes")  # not read by the model
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_bert)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(copy) != weights_fingerprint(tiny_bert)


def test_bf16_autocast_is_a_key_part_and_encodes_as_fp32_does(tmp_path, cache_dir, tiny_bert):
    from src.encoding import encode, load_model

    models, pairs = {"model": str(tiny_bert)}, _pairs(tmp_path / "pairs.jsonl")
    fp32 = _evaluate(tmp_path / "fp32", models, pairs, eval_bf16="no")["model"]
    bf16 = _evaluate(tmp_path / "bf16", models, pairs, eval_bf16="yes")["model"]
    assert (fp32["bf16_autocast"], bf16["bf16_autocast"]) == (False, True)
    assert bf16["embeddings"] == {"documents": "computed", "queries": "computed"}  # not fp32's entries
    model, texts = load_model(str(tiny_bert)), [json.loads(line)["document"] for line in open(pairs)]
    (full, _), (half, _) = (encode(model, texts, None, 16, bf16=b) for b in (False, True))
    assert (full != half).any() and (full * half).sum(axis=1).min() > 0.99  # rounded, not changed


def test_over_its_size_limit_the_cache_drops_the_least_recently_used_entries(tmp_path, cache_dir, tiny_bert,
                                                                            monkeypatch):
    import os

    models = {"model": str(tiny_bert)}
    first = _pairs(tmp_path / "first.jsonl", n=30)
    _evaluate(tmp_path / "a", models, first)
    entry = sum(p.stat().st_size for p in cache_dir.iterdir())  # documents + queries of one evaluation
    for p in cache_dir.iterdir():
        os.utime(p, (1, 1))  # long unused ...
    monkeypatch.setenv("E5KIT_CACHE_MAX_GB", str(1.2 * entry / 1e9))
    assert _evaluate(tmp_path / "b", models, first)["model"]["embeddings"]["documents"] == "cache"  # ... now used
    _evaluate(tmp_path / "c", models, _pairs(tmp_path / "second.jsonl", n=30, changed_row=0))  # a new corpus
    assert sum(p.stat().st_size for p in cache_dir.iterdir()) <= 1.2 * entry
    # when the new corpus's documents were stored, the first corpus's documents were the least recently used
    # entry (run "b" read them before its queries), so they went; the queries stayed
    again = _evaluate(tmp_path / "d", models, first)["model"]["embeddings"]
    assert again == {"documents": "computed", "queries": "cache"}
    for bad in ("lots", "inf", "-1"):
        monkeypatch.setenv("E5KIT_CACHE_MAX_GB", bad)
        with pytest.raises(UsageError, match=f"E5KIT_CACHE_MAX_GB: '{bad}' is not a number of gigabytes"):
            _evaluate(tmp_path / "e", models, first)


def test_stored_documents_take_the_index_rows_and_encode_only_the_others(cache_dir, tiny_xlmr):
    """A query-side run's bank: a document the evaluation's corpus (the index) holds takes its row of the index's
    embeddings, which the evaluation then reads from the cache; only the others are encoded (one entry)."""
    from src.encoding import StoredEncoder
    from src.text import normalized_key

    texts = read_texts(RU_TRAIN, 12)
    index, outside = texts[:8], texts[8:]
    cfg = EvalConfig(eval_batch_size=4)
    stored = StoredEncoder(str(tiny_xlmr), cfg, index)
    respaced = "  " + index[0].replace(" ", "\n\n", 1)  # as the trainer's cleaning may space a document
    bank = stored.documents([outside[0], index[3], outside[1], respaced])
    indexed = stored.index_vectors()
    assert (bank[1] == indexed[normalized_key(index[3])]).all()
    assert (bank[3] == indexed[normalized_key(index[0])]).all()
    stored.close()
    alone = StoredEncoder(str(tiny_xlmr), cfg).documents(outside[:2])  # read back: the entry of the missing two
    assert (bank[[0, 2]] == alone).all() and len(list(cache_dir.glob("*.npy"))) == 2
    assert StoredEncoder(str(tiny_xlmr), EvalConfig(no_cache=True), index).index is None  # no cache: no index
