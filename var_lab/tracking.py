"""MLflow tracking: store setup, a resilient Lightning logger, and the local spool that ``var-lab sync`` delivers.

Layout of one output root (a sweep or a single study)::

    <output_root>/mlflow.db              sqlite tracking store (the default; created once by ensure_store)
    <output_root>/mlflow.db.lock         fcntl lock serialising schema creation and experiment creation
    <output_root>/mlartifacts/<name>/    artifact location of experiment <name> (next to the database)
    <output_dir>/mlflow_run_id           MLflow run id of this run (written atomically by rank 0)
    <output_dir>/mlflow_spool.jsonl      points kept locally while the store was unreachable
    <output_dir>/mlflow_spool.rejected.jsonl  points the store refused for good (with the reason)
    <output_dir>/mlflow_spool_artifacts/ copies of artifacts logged while the store was unreachable

Delivery is at-least-once and the store makes it exactly-once: a metric point keeps the timestamp it was taken with,
and MLflow's SQL store drops a point whose (key, value, step, timestamp) is already recorded. Re-sending a spool line
after a crash therefore never duplicates a point.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

from lightning.fabric.utilities.logger import _add_prefix, _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from var_lab.atomic import write_atomic
from var_lab.contract import KINDS, TAG_KIND, TAG_POINT, TAG_SWEEP  # noqa: F401 - TAG_* re-exported
from var_lab.provenance import git_commit  # noqa: F401 - re-exported for callers of var_lab.tracking

log = logging.getLogger(__name__)

DEFAULT_DB_NAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"
RUN_ID_FILENAME = "mlflow_run_id"
SPOOL_FILENAME = "mlflow_spool.jsonl"
REJECTED_FILENAME = "mlflow_spool.rejected.jsonl"
SPOOL_ARTIFACTS_DIRNAME = "mlflow_spool_artifacts"


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


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Records and their delivery (shared by the logger and `var-lab sync`)
# ----------------------------------------------------------------------------------------------------------------------
# One record is a JSON object: {"uri", "run_id", "type", ...} with type
#   metric:   key, value, step, timestamp (ms)      param / tag: key, value
#   status:   status (RUNNING|FINISHED|FAILED|KILLED), end_time (ms)
#   artifact: path (local file or folder), artifact_path (folder inside the run's artifacts, or null)

_BATCHABLE = {"metric": MAX_METRICS_PER_BATCH, "param": MAX_PARAMS_TAGS_PER_BATCH, "tag": MAX_PARAMS_TAGS_PER_BATCH}


def _segments(records: list[dict]) -> Iterator[list[dict]]:
    """Contiguous runs of records that one MLflow call delivers (same store, run and type, within batch limits)."""
    current: list[dict] = []
    for record in records:
        limit = _BATCHABLE.get(record["type"])
        if current:
            head = current[0]
            same = (head["uri"], head["run_id"], head["type"]) == (record["uri"], record["run_id"], record["type"])
            if not (limit and same and len(current) < limit):
                yield current
                current = []
        current.append(record)
        if limit is None:
            yield current
            current = []
    if current:
        yield current


def _send(client: MlflowClient, records: list[dict]) -> None:
    """One MLflow call for a segment (see _segments)."""
    head = records[0]
    run_id, kind = head["run_id"], head["type"]
    if kind == "metric":
        metrics = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in records]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    elif kind == "param":
        # A batch may not repeat a key; the same key and value twice is one param.
        unique = {(r["key"], r["value"]): r for r in records}
        client.log_batch(run_id, params=[Param(k, v) for k, v in unique], synchronous=True)
    elif kind == "tag":
        client.log_batch(run_id, tags=[RunTag(r["key"], r["value"]) for r in records], synchronous=True)
    elif kind == "status":
        if head["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, head["status"], end_time=head.get("end_time"))
    elif kind == "artifact":
        path = Path(head["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), head.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), head.get("artifact_path"))
    else:
        raise MlflowException(f"unknown record type {kind!r}", error_code="INVALID_PARAMETER_VALUE")


def _validate_record(record: Any) -> Optional[str]:
    """None when ``record`` can be delivered, else why not."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [key for key in ("uri", "run_id", "type") if key not in record]
    if missing:
        return f"missing keys {missing}"
    required = {
        "metric": ("key", "value", "step", "timestamp"),
        "param": ("key", "value"),
        "tag": ("key", "value"),
        "status": ("status",),
        "artifact": ("path",),
    }.get(record["type"])
    if required is None:
        return f"unknown record type {record['type']!r}"
    missing = [key for key in required if key not in record]
    if missing:
        return f"missing keys {missing}"
    if record["type"] == "artifact" and not Path(record["path"]).exists():
        return f"artifact file {record['path']} no longer exists"
    return None


def deliver_records(
    records: list[dict],
    client_for: Callable[[str], MlflowClient],
    reject: Callable[[dict, str], None],
    lock_retries: int = 6,
    max_block_s: float = 30.0,
    progress: Optional[Callable[[int], None]] = None,
) -> None:
    """Deliver records in order, one MLflow call per segment.

    A segment the store refuses for good is retried record by record, and what is still refused goes to ``reject``
    (so one bad point cannot block the others). A changed param (MLflow params are immutable) is rejected with both
    values, the rest of its batch is delivered.

    Args:
        records: see the record format above.
        client_for: MlflowClient for a tracking URI.
        reject: called with (record, reason) for records the store refuses for good.
        lock_retries: quick retries of a busy store (sqlite lock, 503) per call.
        max_block_s: stop retrying a busy store after this long.
        progress: called with the number of records done after each call.

    Raises:
        StoreUnavailableError: the store is down or stayed busy; ``done`` records before it were delivered or rejected.
    """
    done = 0
    for segment in _segments(records):
        try:
            client = client_for(segment[0]["uri"])
        except StoreUnavailableError as exc:
            exc.done = done
            raise
        try:
            _call(lambda seg=segment, c=client: _send(c, seg), lock_retries, max_block_s)
        except StoreUnavailableError as exc:
            exc.done = done
            raise
        except Exception as exc:
            if segment[0]["type"] == "param":
                _send_params_checked(client, segment, reject, lock_retries, max_block_s, done)
            elif len(segment) == 1:
                reject(segment[0], f"{type(exc).__name__}: {exc}")
            else:
                # Isolate the records the store refuses; the others still go in.
                for index, record in enumerate(segment):
                    try:
                        _call(lambda rec=record, c=client: _send(c, [rec]), lock_retries, max_block_s)
                    except StoreUnavailableError as unavailable:
                        unavailable.done = done + index
                        raise
                    except Exception as single_exc:
                        reject(record, f"{type(single_exc).__name__}: {single_exc}")
        done += len(segment)
        if progress is not None:
            progress(len(segment))


def _send_params_checked(
    client: MlflowClient,
    segment: list[dict],
    reject: Callable[[dict, str], None],
    lock_retries: int,
    max_block_s: float,
    done: int,
) -> None:
    """Params after a refused batch: keep what is already logged, reject changed values, log the new keys."""
    run_id = segment[0]["run_id"]
    try:
        existing = _call(lambda: client.get_run(run_id).data.params, lock_retries, max_block_s)
    except StoreUnavailableError as exc:
        exc.done = done
        raise
    except Exception as exc:  # e.g. the run was deleted
        for record in segment:
            reject(record, f"{type(exc).__name__}: {exc}")
        return
    fresh = []
    for record in segment:
        old = existing.get(record["key"])
        if old is None:
            fresh.append(record)
        elif old != record["value"]:
            reject(
                record,
                f"param {record['key']!r} is already logged as {old!r}; MLflow params are immutable, so the new value "
                f"{record['value']!r} was not logged",
            )
    for record in fresh:
        try:
            _call(lambda rec=record: _send(client, [rec]), lock_retries, max_block_s)
        except StoreUnavailableError as exc:
            exc.done = done  # the whole segment is sent again; the store keeps a param logged twice once
            raise
        except Exception as exc:
            reject(record, f"{type(exc).__name__}: {exc}")


@dataclass
class DeliveryReport:
    """Outcome of delivering one spool file."""

    path: Path
    delivered: int = 0
    rejected: int = 0
    remaining: int = 0
    error: Optional[str] = None


class Spool:
    """Append-only JSONL file of tracking records that could not be delivered yet.

    Appends and deliveries hold an fcntl lock on ``<spool>.lock``, so the training process and ``var-lab sync`` can
    work on the same file. A delivery rewrites the file atomically with what is left (or removes it).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.rejected_path = self.path.with_name(REJECTED_FILENAME)
        self.artifacts_dir = self.path.with_name(SPOOL_ARTIFACTS_DIRNAME)

    def exists(self) -> bool:
        """True when there are spooled records."""
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def append(self, records: Iterable[dict]) -> int:
        """Append records (artifacts are copied into the spool folder first). Returns the number appended."""
        lines = []
        for record in records:
            if record["type"] == "artifact":
                record = self._keep_artifact(record)
            lines.append(json.dumps(record, allow_nan=True) + "\n")
        if not lines:
            return 0
        with _file_lock(self.lock_path):
            with open(self.path, "a+b") as handle:
                # A crash in the middle of a write leaves a line without its newline; start a fresh line after it.
                if handle.tell() > 0:
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")
                handle.write("".join(lines).encode())
                handle.flush()
                os.fsync(handle.fileno())
        return len(lines)

    def _keep_artifact(self, record: dict) -> dict:
        source = Path(record["path"])
        if source.is_relative_to(self.artifacts_dir) or not source.exists():
            return record
        target = self.artifacts_dir / uuid.uuid4().hex / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return {**record, "path": str(target)}

    def read(self) -> tuple[list[dict], list[tuple[str, str]]]:
        """Spooled records, and (line, reason) for lines that cannot be delivered (torn or malformed)."""
        if not self.path.exists():
            return [], []
        records, bad = [], []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append((line, "unreadable line (a write torn by a crash?)"))
                continue
            problem = _validate_record(record)
            if problem:
                bad.append((line, problem))
            else:
                records.append(record)
        return records, bad

    def filter(self, keep: Callable[[dict], bool]) -> int:
        """Drop spooled records for which ``keep`` is false. Returns the number dropped."""
        with _file_lock(self.lock_path):
            records, bad = self.read()
            kept = [r for r in records if keep(r)]
            if len(kept) != len(records):
                self._rewrite(kept, [line for line, _ in bad])
            return len(records) - len(kept)

    def _rewrite(self, records: list[dict], raw_lines: list[str] = ()) -> None:
        if not records and not raw_lines:
            self.path.unlink(missing_ok=True)
            return
        text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records) + "".join(f"{x}\n" for x in raw_lines)
        write_atomic(self.path, text)

    def _append_rejected(self, items: list[tuple[Any, str]]) -> None:
        if not items:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with open(self.rejected_path, "a") as handle:
            for record, reason in items:
                handle.write(json.dumps({"record": record, "reason": reason, "time": stamp}, allow_nan=True) + "\n")

    def deliver(
        self,
        client_for: Callable[[str], MlflowClient],
        uri_override: Optional[str] = None,
        lock_retries: int = 6,
        max_block_s: float = 30.0,
        show_progress: bool = False,
    ) -> DeliveryReport:
        """Deliver the spooled records in order; keep what the store did not take.

        Args:
            client_for: MlflowClient for a tracking URI.
            uri_override: deliver to this store instead of the one recorded in each line.
            lock_retries: quick retries of a busy store per call.
            max_block_s: stop retrying a busy store after this long.
            show_progress: tqdm progress bar (``var-lab sync``).

        Returns:
            Counts of delivered, rejected (moved to ``mlflow_spool.rejected.jsonl`` with the reason) and remaining
            records, and the error that stopped the delivery.
        """
        report = DeliveryReport(self.path)
        if uri_override:
            original_client_for = client_for

            def client_for(_uri: str) -> MlflowClient:
                return original_client_for(uri_override)

        with _file_lock(self.lock_path):
            records, bad = self.read()
            rejected: list[tuple[Any, str]] = list(bad)
            done = len(records)
            bar = None
            if show_progress and records:
                from tqdm import tqdm

                bar = tqdm(total=len(records), desc=f"sync {self.path.parent.name}", unit="rec", leave=False)
            try:
                deliver_records(
                    records,
                    client_for,
                    lambda record, reason: rejected.append((record, reason)),
                    lock_retries,
                    max_block_s,
                    progress=bar.update if bar is not None else None,
                )
            except StoreUnavailableError as exc:
                done = exc.done or 0
                report.error = str(exc)
            finally:
                if bar is not None:
                    bar.close()
            remaining = records[done:]
            self._append_rejected(rejected)
            self._rewrite(remaining)
            self._remove_delivered_artifacts(records[:done])
            report.rejected = len(rejected)
            report.delivered = done - (len(rejected) - len(bad))
            report.remaining = len(remaining)
        return report

    def _remove_delivered_artifacts(self, records: list[dict]) -> None:
        for record in records:
            if record["type"] != "artifact":
                continue
            path = Path(record["path"])
            if path.is_relative_to(self.artifacts_dir) and path.parent != self.artifacts_dir:
                shutil.rmtree(path.parent, ignore_errors=True)
        with contextlib.suppress(OSError):  # only when empty
            self.artifacts_dir.rmdir()


# ----------------------------------------------------------------------------------------------------------------------
# The Lightning logger
# ----------------------------------------------------------------------------------------------------------------------

_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger that never loses a point and never stalls training on a dead store.

    - Always an explicit tracking URI; the experiment is created race-safely with its artifacts next to the store.
    - The run id is written to ``run_id_file`` (atomically, by rank 0) as soon as the run exists; passing it back as
      ``run_id`` continues the same run (a resumed or requeued job). The run is set back to RUNNING.
    - A busy store (sqlite ``database is locked``, HTTP 503) is retried with backoff; a store that stays busy or is
      unreachable gets the points appended to ``<output_dir>/mlflow_spool.jsonl`` instead, and training goes on.
      The spool is delivered on a later call (no more often than every ``retry_interval_s``, doubling while the
      store stays down) and at ``finalize``; what is left is delivered by ``var-lab sync``.
    - On resume, metric points at or before the last step already recorded for a key (in the store or the spool)
      are skipped, so the steps a killed run repeats after its last checkpoint are logged once.
    - Params are flattened with ``.`` (``model.depth``); re-logging a param with the same value is fine, a changed
      value is kept in ``mlflow_spool.rejected.jsonl`` with a warning instead of failing the run.

    Args:
        output_dir: the run's folder (spool and default run id file go here).
        tracking_uri: tracking URI (see :func:`resolve_tracking_uri`).
        experiment_name: MLflow experiment.
        run_name: MLflow run name (new runs only).
        tags: run tags (new runs only).
        run_id: continue this run instead of creating one.
        run_id_file: where the run id is written (default ``<output_dir>/mlflow_run_id``).
        artifact_root: artifact root of a new experiment (default: next to an sqlite store; the server's otherwise).
        skip_logged_steps: skip points already recorded for a step on resume (see above).
        retry_interval_s: wait at least this long between delivery attempts while the store is down.
        max_retry_interval_s: cap of the doubling retry interval.
        lock_retries: quick retries of a busy store per call.
        max_block_s: longest a single logging call waits on a busy store before spooling.
        http_max_retries: HTTP retries per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES unless set in the environment).
        http_timeout_s: HTTP timeout per request (MLFLOW_HTTP_REQUEST_TIMEOUT unless set in the environment).
        log_model: as in MLFlowLogger.
        prefix: as in MLFlowLogger.
    """

    def __init__(
        self,
        output_dir: Union[str, Path],
        tracking_uri: str,
        experiment_name: str = "var-lab",
        run_name: Optional[str] = None,
        tags: Optional[dict[str, Any]] = None,
        run_id: Optional[str] = None,
        run_id_file: Optional[Union[str, Path]] = None,
        artifact_root: Optional[Union[str, Path]] = None,
        skip_logged_steps: bool = True,
        retry_interval_s: float = 30.0,
        max_retry_interval_s: float = 600.0,
        lock_retries: int = 6,
        max_block_s: float = 30.0,
        http_max_retries: int = 1,
        http_timeout_s: int = 10,
        log_model: Union[bool, str] = False,
        prefix: str = "",
    ):
        tracking_uri = normalize_tracking_uri(tracking_uri, "tracking_uri")
        self.output_dir = Path(os.path.abspath(output_dir))
        self.run_id_file = Path(run_id_file) if run_id_file is not None else self.output_dir / RUN_ID_FILENAME
        self.spool = Spool(self.output_dir / SPOOL_FILENAME)
        self._artifact_root = str(artifact_root) if artifact_root is not None else default_artifact_root(tracking_uri)
        self._skip_logged_steps = skip_logged_steps
        self._retry_interval_s = retry_interval_s
        self._max_retry_interval_s = max_retry_interval_s
        self._lock_retries = lock_retries
        self._max_block_s = max_block_s
        self._http = (http_max_retries, http_timeout_s)
        self._resumed = run_id is not None
        self._session = uuid.uuid4().hex  # marks the spool lines written by this logger instance
        self._lock = threading.RLock()
        self._offline_since: Optional[float] = None
        self._failures = 0
        self._last_attempt = 0.0
        self._store_steps_pending = False
        self._logged_steps: dict[str, int] = {}
        self._epoch_point: Optional[tuple[int, float]] = None  # the last (step, value) of "epoch" sent
        self.num_skipped = 0  # points not logged because the store already has their step (resume)
        self.num_spooled = 0  # records kept in the spool
        self.num_rejected = 0  # records the store refused for good
        with _http_limits(*self._http):
            super().__init__(
                experiment_name=experiment_name,
                run_name=run_name,
                tracking_uri=tracking_uri,
                tags={k: str(v) for k, v in (tags or {}).items()},
                log_model=log_model,
                prefix=prefix,
                artifact_location=None,
                run_id=run_id,
            )

    def __getstate__(self) -> dict:
        # Picklable for strategies that send the trainer to new processes (ddp_spawn); locks are not.
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- run lifecycle --------------------------------------------------------------------------------------------

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        """The MlflowClient, after the run exists (rank 0; other ranks get Lightning's dummy)."""
        if self._initialized:
            return self._mlflow_client
        with self._lock, _http_limits(*self._http):
            if self._initialized:
                return self._mlflow_client
            if self._run_id is None and self._experiment_id is None:
                try:
                    self._experiment_id = get_or_create_experiment(
                        self._tracking_uri, self._experiment_name, self._artifact_root
                    )
                except Exception as exc:
                    if _is_transient(exc):
                        raise self._unreachable_error(exc) from exc
                    raise
            try:
                client = MLFlowLogger.experiment.fget(self)
            except Exception as exc:
                if self._run_id is not None and _is_transient(exc):
                    # Resuming while the store is down: keep everything in the spool until it returns.
                    self._initialized = True
                    self._store_steps_pending = self._skip_logged_steps
                    self._mark_offline(exc)
                    self._prepare_resume(online=False)
                    return self._mlflow_client
                if self._run_id is not None and getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                    raise RuntimeError(
                        f"MLflow run {self._run_id} (from {self.run_id_file}) does not exist in {self._tracking_uri}; "
                        "point tracking.tracking_uri at the store that holds it, or delete the run id file to start "
                        "a new MLflow run."
                    ) from exc
                if _is_transient(exc):
                    raise self._unreachable_error(exc) from exc
                raise
            if self._resumed:
                self._prepare_resume(online=True)
            if _read_run_id_quietly(self.run_id_file) != self._run_id:
                write_run_id(self.run_id_file, self._run_id)
            return client

    def _unreachable_error(self, exc: BaseException) -> RuntimeError:
        return RuntimeError(
            f"MLflow tracking store {self._tracking_uri} is unreachable and no run exists yet to continue "
            f"({self.run_id_file} is absent), so there is nothing to keep points for: start the store (e.g. "
            f"`mlflow server`) or point tracking.tracking_uri elsewhere. Cause: {type(exc).__name__}: {exc}"
        )

    def _prepare_resume(self, online: bool) -> None:
        """Set the run back to RUNNING and learn the last step of each metric already recorded."""
        if self._skip_logged_steps:
            for record in self.spool.read()[0]:
                if record["run_id"] == self._run_id and record["type"] == "metric":
                    step = self._logged_steps.get(record["key"], -1)
                    self._logged_steps[record["key"]] = max(step, int(record["step"]))
            if online:
                try:
                    self._merge_store_steps()
                except StoreUnavailableError as exc:
                    self._store_steps_pending = True
                    self._mark_offline(exc)
        self._emit([self._record("status", status="RUNNING")])

    def _merge_store_steps(self) -> None:
        """Raise each key's skip step to the last step the store has (MLflow keeps the max step as latest)."""
        run = _call(lambda: self._mlflow_client.get_run(self._run_id), self._lock_retries, self._max_block_s)
        metric_objects = getattr(run.data, "_metric_objs", None)
        if metric_objects is None:  # pragma: no cover - older MLflow
            metric_objects = [
                max(self._mlflow_client.get_metric_history(self._run_id, key), key=lambda m: m.step)
                for key in run.data.metrics
            ]
        for metric in metric_objects:
            self._logged_steps[metric.key] = max(self._logged_steps.get(metric.key, -1), int(metric.step))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Upload checkpoints when ``log_model`` asks for it; a store outage only costs the upload, with a warning."""
        try:
            with _http_limits(*self._http):
                super().after_save_checkpoint(checkpoint_callback)
        except Exception as exc:
            if not _is_transient(exc):
                raise
            warnings.warn(f"MLflow: checkpoint not uploaded ({type(exc).__name__}: {exc})", stacklevel=2)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Deliver what is spooled and set the run's final status (spooled too while the store is down)."""
        if not self._initialized:
            return
        if self._checkpoint_callback:
            try:
                with _http_limits(*self._http):
                    self._scan_and_log_checkpoints(self._checkpoint_callback)
            except Exception as exc:  # checkpoints stay on disk; uploading them is a convenience
                warnings.warn(f"MLflow: could not upload checkpoints ({type(exc).__name__}: {exc})", stacklevel=2)
        self._emit([self._record("status", status=_STATUS.get(status, status.upper()), end_time=_now_ms())], force=True)
        if self.spool.exists():
            warnings.warn(
                f"MLflow store {self._tracking_uri} is unreachable; {self.spool.path} keeps the points not delivered. "
                f"Deliver them with `var-lab sync --output-dir {self.output_dir}` once the store is back.",
                stacklevel=2,
            )

    # -- logging ----------------------------------------------------------------------------------------------------

    @rank_zero_only
    def log_hyperparams(self, params: Union[dict[str, Any], argparse.Namespace]) -> None:
        """Log params, flattened with ``.`` (``{"model": {"depth": 16}}`` -> ``model.depth``)."""
        params = _flatten_dict(_convert_params(params), delimiter=".")
        self._emit([self._record("param", key=k, value=_param_value(v)) for k, v in params.items()])

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Log scalar metrics at ``step`` (strings are dropped with a warning, as Lightning does)."""
        _ = self.run_id  # attach first: on resume this learns which steps are already recorded
        timestamp = _now_ms()
        step = int(step or 0)
        records = []
        for key, value in _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            if isinstance(value, str):
                log.warning("Discarding metric with string value %s=%s.", key, value)
                continue
            clean = re.sub("[^a-zA-Z0-9_/. -]+", "", key)
            if self._logged_steps.get(clean, -1) >= step:
                if self.num_skipped == 0:
                    log.info("MLflow run %s already has step %d of %r; skipping repeats", self.run_id, step, clean)
                self.num_skipped += 1
                continue
            value = float(value.item() if hasattr(value, "item") else value)
            if clean == "epoch":
                # Lightning adds "epoch" to each batch of metrics it logs; a step that also validates sends two
                # batches (the step's, then the validation's), which would record the same epoch point twice.
                if self._epoch_point == (step, value):
                    continue
                self._epoch_point = (step, value)
            records.append(self._record("metric", key=clean, value=value, step=step, timestamp=timestamp))
        self._emit(records)

    @rank_zero_only
    def log_artifact(self, local_path: Union[str, Path], artifact_path: Optional[str] = None) -> None:
        """Upload a file or folder to the run's artifacts (copied into the spool while the store is down)."""
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self._emit([self._record("artifact", path=str(path.resolve()), artifact_path=artifact_path)])

    def flush(self) -> DeliveryReport:
        """Try to deliver the spool now (whatever the retry interval). Returns the delivery report."""
        with self._lock, _http_limits(*self._http):
            return self._deliver_spool()

    def _record(self, kind: str, **fields: Any) -> dict:
        return {"uri": self._tracking_uri, "run_id": self.run_id, "type": kind, "session": self._session, **fields}

    def _client_for(self, uri: str) -> MlflowClient:
        return self._mlflow_client if uri == self._tracking_uri else MlflowClient(uri)

    def _reject(self, record: dict, reason: str) -> None:
        self.spool._append_rejected([(record, reason)])
        self.num_rejected += 1
        if self.num_rejected == 1 or self.num_rejected % 100 == 0:
            warnings.warn(
                f"MLflow refused {record['type']} {record.get('key', '')!r}: {reason} ({self.num_rejected} refused so "
                f"far, kept in {self.spool.rejected_path})",
                stacklevel=3,
            )

    def _mark_offline(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._failures += 1
        self._last_attempt = now
        if self._offline_since is None:
            self._offline_since = now
            log.warning(
                "MLflow store %s unreachable (%s); training goes on and points are kept in %s",
                self._tracking_uri,
                exc,
                self.spool.path,
            )

    def _retry_due(self) -> bool:
        interval = min(self._retry_interval_s * 2 ** max(self._failures - 1, 0), self._max_retry_interval_s)
        return time.monotonic() - self._last_attempt >= interval

    def _deliver_spool(self) -> DeliveryReport:
        if self._store_steps_pending:
            # Resumed while the store was down: now that it answers, drop points this process repeated.
            try:
                self._merge_store_steps()
            except StoreUnavailableError as exc:
                self._mark_offline(exc)
                return DeliveryReport(self.spool.path, remaining=1, error=str(exc))
            steps = dict(self._logged_steps)
            self.num_skipped += self.spool.filter(
                lambda r: (
                    not (
                        r.get("session") == self._session
                        and r["type"] == "metric"
                        and steps.get(r["key"], -1) >= int(r["step"])
                    )
                )
            )
            self._store_steps_pending = False
        report = self.spool.deliver(self._client_for, None, self._lock_retries, self._max_block_s)
        if report.remaining:
            self._mark_offline(StoreUnavailableError(report.error or "store unavailable"))
        elif self._offline_since is not None:
            log.warning("MLflow store %s is back; delivered %d spooled records", self._tracking_uri, report.delivered)
            self._offline_since, self._failures = None, 0
        return report

    def _emit(self, records: list[dict], force: bool = False) -> None:
        """Deliver now, or spool: the store is known to be down, or it fails now."""
        if not records:
            return
        with self._lock, _http_limits(*self._http):
            if self._offline_since is not None and not force and not self._retry_due():
                self.num_spooled += self.spool.append(records)
                return
            if self._offline_since is not None or self.spool.exists():
                if self._deliver_spool().remaining:
                    self.num_spooled += self.spool.append(records)
                    return
            try:
                deliver_records(records, self._client_for, self._reject, self._lock_retries, self._max_block_s)
            except StoreUnavailableError as exc:
                self.num_spooled += self.spool.append(records[exc.done or 0 :])
                self._mark_offline(exc)


def _now_ms() -> int:
    return int(time.time() * 1000)


def make_mlflow_logger(
    tracking_cfg: Any,
    output_dir: Union[str, Path],
    tags: Optional[dict[str, Any]] = None,
    run_id_file: Optional[Union[str, Path]] = None,
    *,
    output_root: Optional[Union[str, Path]] = None,
    run_name: Optional[str] = None,
    **logger_kwargs: Any,
) -> ResilientMLFlowLogger:
    """The Lightning MLflow logger of a run, from its ``TrackingConfig``.

    Resolves the tracking URI (config > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<output_root>/mlflow.db``), creates the
    database if needed (lock-protected), adds the ``var_lab.sweep`` / ``var_lab.point`` tags from the config, and
    continues the run named in ``run_id_file`` when it exists.

    Args:
        tracking_cfg: ``var_lab.config.TrackingConfig`` (tracking_uri, experiment, run_name, sweep, point).
        output_dir: the run's folder (checkpoints, run id file, spool).
        tags: extra run tags, e.g. ``{TAG_KIND: "var"}`` (kind: one of ``var_lab.contract.KINDS``).
        run_id_file: file holding the MLflow run id (default ``<output_dir>/mlflow_run_id``).
        output_root: folder of the default sqlite store (default: the parent of output_dir).
        run_name: run name when the config has none.
        **logger_kwargs: passed to :class:`ResilientMLFlowLogger` (retry intervals, log_model, ...).

    Returns:
        The logger; give it to ``Trainer(logger=...)``.

    Raises:
        ValueError: a bad tracking URI, a bad ``var_lab.kind`` tag or a run id file without a run id.
    """
    output_dir = Path(os.path.abspath(output_dir))
    root = Path(output_root) if output_root is not None else output_dir.parent
    uri = resolve_tracking_uri(getattr(tracking_cfg, "tracking_uri", None), root)
    if _is_database_uri(uri):
        ensure_store(uri)
    all_tags: dict[str, str] = {}
    if getattr(tracking_cfg, "sweep", None):
        all_tags[TAG_SWEEP] = str(tracking_cfg.sweep)
    if getattr(tracking_cfg, "point", None):
        all_tags[TAG_POINT] = str(tracking_cfg.point)
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    if TAG_KIND in all_tags and all_tags[TAG_KIND] not in KINDS:
        raise ValueError(f"tag {TAG_KIND}={all_tags[TAG_KIND]!r}: allowed values are {', '.join(KINDS)}")
    run_id_path = Path(run_id_file) if run_id_file is not None else output_dir / RUN_ID_FILENAME
    return ResilientMLFlowLogger(
        output_dir=output_dir,
        tracking_uri=uri,
        experiment_name=getattr(tracking_cfg, "experiment", "var-lab"),
        run_name=getattr(tracking_cfg, "run_name", None) or run_name,
        tags=all_tags,
        run_id=read_run_id(run_id_path),
        run_id_file=run_id_path,
        **logger_kwargs,
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


# ----------------------------------------------------------------------------------------------------------------------
# var-lab sync
# ----------------------------------------------------------------------------------------------------------------------


def find_spools(paths: Iterable[Union[str, Path]]) -> list[Path]:
    """Spool files in the given run folders, searched recursively (a sweep root finds all its runs)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif (path / SPOOL_FILENAME).is_file():
            found.append(path / SPOOL_FILENAME)
        else:
            found.extend(sorted(path.rglob(SPOOL_FILENAME)))
    return sorted(set(found))


def sync_main(argv: list[str]) -> int:
    """``var-lab sync``: deliver the points runs kept locally while the tracking store was unreachable.

    Returns:
        0 when everything was delivered (or there was nothing to deliver), 1 when records remain or were refused,
        2 for bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="var-lab sync",
        description=(
            f"Deliver the metrics, params, statuses and artifacts that runs kept in {SPOOL_FILENAME} while the MLflow "
            "store was unreachable. Safe to repeat and to run while training goes on: delivered lines are removed, "
            "and the store ignores a point it already has."
        ),
    )
    parser.add_argument(
        "--output-dir",
        action="extend",
        nargs="+",
        default=None,
        metavar="DIR",
        help="a run's output folder, or a folder searched recursively for spool files (repeatable; default: .)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="deliver to this store instead of the one recorded with each point (when the server moved)",
    )
    parser.add_argument("--http-timeout", type=int, default=30, help="HTTP timeout per request in seconds")
    args = parser.parse_args(argv)
    folders = [Path(p) for p in (args.output_dir or ["."])]
    missing = [str(p) for p in folders if not p.exists()]
    if missing:
        print(f"var-lab sync: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    uri_override = None
    if args.tracking_uri:
        try:
            uri_override = normalize_tracking_uri(args.tracking_uri, "--tracking-uri")
        except ValueError as exc:
            print(f"var-lab sync: {exc}", file=sys.stderr)
            return 2
    spools = find_spools(folders)
    if not spools:
        print(f"var-lab sync: nothing to deliver under {', '.join(map(str, folders))}")
        return 0
    clients: dict[str, MlflowClient] = {}

    def client_for(uri: str) -> MlflowClient:
        if uri not in clients:
            db = sqlite_path(uri)
            if db is not None and not db.is_file():
                # Never create an empty store here: the runs the points belong to would not be in it.
                raise StoreUnavailableError(f"sqlite database {db} does not exist (moved? see --tracking-uri)")
            clients[uri] = MlflowClient(uri)
        return clients[uri]

    rows = []
    with _http_limits(2, args.http_timeout):
        for path in spools:
            report = Spool(path).deliver(client_for, uri_override, show_progress=True)
            rows.append(report)
    width = max(len(str(r.path)) for r in rows)
    print(f"{'spool'.ljust(width)}  delivered  rejected  remaining")
    for r in rows:
        print(f"{str(r.path).ljust(width)}  {r.delivered:9d}  {r.rejected:8d}  {r.remaining:9d}")
        if r.error:
            print(f"  store unavailable: {r.error}", file=sys.stderr)
        if r.rejected:
            print(f"  refused records and reasons: {Spool(r.path).rejected_path}", file=sys.stderr)
    return 0 if all(r.remaining == 0 and r.rejected == 0 for r in rows) else 1
