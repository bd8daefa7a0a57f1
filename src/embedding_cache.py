"""Corpus embeddings of models that a run does not change, computed once and kept in the kit's cache.

Why: every training run evaluates its adapted model against the same base model on the same held-out data, and
`python -m src.evaluation` is often rerun on an unchanged model. Encoding the collection is the slow part of an
evaluation, and for a model whose weights did not change it gives the same numbers every time, so they are
stored once in ``<$E5KIT_CACHE or ~/.cache/e5kit>/embeddings/`` and read back.

What the key covers (anything that changes the embeddings): a content hash of the model folder's weight,
configuration and tokenizer files (not its path, not modification times), every text in order, the prompt
string actually prepended, max_seq_length, batch size, parameter precision, bf16 autocast, device type, and the
sentence-transformers and torch versions. An entry is ``<key>.npy`` (float32, one row per text) and
``<key>.json`` (the key's parts, the array's shape and a SHA-256 of its bytes), each written to a temporary file
and renamed into place. An entry that cannot be read or does not match its key, shape or checksum is never
trusted: a warning names it, and the embeddings are computed afresh and stored over it. The cache holds at most
$E5KIT_CACHE_MAX_GB (DEFAULT_MAX_GB without it): past that, the least recently used entries are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from src.errors import UsageError
from src.provision import kit_cache

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the meaning of a key part changes: older entries then simply miss
# Files that decide what a sentence-transformers model computes: weights, configurations, tokenizer files,
# remote code. Other files (README, ONNX/OpenVINO exports, TF/Flax weights) are not read by a torch model.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".py", ".tiktoken")
SKIPPED_FOLDERS = {"onnx", "openvino"}
CHUNK = 1 << 20
DEFAULT_MAX_GB = 10.0  # e.g. about 60 corpora of 100,000 texts at 384 dimensions


def cache_folder() -> Path:
    return kit_cache() / "embeddings"


def size_limit() -> int:
    """Bytes the cache may hold: $E5KIT_CACHE_MAX_GB, DEFAULT_MAX_GB without it."""
    value = os.environ.get("E5KIT_CACHE_MAX_GB", str(DEFAULT_MAX_GB))
    try:
        gigabytes = float(value)
    except ValueError:
        gigabytes = math.nan
    if not 0 <= gigabytes < math.inf:
        raise UsageError(f"environment variable E5KIT_CACHE_MAX_GB: '{value}' is not a number of gigabytes >= 0")
    return int(gigabytes * 1e9)


def entry_bytes(npy: Path) -> int:
    """The size of an entry's files; 0 for whatever another process deleted meanwhile."""
    total = 0
    for f in (npy, npy.with_suffix(".json")):
        with contextlib.suppress(OSError):
            total += f.stat().st_size
    return total


def last_used(npy: Path) -> float:
    try:
        return npy.stat().st_mtime
    except OSError:
        return 0.0


def evict(root: Path, keep: Path, limit: int) -> None:
    """Delete the least recently used entries (the oldest modification time: reading an entry touches it) until
    the cache holds at most `limit` bytes; `keep`, the entry just written, stays whatever its size."""
    entries = sorted(root.glob("*.npy"), key=last_used)
    total = sum(map(entry_bytes, entries))
    for npy in (e for e in entries if e != keep):
        if total <= limit:
            break
        total -= entry_bytes(npy)
        for f in (npy, npy.with_suffix(".json")):
            f.unlink(missing_ok=True)
        logger.info("embedding cache: evicted %s (over E5KIT_CACHE_MAX_GB = %g)", npy.name, limit / 1e9)


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that the fingerprint covers, in a fixed order (symbolic links followed)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS]
        found += [Path(root) / f for f in files if not f.startswith(".") and f.endswith(MODEL_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(folder: Path) -> str:
    """SHA-256 over the names and contents of the model's files: equal exactly when the model is unchanged."""
    h = hashlib.sha256()
    for path in model_files(folder):
        h.update(f"{path.relative_to(folder).as_posix()}\0{file_digest(path)}\n".encode())
    return h.hexdigest()


def texts_digest(texts: list[str]) -> str:
    """SHA-256 over the texts in order, each prefixed by its length so that no two lists collide by joining."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def array_digest(emb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(emb).tobytes()).hexdigest()


def prompt_text(model, prompt_name: str | None) -> str:
    """The string sentence-transformers prepends for `prompt_name` (its default prompt where None)."""
    name = prompt_name if prompt_name is not None else getattr(model, "default_prompt_name", None)
    if name is None:
        return ""
    return (model.prompts or {}).get(name) or ""


def model_parts(model, folder: Path, batch_size: int, bf16: bool) -> dict:
    """The key parts that belong to the model as it is configured for this evaluation."""
    import sentence_transformers
    import torch

    return {"format": FORMAT, "weights": weights_fingerprint(folder), "max_seq_length": model.max_seq_length,
            "precision": str(next(model.parameters()).dtype).removeprefix("torch."), "bf16_autocast": bf16,
            "device": model.device.type,
            "batch_size": batch_size, "normalized": True, "stored_as": "float32",
            "sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__}


def write_atomic(path: Path, write) -> None:
    """Write through `write(binary file)` into a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def cache_lock(root: Path, exclusive: bool):
    """The cache-wide lock (flock on `root`/.lock): writers exclusive, readers shared, so that two processes storing
    the same entry leave one whole entry, and no reader sees one writer's array beside another's header. A cache
    whose folder cannot hold the lock file (read-only) is read without it."""
    import fcntl

    try:
        handle = (root / ".lock").open("a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def read_entry(npy: Path, header_path: Path, key: str, parts: dict, n_texts: int) -> np.ndarray:
    """The stored array, or ValueError/OSError saying why the entry cannot be trusted."""
    header = json.loads(header_path.read_text(encoding="utf-8"))
    if not isinstance(header, dict) or header.get("key") != key or header.get("parts") != parts:
        raise ValueError("its header names another key")
    emb = np.load(npy, allow_pickle=False)
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape[0] != n_texts or list(emb.shape) != header["shape"]:
        raise ValueError(f"it holds a {emb.dtype} array of shape {emb.shape}, not {n_texts} float32 rows")
    if array_digest(emb) != header.get("sha256"):
        raise ValueError("its content does not match its checksum")
    return emb


class EmbeddingCache:
    """Cached embeddings of one model, loaded from `folder` and configured (max_seq_length) for an evaluation."""

    def __init__(self, model, folder: Path, batch_size: int, bf16: bool, root: Path | None = None):
        self.model, self.folder, self.bf16 = model, Path(folder).resolve(), bf16  # how its entries are encoded
        self.root = Path(root) if root is not None else cache_folder()
        self.parts, self.limit = model_parts(model, self.folder, batch_size, bf16), size_limit()

    def key(self, texts: list[str], prompt_name: str | None) -> tuple[str, dict]:
        parts = {**self.parts, "texts": texts_digest(texts), "n_texts": len(texts),
                 "prompt": prompt_text(self.model, prompt_name)}
        parts = json.loads(json.dumps(parts, sort_keys=True))  # as a header stores it
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.json"

    def load(self, texts: list[str], prompt_name: str | None) -> np.ndarray | None:
        """The stored embeddings of `texts`, or None (missing, or not trusted: then with a warning)."""
        key, parts = self.key(texts, prompt_name)
        npy, header = self.paths(key)
        if not npy.exists() and not header.exists():
            return None
        try:
            with cache_lock(self.root, exclusive=False):
                emb = read_entry(npy, header, key, parts, len(texts))
        except Exception as exc:  # whatever is wrong with an entry, it is recomputed, never trusted
            logger.warning("embedding cache: ignoring %s (%s); computing these embeddings afresh", npy, exc)
            return None
        logger.info("embedding cache: read %d embeddings of %s from %s", len(texts), self.folder, npy)
        with contextlib.suppress(OSError):  # a read-only cache still serves; its order is then by writing
            os.utime(npy)  # recently used: evicted last
        return emb

    def store(self, texts: list[str], prompt_name: str | None, emb: np.ndarray) -> None:
        """Store `emb` for `texts` (over any entry there); a cache that cannot be written only warns."""
        key, parts = self.key(texts, prompt_name)
        npy, header_path = self.paths(key)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        header = {"key": key, "parts": parts, "shape": list(emb.shape), "sha256": array_digest(emb),
                  "model": str(self.folder)}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with cache_lock(self.root, exclusive=True):
                write_atomic(npy, lambda fh: np.save(fh, emb, allow_pickle=False))
                write_atomic(header_path, lambda fh: fh.write(json.dumps(header, indent=1).encode("utf-8")))
                evict(self.root, npy, self.limit)
        except OSError as exc:  # a full disk, a read-only folder: the run goes on without storing
            logger.warning("embedding cache: cannot write %s (%s); continuing without it", npy, exc)
