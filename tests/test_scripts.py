"""Every script runs as a module from the repository root: `python -m scripts.<name> --help` imports it and
parses its options (nothing is built, trained or downloaded)."""

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
