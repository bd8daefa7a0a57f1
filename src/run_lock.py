"""One process per run folder: a lock file in `<output_dir>.partial/` naming the process that writes there.

A second trainer on the same run (fresh, `--resume` or `--overwrite`) is refused at once with one line naming the
first; a lock whose process is gone (killed, crashed, the machine restarted) is stale and taken over with a
warning. The lock is created with O_EXCL, so two processes starting together cannot both take it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from src.errors import KitError

logger = logging.getLogger(__name__)

LOCK_FILE = "lock.json"


def holder(folder: Path) -> dict | None:
    """Who holds the lock of `folder` ({pid, host, started}), or None; an unreadable lock file (torn by a kill while
    it was written) holds nothing."""
    try:
        record = json.loads((folder / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"pid", "host", "started"} <= record.keys() else None


def alive(record: dict) -> bool:
    """Whether the lock's process still runs. A process on another host cannot be checked: it counts as running."""
    if record["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def check_free(folder: Path) -> None:
    """Refuse (one line) when another live process holds `folder`'s lock: called before anything touches it."""
    record = holder(folder)
    if record is not None and record["pid"] != os.getpid() and alive(record):
        raise KitError(f"run folder {folder} is in use by process {record['pid']} on {record['host']} (started "
                       f"{record['started']}): wait for it to finish or stop it; two processes must not write one run")


def acquire(folder: Path) -> None:
    """Take `folder`'s lock (the folder exists), taking over a stale one with a warning."""
    path = folder / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_free(folder)
            record = holder(folder) or {"pid": "?", "host": "?", "started": "?"}
            logger.warning("taking over the lock of %s: its process %s on %s (started %s) is gone", folder,
                           record["pid"], record["host"], record["started"])
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, fh)
        return
    raise KitError(f"run folder {folder}: another process took its lock at the same moment; run again")


def release(folder: Path) -> None:
    """Give the lock back, if this process holds it."""
    record = holder(folder)
    if record is not None and record["pid"] == os.getpid() and record["host"] == socket.gethostname():
        (folder / LOCK_FILE).unlink(missing_ok=True)
