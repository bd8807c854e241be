"""The package metadata builds without deprecation warnings and says its license as an SPDX expression."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO_ROOT = Path(__file__).resolve().parents[1]

_BUILD_METADATA = """
import json, warnings
from setuptools import build_meta
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    name = build_meta.prepare_metadata_for_build_wheel("meta")
print(json.dumps({"dist_info": name, "warnings": [str(w.message) for w in caught]}))
"""


def test_license_is_an_spdx_expression_and_builds_without_deprecation(tmp_path):
    # The metadata of a copy of the project's pyproject.toml (the build writes an egg-info next to it, so not in the
    # checkout), with the installed setuptools, as `pip install -e .` builds it.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    for package in ("var_lab", "analysis"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "var_lab" / "py.typed").write_text("")
    (tmp_path / "meta").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_METADATA], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [w for w in result["warnings"] if "license" in w.lower()], result["warnings"]
    metadata = (tmp_path / "meta" / result["dist_info"] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata.splitlines()


def test_build_requirement_admits_the_installed_setuptools_and_no_version_without_spdx_licenses():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    (setuptools_req,) = [Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools_req.specifier.contains(setuptools.__version__)
    assert not setuptools_req.specifier.contains("76.1")  # setuptools reads license = "SPDX" from 77.0 on
