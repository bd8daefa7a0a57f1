"""One error type for everything a user can get wrong, and the CLI wrapper that prints it in one line."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path


class KitError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(KitError):
    """A bad option or config value (exit code 2, like argparse)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


# Running out of disk space, however a library reports it: Python's OSError (errno 28), or safetensors' bare
# Exception("... No space left on device (os error 28)") from its Rust writer. The one place that knows.
NO_SPACE = re.compile(r"No space left on device|os error 28")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is a full disk."""
    for _ in range(8):  # causes and contexts, a few links deep
        if exc is None:
            return False
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or NO_SPACE.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: Path) -> int:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def megabytes(count: int) -> str:
    return f"{count / 1e6:,.0f} MB"


@contextlib.contextmanager
def writing(what: str, path: Path, then: str = "run the same command with --resume"):
    """Turn a full disk while writing `what` to `path` into one KitError line: where, what, how much space is free,
    and what to do (`then`); what a whole run needs is checked before it starts (src/run_folder.py). Any other error
    passes through unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise KitError(f"no space left on the device writing {what} to {path} ({megabytes(free_bytes(path))} "
                       f"free): free some space, then {then}") from exc


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A third-party exception's first line, capped: enough to name the cause inside the kit's one-line errors."""
    lines = str(exc).splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


# Third-party messages a user of the kit cannot act on, each matched by its logger and its text, so that anything
# else these libraries say still gets through. `--debug` shows them all.
NOISY_LOG_MESSAGES = {
    # an optional faster 4-bit CPU kernel, fetched from the model hub; the kit runs without it
    "bitsandbytes.backends.cpu.ops": re.compile(r"Failed to load CPU gemm_4bit_forward"),
    # the kit passes device_map for 4-bit loading on purpose
    "sentence_transformers.base.model": re.compile(r"Ignoring `device=\S+` because `model_kwargs\['device_map'\]`"),
    # the Trainer copies the tokenizer's special token ids into the encoder's config: nothing to do
    "transformers.trainer_utils": re.compile(r"The tokenizer has new PAD/BOS/EOS tokens"),
}
NOISY_WARNINGS = [  # (message regex, category): transformers 5 renamed these; peft and sentence-transformers call them
    (r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated", FutureWarning),
]
QUIET_LOGGERS = {"faiss.loader": logging.WARNING}  # which build of faiss loaded, at INFO


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "transformers.modeling_utils" and "LOAD REPORT" in message:
            return not only_missing_pooler(message)
        pattern = NOISY_LOG_MESSAGES.get(record.name)
        return not (pattern and pattern.search(message))


_DROP_NOISE = _DropNoise()


def only_missing_pooler(report: str) -> bool:
    """True for transformers' LOAD REPORT when its only finding is a freshly initialised pooler, which mean
    pooling never uses."""
    rows = [re.sub(r"\x1b\[[0-9;]*m", "", line).split("|") for line in report.splitlines()[1:]]
    rows = [[cell.strip() for cell in row] for row in rows if len(row) >= 2 and row[0].strip() != "Key"]
    return bool(rows) and all(key.startswith("pooler.") and status == "MISSING" for key, status, *_ in rows)


def quiet_third_party() -> None:
    """Drop the messages above (idempotent). Called before the libraries are imported too (src/__init__.py),
    since bitsandbytes speaks while being imported."""
    for name in [*NOISY_LOG_MESSAGES, "transformers.modeling_utils"]:
        logger = logging.getLogger(name)
        if _DROP_NOISE not in logger.filters:
            logger.addFilter(_DROP_NOISE)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


QUIET_BARS = {"Loading weights", "Writing model shards"}  # transformers' bars for each model loaded or saved


def quiet_loading_bars() -> None:
    """Hide transformers' bar for every model it loads or saves (several per run, each over in a blink, each
    a line in a log file); the training bar and the encoding bars stay."""
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        return factory(*args, **({**kwargs, "disable": True} if kwargs.get("desc") in QUIET_BARS else kwargs))

    hf_logging.set_tqdm_hook(hook)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("E5KIT_DEBUG") == "1"


def run_cli(main, argv=None) -> None:
    """Run a module's `main`, turning KitError into `error: ...` + exit code (traceback and every third-party
    message only with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not debug:
        quiet_third_party()
        quiet_loading_bars()
    try:
        main(argv)
    except KitError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
