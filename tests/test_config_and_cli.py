"""Settings resolution and the one-line errors every CLI gives."""

import subprocess
import sys

import pytest

from conftest import ROOT
from src.config import parse_config
from src.errors import UsageError


def test_defaults_file_and_cli_precedence(tmp_path):
    cfg = parse_config([])
    assert cfg.model.precision == "nf4" and cfg.noise.deletion_ratio == 0.6
    grouped = tmp_path / "c.yaml"
    grouped.write_text("train:\n  learning_rate: 0.001\n  max_steps: 5\nprecision: none\n")
    cfg = parse_config(["--config", str(grouped), "--max_steps", "7"])
    assert (cfg.train.learning_rate, cfg.train.max_steps, cfg.model.precision) == (0.001, 7, "none")
    flat = tmp_path / "c.json"
    flat.write_text('{"deletion_ratio": 0.5, "gradient_checkpointing": true}')
    cfg = parse_config(["--config", str(flat)])
    assert cfg.noise.deletion_ratio == 0.5 and cfg.train.gradient_checkpointing is True


@pytest.mark.parametrize("argv,message", [
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--deletion_ratio", "1.5"], "--deletion_ratio"),
    (["--batch_size", "0"], "--batch_size"),
    (["--validation_fraction", "0.9"], "--validation_fraction"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
])
def test_bad_values_name_the_option(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


@pytest.mark.parametrize("text,message", [
    ("learning_rat: 0.1\n", "unknown option 'learning_rat'"),
    ("learning_rate: fast\n", "option 'learning_rate': invalid value 'fast'"),
    ("attention_dropout: null\n", "option 'attention_dropout': invalid value None"),
    ("train:\n  batch_size: [8]\n", "option 'batch_size': invalid value \\[8\\]"),
])
def test_bad_config_file_values_name_the_file_and_option(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=f"config file {path}: {message}"):
        parse_config(["--config", str(path)])


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,code,message", [
    (("src.trainer", "--precision", "fp8"), 2, "invalid choice"),
    (("src.trainer", "--learning_rate", "0"), 2, "option --learning_rate"),
    (("src.trainer", "--train_file", "nope.csv", "--output_dir", "{tmp}/r"), 1, "nope.csv: file does not exist"),
    (("src.evaluation", "--model", "{tmp}/missing"), 1, "does not exist"),
    (("src.create_dataset", "--train_file", "{tmp}/x.docx"), 1, "unsupported file type"),
])
def test_cli_errors_are_one_line_with_exit_code(tmp_path, args, code, message):
    result = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written left behind


def test_trainer_refuses_to_overwrite_a_finished_run(tmp_path):
    (tmp_path / "done").mkdir()
    result = run("src.trainer", "--output_dir", str(tmp_path / "done"))
    assert result.returncode == 1 and "already exists; pass --overwrite" in result.stderr
