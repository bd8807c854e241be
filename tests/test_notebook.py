"""notebooks/scaling_curves.ipynb runs top to bottom (nbclient, a kernel on this venv's python) on a real store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from analysis.synthetic import SyntheticRun, SyntheticStudy, write_synthetic_study

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "scaling_curves.ipynb"
KERNEL = "var-lab-test-venv"


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
    """A kernelspec whose python is the one running the tests, found through JUPYTER_PATH only."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "var-lab test (venv)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    return KERNEL


@pytest.mark.slow
def test_notebook_executes_against_a_synthetic_study(tmp_path, monkeypatch, venv_kernel):
    import nbformat
    from nbclient import NotebookClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = [SyntheticRun(depth=d, steps=500, global_batch=64) for d in (2, 3, 4, 6)]
    runs.append(SyntheticRun(depth=5, steps=300, global_batch=64, status="FAILED"))
    write_synthetic_study(uri, "nb-study", SyntheticStudy(runs=runs, patch_nums=(1, 2, 3, 4, 6, 8), log_points=20))
    report_dir = tmp_path / "report"
    monkeypatch.setenv("VAR_LAB_TRACKING_URI", uri)
    monkeypatch.setenv("VAR_LAB_EXPERIMENTS", "nb-study")
    monkeypatch.setenv("VAR_LAB_BOOTSTRAP", "20")
    monkeypatch.setenv("VAR_LAB_REPORT_DIR", str(report_dir))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=venv_kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"python: {sys.executable}" in text  # the kernel is this venv's interpreter
    assert "5 runs" in text and "dropped 1 of 5 runs" in text  # the failed run is flagged and dropped, not a crash
    assert "val/L_mean = (" in text and "r = " in text
    assert "paper: FID = (0.0662 N)^-0.298, r = -0.973" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # loss vs N, loss vs C, FID vs N
    assert (report_dir / "report.md").exists() and (report_dir / "plots" / "loss_vs_params.svg").exists()
