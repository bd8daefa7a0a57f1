"""One error type for everything a user can get wrong, and the CLI wrapper that prints it in one line."""

from __future__ import annotations

import logging
import os
import sys


class KitError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(KitError):
    """A bad option or config value (exit code 2, like argparse)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


def run_cli(main, argv=None) -> None:
    """Run a module's `main`, turning KitError into `error: ...` + exit code (traceback only with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("E5KIT_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
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
