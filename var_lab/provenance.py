"""Provenance of a run (the code version), importable without MLflow."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The git HEAD of the var-lab checkout, or ``"unknown"`` (not a checkout, or git missing)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if re.fullmatch(r"[0-9a-f]{40,64}", commit) else "unknown"
