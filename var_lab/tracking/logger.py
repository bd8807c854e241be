"""The Lightning logger of a run: :class:`ResilientMLFlowLogger`, and :func:`make_mlflow_logger` that builds it.

The logger delivers through :mod:`var_lab.tracking.spool` and keeps points in the run's spool while the store is
unreachable, so training never stalls on, or loses points to, a dead store.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from lightning.fabric.utilities.logger import _add_prefix, _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.tracking import MlflowClient

from var_lab.contract import KINDS, TAG_KIND, TAG_PARENT_RUN, TAG_POINT, TAG_SWEEP
from var_lab.tracking.spool import SPOOL_FILENAME, DeliveryReport, Spool, deliver_records
from var_lab.tracking.store import (
    RUN_ID_FILENAME,
    StoreUnavailableError,
    _call,
    _http_limits,
    _is_database_uri,
    _is_transient,
    _param_value,
    _read_run_id_quietly,
    default_artifact_root,
    ensure_store,
    find_sweep_run,
    get_or_create_experiment,
    normalize_tracking_uri,
    read_run_id,
    resolve_tracking_uri,
    write_run_id,
)

log = logging.getLogger(__name__)

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
                    self._adopt_sweep_parent()
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

    def _adopt_sweep_parent(self) -> None:
        """A new run of a launched sweep becomes a child of the sweep's parent run (made by ``sweep launch``)."""
        tags = self.tags if self.tags is not None else {}
        sweep = tags.get(TAG_SWEEP)
        if not sweep or TAG_PARENT_RUN in tags or tags.get(TAG_KIND) == "sweep":
            return
        parent = find_sweep_run(self._tracking_uri, self._experiment_id, sweep)
        if parent is not None:
            self.tags = {**tags, TAG_PARENT_RUN: parent}

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

    @rank_zero_only
    def log_image(self, local_path: Union[str, Path], key: str, step: int) -> None:
        """Log a PNG as MLflow's image ``key`` at ``step`` (``MlflowClient.log_image``; spooled while the store is
        down). The MLflow UI shows a key's images over the steps."""
        path = Path(local_path)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        record = self._record("artifact", path=str(path.resolve()), image_key=key, step=int(step), timestamp=_now_ms())
        self._emit([record])

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
