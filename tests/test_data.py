"""Corpus loading, bad input, TSDAE noise, preprocessing and the bundled held-out split."""

import json

import pandas as pd
import pytest
from conftest import EN_TRAIN, ROOT, RU_TRAIN, read_texts

from src.config import DataConfig, NoiseConfig, PreprocessConfig
from src.create_dataset import clean_corpus, load_training_data
from src.errors import KitError
from src.noise import WordNoise, noisy_dataset
from src.preprocess import clean_text, records_to_texts
from src.tables import read_table
from src.text import count_words, join, tokenize

TEXTS = ["Смартфон Samsung Galaxy A53 SM-A536, 128 ГБ, черный цвет корпуса",
         "Real-time strategy game of ancient warfare with 3D graphics",
         "Утилита ping, определяющая сторону, виновную в потерях пакетов"]


def write(path, frame: pd.DataFrame):
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".json":
        path.write_text(json.dumps(frame.to_dict("records"), ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("\n".join(frame["body"]), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl", ".json", ".txt"])
def test_every_format_loads_the_same_texts(tmp_path, suffix):
    frame = pd.DataFrame({"body": TEXTS * 10, "id": range(30)})
    path = write(tmp_path / f"corpus{suffix}", frame)
    data = load_training_data(DataConfig(train_file=str(path), text_column="body", validation_fraction=0.0), seed=1)
    assert sorted(data.texts) == sorted(TEXTS)  # duplicates removed
    assert data.dev_texts == [] and data.pairs == []


def test_split_is_deterministic_by_seed(tmp_path):
    path = write(tmp_path / "c.jsonl", pd.DataFrame({"text": read_texts(RU_TRAIN, 200)}))
    cfg = DataConfig(train_file=str(path), validation_fraction=0.1)
    a, b, c = load_training_data(cfg, 3), load_training_data(cfg, 3), load_training_data(cfg, 4)
    assert a == b and a != c
    assert 37 <= len(a.dev_texts) <= 40  # a fifth of the 200 rows (the development minimum); a few repeat
    assert not set(a.texts) & set(a.dev_texts)


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, "does not exist"),
    ("empty.jsonl", b"", "is empty"),
    ("latin1.csv", "text\nCaf\xe9 au lait, tr\xe8s bon\n".encode("latin-1"), "not UTF-8"),
    ("corpus.xlsx", b"PK\x03\x04", "unsupported file type"),
    ("broken.jsonl", b'{"text": "a b c d"}\n{"text": "broken\n', "line 2 is not valid JSON"),
    ("truncated.parquet", None, "cannot read parquet"),
    ("other.jsonl", b'{"body": "a b c d"}\n', "missing column 'text'"),
    ("blank.jsonl", b'{"text": ""}\n{"text": "  "}\n', "filtered away"),
])
def test_bad_input_gives_one_line_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if name == "truncated.parquet":
        pd.DataFrame({"text": TEXTS}).to_parquet(path)
        path.write_bytes(path.read_bytes()[:-40])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(KitError) as err:
        load_training_data(DataConfig(train_file=str(path)), seed=0)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_huge_texts_are_truncated_not_fatal():
    texts, counts = clean_corpus(["слово " * 500_000], DataConfig(max_chars=1000))
    assert counts["truncated"] == 1 and len(texts[0]) <= 1000


def test_sentence_and_window_splitting():
    text = "Первое предложение здесь. Второе предложение тоже! Third sentence in English? 42 is fine."
    sentences, _ = clean_corpus([text], DataConfig(split_mode="sentences", min_words=1))
    assert len(sentences) == 4 and sentences[1] == "Второе предложение тоже!"
    windows, _ = clean_corpus([" ".join(f"w{i}" for i in range(100))], DataConfig(split_mode="windows",
                                                                                  window_words=30))
    assert [count_words(w) for w in windows] == [30, 30, 30, 10]


@pytest.mark.parametrize("text", TEXTS + ["Цена: 1 299,90 ₽ (скидка 15%) — «Хит»", "don't split e-mail/Wi-Fi 3.5mm"])
def test_tokenize_join_round_trip_keeps_cyrillic_numbers_and_model_codes(text):
    tokens = tokenize(text)
    assert join(tokens) == text
    words = [t for t, _ in tokens]
    if "SM-A536" in text:
        assert "SM-A536" in words and "128" in words and "ГБ" in words


@pytest.mark.parametrize("corpus", [RU_TRAIN, EN_TRAIN])
def test_measured_deletion_rate_matches_setting(corpus):
    texts = read_texts(corpus, 400)
    for ratio in (0.6, 0.3):
        noise = WordNoise(NoiseConfig(deletion_ratio=ratio), seed=0)
        before = sum(len(tokenize(t)) for t in texts)
        after = sum(len(tokenize(noise(t, i))) for i, t in enumerate(texts))
        assert abs((1 - after / before) - ratio) < 0.03


def test_noise_keeps_a_word_differs_by_epoch_and_repeats_by_seed():
    noise = WordNoise(NoiseConfig(deletion_ratio=0.99), seed=5)
    assert all(noise("один два", i) for i in range(50))  # at least one word is always kept
    noise = WordNoise(NoiseConfig(), seed=5)
    epoch0 = [noise(t, i) for i, t in enumerate(TEXTS)]
    noise.epoch = 1
    epoch1 = [noise(t, i) for i, t in enumerate(TEXTS)]
    assert epoch0 != epoch1
    noise.epoch = 0
    assert [noise(t, i) for i, t in enumerate(TEXTS)] == epoch0
    assert [WordNoise(NoiseConfig(), seed=6)(t, i) for i, t in enumerate(TEXTS)] != epoch0


def test_dataset_applies_noise_lazily_per_access():
    noise = WordNoise(NoiseConfig(), seed=0)
    dataset = noisy_dataset(TEXTS, noise)
    first = dataset[:]["noisy"]
    noise.epoch = 1
    assert dataset[:]["text"] == TEXTS and dataset[:]["noisy"] != first
    for noisy, text in zip(first, TEXTS):
        assert count_words(noisy) < count_words(text)
        assert {w for w, _ in tokenize(noisy)} <= {w for w, _ in tokenize(text)}


def test_optional_swap_and_insertion_noise():
    cfg = NoiseConfig(deletion_ratio=0.0, swap_ratio=0.5, insertion_ratio=0.3)
    out = WordNoise(cfg, seed=0)(TEXTS[1], 0)
    assert out != TEXTS[1] and count_words(out) > count_words(TEXTS[1])
    assert sorted(set(out.split())) == sorted(set(TEXTS[1].split()))


def test_preprocess_template_attributes_html_and_counts():
    frame = pd.DataFrame({
        "name": ["Смартфон Samsung A53", "Чехол", "Смартфон Samsung A53", "Наушники"],
        "attrs": ['{"Цвет": "черный", "Память": "128 ГБ"}', "", '{"Цвет": "черный", "Память": "128 ГБ"}',
                  "{'Тип': 'вкладыши'}"],
        "description": ["<p>Хороший&nbsp;телефон</p><br>SM-A536", "", "<p>Хороший&nbsp;телефон</p><br>SM-A536", ""],
    })
    cfg = PreprocessConfig(input_file="x", output_file="y", title_field="name", attributes_field="attrs", min_chars=8)
    texts, counts = records_to_texts(frame, cfg)
    assert texts["text"].tolist() == ["Смартфон Samsung A53. Цвет: черный; Память: 128 ГБ. Хороший телефон SM-A536",
                                      "Наушники. Тип: вкладыши"]
    assert counts == {"records": 4, "dropped_empty": 0, "dropped_too_short": 1, "dropped_duplicates": 1, "kept": 2}
    assert clean_text("a&amp;b <b>bold</b>\n\t x") == "a&b bold x"


def test_preprocess_bad_attributes_and_missing_column():
    cfg = PreprocessConfig(input_file="x", output_file="y", title_field="name", attributes_field="attrs")
    with pytest.raises(KitError, match="row 1, field 'attrs'"):
        records_to_texts(pd.DataFrame({"name": ["a"], "attrs": ["not a mapping"], "description": [""]}), cfg)
    with pytest.raises(KitError, match="missing column 'name'"):
        records_to_texts(pd.DataFrame({"title": ["a"]}), cfg, source="raw.csv")


@pytest.mark.parametrize("lang", ["ru", "en"])
def test_bundled_test_items_are_held_out_of_training(lang):
    folder = ROOT / "data" / f"{lang}_catalog"
    train = "\n".join(read_table(folder / "train.jsonl")["text"])
    queries = read_table(folder / "test" / "queries.jsonl")
    corpus = read_table(folder / "test" / "corpus.jsonl").set_index("_id")["text"]
    qrels = pd.read_csv(folder / "test" / "qrels" / "test.tsv", sep="\t")
    assert len(queries) == 600 and len(qrels) == 600
    for doc_id in qrels["corpus-id"]:
        assert corpus[doc_id] not in train
    assert corpus.duplicated().sum() == 0
