"""Encoding a list of texts into the normalized embeddings a FAISS index stores, as the evaluation and the
query-side training (src/query_side.py) both need it: one loader, one encoder, one cache (src/embedding_cache.py).

The documents' embeddings of the base model are what a user's index already holds; `StoredEncoder` computes them
exactly as the evaluation does (same length, same bf16 setting, same cache entries), so that a query-side run
trains against the very vectors it will be searched against.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time

import numpy as np

from src.config import EvalConfig
from src.embedding_cache import EmbeddingCache
from src.errors import KitError, first_line
from src.model_builder import bf16_enabled
from src.openvino_module import MODULE_FILE
from src.text import normalized_key

logger = logging.getLogger(__name__)


def encoding_devices() -> list[str] | None:
    """Every GPU when there are several (sentence-transformers then encodes with one process per GPU); else None:
    the model's own device (on CPU, with the threads torch is given)."""
    import torch

    count = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(count)] if count > 1 else None


def encoding_bf16(model, setting: str) -> bool:
    """Whether to encode under bf16 autocast: as training decides (`setting` auto: where bf16 is native), and
    never across several GPUs, whose worker processes this process's autocast does not reach."""
    return bf16_enabled(model.device.type, setting) and encoding_devices() is None


def encode(model, texts: list[str], prompt_name: str | None, batch_size: int, cache: EmbeddingCache | None = None,
           bf16: bool = False, task: str | None = None) -> tuple[np.ndarray, float | None]:
    """Normalized float32 embeddings (sentence-transformers sorts by length and batches) and texts/second: read
    from `cache` where it holds them (the speed is then None), else computed (and stored there). `task`
    ("query"/"document") picks the route of an asymmetric model (a query-side run's merged/); others ignore it."""
    import torch

    if cache is not None and (emb := cache.load(texts, prompt_name)) is not None:
        return emb, None
    started = time.perf_counter()
    with torch.autocast(model.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        emb = model.encode(texts, prompt_name=prompt_name, batch_size=batch_size, show_progress_bar=True,
                           convert_to_numpy=True, normalize_embeddings=True, device=encoding_devices(), task=task)
    emb = emb.astype(np.float32, copy=False)
    rate = len(texts) / max(time.perf_counter() - started, 1e-9)
    if cache is not None:
        cache.store(texts, prompt_name, emb)
    return emb, rate


def document_vector_modules(model) -> list:
    """The modules of an asymmetric model's document route that act on the embedding alone, after the route's first
    normalization: a `--adapt queries+map` run's document map. None for any other model."""
    from sentence_transformers.base.modules import Normalize, Router

    if not isinstance(model[0], Router):
        return []
    route = list(model[0].sub_modules["document"])
    ends = [i for i, module in enumerate(route) if isinstance(module, Normalize)]
    return route[ends[0] + 1 :] if ends else []


def rewrite_stored(model, vectors: np.ndarray) -> np.ndarray:
    """The base model's stored document vectors as `model` encodes the same documents (a query-side run's merged/):
    through its document map, where it has one, else unchanged. This is how to update an index without encoding
    any document text again."""
    import torch

    modules = document_vector_modules(model)
    if not modules:
        return vectors
    stored = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    features = {"sentence_embedding": stored.to(model.device)}
    with torch.no_grad():
        for module in modules:
            features = module(features)
    return features["sentence_embedding"].float().cpu().numpy()


def prompt_names(model) -> tuple[str | None, str | None]:
    prompts = model.prompts or {}
    return ("query" if "query" in prompts else None), ("passage" if "passage" in prompts else None)


def load_model(name_or_path: str, device: str | None = None):
    """A model for encoding, on the GPU when there is one (`device` None), with e5's document prompt."""
    from sentence_transformers import SentenceTransformer

    from src.provision import e5_document_prompt, resolve_model

    path = resolve_model(name_or_path)
    exported = (path / MODULE_FILE).is_file()  # the kit's own export (src/export.py): its module's code is in it
    try:
        return e5_document_prompt(SentenceTransformer(str(path), device="cpu" if exported else device,
                                                      trust_remote_code=exported))
    except (OSError, ValueError) as exc:
        raise KitError(f"model {path}: cannot load as a sentence-transformers model "
                       f"({first_line(exc)})") from exc


def open_encoder(path: str, cfg: EvalConfig, cached: bool) -> tuple[object, EmbeddingCache | None, bool]:
    """A model configured as every compared model is (--eval_max_seq_length), its cache (None when `cached` is
    false or --no_cache) and whether it encodes under bf16 autocast (as its cache key says)."""
    from src.provision import resolve_model

    folder = resolve_model(path)
    model = load_model(str(folder))
    if cfg.eval_max_seq_length:
        model.max_seq_length = cfg.eval_max_seq_length
    bf16 = encoding_bf16(model, cfg.eval_bf16)
    cache = EmbeddingCache(model, folder, cfg.eval_batch_size, bf16) if cached and not cfg.no_cache else None
    return model, cache, bf16


class StoredEncoder:
    """The base model's document embeddings, as the user's index stores them and the evaluation computes them
    (through the kit's cache): the fixed side of a query-side run. The model loads on first use; `close` frees it
    before training starts.

    Args:
        base: the base model's name or folder.
        cfg: the evaluation settings (batch size, length, bf16, cache) every stored embedding is computed with.
        index: the evaluation's corpus, in its order, or None. Its base embeddings are computed first, exactly as
            the evaluation will compute (and then read from the cache) them, and a document it holds takes its row
            from them: a training document that is also in the index is encoded once, not twice, and has the vector
            the index holds (found by its normalized key: the trainer's cleaning changes spaces and line breaks).
            Only with the cache on (without it the evaluation would encode the index again).
    """

    def __init__(self, base: str, cfg: EvalConfig, index: list[str] | None = None):
        self.base, self.cfg = base, cfg
        self.index = index if not cfg.no_cache else None
        self.model = self.cache = self.indexed = None
        self.bf16 = False

    def documents(self, texts: list[str]) -> np.ndarray:
        """Normalized float32 embeddings of `texts` as documents (e5's `passage: ` prompt): the index's row where
        it holds the text, the others encoded (one cache entry for them)."""
        indexed = self.index_vectors()
        missing = [text for text in dict.fromkeys(texts) if normalized_key(text) not in indexed]
        logger.info("stored document embeddings: %d texts by the base model %s (%d distinct not in the index: "
                    "encoded)", len(texts), self.base, len(missing))
        encoded = dict(zip(missing, self.encode(missing))) if missing else {}
        return np.stack([encoded[text] if text in encoded else indexed[normalized_key(text)] for text in texts])

    def index_vectors(self) -> dict[str, np.ndarray]:
        """A document's normalized key -> its row of the index's base embeddings (empty without an index)."""
        if self.indexed is None:
            self.indexed = {}
            if self.index:
                self.indexed = {normalized_key(text): row for text, row in zip(self.index, self.encode(self.index))}
        return self.indexed

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.model is None:
            self.model, self.cache, self.bf16 = open_encoder(self.base, self.cfg, cached=True)
        emb, _ = encode(self.model, texts, prompt_names(self.model)[1], self.cfg.eval_batch_size, self.cache,
                        self.bf16, task="document")
        return emb

    def close(self) -> None:
        self.model = self.cache = self.indexed = None
        gc.collect()

