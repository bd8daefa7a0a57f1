"""e5 domain adaptation kit: `python -m src.<module>`, see README.md."""

import sys

if sys.argv[:1] == ["-m"]:
    # `python -m src.<module>` imports this package before the module and its libraries: the one moment to drop a
    # notice that a library prints while it is imported (the rest is dropped in errors.run_cli).
    from src.errors import debug_requested, quiet_third_party

    if not debug_requested(sys.argv[1:]):
        quiet_third_party()
