"""The records of a run, their delivery to a store, the local spool and ``var-lab sync``.

One record is a JSON object (see the format below) for a metric point, a param, a tag, a run status or an artifact.
:func:`deliver_records` sends them in order, batched; a store that is down raises
:class:`~var_lab.tracking.store.StoreUnavailableError` and the rest goes to a :class:`Spool`, an append-only JSONL
file in the run's folder that a later delivery or ``var-lab sync`` (:func:`sync_main`) sends on.

Delivery is at-least-once and the store makes it exactly-once: a metric point keeps the timestamp it was taken with,
and MLflow's SQL store drops a point whose (key, value, step, timestamp) is already recorded. Re-sending a spool line
after a crash therefore never duplicates a point.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from var_lab.atomic import write_atomic
from var_lab.inputs import ArgumentParser
from var_lab.tracking.store import (
    StoreUnavailableError,
    _call,
    _file_lock,
    _http_limits,
    normalize_tracking_uri,
    sqlite_path,
)

SPOOL_FILENAME = "mlflow_spool.jsonl"
REJECTED_FILENAME = "mlflow_spool.rejected.jsonl"
SPOOL_ARTIFACTS_DIRNAME = "mlflow_spool_artifacts"


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
        if head.get("image_key"):
            # MLflow's image with a step (its UI shows the grids of a key as a step slider)
            from PIL import Image

            with Image.open(path) as image:
                client.log_image(
                    run_id, image.convert("RGB"), key=head["image_key"], step=int(head.get("step") or 0),
                    timestamp=head.get("timestamp"), synchronous=True,
                )  # fmt: skip
        elif path.is_dir():
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


def store_clients() -> Callable[[str], MlflowClient]:
    """An MlflowClient per tracking URI, made once; a sqlite store that does not exist is unavailable, never created.

    Records always belong to runs already in a store, so an empty new database could only swallow them.
    """
    clients: dict[str, MlflowClient] = {}

    def client_for(uri: str) -> MlflowClient:
        if uri not in clients:
            db = sqlite_path(uri)
            if db is not None and not db.is_file():
                raise StoreUnavailableError(f"sqlite database {db} does not exist (moved? see --tracking-uri)")
            clients[uri] = MlflowClient(uri)
        return clients[uri]

    return client_for


def logged_params(uri: str, run_id: str, http_timeout_s: int = 10) -> Optional[dict[str, str]]:
    """The params a run has logged, or None when its store is unreachable now.

    Raises:
        MlflowException: the store is up and has no such run.
    """
    with _http_limits(1, http_timeout_s):
        try:
            client = store_clients()(uri)
            return _call(lambda: client.get_run(run_id).data.params, lock_retries=6, max_block_s=30.0)
        except StoreUnavailableError:
            return None


def deliver_or_spool(
    records: list[dict], spool_path: Union[str, Path], http_max_retries: int = 1, http_timeout_s: int = 10
) -> DeliveryReport:
    """Deliver records now; what an unreachable store did not take is appended to the spool for ``var-lab sync``.

    The one way eval, analyze and a run's logger write to MLflow once their run exists: an outage costs nothing but
    a later ``var-lab sync``. Records the store refuses for good go to the rejected file beside the spool, with the
    reason.

    Args:
        records: see the record format above (their runs must exist).
        spool_path: the spool file (``<folder>/mlflow_spool.jsonl``, which ``var-lab sync --output-dir`` finds).
        http_max_retries: HTTP retries per call of a tracking server (a down server is not waited for).
        http_timeout_s: HTTP timeout per request.

    Returns:
        Counts: delivered, rejected, and remaining (spooled); ``error`` says why the store was unavailable.
    """
    spool = Spool(spool_path)
    report = DeliveryReport(spool.path)
    rejected: list[tuple[Any, str]] = []
    done = len(records)
    with _http_limits(http_max_retries, http_timeout_s):
        try:
            deliver_records(records, store_clients(), lambda record, reason: rejected.append((record, reason)))
        except StoreUnavailableError as exc:
            done = exc.done or 0
            report.error = str(exc)
    spool._append_rejected(rejected)
    report.remaining = spool.append(records[done:])
    report.rejected = len(rejected)
    report.delivered = done - len(rejected)
    return report


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
    parser = ArgumentParser(
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
    client_for = store_clients()
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
