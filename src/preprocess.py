"""Raw catalog records -> clean training texts, one per item.

A marketplace export has a title, attributes (a JSON/dict-like mapping such as
`{"Цвет": "черный", "Память": "128 ГБ"}`, or flat columns) and an optional description. They are joined by a
template, HTML and whitespace are cleaned, and empty, too short and duplicate texts are dropped (counts logged).

    python -m src.preprocess --input_file raw.csv --output_file data/texts.parquet \
        --title_field name --attributes_field attrs --description_field description
"""

from __future__ import annotations

import ast
import html
import json
import logging
import re
import unicodedata

import pandas as pd

from src.cli import parse_groups
from src.config import PreprocessConfig
from src.errors import KitError, run_cli
from src.settings import check_option, comma_list
from src.tables import read_table, require_columns, write_table

logger = logging.getLogger(__name__)

_TAG = re.compile(r"<[^>]+>")
_BLOCK_TAG = re.compile(r"<\s*(br|/p|/div|/li|/h\d)\s*/?>", re.I)
_SPACE = re.compile(r"\s+")
_EMPTY_PARTS = re.compile(r"(\s*[.;,]\s*)(?=[.;,]|$)")


def clean_text(text, keep_lines: bool = False) -> str:
    """Unescape HTML entities, drop tags (block tags become spaces), NFC-normalize, squeeze whitespace. With
    `keep_lines`, line breaks survive (one per run of blank lines): a document's headings stay findable."""
    if text is None or (isinstance(text, float) and pd.isna(text)):
        return ""
    text = html.unescape(str(text))
    text = _TAG.sub("", _BLOCK_TAG.sub(" ", text))
    text = unicodedata.normalize("NFC", text).replace("\u00a0", " ")
    if keep_lines:
        lines = (_SPACE.sub(" ", line).strip() for line in text.splitlines())
        return "\n".join(line for line in lines if line)
    return _SPACE.sub(" ", text).strip()


def parse_attributes(value) -> dict:
    """A JSON object, a Python dict literal, or an already parsed mapping -> dict ({} for empty)."""
    if isinstance(value, dict):
        return value
    if value is None or (isinstance(value, float) and pd.isna(value)) or not str(value).strip():
        return {}
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(str(value))
        except (ValueError, SyntaxError):
            continue
        if isinstance(parsed, dict):
            return parsed
    raise ValueError(f"not a JSON or dict-like mapping: {str(value)[:60]!r}")


def format_attributes(attributes: dict) -> str:
    parts = [f"{clean_text(k)}: {clean_text(v)}" for k, v in attributes.items() if clean_text(v)]
    return "; ".join(parts)


def render(template: str, title: str, attributes: str, description: str) -> str:
    text = template.format(title=title, attributes=attributes, description=description)
    text = _EMPTY_PARTS.sub("", text)  # an empty part leaves ". ." behind: drop the dangling separator
    return _SPACE.sub(" ", text).strip(" .;,")


def records_to_texts(frame: pd.DataFrame, cfg: PreprocessConfig, source="input") -> tuple[pd.DataFrame, dict]:
    """Combine each record into one text; returns the texts frame and the counts of what was dropped."""
    flat_columns = comma_list(cfg.attribute_columns)
    keep = comma_list(cfg.keep_columns)
    needed = [cfg.title_field, *flat_columns, *keep] + [f for f in (cfg.attributes_field, cfg.description_field) if f]
    require_columns(frame, needed, source)
    texts = []
    for row_number, row in enumerate(frame.to_dict("records"), 1):
        attributes = {c: row[c] for c in flat_columns}
        if cfg.attributes_field:
            try:
                attributes.update(parse_attributes(row[cfg.attributes_field]))
            except ValueError as exc:
                raise KitError(f"{source}: row {row_number}, field '{cfg.attributes_field}': {exc}") from exc
        description = clean_text(row[cfg.description_field]) if cfg.description_field else ""
        texts.append(render(cfg.template, clean_text(row[cfg.title_field]), format_attributes(attributes),
                            description))
    out = frame[keep].copy() if keep else pd.DataFrame(index=frame.index)
    out["text"] = texts
    counts = {"records": len(out)}
    empty = out["text"].str.len() == 0
    short = ~empty & (out["text"].str.len() < cfg.min_chars)
    counts["dropped_empty"], counts["dropped_too_short"] = int(empty.sum()), int(short.sum())
    out = out[~empty & ~short]
    duplicated = out["text"].str.casefold().duplicated()
    counts["dropped_duplicates"] = int(duplicated.sum())
    out = out[~duplicated].reset_index(drop=True)
    counts["kept"] = len(out)
    return out, counts


def main(argv=None) -> None:
    cfg = parse_groups({"preprocess": PreprocessConfig}, argv)["preprocess"]
    frame = read_table(cfg.input_file)
    texts, counts = records_to_texts(frame, cfg, source=cfg.input_file)
    logger.info("records %(records)d: dropped %(dropped_empty)d empty, %(dropped_too_short)d too short, "
                "%(dropped_duplicates)d duplicates; kept %(kept)d", counts)
    check_option(len(texts) > 0, "input_file", f"{cfg.input_file}: every text was filtered away")
    path = write_table(texts, cfg.output_file)
    print(json.dumps({"output_file": str(path), **counts}, ensure_ascii=False))


if __name__ == "__main__":
    run_cli(main)
