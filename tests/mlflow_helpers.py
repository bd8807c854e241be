"""MLflow helpers for the tests: a local ``mlflow server`` process, a free port, and logging nested params.

They used to live in ``var_lab.tracking``; nothing outside ``tests/`` uses them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from mlflow.tracking import MlflowClient

from var_lab.tracking import (
    ARTIFACTS_DIRNAME,
    ResilientMLFlowLogger,
    default_artifact_root,
    deliver_records,
    ensure_store,
    flatten_params,
    normalize_tracking_uri,
)


def log_params_flat(
    logger_or_client: Union[ResilientMLFlowLogger, MlflowClient], run_id: Optional[str], params: Mapping[str, Any]
) -> dict[str, str]:
    """Log a nested dict of params under dotted names (``model.depth``), e.g. the MLflow contract's params.

    Args:
        logger_or_client: a ResilientMLFlowLogger (resilient path; ``run_id`` may be None) or an MlflowClient.
        run_id: the run (required for a client).
        params: nested dict; values become strings, tuples ``[1, 2]``.

    Returns:
        The flat params that were logged.

    Raises:
        StoreUnavailableError: with a client, when the store is down (a logger spools instead).
        ValueError: with a client, when a param already has a different value.
    """
    flat = flatten_params(params)
    if isinstance(logger_or_client, ResilientMLFlowLogger):
        if run_id is not None and run_id != logger_or_client.run_id:
            raise ValueError(f"run_id {run_id} is not the logger's run {logger_or_client.run_id}")
        logger_or_client.log_hyperparams(flat)
        return flat
    if run_id is None:
        raise ValueError("log_params_flat: run_id is required with an MlflowClient")
    records = [{"uri": "", "run_id": run_id, "type": "param", "key": k, "value": v} for k, v in flat.items()]
    refused: list[str] = []
    deliver_records(records, lambda _: logger_or_client, lambda record, reason: refused.append(reason))
    if refused:
        raise ValueError("; ".join(refused))
    return flat


# ----------------------------------------------------------------------------------------------------------------------
# A local tracking server
# ----------------------------------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A local ``mlflow server`` process, for sweeps whose many writers would contend on one sqlite file.

    The server and its uvicorn workers run in their own session, so :meth:`stop` ends exactly them. MLflow's job
    runner is off unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` is set: it starts a dozen worker processes that
    tracking does not need.

    Args:
        backend_store_uri: the server's store (``sqlite:///...`` or another database).
        port: TCP port (default: a free one).
        host: interface to bind (default: localhost only).
        artifacts_destination: where the server keeps proxied artifacts (default ``<db folder>/mlartifacts``).
        log_path: file receiving the server's output (default: discarded).
        workers: uvicorn worker processes.
    """

    def __init__(
        self,
        backend_store_uri: str,
        port: Optional[int] = None,
        host: str = "127.0.0.1",
        artifacts_destination: Optional[Union[str, Path]] = None,
        log_path: Optional[Union[str, Path]] = None,
        workers: int = 1,
    ):
        self.backend_store_uri = normalize_tracking_uri(backend_store_uri, "backend_store_uri")
        self.host = host
        self.port = port or free_port(host)
        if artifacts_destination is None:
            artifacts_destination = default_artifact_root(self.backend_store_uri) or os.path.abspath(ARTIFACTS_DIRNAME)
        self.artifacts_destination = str(artifacts_destination)
        self.log_path = Path(log_path) if log_path is not None else None
        self.workers = workers
        self._process: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        """Tracking URI of the server (``http://host:port``)."""
        return f"http://{self.host}:{self.port}"

    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 180.0) -> MlflowServer:
        """Start the server and wait until ``/health`` answers.

        Raises:
            RuntimeError: the server exited or did not answer within ``timeout_s`` (with the tail of its log).
        """
        import requests

        if self.running():
            return self
        ensure_store(self.backend_store_uri)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        env = dict(os.environ)
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env.pop("MLFLOW_TRACKING_URI", None)
        output = open(self.log_path, "ab") if self.log_path is not None else subprocess.DEVNULL
        try:
            self._process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            if self.log_path is not None:
                output.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self._process.returncode}{self._log_tail()}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"mlflow server on {self.uri} did not answer /health within {timeout_s:.0f} s{self._log_tail()}"
        )

    def stop(self, kill: bool = False, timeout_s: float = 30.0) -> None:
        """Stop the server and its workers (SIGTERM, or SIGKILL with ``kill=True`` to simulate a crash)."""
        import signal

        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            except ProcessLookupError:
                pass
        # The uvicorn worker may outlive its parent by a moment; end the whole session before the port is reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n--- server log (tail) ---\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
