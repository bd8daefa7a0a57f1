"""The machinery of a settings group (src/config.py holds the groups): a field with help text, validation on
construction, and the one-line errors a bad value gets."""

from __future__ import annotations

from dataclasses import field

from src.errors import UsageError


def help_field(text: str, **kw):
    """A dataclass field whose help text `python -m src.<module> --help` prints."""
    return field(metadata={"help": text}, **kw)


class Settings:
    """A settings group whose `validate` runs on construction: one built in code is checked like a parsed one."""

    def __post_init__(self):
        self.validate()


def comma_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: the kit's comma-separated options."""
    return [item.strip() for item in text.split(",") if item.strip()]


def check_option(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise UsageError(f"option --{option}: {message}")


def check_minimum(settings, minimum: float, *options: str) -> None:
    for option in options:
        check_option(getattr(settings, option) >= minimum, option, f"must be >= {minimum}")
