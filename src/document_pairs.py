"""(query, positive) pairs made from documents alone: retrieval training and model selection without labels.

    ict    inverse cloze task: one sentence of a document (a short word span when it has one sentence) is the
           query; the document without it is the positive, or with it 10% of the time, so the model learns
           both topical and lexical matching (Lee, Chang, Toutanova, "Latent Retrieval for Weakly Supervised
           Open Domain Question Answering", ACL 2019, https://arxiv.org/abs/1906.00300).
    crop   independent cropping: two random spans of 10-50% of a document's words; the shorter one is the
           query (Izacard et al., "Unsupervised Dense Information Retrieval with Contrastive Learning", TMLR 2022,
           https://arxiv.org/abs/2112.09118).
    lead   the leading line (a heading) -> the rest; without lines, the first sentence -> the rest. The closest
           a document comes to its own title; the same pair every epoch.
    keys   a title-length query of the document's most distinctive words (highest tf-idf over the training
           documents, 2-5 of them, in the order they first occur) -> the whole document: what short title and
           term queries share with the document they name.

Like the TSDAE noise, the random stream is a function of (seed, epoch, document index): pairs are redrawn
every epoch, repeat exactly for the same seed, and survive a resume.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from src.config import DOCUMENT_CONSTRUCTIONS
from src.text import SENTENCE_END, join, tokenize

ICT_KEEP = 0.1  # Lee et al.: the query sentence stays in its document 10% of the time
CROP_RATIO = (0.1, 0.5)  # Izacard et al.: each span covers 10-50% of the document
SPAN_WORDS = (4, 16)  # query length when a document has a single sentence: about a title's
MAX_QUERY_WORDS = 32  # longer sentences are cut to a random window of this many words
KEY_WORDS = (2, 5)  # keys: words per query, about a title's


def key_words(text: str) -> list[str]:
    """The words that can be key terms: with a letter, three characters or more."""
    return [w for w, _ in tokenize(text) if len(w) >= 3 and any(c.isalpha() for c in w)]


def inverse_document_frequency(texts: list[str]) -> dict[str, float]:
    """log(N / df) of every casefolded key word of `texts`."""
    df = Counter(w for t in texts for w in {w.casefold() for w in key_words(t)})
    return {w: math.log(len(texts) / n) for w, n in df.items()}


def sentences(text: str) -> list[str]:
    """Sentences within lines: a line break always ends a sentence."""
    return [s.strip() for line in text.split("\n") for s in SENTENCE_END.split(line) if s.strip()]


def _clip(tokens: list, rng: np.random.Generator, limit: int = MAX_QUERY_WORDS) -> list:
    start = int(rng.integers(len(tokens) - limit + 1)) if len(tokens) > limit else 0
    return tokens[start : start + limit]


def _span_start(tokens: list, length: int, rng: np.random.Generator) -> int:
    """Where a random span of `length` tokens starts."""
    return int(rng.integers(len(tokens) - length + 1))


class DocumentPairs:
    """A document -> (query, positive) by one construction, drawn from the stream (seed, epoch, index).

    Args:
        kind: `ict`, `crop`, `lead` or `keys` (see the module docstring).
        seed: the run's seed; `epoch` is set by the trainer at each epoch's start.
        corpus: the training documents, whose word frequencies `keys` ranks by (ignored by the others).

    A document needs two words for the sides to differ; a one-word document gives (word, word).
    """

    def __init__(self, kind: str, seed: int, corpus: list[str] | None = None):
        if kind not in DOCUMENT_CONSTRUCTIONS:
            raise ValueError(f"unknown construction '{kind}' (use {', '.join(DOCUMENT_CONSTRUCTIONS)})")
        self.kind, self.seed, self.epoch = kind, seed, 0
        # keys: without a corpus every word is equally rare, and term frequency alone decides
        self.idf = inverse_document_frequency(corpus) if kind == "keys" and corpus else {}
        self.rarest = max(self.idf.values(), default=1.0)  # a word no training document has is as rare as any

    def __call__(self, text: str, index: int) -> tuple[str, str]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return getattr(self, self.kind)(text, rng)

    def ict(self, text: str, rng: np.random.Generator) -> tuple[str, str]:
        parts = sentences(text)
        if len(parts) < 2:
            return self._span_query(text, rng)
        i = int(rng.integers(len(parts)))
        rest = parts if rng.random() < ICT_KEEP else parts[:i] + parts[i + 1 :]
        return join(_clip(tokenize(parts[i]), rng)), " ".join(rest)

    def crop(self, text: str, rng: np.random.Generator) -> tuple[str, str]:
        tokens = tokenize(text)
        if len(tokens) < 2:
            return text, text
        spans = []
        for _ in range(2):
            length = max(1, int(round(rng.uniform(*CROP_RATIO) * len(tokens))))
            start = _span_start(tokens, length, rng)
            spans.append(tokens[start : start + length])
        short, long = sorted(spans, key=len)
        query, positive = join(_clip(short, rng)), join(long)
        return (query, text) if query == positive else (query, positive)

    def lead(self, text: str, rng: np.random.Generator) -> tuple[str, str]:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if len(lines) >= 2 and len(tokenize(lines[0])) <= MAX_QUERY_WORDS:
            return lines[0], "\n".join(lines[1:])
        parts = sentences(text)
        if len(parts) >= 2:
            return join(tokenize(parts[0])[:MAX_QUERY_WORDS]), " ".join(parts[1:])
        tokens = tokenize(text)
        length = min(SPAN_WORDS[1], len(tokens) // 2)
        return (join(tokens[:length]), join(tokens[length:])) if length else (text, text)

    def keys(self, text: str, rng: np.random.Generator) -> tuple[str, str]:
        words = key_words(text)
        counts = Counter(w.casefold() for w in words)
        if len(counts) < 2:
            return self._span_query(text, rng)
        ranked = sorted(counts, key=lambda w: (-counts[w] * self.idf.get(w, self.rarest), w))
        chosen = set(ranked[: int(rng.integers(KEY_WORDS[0], KEY_WORDS[1] + 1))])
        query = []
        for word in words:  # in the document's order, each once, as it is first written
            if word.casefold() in chosen:
                chosen.remove(word.casefold())
                query.append(word)
        return " ".join(query), text

    @staticmethod
    def _span_query(text: str, rng: np.random.Generator) -> tuple[str, str]:
        """One-sentence documents: a title-length word span is the query, the words around it the positive."""
        tokens = tokenize(text)
        if len(tokens) < 2:
            return text, text
        length = min(int(rng.integers(SPAN_WORDS[0], SPAN_WORDS[1] + 1)), len(tokens) // 2)
        start = _span_start(tokens, length, rng)
        return join(tokens[start : start + length]), join(tokens[:start] + tokens[start + length :])


def document_pairs_dataset(texts: list[str], pairs: DocumentPairs, indices=None):
    """A `datasets.Dataset` with columns (anchor, positive), drawn lazily on every access (fresh each epoch), of
    the documents at `indices` (all by default), each drawn from its own stream (its index in `texts`)."""
    from datasets import Dataset

    indices = list(range(len(texts)) if indices is None else indices)
    dataset = Dataset.from_dict({"text": [texts[i] for i in indices], "index": indices})

    def transform(batch):
        drawn = [pairs(t, i) for t, i in zip(batch["text"], batch["index"])]
        return {"anchor": [q for q, _ in drawn], "positive": [p for _, p in drawn]}

    dataset.set_transform(transform)
    return dataset
