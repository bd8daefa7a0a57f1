"""Settings resolution and the one-line errors every CLI gives."""

import dataclasses
import json
import logging
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, RU_TRAIN

from src.cli import parse_config, parse_groups
from src.compare import CompareArguments
from src.config import GROUPS, Config, EvalConfig, EvaluationArguments, OutputConfig, PreprocessConfig, TrainConfig
from src.errors import UsageError, quiet_third_party
from src.export import ExportArguments
from src.run_folder import prepare_run_folder, save_settings


def test_defaults_file_and_cli_precedence(tmp_path):
    cfg = parse_config([])
    assert cfg.model.precision == "auto" and cfg.noise.deletion_ratio == 0.6
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
    (["--max_seq_length", "4"], "--max_seq_length: must be 0 \\(auto\\) or in \\[8, 8192\\]"),
    (["--validation_fraction", "0.9"], "--validation_fraction"),
    (["--lora_layers", "-1"], "--lora_layers: must be >= 0"),
    (["--lora_layers", "6", "--precision", "full"], "--lora_layers: applies to LoRA"),
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
    (("src.trainer", "--learning_rate", "-0.1"), 2, "option --learning_rate"),
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


HELP_GROUPS = {"src.cli": GROUPS, "src.create_dataset": GROUPS, "src.model_builder": GROUPS, "src.trainer": GROUPS,
               "src.preprocess": {"preprocess": PreprocessConfig},
               "src.evaluation": {"evaluation": EvaluationArguments, "eval": EvalConfig}, "src.provision": {},
               "src.export": {"export": ExportArguments}, "src.compare": {"compare": CompareArguments}}


@pytest.mark.parametrize("module", HELP_GROUPS)
def test_every_command_explains_every_option(module):
    result = run(module, "--help")
    assert result.returncode == 0, result.stderr[-2000:]  # a bare % in a help text crashes argparse
    options = [f"--{f.name}" for cls in HELP_GROUPS[module].values() for f in dataclasses.fields(cls)]
    options += ["--config"] if HELP_GROUPS[module] else ["model"]
    assert [o for o in options if o not in result.stdout] == []


@pytest.mark.parametrize("module", ["src.preprocess", "src.evaluation", "src.trainer", "src.export"])
def test_unknown_option_is_one_line_exit_2(module):
    result = run(module, "--no_such_option", "1")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unrecognized arguments: --no_such_option 1"


def test_a_config_file_serves_every_command(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("evaluation:\n  model: m\n  seed: 3\neval:\n  eval_data: pairs.jsonl\nprecision: none\n"
                    "train:\n  learning_rate: 0.001\n")
    settings = parse_groups({"evaluation": EvaluationArguments, "eval": EvalConfig}, ["--config", str(path)])
    evaluation, eval_settings = settings["evaluation"], settings["eval"]
    assert (evaluation.model, evaluation.seed, eval_settings.eval_data) == ("m", 3, "pairs.jsonl")
    assert parse_config(["--config", str(path)]).train.learning_rate == 0.001  # the trainer takes its own part
    run_config_json = tmp_path / "config.json"  # a finished run's settings (and its plan), for src.evaluation
    save_settings(tmp_path, Config(eval=EvalConfig(eval_data="held-out.csv")), {"objective": "mnrl", "max_steps": 3})
    settings = parse_groups({"evaluation": EvaluationArguments, "eval": EvalConfig},
                            ["--config", str(run_config_json), "--model", "runs/x/merged"])
    assert settings["eval"].eval_data == "held-out.csv" and settings["evaluation"].output_dir == "evaluation"
    with pytest.raises(UsageError, match="option --model: is required"):
        parse_groups({"evaluation": EvaluationArguments, "eval": EvalConfig}, ["--config", str(run_config_json)])


def _bad_eval_data(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "no-such-pairs.jsonl", "no-such-pairs.jsonl: file does not exist"
    if kind == "pairs without document":
        (tmp_path / "pairs.jsonl").write_text('{"query": "a", "text": "b"}\n')
        return tmp_path / "pairs.jsonl", "missing column 'document'"
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "body": "one"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "first"}\n')
    (beir / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    return beir, "corpus.jsonl: missing column 'text'"


@pytest.mark.parametrize("kind", ["missing", "pairs without document", "beir without text"])
def test_bad_eval_data_fails_before_any_model_or_folder(tmp_path, kind):
    eval_data, message = _bad_eval_data(tmp_path, kind)
    before = set(tmp_path.iterdir())
    started = time.monotonic()
    # the model does not exist either: an error about it would mean the model came first
    result = run("src.trainer", "--eval_data", str(eval_data), "--output_dir", str(tmp_path / "run"),
                 "--model_name_or_path", str(tmp_path / "no-model"), "--max_train_texts", "50")
    assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    assert set(tmp_path.iterdir()) == before  # no run folder, no .partial folder


THIRD_PARTY_NOISE = ["gemm_4bit_forward", "pip install kernels", "FutureWarning", "is deprecated", "takes priority",
                     "PAD/BOS/EOS", "LOAD REPORT", "MISSING", "not writable", "has been renamed", "faiss.loader",
                     "Loading weights", "Writing model shards", "Computing widget examples"]  # the last three: bars


def test_a_run_prints_only_what_a_user_can_act_on(tmp_path, tiny_xlmr):
    result = run("src.trainer", "--model_name_or_path", str(tiny_xlmr), "--train_file", str(RU_TRAIN),
                 "--max_train_texts", "48", "--max_steps", "2", "--batch_size", "4", "--max_seq_length", "32",
                 "--eval_data", "", "--objective", "tsdae", "--output_dir", str(tmp_path / "run"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "run finished" in output and [n for n in THIRD_PARTY_NOISE if n in output] == []
    assert f"saved: {tmp_path / 'run'}/ merged/" in output and "held-out evaluation: not run" in output  # the summary
    assert re.search(r"objective tsdae: \d+ training texts; development: \d+ held-out pairs", output)  # no pair count


@pytest.mark.parametrize("logger,message", [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: no module. "
                                      "Please make sure you already `pip install kernels`"),
    ("sentence_transformers.base.model", "Ignoring `device=cpu` because `model_kwargs['device_map']` takes priority."),
    ("transformers.trainer_utils", "The tokenizer has new PAD/BOS/EOS tokens that differ from the model config"),
    ("transformers.modeling_utils", "\x1b[1mBertModel LOAD REPORT\x1b[0m from: x\nKey | Status |\n"
                                    "----+----\npooler.dense.weight | MISSING | \npooler.dense.bias | MISSING | \n"),
])
def test_third_party_noise_is_dropped_and_the_rest_kept(logger, message):
    quiet_third_party()
    records, handler = [], logging.Handler()
    handler.emit = records.append  # on the logger itself: transformers' loggers do not propagate to the root
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        log.warning(message)
        log.warning("LOAD REPORT\nencoder.layer.0.weight | MISSING |")  # anything else still gets through
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["LOAD REPORT\nencoder.layer.0.weight | MISSING |"]


def test_resume_refuses_other_settings_and_allows_other_threads(tmp_path):
    started = Config(output=OutputConfig(output_dir=str(tmp_path / "run")))
    partial = tmp_path / "run.partial"
    partial.mkdir()
    save_settings(partial, started, {"objective": "mnrl"})
    changed = Config(train=TrainConfig(resume=True, learning_rate=3e-4, dev_construction="lead"),
                     output=OutputConfig(output_dir=str(tmp_path / "run")))
    with pytest.raises(UsageError, match=r"option --dev_construction: the run in .*run.partial was started with "
                                         r"'auto', not 'lead'.*--overwrite"):
        prepare_run_folder(changed)
    left = json.loads((partial / "config.json").read_text())
    assert left == {**started.to_dict(), "resolved": {"objective": "mnrl"}}  # as it was
    halved = Config(train=TrainConfig(resume=True, batch_size=16), output=started.output)
    with pytest.raises(UsageError, match="option --batch_size: .* effective batch of 32 .*, not 16"):
        prepare_run_folder(halved)
    same = Config(train=TrainConfig(resume=True, threads=1, batch_size=16, gradient_accumulation_steps=2),
                  output=OutputConfig(output_dir=str(tmp_path / "run")))  # after running out of memory
    assert prepare_run_folder(same) == partial
