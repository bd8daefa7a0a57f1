"""Build the bundled sample data under data/ from the Debian catalog text in ../shared/data/.

    python -m scripts.build_sample_data [--shared ../shared/data]

For each language: training items (title, description, and text = "title. description") and a BEIR-style test folder
(query = a held-out item's title, relevant document = its description, every distinct description of the
catalog as the collection). Deterministic (seed 0).
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from src.preprocess import clean_text
from src.retrieval_data import RetrievalData, near_duplicates, save_beir
from src.tables import read_table, write_table
from src.text import normalized_key

ROOT = Path(__file__).resolve().parent.parent

# language -> (source file, items used, test items)
CATALOGS = {"ru": ("debian_packages_ru.jsonl", None, 600), "en": ("debian_packages_en.jsonl", 4000, 600)}


def holdout_split(frame: pd.DataFrame, query_field: str, document_field: str, test_items: int, seed: int
                  ) -> tuple[pd.DataFrame, RetrievalData]:
    """Split catalog items into training items (columns query_field, document_field and `text` =
    "query. document") and held-out test data, by item: no test item's query or document text appears in
    the training items. The test collection holds every distinct document (the
    training items' ones act as distractors); a test item is only chosen when its document is unlike every
    other item's (see `near_duplicates`) and its query is unique, since such a pair has one right answer.
    """
    frame = frame.assign(**{c: frame[c].map(clean_text) for c in (query_field, document_field)})
    frame = frame[(frame[query_field] != "") & (frame[document_field] != "")].reset_index(drop=True)
    doc_key = frame[document_field].map(normalized_key)
    unique = ~near_duplicates(doc_key.tolist()) & ~frame[query_field].map(normalized_key).duplicated(keep=False)
    candidates = np.flatnonzero(unique.to_numpy())
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(frame), dtype=bool)
    is_test[rng.choice(candidates, min(test_items, len(candidates)), replace=False)] = True
    train = frame.loc[~is_test, [query_field, document_field]].reset_index(drop=True)
    train["text"] = train[query_field] + ". " + train[document_field]
    keep_doc = ~doc_key.duplicated()  # one copy of each distinct document
    corpus = {f"d{i}": frame[document_field][i] for i in np.flatnonzero(keep_doc.to_numpy())}
    queries = {f"q{i}": frame[query_field][i] for i in np.flatnonzero(is_test)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in np.flatnonzero(is_test)}
    return train, RetrievalData(queries, corpus, qrels, source="holdout").validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    for lang, (file, n_items, n_test) in CATALOGS.items():
        frame = read_table(Path(args.shared) / file)
        if n_items:
            frame = frame.sample(n=n_items, random_state=0).sort_index()
        train, test = holdout_split(frame, "title", "description", n_test, seed=0)
        out = ROOT / "data" / f"{lang}_catalog"
        write_table(train, out / "train.jsonl")
        save_beir(test, out / "test")
        print(f"{lang}: {len(train)} training texts, {len(test.queries)} test queries, "
              f"{len(test.corpus)} documents -> {out}")


if __name__ == "__main__":
    main()
