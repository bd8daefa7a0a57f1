"""TSDAE's input corruption, drawn afresh every epoch and reproducible by seed."""

from __future__ import annotations

import numpy as np

from src.config import NoiseConfig
from src.text import join, tokenize


class WordNoise:
    """TSDAE input corruption: delete each word with probability `deletion_ratio` (at least one word is always
    kept), then optionally swap adjacent words and duplicate words. The random stream is a function of
    (seed, epoch, item index), so noise differs between epochs, repeats exactly for the same seed, and is
    the same after resuming from a checkpoint.

    Reference: Wang, Reimers, Gurevych. TSDAE (Findings of EMNLP 2021), https://arxiv.org/abs/2104.06979
    """

    def __init__(self, cfg: NoiseConfig, seed: int):
        self.cfg, self.seed, self.epoch = cfg, seed, 0

    def __call__(self, text: str, index: int) -> str:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        tokens = tokenize(text)
        if not tokens:
            return text
        keep = rng.random(len(tokens)) >= self.cfg.deletion_ratio
        if not keep.any():
            keep[rng.integers(len(tokens))] = True
        tokens = [t for t, k in zip(tokens, keep) if k]
        if self.cfg.swap_ratio and len(tokens) > 1:
            for i in np.flatnonzero(rng.random(len(tokens) - 1) < self.cfg.swap_ratio):
                tokens[i], tokens[i + 1] = (tokens[i + 1][0], tokens[i][1]), (tokens[i][0], tokens[i + 1][1])
        if self.cfg.insertion_ratio:
            for _ in range(int(rng.binomial(len(tokens), self.cfg.insertion_ratio))):
                word = tokens[rng.integers(len(tokens))][0]
                tokens.insert(int(rng.integers(len(tokens) + 1)), (word, True))
        return join(tokens)


def noisy_dataset(texts: list[str], noise: WordNoise):
    """A `datasets.Dataset` with columns (noisy, text); the noise is applied lazily on every access."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": texts, "index": list(range(len(texts)))})

    def transform(batch):
        return {"noisy": [noise(t, i) for t, i in zip(batch["text"], batch["index"])], "text": batch["text"]}

    dataset.set_transform(transform)
    return dataset
