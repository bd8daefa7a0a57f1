"""The one command-line path of every module: dataclass settings from defaults < a --config file < options.

A config file may be flat (`learning_rate: 1e-4`) or grouped (`train: {learning_rate: 1e-4}`); a run's own
config.json works as one (its `resolved` record, what the run made of the settings, is skipped). Every mistake is
one line (`error: ...`, exit code 2), never argparse's usage dump.

    python -m src.cli --help                                 # every option of the trainer, with its help
    python -m src.cli --config my.yaml --learning_rate 5e-5  # the settings those resolve to, as JSON
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from transformers import HfArgumentParser

from src.config import ALL_GROUPS, GROUPS, Config
from src.errors import UsageError, first_line, run_cli

RESOLVED = "resolved"  # a run's config.json: the plan it resolved (src/plan.py), beside the requested groups


def _read_config_file(path: str, groups: dict) -> dict:
    """Flat or grouped YAML/JSON -> flat {option: value} for the options of `groups`. Settings of the kit's other
    commands are skipped, so one file (a run's config.json, say) serves several commands."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text)
        elif p.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raise UsageError(f"config file {path}: use .yaml, .yml or .json")
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"config file {path}: cannot parse ({first_line(exc)})") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"config file {path}: expected a mapping of option: value")
    flat = {}
    for key, value in raw.items():
        if key == RESOLVED:
            continue
        if not (key in ALL_GROUPS and isinstance(value, dict)):
            flat[key] = value
        elif key in groups:
            flat.update(value)
    known_anywhere = {f.name for cls in ALL_GROUPS.values() for f in dataclasses.fields(cls)}
    unknown = sorted(set(flat) - known_anywhere)
    if unknown:
        raise UsageError(f"config file {path}: unknown option '{unknown[0]}'")
    return flat


def _config_value(action, value, path: str):
    """A config file's value, converted as the command line would convert it."""
    if not action.type or isinstance(value, bool):
        return value
    if value is not None:  # str(None) would read as the text 'None'
        try:
            return action.type(str(value))
        except (TypeError, ValueError):
            pass
    raise UsageError(f"config file {path}: option '{action.dest}': invalid value {value!r}")


class KitParser(HfArgumentParser):
    """argparse would print the whole usage (dozens of options) above the one line that matters, and exit: raise
    instead, so that run_cli prints `error: ...` alone, with exit code 2."""

    def error(self, message):
        raise UsageError(message)


def parse_groups(groups: dict, argv: list[str] | None = None) -> dict:
    """Every command's one way to read its settings: the dataclass `groups` (name -> class) it needs, resolved as
    defaults < --config file < command-line options. Returns name -> instance."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = KitParser(list(groups.values()))
    parser.add_argument("--config", default=None, help="YAML or JSON file with settings (CLI options win).")
    pre, unknown = parser.parse_known_args(argv)
    if unknown:  # before any group is built (and validated): the typo is the error to report
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    if pre.config:
        flat = _read_config_file(pre.config, groups)
        for action in parser._actions:
            if action.dest in flat:
                action.default = _config_value(action, flat[action.dest], pre.config)
    try:
        *values, _ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as exc:
        raise UsageError(first_line(exc)) from exc
    return dict(zip(groups, values))  # each validated on construction; the last value holds --config


def parse_config(argv: list[str] | None = None) -> Config:
    """The trainer's settings (every group of Config)."""
    return Config(**parse_groups(GROUPS, argv))


def main(argv=None) -> None:
    print(json.dumps(parse_config(argv).to_dict(), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    run_cli(main)
