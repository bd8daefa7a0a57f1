"""Build the development retrieval collections under data/dev/ (documents-only domain adaptation checks).

    python -m scripts.build_dev_collections [--out data/dev] [--collections a,b,c] [--workdir /tmp/dev_debs]

Collections:
- ru_catalog_docs: the descriptions (no titles) of the bundled data/ru_catalog/train.jsonl as training
  documents; its test set is the existing data/ru_catalog/test (not copied).
- ru_gimp_help, en_postgresql_doc, en_python_doc, en_linux_doc: the GIMP manual in Russian, the PostgreSQL 15
  manual, the Python 3.11 documentation and the Linux 6.1 kernel documentation, from Debian 12 packages downloaded
  here with `apt-get download` (needs `apt-get update` once) and unpacked with `dpkg-deb -x`. HTML pages are split
  at their headings (h1-h4): a section's TITLE is the query, its BODY (the title removed) the document.
- en_anarchist_faq: the same from "An Anarchist FAQ" (Debian package anarchism), whose headings are its questions
  ("Why are anarchists against the state?"): the test queries are questions only (titles with a "?").

Rules for the Debian collections (like `holdout_split` of the catalog in scripts.build_sample_data):
- bodies are plain text (markup stripped, whitespace squeezed, one paragraph a line), a leading repeat of the
  title removed, cut to 1,500 characters; titles lose their numbering ("4.2.", "B.4.3", "3 ");
- a title that cannot be a query (under 2 words, generic: GENERIC_TITLES, or occurring more than once in the
  source) makes no item of its own: the section's text (not its heading) joins the enclosing section's body; a page
  without such an enclosing section stays an untitled document (training document and distractor only);
- dropped: bodies under 15 words; in the Russian collection, texts that are mostly not Cyrillic (untranslated
  pages); exact duplicate bodies keep one copy;
- at most 3,000 documents and ~3 MB per collection, 6,000 and ~13 MB for en_linux_doc (`Source.max_docs`,
  `max_bytes`; a seed-0 sample when the source has more);
- test items: 300-500 (a third of the documents, within those bounds) drawn with seed 0 among titled items
  (en_anarchist_faq: its questions) whose body shares under half of its 6-word shingles with every other body
  (`near_duplicates`); the other documents are the training documents. The test corpus holds every document,
  training ones included as distractors.

Writes <out>/<name>/train.jsonl ({"_id", "text"}) and <out>/<name>/test/ (BEIR: corpus.jsonl, queries.jsonl,
qrels/test.tsv), then prints a table of the collections with the source package versions.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from scripts.manual_sections import (
    Item,
    anarchist_faq_items,
    gimp_help_items,
    linux_doc_items,
    postgresql_doc_items,
    python_doc_items,
)
from src.errors import KitError, run_cli
from src.preprocess import clean_text
from src.retrieval_data import RetrievalData, near_duplicates, save_beir
from src.settings import comma_list
from src.tables import read_table, write_table
from src.text import normalized_key, tokenize

ROOT = Path(__file__).resolve().parent.parent

SEED = 0
MAX_CHARS = 1500
MIN_BODY_WORDS, MIN_TITLE_WORDS = 15, 2
MAX_DOCS, MAX_BYTES = 3000, 3_000_000
MIN_TEST, MAX_TEST = 300, 500
GENERIC_TITLES = {normalized_key(t) for t in (
    "Introduction", "Overview", "See also", "See Also", "Notes", "Note", "Example", "Examples", "Description",
    "Synopsis", "Options", "Parameters", "Compatibility", "Summary", "Tips", "Tip", "Warning", "Usage",
    "Activating the Tool", "Activating the Filter", "Activating the Dialog", "Activating the Command",
    "Key modifiers", "Key modifiers (Defaults)", "Return Value", "Return Values", "Arguments", "Outputs",
    "Description of the dialog", "Getting started", "Further reading", "More information",
    "Описание", "Введение", "Обзор", "Примечание", "Примечания", "Пример", "Примеры", "См. также", "Параметры",
    "Подробнее", "Дополнительная информация", "Советы", "Совет")}
_NUMBERING = re.compile(  # "4.2. ", "E.1. ", "Chapter 5. ", "Глава 5. "; "B.4.3 ", "4.72 ", "3 " (not "1772 Floppy")
    r"^(?:(?:Chapter|Appendix|Part|Глава|Приложение|Часть)\s+)?"
    r"(?:(?:[A-Z]|[IVX]+|\d+)(?:\.\d+)*\.|(?:[A-Z]|\d+)(?:\.\d+)+|\d{1,2}(?=\s+[A-Z]))\s+")
_CYRILLIC, _LATIN = re.compile(r"[а-яё]", re.I), re.compile(r"[a-z]", re.I)


@dataclass
class Source:
    language: str
    package: str
    parse: Callable[[Path], list[Item]]  # unpacked package root -> items
    max_docs: int = MAX_DOCS
    max_bytes: int = MAX_BYTES
    questions_only: bool = False  # an FAQ: its other headings ("The Paris Commune") make training documents only


SOURCES = {
    "ru_gimp_help": Source("ru", "gimp-help-ru", gimp_help_items),
    "en_postgresql_doc": Source("en", "postgresql-doc-15", postgresql_doc_items),
    "en_python_doc": Source("en", "python3.11-doc", python_doc_items),
    # the one large collection (6,000 documents), for checks that need more documents than the others have
    "en_linux_doc": Source("en", "linux-doc-6.1", linux_doc_items, max_docs=6000, max_bytes=13_000_000),
    "en_anarchist_faq": Source("en", "anarchism", anarchist_faq_items, questions_only=True),
}
CATALOG = "ru_catalog_docs"


# --------------------------------------------------------------------------------------------------------
# Packages


def fetch_package(package: str, workdir: Path) -> tuple[Path, str]:
    """`apt-get download` the package into workdir, unpack it; -> (unpacked root, exact version)."""
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise KitError("apt-get not found: this script needs a Debian 12 system (or container)") from exc
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise KitError(f"apt-get download {package} failed ({message}); run `apt-get update` first")
    deb = max(debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    root = workdir / "unpacked" / deb.stem
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root, version


# --------------------------------------------------------------------------------------------------------
# Items -> documents -> collection


def mostly_cyrillic(text: str) -> bool:
    cyrillic, latin = len(_CYRILLIC.findall(text)), len(_LATIN.findall(text))
    return cyrillic > 0 and cyrillic >= latin


def words(text: str) -> list[str]:
    """The kit's word tokens of `text` (`src.text.tokenize`), its punctuation tokens left out."""
    return [token for token, _ in tokenize(text) if token[0].isalnum() or token[0] == "_"]


def n_words(text: str) -> int:
    return len(words(text))


def strip_title(title: str, body: str) -> str:
    """`body` without a leading repeat of `title` (case, punctuation and spacing aside)."""
    title_words = words(title)
    pattern = r"\W*" + r"\W+".join(map(re.escape, title_words)) + r"(?!\w)[\s.:;,—–()-]*"
    match = re.match(pattern, body, re.I) if title_words else None
    return body[match.end():] if match else body


def clean_title(title: str) -> str:
    return _NUMBERING.sub("", clean_text(title)).strip(" .:")


def clean_body(title: str, paragraphs: list[str]) -> str:
    """Plain text, a paragraph a line, without a leading repeat of the title, cut to MAX_CHARS."""
    body = strip_title(title, "\n".join(p for p in map(clean_text, paragraphs) if p))
    if len(body) > MAX_CHARS:
        body = body[:MAX_CHARS].rsplit(" ", 1)[0]
    return body


def title_problems(titles: list[str]) -> dict[str, np.ndarray]:
    """Masks of the titles that cannot be a query: too short, generic, or not unique in the source."""
    keys = pd.Series([normalized_key(t) for t in titles])
    return {"short_title": np.array([n_words(t) < MIN_TITLE_WORDS for t in titles]),
            "generic_title": keys.isin(GENERIC_TITLES).to_numpy(),
            "repeated_title": keys.duplicated(keep=False).to_numpy()}


def fold_sections(items: list[Item], good: np.ndarray) -> list[Item]:
    """A section whose title cannot be a query is no item of its own: its text (not its heading) is appended to
    the closest enclosing section (same page, lower heading level) that is one. Without one (a page titled "Crop")
    it stays a document without a title: a training document and distractor, never a test item."""
    kept: dict[int, Item] = {}
    open_sections: list[tuple[str, int, int]] = []  # (page, level, item index) enclosing the current item
    for i, item in enumerate(items):
        while open_sections and (open_sections[-1][0] != item.page or open_sections[-1][1] >= item.level):
            open_sections.pop()
        if good[i]:
            kept[i] = Item(item.page, item.level, item.title, list(item.paragraphs))
        else:
            parent = next((j for _, _, j in reversed(open_sections) if j in kept), None)
            if parent is not None:
                kept[parent].paragraphs += item.paragraphs
            else:
                kept[i] = Item(item.page, item.level, "", list(item.paragraphs))
        open_sections.append((item.page, item.level, i))
    return list(kept.values())


def select_items(items: list[Item], language: str) -> tuple[pd.DataFrame, dict]:
    """Items -> frame (title, body) of the kept items, and the counts of what was folded or dropped."""
    titles = [clean_title(i.title) for i in items]
    problems = title_problems(titles)
    good = ~np.logical_or.reduce(list(problems.values()))
    counts = {"sections": len(items), **{k: int(v.sum()) for k, v in problems.items()}}
    for item, title in zip(items, titles):
        item.title = title
    folded = fold_sections(items, good)
    frame = pd.DataFrame({"title": [i.title for i in folded],
                          "body": [clean_body(i.title, i.paragraphs) for i in folded]})
    drops = {"short_body": frame["body"].map(n_words) < MIN_BODY_WORDS}
    if language == "ru":
        title_ok = frame["title"].map(lambda t: not t or mostly_cyrillic(t))
        drops["not_russian"] = ~(title_ok & frame["body"].map(mostly_cyrillic))
    drops["duplicate_body"] = frame["body"].map(normalized_key).duplicated()
    dropped = np.zeros(len(frame), dtype=bool)
    for reason, mask in drops.items():
        counts[reason] = int((mask.to_numpy() & ~dropped).sum())
        dropped |= mask.to_numpy()
    counts["kept"] = int((~dropped).sum())
    counts["untitled"] = int(((frame["title"] == "") & ~dropped).sum())
    return frame[~dropped].reset_index(drop=True), counts


def cap(frame: pd.DataFrame, max_docs: int, max_bytes: int) -> pd.DataFrame:
    """At most max_docs documents and ~max_bytes on disk (each body is written twice: train and corpus)."""
    order = np.random.default_rng(SEED).permutation(len(frame))
    size = np.cumsum([2 * len(frame["body"][i].encode()) + 60 for i in order])
    keep = order[: min(max_docs, int(np.searchsorted(size, max_bytes, side="right")))]
    return frame.iloc[np.sort(keep)].reset_index(drop=True)


def split(frame: pd.DataFrame, questions_only: bool) -> tuple[list[dict], RetrievalData]:
    """Hold out test items among the titled items (questions only, if asked) whose body is unlike every other
    body; -> training documents, test data."""
    queries_ok = frame["title"].str.contains("?", regex=False) if questions_only else frame["title"] != ""
    eligible = np.flatnonzero(~near_duplicates(frame["body"].map(normalized_key).tolist()) & queries_ok)
    n_test = min(MAX_TEST, max(MIN_TEST, len(frame) // 3), len(eligible))
    is_test = np.zeros(len(frame), dtype=bool)
    is_test[np.random.default_rng(SEED).choice(eligible, n_test, replace=False)] = True
    corpus = {f"d{i}": body for i, body in enumerate(frame["body"])}
    queries = {f"q{i}": frame["title"][i] for i in np.flatnonzero(is_test)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in np.flatnonzero(is_test)}
    train = [{"_id": f"d{i}", "text": frame["body"][i]} for i in np.flatnonzero(~is_test)]
    return train, RetrievalData(queries, corpus, qrels, source="dev").validate()


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows])


def mean_words(texts) -> float:
    """Mean whitespace-separated words per text, for the table."""
    return round(float(np.mean([len(t.split()) for t in texts])), 1) if len(texts) else 0.0


def build_debian(name: str, source: Source, out: Path, workdir: Path) -> dict:
    root, version = fetch_package(source.package, workdir)
    frame, counts = select_items(source.parse(root), source.language)
    frame = cap(frame, source.max_docs, source.max_bytes)
    train, test = split(frame, source.questions_only)
    write_table(pd.DataFrame(train), out / name / "train.jsonl")
    save_beir(test, out / name / "test")
    print(f"{name}: {counts['sections']} sections; titles short {counts['short_title']}, generic "
          f"{counts['generic_title']}, repeated {counts['repeated_title']} (folded into the enclosing section); "
          f"dropped: short body {counts['short_body']}, not Russian {counts.get('not_russian', 0)}, duplicate "
          f"{counts['duplicate_body']}; kept {counts['kept']} ({counts['untitled']} untitled), {len(frame)} after "
          f"the cap", file=sys.stderr)
    return {"collection": name, "lang": source.language, "source": f"{source.package} {version}",
            "documents": len(test.corpus), "train_docs": len(train), "test_queries": len(test.queries),
            "words_per_doc": mean_words(list(test.corpus.values())),
            "words_per_query": mean_words(list(test.queries.values()))}


def build_catalog(out: Path) -> dict:
    """Descriptions only (no titles) of the bundled Russian catalog's training items; test: data/ru_catalog/test."""
    frame = read_table(ROOT / "data/ru_catalog/train.jsonl")
    train = pd.DataFrame({"_id": [f"t{i}" for i in range(len(frame))], "text": frame["description"].map(clean_text)})
    write_table(train, out / CATALOG / "train.jsonl")
    queries = read_table(ROOT / "data/ru_catalog/test/queries.jsonl")["text"]
    corpus = read_table(ROOT / "data/ru_catalog/test/corpus.jsonl")["text"]
    return {"collection": CATALOG, "lang": "ru", "source": "data/ru_catalog (bundled)", "documents": len(corpus),
            "train_docs": len(train), "test_queries": len(queries), "words_per_doc": mean_words(corpus.tolist()),
            "words_per_query": mean_words(queries.tolist())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "data" / "dev"))
    parser.add_argument("--collections", default=",".join([CATALOG, *SOURCES]))
    parser.add_argument("--workdir", default="", help="where .deb files are downloaded and unpacked (default: a "
                        "temporary folder, removed afterwards)")
    args = parser.parse_args(argv)
    names = comma_list(args.collections)
    unknown = [n for n in names if n != CATALOG and n not in SOURCES]
    if unknown:
        raise KitError(f"unknown collection(s) {', '.join(unknown)}; choose from {CATALOG}, {', '.join(SOURCES)}")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="dev_collections_") as tmp:
        workdir = Path(args.workdir or tmp)
        rows = [build_catalog(out) if n == CATALOG else build_debian(n, SOURCES[n], out, workdir) for n in names]
    print(markdown_table(rows))


if __name__ == "__main__":
    run_cli(main)
