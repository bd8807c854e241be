"""Atomic text files: write a temporary file in the same folder, flush it to disk, then rename it over the target.

A reader (another rank, ``sweep status``, a resumed run) sees the old file or the new one, never half of one; a crash
leaves at most a hidden ``.<name>.tmp<pid>.<thread>`` file. Checkpoints go through ``var_lab.resilience.save_atomic``,
which adds the disk-full diagnosis.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Union


def write_atomic(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` atomically (parents created; the temporary file is removed on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")  # unique per process and thread
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
