"""Every script runs as a module from the repository root: `python -m scripts.<name> --help` imports it and
parses its options (nothing is built, trained or downloaded); and what a benchmark compares is what it says."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# A script is a module of scripts/ with a `__main__` entry point; the others are its helpers.
SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8"))


def test_the_scripts_are_found():
    assert {"benchmark_documents", "benchmark_training", "build_dev_collections", "build_sample_data",
            "soak_resume"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_as_a_module(name):
    proc = subprocess.run([sys.executable, "-m", f"scripts.{name}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout


def test_the_documents_peer_trains_the_kits_own_pairs_at_the_defaults_budget():
    """benchmark_documents' st-lead: plain sentence-transformers gets the kit's lead pairs, as many as the default
    trains (every document of a smaller collection), each document at most once."""
    from scripts.benchmark_documents import DEV, peer_pairs
    from src.document_pairs import DocumentPairs
    from src.plan import DOCUMENTS_PAIRS

    lines = (DEV / "en_anarchist_faq" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    lead = DocumentPairs("lead", 0)
    small = peer_pairs("en_anarchist_faq", "lead")
    assert len(texts) < DOCUMENTS_PAIRS and len(small) == len(texts)
    assert sorted(zip(small["anchor"], small["positive"])) == sorted(lead(t, i) for i, t in enumerate(texts))
    assert len(peer_pairs("en_python_doc", "lead")) == DOCUMENTS_PAIRS  # 872 documents


def test_two_documents_recipes_are_compared_paired_over_the_same_queries(tmp_path):
    """benchmark_documents --against: a recipe minus another, from the per-query scores each run keeps."""
    import numpy as np

    from scripts.benchmark_documents import paired_lines
    from src.config import EvalConfig
    from src.metrics import METRICS

    queries = 300  # en_anarchist_faq's test queries
    rng = np.random.default_rng(0)
    reference = {m: rng.uniform(0.2, 0.8, queries) for m in METRICS}
    better = {m: v + 0.05 for m, v in reference.items()}  # five points higher on every query
    for recipe, scores in (("auto", reference), ("auto-hn1", better)):
        folder = tmp_path / "en_anarchist_faq" / recipe
        folder.mkdir(parents=True)
        (folder / "per_query.json").write_text(json.dumps({m: v.tolist() for m, v in scores.items()}))
        (folder / "benchmark_row.json").write_text("{}")  # a finished run
    table = "\n".join(paired_lines("en_anarchist_faq", ["auto", "auto-hn1", "auto-960"], "auto",
                                    tmp_path / "en_anarchist_faq", None, EvalConfig()))
    assert "| en_anarchist_faq | auto-hn1 | +5.00 [+5.00, +5.00] | 0.000 | better |" in table
    assert table.count("| en_anarchist_faq |") == 1  # auto-960 has no run: no row, nothing encoded


def test_a_finished_run_is_reused_only_for_the_command_it_ran(tmp_path):
    """benchmark_documents reuses a finished run by its folder's name: a run of other options under that name (the
    recipe or the default changed since) is a one-line error, never another run's scores in the table."""
    from scripts.benchmark_documents import finished_row, row_command

    assert row_command("en_python_doc", "auto-top6") == (
        "python -m src.trainer --train_file data/dev/en_python_doc/train.jsonl --lora_layers 6")
    folder = tmp_path / "auto-top6"
    assert finished_row(folder, row_command("en_python_doc", "auto-top6")) is None  # nothing run yet
    folder.mkdir()
    (folder / "benchmark_row.json").write_text(json.dumps({"command": row_command("en_python_doc", "auto")}))
    with pytest.raises(SystemExit, match="auto-top6 holds a run of '.*train.jsonl', not of '.*--lora_layers 6'"):
        finished_row(folder, row_command("en_python_doc", "auto-top6"))
    assert finished_row(folder, row_command("en_python_doc", "auto"))["command"].endswith("train.jsonl")


def test_the_linear_peer_learns_the_map_that_finds_each_querys_document(tmp_path):
    """scripts.linear_peer: queries that are the bank's documents turned by a rotation find their own document
    only once the fitted map undoes the turn (the identity, the base, finds few of them)."""
    import torch

    from scripts.linear_peer import LINEAR, fit_map, read_pairs

    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    rotation = torch.linalg.qr(torch.randn(16, 16))[0]
    queries, labels = bank @ rotation.T, torch.arange(64)

    def found(weight):
        return float(((queries @ weight.T) @ bank.T).argmax(1).eq(labels).float().mean())

    weight, loss = fit_map(queries, bank, labels, 1e-2, 60, 16, LINEAR["scale"], seed=0)
    assert found(torch.eye(16)) < 0.5 and found(weight) == 1.0 and loss < 0.1
    path = tmp_path / "pairs.jsonl"
    rows = [("a", "x"), ("b", "y"), ("c", "x")]
    path.write_text("\n".join(json.dumps({"title": t, "description": d}) for t, d in rows) + "\n", encoding="utf-8")
    assert read_pairs(path) == (["a", "b", "c"], ["x", "y"], [0, 1, 0])
