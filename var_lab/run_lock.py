"""A run folder is owned by the process that trains in it.

``var-lab fit`` and ``fit-tokenizer`` (rank 0) hold an exclusive ``fcntl.flock`` on ``<output_dir>/trainer.lock`` for
as long as they train. The kernel drops the lock when the process ends, however it ends (kill -9 included), so a lock
that can be taken is never stale. The file records the holder (pid, host, start time) for messages; whether the
trainer is alive is only ever read from the lock itself. Used by the trainer (:func:`hold_run_folder`: a second
trainer on the same folder refuses, naming the holder's pid) and by the sweep's claims and status
(:func:`trainer_holding`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

from var_lab.inputs import BadInputError

LOCK_NAME = "trainer.lock"


class RunFolderBusyError(BadInputError):
    """Another live trainer holds the run folder."""


def _read(handle) -> dict:
    handle.seek(0)
    try:
        data = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def describe(holder: dict) -> str:
    """``pid 123 on host (since ...)`` for a lock holder."""
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return text + (f" (since {holder['since']})" if holder.get("since") else "")


@contextlib.contextmanager
def hold_run_folder(output_dir: Union[str, Path], what: str = "var-lab fit") -> Iterator[dict]:
    """Hold ``output_dir``'s trainer lock for the ``with`` block (the folder is created if needed).

    Raises:
        RunFolderBusyError: another process holds it; the message names its pid and host.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the whole block
    try:
        if not _lock_exclusive(handle):
            holder = _read(handle)
            raise RunFolderBusyError(
                f"output_dir {folder} is in use by another trainer, {describe(holder)}; a run folder has one trainer "
                f"at a time: wait for it to end (or stop it), or train into another output_dir"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": what,
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info))
        handle.flush()
        try:
            yield info
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def _lock_exclusive(handle, attempts: int = 20) -> bool:
    """Take the lock, waiting out a status reader's momentary shared probe (about 2 s at most)."""
    for attempt in range(attempts):
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.1)
    return False


def trainer_holding(output_dir: Union[str, Path]) -> Optional[dict]:
    """The live trainer holding ``output_dir`` (its recorded pid and host), or None when no process holds it."""
    path = Path(output_dir) / LOCK_NAME
    try:
        handle = open(path)  # noqa: SIM115
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(handle) or {"pid": None, "host": None}
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return None
