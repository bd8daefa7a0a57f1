"""Words and sentences: the kit's tokenizer, which needs no nltk data, and the keys used to find duplicates."""

from __future__ import annotations

import re

# A word is letters/digits joined by inner hyphens, dots, commas, slashes or apostrophes ("SM-A536",
# "3.5", "1,5", "Wi-Fi", "don't"); any other non-space character is a token of its own. Unicode \w covers
# Cyrillic. Every token remembers whether a space preceded it, so detokenization is exact (see `join`).
_TOKEN = re.compile(r"\w+(?:[-.,/'’]\w+)*|[^\w\s]")
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+(?=[\"«(\[]?[A-ZА-ЯЁ0-9])")


def tokenize(text: str) -> list[tuple[str, bool]]:
    """Words and punctuation of `text`, each with 'a space preceded it'."""
    return [(m.group(), m.start() > 0 and text[m.start() - 1].isspace()) for m in _TOKEN.finditer(text)]


def join(tokens: list[tuple[str, bool]]) -> str:
    """Inverse of `tokenize`: `join(tokenize(t)) == t` for whitespace-normalized t. Two words that noise made
    neighbours are always separated (the tokenizer never yields two adjacent words without a space)."""
    out = []
    for i, (tok, space) in enumerate(tokens):
        glued_words = i and tok[0].isalnum() and tokens[i - 1][0][-1].isalnum()
        out.append((" " if i and (space or glued_words) else "") + tok)
    return "".join(out)


def count_words(text: str) -> int:
    return len(_TOKEN.findall(text))


def normalized_key(text: str) -> str:
    return re.sub(r"\W+", " ", text.casefold()).strip()


SHINGLE_WORDS = 6  # a text sharing half of its 6-word shingles with another one is a near-duplicate of it
NEAR_DUPLICATE = 0.5


def shingles(text: str) -> set[tuple[str, ...]]:
    """The text's runs of SHINGLE_WORDS words (one shorter run for a shorter text), split on whitespace."""
    w = text.split()
    return {tuple(w[i : i + SHINGLE_WORDS]) for i in range(max(1, len(w) - SHINGLE_WORDS + 1))}


def near_duplicate(a: str, b: str) -> bool:
    """True when the normalized texts are equal, or either shares at least NEAR_DUPLICATE of its shingles with the
    other (shared boilerplate paragraphs, one description contained in another)."""
    a, b = normalized_key(a), normalized_key(b)
    sa, sb = shingles(a), shingles(b)
    return a == b or len(sa & sb) >= NEAR_DUPLICATE * min(len(sa), len(sb))
