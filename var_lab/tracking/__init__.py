"""MLflow tracking: store setup, a resilient Lightning logger, and the local spool that ``var-lab sync`` delivers.

Submodules, each importing only the ones below it:

* :mod:`var_lab.tracking.logger`: :class:`ResilientMLFlowLogger` and :func:`make_mlflow_logger`, the logger of a run.
* :mod:`var_lab.tracking.spool`: records and their delivery (:func:`deliver_records`), the :class:`Spool` file, and
  ``var-lab sync`` (:func:`sync_main`).
* :mod:`var_lab.tracking.store`: tracking URIs, the sqlite store (:func:`ensure_store`), experiments, run-id files,
  params flattening and the retries of a busy store.

Layout of one output root (a sweep or a single study)::

    <output_root>/mlflow.db              sqlite tracking store (the default; created once by ensure_store)
    <output_root>/mlflow.db.lock         fcntl lock serialising schema creation and experiment creation
    <output_root>/mlartifacts/<name>/    artifact location of experiment <name> (next to the database)
    <output_dir>/mlflow_run_id           MLflow run id of this run (written atomically by rank 0)
    <output_dir>/mlflow_spool.jsonl      points kept locally while the store was unreachable
    <output_dir>/mlflow_spool.rejected.jsonl  points the store refused for good (with the reason)
    <output_dir>/mlflow_spool_artifacts/ copies of artifacts logged while the store was unreachable

The names below are re-exported so that ``from var_lab.tracking import X`` works; patch a name in the submodule that
holds it.
"""

from __future__ import annotations

from var_lab.contract import KINDS, TAG_KIND, TAG_POINT, TAG_SWEEP
from var_lab.provenance import git_commit
from var_lab.tracking.logger import ResilientMLFlowLogger, make_mlflow_logger
from var_lab.tracking.spool import (
    REJECTED_FILENAME,
    SPOOL_ARTIFACTS_DIRNAME,
    SPOOL_FILENAME,
    DeliveryReport,
    Spool,
    deliver_or_spool,
    deliver_records,
    find_spools,
    logged_params,
    store_clients,
    sync_main,
)
from var_lab.tracking.store import (
    ARTIFACTS_DIRNAME,
    DEFAULT_DB_NAME,
    RUN_ID_FILENAME,
    StoreUnavailableError,
    default_artifact_root,
    ensure_store,
    find_sweep_run,
    flatten_params,
    get_or_create_experiment,
    get_or_create_sweep_run,
    mlflow_ui,
    normalize_tracking_uri,
    read_run_id,
    resolve_tracking_uri,
    run_address,
    run_page,
    sqlite_path,
    write_run_id,
)

__all__ = [
    "ARTIFACTS_DIRNAME",
    "DEFAULT_DB_NAME",
    "KINDS",
    "REJECTED_FILENAME",
    "RUN_ID_FILENAME",
    "SPOOL_ARTIFACTS_DIRNAME",
    "SPOOL_FILENAME",
    "TAG_KIND",
    "TAG_POINT",
    "TAG_SWEEP",
    "DeliveryReport",
    "ResilientMLFlowLogger",
    "Spool",
    "StoreUnavailableError",
    "default_artifact_root",
    "deliver_or_spool",
    "deliver_records",
    "ensure_store",
    "find_spools",
    "find_sweep_run",
    "flatten_params",
    "get_or_create_experiment",
    "get_or_create_sweep_run",
    "git_commit",
    "logged_params",
    "make_mlflow_logger",
    "normalize_tracking_uri",
    "read_run_id",
    "resolve_tracking_uri",
    "mlflow_ui",
    "run_address",
    "run_page",
    "sqlite_path",
    "store_clients",
    "sync_main",
    "write_run_id",
]
