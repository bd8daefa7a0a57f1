"""Reading and writing record files (CSV, TSV, Parquet, JSON Lines, JSON, TXT) with one-line errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from src.errors import KitError, first_line

READ_FORMATS = (".csv", ".tsv", ".parquet", ".jsonl", ".json", ".txt")


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KitError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise KitError(f"{path}: line {number} is not a JSON object")
            rows.append(row)
    return pd.DataFrame(rows)


def _read_json(path: Path) -> pd.DataFrame:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise KitError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict):  # {"data": [...]} or column -> values
        data = next((v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict)), data)
    try:
        return pd.DataFrame(data)
    except ValueError as exc:
        raise KitError(f"{path}: expected a list of objects or a mapping of columns") from exc


def read_table(path: str | os.PathLike, text_column: str = "text", header: bool = True) -> pd.DataFrame:
    """Read a record file into a DataFrame; .txt gives one `text_column` row per non-empty line. `header=False`:
    a CSV/TSV's first line is data too (columns 0, 1, ...)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READ_FORMATS:
        raise KitError(f"{path}: unsupported file type '{suffix or path.name}' (use {', '.join(READ_FORMATS)})")
    if not path.is_file():
        raise KitError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise KitError(f"{path}: file is empty")
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", encoding="utf-8", dtype=str,
                                keep_default_na=False, header=0 if header else None)
        elif suffix == ".jsonl":
            frame = _read_jsonl(path)
        elif suffix == ".json":
            frame = _read_json(path)
        else:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            frame = pd.DataFrame({text_column: [ln for ln in lines if ln]})
    except UnicodeDecodeError as exc:
        raise KitError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from exc
    except KitError:
        raise
    except Exception as exc:  # pyarrow/pandas parser errors: truncated Parquet, ragged CSV, ...
        raise KitError(f"{path}: cannot read {suffix[1:]} file ({first_line(exc)})") from exc
    if frame.empty:
        raise KitError(f"{path}: no records")
    return frame


def require_columns(frame: pd.DataFrame, columns: list[str], path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KitError(f"{path}: missing column '{missing[0]}' (has: {', '.join(map(str, frame.columns))})")


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write .parquet or .jsonl atomically (temp file + rename), creating parent folders."""
    path = Path(path)
    if path.suffix.lower() not in (".parquet", ".jsonl"):
        raise KitError(f"{path}: output must be .parquet or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix.lower() == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
