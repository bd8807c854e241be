"""MLflow tracking stores: URIs, the sqlite database, experiments, run-id files and retrying a busy store.

Everything here talks to a store directly; :mod:`var_lab.tracking.spool` and :mod:`var_lab.tracking.logger` build on
it. The database and its experiments are created under an fcntl lock (``<db>.lock``), so concurrent first users of a
store are safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from var_lab.atomic import write_atomic

log = logging.getLogger(__name__)

DEFAULT_DB_NAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"
RUN_ID_FILENAME = "mlflow_run_id"


_DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql")
_ALLOWED_SCHEMES = "sqlite:///<path>, http(s)://<host>:<port>, postgresql://, mysql://, mssql://, databricks"

# MLflow error codes that say "try again later" (store busy, server down or overloaded), as opposed to a request the
# store will refuse forever (bad value, deleted run, changed param).
_TRANSIENT_CODES = frozenset(
    {
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
        "INTERNAL_ERROR",
        "DEADLINE_EXCEEDED",
        "ABORTED",
        "IO_ERROR",
        "SERVICE_UNDER_MAINTENANCE",
        "WORKSPACE_TEMPORARILY_UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
    }
)
_BUSY_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ABORTED"})

_ENSURED: set[str] = set()
_ENSURE_LOCK = threading.Lock()
_ENV_LOCK = threading.RLock()


# ----------------------------------------------------------------------------------------------------------------------
# Tracking URI and store
# ----------------------------------------------------------------------------------------------------------------------


def normalize_tracking_uri(uri: str, source: str = "tracking URI") -> str:
    """Validate a tracking URI and make an sqlite path absolute.

    Relative sqlite paths are resolved against the current folder once, here, so that processes started elsewhere
    (submitit, torchrun) all open the same database.

    Args:
        uri: the tracking URI.
        source: where the URI came from, for error messages (e.g. ``tracking.tracking_uri``).

    Returns:
        The URI, with an absolute path for sqlite (``sqlite:////abs/path/mlflow.db``).

    Raises:
        ValueError: for MLflow's old file store (a plain path or ``file:``), an in-memory sqlite database, or a scheme
            MLflow cannot track to, naming the source and the allowed forms.
    """
    uri = str(uri).strip()
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("", "file") or re.match(r"^[A-Za-z]:[\\/]", uri):
        raise ValueError(
            f"{source}: tracking URI {uri!r} is a folder for MLflow's old file store, which MLflow 3 no longer "
            "supports for tracking. Use an sqlite database instead, e.g. 'sqlite:////abs/path/mlflow.db' (four "
            "slashes for an absolute path), or a tracking server 'http://HOST:PORT'."
        )
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise ValueError(
                f"{source}: tracking URI {uri!r} is an in-memory sqlite database, which other processes cannot see; "
                "use a file, e.g. 'sqlite:////abs/path/mlflow.db'."
            )
        path, sep, query = uri[len("sqlite:///") :].partition("?")
        if path in ("", ":memory:"):
            raise ValueError(
                f"{source}: tracking URI {uri!r} is an in-memory sqlite database, which other processes cannot see; "
                "use a file, e.g. 'sqlite:////abs/path/mlflow.db'."
            )
        absolute = os.path.abspath(os.path.expanduser(path))
        return f"sqlite:///{absolute}{sep}{query}"
    if scheme in ("http", "https"):
        if not urlparse(uri).netloc:
            raise ValueError(f"{source}: tracking URI {uri!r} has no host; expected e.g. 'http://127.0.0.1:5000'.")
        return uri.rstrip("/")
    if scheme.split("+")[0] in _DATABASE_SCHEMES or scheme in ("databricks", "databricks-uc"):
        return uri
    raise ValueError(f"{source}: tracking URI {uri!r} has unsupported scheme {scheme!r}; allowed: {_ALLOWED_SCHEMES}.")


def resolve_tracking_uri(cfg_uri: Optional[str], output_root: Union[str, Path]) -> str:
    """The tracking URI of a run: explicit config, else ``$MLFLOW_TRACKING_URI``, else an sqlite file in the root.

    Args:
        cfg_uri: ``tracking.tracking_uri`` from the run config (None or empty: not set).
        output_root: folder holding the default database ``mlflow.db`` (a sweep's root, or a run's parent folder).

    Returns:
        A validated URI; the default is ``sqlite:///<absolute output_root>/mlflow.db``.

    Raises:
        ValueError: see :func:`normalize_tracking_uri`.
    """
    if cfg_uri:
        return normalize_tracking_uri(cfg_uri, "tracking.tracking_uri")
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_uri:
        return normalize_tracking_uri(env_uri, "$MLFLOW_TRACKING_URI")
    db = Path(os.path.abspath(Path(output_root).expanduser())) / DEFAULT_DB_NAME
    return f"sqlite:///{db}"


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of an ``sqlite:///`` URI, or None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].partition("?")[0])


def default_artifact_root(uri: str) -> Optional[str]:
    """Artifact root next to an sqlite database (``<db folder>/mlartifacts``); None where the server decides."""
    db = sqlite_path(uri)
    return None if db is None else str(db.parent / ARTIFACTS_DIRNAME)


def _is_database_uri(uri: str) -> bool:
    return urlparse(uri).scheme.lower().split("+")[0] in _DATABASE_SCHEMES


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive fcntl lock on ``path`` (created if needed), held for the ``with`` block; works across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    db = sqlite_path(uri)
    return contextlib.nullcontext() if db is None else _file_lock(db.with_name(db.name + ".lock"))


def ensure_store(uri: str) -> None:
    """Create the tracking database and bring its schema up to date, once, before parallel processes use it.

    Call it in the launcher / parent / rank-0 process. MLflow creates the schema on first use, and two processes
    doing that at once race (``table experiments already exists``); here the creation holds an fcntl lock on
    ``<db>.lock``, so even concurrent callers are safe. Idempotent and cheap after the first call in a process.

    For an ``http(s)://`` server it checks that ``/health`` answers.

    Args:
        uri: tracking URI (validated with :func:`normalize_tracking_uri`).

    Raises:
        ValueError: an unsupported URI.
        ConnectionError: a tracking server that does not answer.
    """
    uri = normalize_tracking_uri(uri)
    with _ENSURE_LOCK:
        if uri in _ENSURED:
            return
        scheme = urlparse(uri).scheme.lower()
        if scheme in ("http", "https"):
            import requests

            try:
                requests.get(f"{uri}/health", timeout=10).raise_for_status()
            except requests.RequestException as exc:
                raise ConnectionError(f"MLflow tracking server {uri} does not answer on /health: {exc}") from exc
        elif _is_database_uri(uri):
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            db = sqlite_path(uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            artifact_root = default_artifact_root(uri) or os.path.abspath(ARTIFACTS_DIRNAME)
            with _store_lock(uri):
                # The constructor creates the tables on an empty database and verifies the schema otherwise.
                store = SqlAlchemyStore(uri, Path(artifact_root).as_uri())
                store.engine.dispose()
        _ENSURED.add(uri)


def _experiment_artifact_location(artifact_root: Optional[str], name: str) -> Optional[str]:
    if artifact_root is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    if "://" in artifact_root or artifact_root.startswith("file:"):
        return f"{artifact_root.rstrip('/')}/{folder}"
    return (Path(os.path.abspath(artifact_root)) / folder).as_uri()


def get_or_create_experiment(uri: str, name: str, artifact_root: Optional[Union[str, Path]] = None) -> str:
    """The id of experiment ``name``, created when missing; safe when several processes do this at once.

    Args:
        uri: tracking URI.
        name: experiment name (one per sweep).
        artifact_root: folder or URI under which the experiment's artifacts go (``<root>/<name>``); None means next to
            an sqlite database (``<db folder>/mlartifacts``), or the server's default for a tracking server.

    Returns:
        The experiment id. Two processes creating the same experiment both get the same id.
    """
    uri = normalize_tracking_uri(uri)
    if _is_database_uri(uri):
        ensure_store(uri)
    root = str(artifact_root) if artifact_root is not None else default_artifact_root(uri)
    location = _experiment_artifact_location(root, name)
    client = MlflowClient(uri)
    with _store_lock(uri):
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException as exc:
                # Another process (on another machine, for a server) created it between our lookup and create.
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r (id %s) was deleted; restoring it", name, experiment.experiment_id)
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id


def _sweep_run_filter(sweep: str) -> str:
    from var_lab.contract import TAG_KIND, TAG_SWEEP

    return f"tags.`{TAG_KIND}` = 'sweep' and tags.`{TAG_SWEEP}` = '{sweep}'"


def find_sweep_run(uri: str, experiment_id: str, sweep: str) -> Optional[str]:
    """The id of sweep ``sweep``'s parent run in an experiment (the oldest, should there be two), or None."""
    runs = MlflowClient(normalize_tracking_uri(uri)).search_runs(
        [experiment_id], filter_string=_sweep_run_filter(sweep), order_by=["attributes.start_time ASC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def get_or_create_sweep_run(uri: str, experiment: str, sweep: str, description: str = "") -> str:
    """The parent run of sweep ``sweep`` (``var_lab.kind=sweep``), created when missing and marked RUNNING.

    ``var-lab sweep launch`` calls it once before any point starts, so each point's logger finds it and becomes its
    child (MLflow's ``mlflow.parentRunId`` tag); a relaunch reuses it. ``var-lab analyze`` logs the report to it.
    """
    from var_lab.contract import TAG_KIND, TAG_SWEEP

    uri = normalize_tracking_uri(uri)
    experiment_id = get_or_create_experiment(uri, experiment)
    client = MlflowClient(uri)
    with _store_lock(uri):
        run_id = find_sweep_run(uri, experiment_id, sweep)
        if run_id is None:
            tags = {TAG_KIND: "sweep", TAG_SWEEP: sweep}
            if description:
                tags["mlflow.note.content"] = description
            return client.create_run(experiment_id, tags=tags, run_name=f"sweep {sweep}").info.run_id
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")  # launched again: points are running under it
    return run_id


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------


def mlflow_ui(uri: str) -> tuple[str, Optional[str]]:
    """(the base address of the MLflow UI for a store, the command that serves it, or None for a tracking server)."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/"), None
    return "http://127.0.0.1:5000", f"mlflow ui --backend-store-uri {uri}"


def run_page(uri: str, experiment_id: Optional[str], run_id: str) -> str:
    """The address of a run's page in the MLflow UI (see :func:`mlflow_ui` for a database store)."""
    base, _ = mlflow_ui(uri)
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if experiment_id else f"{base}/#/runs/{run_id}"


def run_address(uri: str, experiment_id: Optional[str], run_id: str) -> str:
    """Where a person looks at a run: its page on a tracking server, or the ``mlflow ui`` command and the page."""
    _, command = mlflow_ui(uri)
    page = run_page(uri, experiment_id, run_id)
    return page if command is None else f"`{command}`, then {page}"


def read_run_id(path: Union[str, Path]) -> Optional[str]:
    """The MLflow run id stored in ``path``, or None when the file does not exist.

    Raises:
        ValueError: the file exists but does not hold a run id.
    """
    path = Path(path)
    if not path.exists():
        return None
    run_id = path.read_text().strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{8,64}", run_id):
        raise ValueError(
            f"{path}: expected an MLflow run id (32 hex digits), found {run_id[:80]!r}; delete the file to start a "
            "new MLflow run, or write the id of the run to continue."
        )
    return run_id


def _read_run_id_quietly(path: Path) -> Optional[str]:
    try:
        return read_run_id(path)
    except ValueError:
        return None


def write_run_id(path: Union[str, Path], run_id: str) -> None:
    """Store an MLflow run id atomically (tmp file + ``os.replace``)."""
    write_atomic(Path(path), run_id + "\n")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"model.depth": "16", ...}`` with MLflow-ready string values.

    Tuples and lists are written as ``[1, 2, 3]``; values longer than MLflow's limit are truncated.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        else:
            flat[name] = _param_value(value)
    return flat


def _param_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return str(value)[:MAX_PARAM_VAL_LENGTH]


@contextlib.contextmanager
def _http_limits(max_retries: int, timeout_s: int) -> Iterator[None]:
    """Short HTTP retries and timeout for the enclosed MLflow calls.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) block a training step for minutes when the
    server is down; the spool makes waiting pointless. Values the user set in the environment are kept.
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    }
    with _ENV_LOCK:
        added = [key for key in wanted if key not in os.environ]
        for key in added:
            os.environ[key] = wanted[key]
        try:
            yield
        finally:
            for key in added:
                os.environ.pop(key, None)


def _is_transient(exc: BaseException) -> bool:
    """True when the store may accept the same request later (down, busy, timed out)."""
    if isinstance(exc, MlflowException):
        if exc.error_code in _TRANSIENT_CODES:
            return True
        text = str(exc).lower()
        return "database is locked" in text or "connection" in text or "timed out" in text
    if isinstance(exc, (ConnectionError, TimeoutError, OSError, sqlite3.OperationalError)):
        return True
    try:
        import sqlalchemy.exc

        return isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError))
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        return False


def _is_busy(exc: BaseException) -> bool:
    """True when the store is up but contended (sqlite lock, 503/429): worth a quick local retry."""
    code = getattr(exc, "error_code", None)
    text = str(exc).lower()
    return code in _BUSY_CODES or "locked" in text or "busy" in text


class StoreUnavailableError(RuntimeError):
    """The tracking store did not take a request; ``done`` records before it were delivered."""

    def __init__(self, message: str, done: Optional[int] = None):
        super().__init__(message)
        self.done = done


def _call(fn: Callable[[], Any], lock_retries: int, max_block_s: float) -> Any:
    """Run ``fn``, retrying a busy store with backoff; transient errors become StoreUnavailableError."""
    start = time.monotonic()
    for attempt in range(lock_retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            elapsed = time.monotonic() - start
            if attempt < lock_retries and _is_busy(exc) and elapsed < max_block_s:
                # Exponential backoff with jitter so that contending writers spread out.
                time.sleep(min(0.1 * 2**attempt, 2.0) * (1.0 + random.random()))
                continue
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
    raise AssertionError("unreachable")  # pragma: no cover
