"""Two evaluations paired, nothing encoded again: which of two adaptations of the same base is better, on the
same held-out queries (for example a run with `--adapt queries` against one with `--adapt both`).

    python -m src.compare --runs runs/queries,runs/both --output_dir runs/queries-vs-both

Every evaluation (a run's evaluation/ folder, or the output folder of `python -m src.evaluation`) keeps each
query's scores in per_query.json. This pairs one model of each (`--model`: the run's adapted model by default)
over the same queries with the evaluation's own statistics (src/metrics.py: a 95% paired-bootstrap interval, a
paired randomization test, a verdict in words). Two evaluations of different data, or of different queries of it
(another --max_eval_queries sample), cannot be paired and are refused. Writes comparison.json and comparison.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.cli import parse_groups
from src.config import EvalConfig
from src.errors import KitError, UsageError, run_cli
from src.metrics import MAIN_METRIC, METRICS, PER_QUERY, compare, format_difference, format_p, verdict
from src.settings import Settings, comma_list, help_field


@dataclass
class CompareArguments(Settings):
    """Settings of `python -m src.compare`."""

    runs: str = help_field("Two run folders (or evaluation folders), comma-separated: FIRST,SECOND. The report "
                           "gives FIRST minus SECOND.", default="")
    model: str = help_field("The model of each evaluation to pair: adapted (a run's adapted model), base, "
                            "adapted-openvino (its export), model (a `python -m src.evaluation` report); two "
                            "names, comma-separated, where they differ (FIRST's,SECOND's).", default="adapted")
    output_dir: str = help_field("Where to write comparison.json and comparison.md.", default="comparison")
    overwrite: bool = help_field("Replace a comparison already in output_dir.", default=False)
    seed: int = help_field("Seed of the bootstrap (0, as the evaluation's).", default=0)

    def validate(self):
        if len(comma_list(self.runs)) != 2:
            raise UsageError("option --runs: two folders, comma-separated (FIRST,SECOND)")
        if len(comma_list(self.model)) not in (1, 2):
            raise UsageError("option --model: one model name, or two comma-separated (FIRST's,SECOND's)")

    def models(self) -> list[str]:
        """The model to read from FIRST and from SECOND."""
        names = comma_list(self.model)
        return names * 2 if len(names) == 1 else names


@dataclass
class Scores:
    """One model's per-query scores in one evaluation, and what they were scored on."""

    folder: Path
    data: dict
    query_ids: list[str]
    per_query: dict[str, np.ndarray]


def scores_folder(path: str) -> Path:
    """A run folder's evaluation/, or an evaluation folder itself: the one holding per_query.json."""
    for folder in (Path(path) / "evaluation", Path(path)):
        if (folder / PER_QUERY).is_file():
            return folder
    raise KitError(f"{path}: no {PER_QUERY} in it or in its evaluation/ (is it a finished run with --eval_data, "
                   f"evaluated by this version of the kit?)")


def read_scores(path: str, model: str) -> Scores:
    folder = scores_folder(path)
    saved = json.loads((folder / PER_QUERY).read_text(encoding="utf-8"))
    if model not in saved["models"]:
        raise KitError(f"{folder / PER_QUERY}: no model '{model}' (it has {', '.join(saved['models'])}); "
                       f"choose one with --model")
    per_query = {m: np.asarray(v, dtype=float) for m, v in saved["models"][model].items()}
    return Scores(folder, saved["data"], saved["query_ids"], per_query)


def check_pairable(first: Scores, second: Scores) -> None:
    """The same data and the same queries in the same order, or a one-line refusal."""
    for key in ("source", "documents"):
        if first.data[key] != second.data[key]:
            raise KitError(f"{first.folder} and {second.folder} evaluated different data ({key}: "
                           f"{first.data[key]} vs {second.data[key]}): they cannot be paired")
    if first.query_ids != second.query_ids:
        raise KitError(f"{first.folder} and {second.folder} scored different queries of {first.data['source']} "
                       f"({len(first.query_ids)} vs {len(second.query_ids)}; another --max_eval_queries sample?): "
                       f"they cannot be paired")


def compare_scores(first: Scores, second: Scores, models: list[str], seed: int) -> dict:
    check_pairable(first, second)
    comparison = compare(first.per_query, second.per_query, EvalConfig.bootstrap_samples, seed)
    return {"first": str(first.folder), "second": str(second.folder), "models": models, "data": first.data,
            "means": {"first": {m: float(first.per_query[m].mean()) for m in METRICS},
                      "second": {m: float(second.per_query[m].mean()) for m in METRICS}},
            "metrics": comparison, "verdict": verdict(comparison)}


def markdown(summary: dict) -> str:
    d, v = summary["data"], summary["verdict"]
    said = "are not distinguishable" if v == "not distinguishable" else f"FIRST is {v} than SECOND"
    lines = ["# Two evaluations paired", "",
             f"FIRST: `{summary['first']}` (its model `{summary['models'][0]}`), SECOND: `{summary['second']}` "
             f"(`{summary['models'][1]}`), "
             f"on `{d['source']}`: {d['queries']} queries, {d['documents']} documents; nothing encoded again.", "",
             "| metric (x100) | FIRST | SECOND | FIRST - SECOND [95% CI] | p |", "|---|---|---|---|---|"]
    for m in METRICS:
        c = summary["metrics"][m]
        lines.append(f"| {m} | {100 * summary['means']['first'][m]:.2f} | {100 * summary['means']['second'][m]:.2f} "
                     f"| {format_difference(c)} | {format_p(c['p_value'])} |")
    lines += ["", f"**Verdict on {MAIN_METRIC}: {said}**", "",
              "(95% paired bootstrap over queries; two-sided paired randomization test, alpha 0.05.)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_groups({"compare": CompareArguments}, argv)["compare"]
    folder = Path(args.output_dir)
    if (folder / "comparison.json").exists() and not args.overwrite:
        raise KitError(f"{folder} already holds a comparison; pass --overwrite or choose another --output_dir")
    models = args.models()
    first, second = (read_scores(path, model) for path, model in zip(comma_list(args.runs), models))
    summary = compare_scores(first, second, models, args.seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comparison.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
    (folder / "comparison.md").write_text(markdown(summary), encoding="utf-8")
    c = summary["metrics"][MAIN_METRIC]
    print(f"FIRST minus SECOND, {MAIN_METRIC}: {format_difference(c)} points, p {format_p(c['p_value'], '= ')}: "
          f"{summary['verdict']}")
    print(f"wrote {folder}/comparison.json, comparison.md")


if __name__ == "__main__":
    run_cli(main)
