"""MLflow experiments -> tidy pandas frames.

Two frames describe a study:

* ``runs``: one row per MLflow run. Identity (``run_id``, ``run_name``, ``experiment``, ``status``), the var-lab tags
  (``sweep``, ``point``, ``kind``), the contract params converted to numbers (``depth``, ``width``, ``heads``,
  ``params_total``, ``params_blocks``, ``params_embed``, ``params_adaln``, ``params_head``, ``flops_per_image``,
  ``global_batch``, ``epochs``, ``base_lr``, ``resolution``, ``tokens_per_image``), what the run consumed
  (``final_step``, ``images_seen``, ``tokens_seen``, ``compute_flops``, ``compute_pflops``), ``flag`` (``"ok"`` or
  a ``;``-joined list of ``failed``, ``killed``, ``unfinished``, ``nan_loss`` (the last value of a train or val loss
  is NaN or infinite), ``no_metrics``) and, for every metric, ``final:<metric>`` (value at the last step) and, for
  train/val/eval metrics, ``best:<metric>`` (minimum, or maximum for accuracies, IS, precision and recall; NaNs
  ignored). ``images_seen`` is the final ``compute/flops`` over ``flops_per_image`` (training logs compute as steps x
  global batch x FLOPs per image), else the last step x ``global_batch``; ``tokens_seen`` multiplies it by the
  tokens per image of ``model.patch_nums``.
* ``history``: the long frame of metric histories with columns ``run_id``, ``step``, ``compute`` (training PFLOPs at
  that step: ``compute/pflops`` or ``compute/flops`` interpolated by step), ``metric``, ``value``. One row per
  (run, metric, step); a step logged twice keeps the last value written.

Failed and NaN runs are kept and flagged: the fits drop them with a warning (:func:`usable_runs`).

Loading goes through MLflow's client for any tracking URI. For ``sqlite:///`` URIs a fast path reads MLflow's tables
directly (read-only, through the schema's ``(run_uuid, key, step)`` index, optionally in worker processes), because
the client's one-call-per-(run, metric) history API takes minutes on a 1,000-run study; ``backend="client"`` forces
the client, and the fast path falls back to it when the schema is not the one it knows.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
import re
import sqlite3
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from var_lab.contract import TAG_KIND, TAG_POINT, TAG_SWEEP

#: MLflow param -> (runs column, numeric)
CONTRACT_PARAMS: dict[str, tuple[str, bool]] = {
    "model.depth": ("depth", True),
    "model.width": ("width", True),
    "model.heads": ("heads", True),
    "model.params_total": ("params_total", True),
    "model.params_blocks": ("params_blocks", True),
    "model.params_embed": ("params_embed", True),
    "model.params_adaln": ("params_adaln", True),
    "model.params_head": ("params_head", True),
    "model.flops_per_image": ("flops_per_image", True),
    "train.global_batch": ("global_batch", True),
    "train.epochs": ("epochs", True),
    "train.base_lr": ("base_lr", True),
    "data.resolution": ("resolution", True),
    "data.name": ("dataset", False),
    "model.patch_nums": ("patch_nums", False),
    "git.commit": ("git_commit", False),
}
#: MLflow tag -> runs column
CONTRACT_TAGS: dict[str, str] = {TAG_SWEEP: "sweep", TAG_POINT: "point", TAG_KIND: "kind"}
#: columns stored as nullable integers
INTEGER_COLUMNS = ("depth", "width", "heads", "global_batch", "resolution", "tokens_per_image", "final_step")

RUN_COLUMNS = [
    "run_id", "run_name", "experiment", "experiment_id", "status", "start_time", "end_time",
    "sweep", "point", "kind",
    "depth", "width", "heads", "params_total", "params_blocks", "params_embed", "params_adaln", "params_head",
    "flops_per_image", "global_batch", "epochs", "base_lr", "resolution", "dataset", "patch_nums", "git_commit",
    "tokens_per_image", "final_step", "images_seen", "tokens_seen", "compute_flops", "compute_pflops", "flag",
]  # fmt: skip
HISTORY_COLUMNS = ["run_id", "step", "compute", "metric", "value"]

# MLflow's sqlite store writes +-inf as +-DBL_MAX (SQL has no infinities); NaN as value 0 with is_nan = 1.
_DBL_MAX = 1.7976931348623157e308
_HIGHER_IS_BETTER = re.compile(r"(^|/)(acc\w*|is|precision|recall|images_per_s|tokens_per_s)$")
_NO_BEST_PREFIXES = ("compute/", "opt/", "perf/", "system/")
_LOSS_LIKE = re.compile(r"^(train|val)/(loss|L_\w+)$")
_SQLITE_TABLES = {
    "experiments": {"experiment_id", "name", "lifecycle_stage"},
    "runs": {"run_uuid", "name", "status", "start_time", "end_time", "experiment_id", "lifecycle_stage"},
    "params": {"run_uuid", "key", "value"},
    "tags": {"run_uuid", "key", "value"},
    "metrics": {"run_uuid", "key", "step", "value", "is_nan", "timestamp"},
    "latest_metrics": {"run_uuid", "key", "step", "value", "is_nan"},
}


class AnalysisWarning(UserWarning):
    """Something in the study was skipped or dropped (a NaN run, a fit without enough points)."""


@dataclass
class Study:
    """A loaded study: the runs frame, the history frame and where they came from."""

    runs: pd.DataFrame
    history: pd.DataFrame
    tracking_uri: str
    experiments: list[str]
    backend: str
    """``"sqlite"`` (direct read of MLflow's tables) or ``"client"`` (MLflow client API)."""
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------------
# public API


def load_study(
    experiments: str | Sequence[str],
    tracking_uri: str | None = None,
    *,
    metrics: Sequence[str] | None = None,
    history: bool = True,
    kinds: Sequence[str | None] | None = None,
    backend: str = "auto",
    workers: int | None = None,
    progress: bool = False,
) -> Study:
    """Load one or more MLflow experiments into a runs frame and a history frame.

    Args:
        experiments: experiment names or ids (a name wins when a string is both).
        tracking_uri: any MLflow tracking URI; None reads ``$MLFLOW_TRACKING_URI``.
        metrics: metric names or glob patterns (``"val/*"``) to load; None loads every metric. ``compute/*`` is always
            loaded (it gives the compute axis).
        history: also build the long history frame (else it is empty and the runs' final/best values come from SQL
            aggregates on the fast path).
        kinds: keep only runs whose ``var_lab.kind`` tag is in this list (None in the list keeps untagged runs);
            None keeps every run.
        backend: ``"auto"`` (sqlite fast path when possible, else client), ``"sqlite"`` or ``"client"``.
        workers: processes reading histories on the sqlite fast path; None picks by size (1 for small studies).
        progress: show tqdm progress bars.

    Returns:
        A :class:`Study` with ``runs`` (one row per run, columns described in the module docstring) and ``history``
        (columns ``run_id, step, compute, metric, value``).

    Raises:
        ValueError: no tracking URI, an unknown experiment (the message lists the available ones), experiments
            without any run, a bad backend.
        FileNotFoundError: a ``sqlite:///`` URI whose database file does not exist.
    """
    t0 = time.perf_counter()
    if isinstance(experiments, str):
        experiments = [experiments]
    experiments = list(experiments)
    if not experiments:
        raise ValueError("no experiment given: pass at least one experiment name or id")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    if backend not in ("auto", "sqlite", "client"):
        raise ValueError(f"backend must be 'auto', 'sqlite' or 'client', got {backend!r}")
    reader: _Reader
    notes: list[str] = []
    if backend in ("auto", "sqlite") and tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])
        if not path.exists():
            raise FileNotFoundError(
                f"MLflow store {path} does not exist (tracking URI {tracking_uri}); point --tracking-uri at the "
                "sqlite file that training wrote"
            )
        problem = _sqlite_schema_problem(path)
        if problem is None:
            reader = _SqliteReader(path, workers=workers, progress=progress)
        elif backend == "sqlite":
            raise ValueError(f"{path} is not an MLflow store this loader can read directly: {problem}")
        else:
            notes.append(f"sqlite fast path off ({problem}); loaded through the MLflow client")
            reader = _ClientReader(tracking_uri, progress=progress)
    elif backend == "sqlite":
        raise ValueError(f"backend 'sqlite' needs a sqlite:/// tracking URI, got {tracking_uri!r}")
    else:
        reader = _ClientReader(tracking_uri, progress=progress)

    try:
        exp_frame = reader.resolve_experiments(experiments)
        raw_runs = reader.runs(exp_frame["experiment_id"].tolist())
        if not len(raw_runs):
            names = ", ".join(repr(n) for n in exp_frame["experiment"])
            raise ValueError(
                f"experiment {names} in {reader.where()} has no runs: nothing to analyse (train into it first, "
                "e.g. var-lab sweep launch, or pick another experiment)"
            )
        raw_runs = raw_runs.merge(exp_frame, on="experiment_id", how="left")
        params = reader.params(raw_runs["run_id"].tolist())
        tags = reader.tags(raw_runs["run_id"].tolist())
        runs = _assemble_runs(raw_runs, params, tags)
        if kinds is not None:
            keep = runs["kind"].isin([k for k in kinds if k is not None])
            if None in kinds:
                keep |= runs["kind"].isna()
            runs = runs[keep].reset_index(drop=True)
        run_ids = runs["run_id"].tolist()
        keys = _select_keys(reader.metric_keys(run_ids), metrics)
        if history or isinstance(reader, _ClientReader):
            hist = reader.histories(run_ids, keys)
            summary = _summarise_history(hist)
        else:
            hist = _RawHistory.empty()
            summary = reader.summaries(run_ids, keys)
        runs = _add_metrics(runs, summary, keys)
        hist_frame = _history_frame(hist, runs) if history else _empty_history(run_ids)
        _flag(runs, summary)
    finally:
        reader.close()
    return Study(
        runs=runs,
        history=hist_frame,
        tracking_uri=tracking_uri,
        experiments=exp_frame["experiment"].tolist(),
        backend=reader.name,
        load_seconds=time.perf_counter() - t0,
        notes=notes,
    )


def load_runs(experiments: str | Sequence[str], tracking_uri: str | None = None, **kwargs) -> pd.DataFrame:
    """The runs frame of :func:`load_study` without building histories (``history=False``)."""
    kwargs.setdefault("history", False)
    return load_study(experiments, tracking_uri, **kwargs).runs


def load_history(experiments: str | Sequence[str], tracking_uri: str | None = None, **kwargs) -> pd.DataFrame:
    """The long history frame (``run_id, step, compute, metric, value``) of :func:`load_study`."""
    return load_study(experiments, tracking_uri, history=True, **kwargs).history


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The tracking URI to read: the argument, else ``$MLFLOW_TRACKING_URI``.

    Raises:
        ValueError: neither is set (MLflow's own default would silently open an empty store).
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(
            "no MLflow tracking URI: pass --tracking-uri (e.g. sqlite:///runs/mlflow.db or http://host:5000) or set "
            "MLFLOW_TRACKING_URI"
        )
    return uri


def usable_runs(runs: pd.DataFrame, columns: Iterable[str] = (), *, warn: bool = True) -> pd.DataFrame:
    """Runs that can enter a fit: flag ``ok`` and finite, positive values in ``columns``.

    Dropped runs are reported with an :class:`AnalysisWarning` naming them and why, never an exception.
    """
    columns = [c for c in columns]
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise KeyError(f"runs frame has no column(s) {missing}; available: {sorted(map(str, runs.columns))}")
    keep = runs["flag"].eq("ok") if "flag" in runs.columns else pd.Series(True, index=runs.index)
    reasons = pd.Series("", index=runs.index, dtype=object)
    if "flag" in runs.columns:
        reasons[~keep] = runs.loc[~keep, "flag"].astype(str)
    for col in columns:
        values = pd.to_numeric(runs[col], errors="coerce").astype(float)
        bad = ~np.isfinite(values) | (values <= 0)
        reasons[bad & keep] = f"{col} missing or not positive"
        keep &= ~bad
    dropped = runs[~keep]
    if warn and len(dropped):
        names = ", ".join(f"{_run_label(row)} ({reasons[i]})" for i, row in dropped.head(10).iterrows())
        more = f" and {len(dropped) - 10} more" if len(dropped) > 10 else ""
        warnings.warn(f"dropped {len(dropped)} of {len(runs)} runs: {names}{more}", AnalysisWarning, stacklevel=2)
    return runs[keep]


def higher_is_better(metric: str) -> bool:
    """Whether larger values of a metric are better (accuracies, IS, precision, recall, throughput)."""
    return bool(_HIGHER_IS_BETTER.search(metric))


def parse_patch_nums(value) -> tuple[int, ...] | None:
    """``"(1, 2, 3)"``, ``"[1,2,3]"`` or ``"1_2_3"`` -> ``(1, 2, 3)``; None or empty -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    numbers = re.findall(r"\d+", str(value))
    return tuple(int(v) for v in numbers) if numbers else None


# ----------------------------------------------------------------------------------------------------------------------
# readers


@dataclass
class _RawHistory:
    """Histories as flat arrays, sorted by (run, key, step), one entry per (run, key, step)."""

    run_ids: list[str]
    keys: list[str]
    run_code: np.ndarray  # (n,) int32 index into run_ids
    key_code: np.ndarray  # (n,) int32 index into keys
    step: np.ndarray  # (n,) int64
    value: np.ndarray  # (n,) float64, NaN and +-inf restored

    @staticmethod
    def empty(run_ids=(), keys=()) -> _RawHistory:
        return _RawHistory(
            list(run_ids),
            list(keys),
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
            np.zeros(0, np.float64),
        )


class _Reader:
    name = ""

    def resolve_experiments(self, wanted: Sequence[str]) -> pd.DataFrame:
        available = self.experiments()
        rows = []
        for item in wanted:
            item = str(item)
            by_name = available[available["experiment"] == item]
            by_id = available[available["experiment_id"] == item]
            if len(by_name) > 1:
                ids = ", ".join(by_name["experiment_id"])
                raise ValueError(f"experiment name {item!r} is ambiguous in {self.where()} (ids {ids}): pass an id")
            match = by_name if len(by_name) else by_id
            if not len(match):
                names = ", ".join(repr(n) for n in available["experiment"].head(20))
                raise ValueError(
                    f"experiment {item!r} not found in {self.where()}; available experiments: {names or '(none)'}"
                )
            rows.append(match.iloc[0])
        return pd.DataFrame(rows).drop_duplicates("experiment_id").reset_index(drop=True)

    def close(self) -> None:
        """Release connections (the sqlite reader's; the client holds none of its own)."""

    # the rest is implemented by the two backends
    def where(self) -> str:
        raise NotImplementedError

    def experiments(self) -> pd.DataFrame:
        raise NotImplementedError

    def runs(self, experiment_ids: list[str]) -> pd.DataFrame:
        raise NotImplementedError

    def params(self, run_ids: list[str]) -> pd.DataFrame:
        raise NotImplementedError

    def tags(self, run_ids: list[str]) -> pd.DataFrame:
        raise NotImplementedError

    def metric_keys(self, run_ids: list[str]) -> list[str]:
        raise NotImplementedError

    def histories(self, run_ids: list[str], keys: list[str]) -> _RawHistory:
        raise NotImplementedError

    def summaries(self, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
        raise NotImplementedError


def _sqlite_schema_problem(path: Path) -> str | None:
    """None when the file has MLflow's tables and columns, else what is missing."""
    try:
        con = _connect_ro(path)
    except sqlite3.Error as error:
        return f"cannot open: {error}"
    try:
        for table, needed in _SQLITE_TABLES.items():
            columns = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
            if not columns:
                return f"no table {table!r}"
            if needed - columns:
                return f"table {table!r} lacks columns {sorted(needed - columns)}"
    except sqlite3.Error as error:
        return f"cannot read the schema: {error}"
    finally:
        con.close()
    return None


def _connect_ro(path: Path) -> sqlite3.Connection:
    # read-only: never create or lock-upgrade the store that training may be writing
    # (mode=ro still allows the TEMP table used to select runs)
    return sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=60)


class _SqliteReader(_Reader):
    name = "sqlite"

    def __init__(self, path: Path, workers: int | None = None, progress: bool = False):
        self.path = path
        self.workers = workers
        self.progress = progress
        self.con = _connect_ro(path)
        self._staged: tuple[str, ...] = ()

    def where(self) -> str:
        return f"sqlite:///{self.path}"

    def close(self) -> None:
        self.con.close()

    def experiments(self) -> pd.DataFrame:
        rows = self.con.execute(
            "SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active' ORDER BY experiment_id"
        ).fetchall()
        return pd.DataFrame([(str(i), n) for i, n in rows], columns=["experiment_id", "experiment"])

    def runs(self, experiment_ids: list[str]) -> pd.DataFrame:
        marks = ",".join("?" * len(experiment_ids))
        rows = self.con.execute(
            f"SELECT run_uuid, name, status, start_time, end_time, experiment_id FROM runs "
            f"WHERE experiment_id IN ({marks}) AND lifecycle_stage = 'active' ORDER BY start_time, run_uuid",
            [int(i) for i in experiment_ids],
        ).fetchall()
        frame = pd.DataFrame(rows, columns=["run_id", "run_name", "status", "start_time", "end_time", "experiment_id"])
        frame["experiment_id"] = frame["experiment_id"].astype(str)
        return frame

    def _stage(self, run_ids: list[str]) -> None:
        # a temp table (allowed on a read-only connection) joins faster than thousands of bound parameters
        if tuple(run_ids) == self._staged:
            return
        self.con.execute("CREATE TEMP TABLE IF NOT EXISTS selected_runs (run_uuid TEXT PRIMARY KEY)")
        self.con.execute("DELETE FROM temp.selected_runs")
        self.con.executemany("INSERT INTO temp.selected_runs VALUES (?)", [(r,) for r in run_ids])
        self._staged = tuple(run_ids)

    def _key_values(self, table: str, run_ids: list[str]) -> pd.DataFrame:
        self._stage(run_ids)
        rows = self.con.execute(
            f"SELECT t.run_uuid, t.key, t.value FROM {table} t JOIN temp.selected_runs s ON s.run_uuid = t.run_uuid"
        ).fetchall()
        return pd.DataFrame(rows, columns=["run_id", "key", "value"])

    def params(self, run_ids: list[str]) -> pd.DataFrame:
        return self._key_values("params", run_ids)

    def tags(self, run_ids: list[str]) -> pd.DataFrame:
        return self._key_values("tags", run_ids)

    def metric_keys(self, run_ids: list[str]) -> list[str]:
        self._stage(run_ids)
        rows = self.con.execute(
            "SELECT DISTINCT m.key FROM latest_metrics m JOIN temp.selected_runs s ON s.run_uuid = m.run_uuid"
        ).fetchall()
        return sorted(r[0] for r in rows)

    def summaries(self, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
        self._stage(run_ids)
        wanted = set(keys)
        agg = self.con.execute(
            "SELECT m.run_uuid, m.key, COUNT(*), SUM(m.is_nan), MIN(IIF(m.is_nan, NULL, m.value)), "
            "MAX(IIF(m.is_nan, NULL, m.value)) FROM metrics m JOIN temp.selected_runs s ON s.run_uuid = m.run_uuid "
            "GROUP BY m.run_uuid, m.key"
        ).fetchall()
        latest = self.con.execute(
            "SELECT m.run_uuid, m.key, m.step, IIF(m.is_nan, NULL, m.value) FROM latest_metrics m "
            "JOIN temp.selected_runs s ON s.run_uuid = m.run_uuid"
        ).fetchall()
        agg_frame = pd.DataFrame(agg, columns=["run_id", "metric", "count", "n_nan", "min", "max"])
        latest_frame = pd.DataFrame(latest, columns=["run_id", "metric", "final_step", "final"])
        out = agg_frame.merge(latest_frame, on=["run_id", "metric"], how="left")
        out = out[out["metric"].isin(wanted)].reset_index(drop=True)
        for col in ("min", "max", "final"):
            out[col] = _restore_inf(pd.to_numeric(out[col], errors="coerce").to_numpy(dtype=float))
        return out

    def histories(self, run_ids: list[str], keys: list[str]) -> _RawHistory:
        if not run_ids or not keys:
            return _RawHistory.empty(run_ids, keys)
        workers = self.workers
        if workers is None:
            # processes pay ~1 s to start; worth it from a few hundred runs on
            workers = min(os.cpu_count() or 1, 4) if len(run_ids) >= 200 else 1
        workers = max(1, min(workers, len(run_ids)))
        keys_by_run = self._keys_by_run(run_ids, set(keys))
        if workers == 1:
            parts = [_read_sqlite_histories(str(self.path), run_ids, keys, keys_by_run, 0, self.progress)]
        else:
            import concurrent.futures as futures
            import multiprocessing

            chunks = np.array_split(np.arange(len(run_ids)), workers * 4)
            # fork: the workers need nothing but sqlite3 and numpy, and unlike spawn it works when the caller's
            # __main__ cannot be re-imported (python -c, stdin, some notebooks)
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            parts = []
            with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                jobs = [
                    pool.submit(
                        _read_sqlite_histories,
                        str(self.path),
                        [run_ids[i] for i in chunk],
                        keys,
                        [keys_by_run[i] for i in chunk],
                        int(chunk[0]),
                        False,
                    )
                    for chunk in chunks
                    if len(chunk)
                ]
                iterator: Iterable = futures.as_completed(jobs)
                if self.progress:
                    from tqdm import tqdm

                    iterator = tqdm(iterator, total=len(jobs), desc="reading histories", unit="chunk")
                for job in iterator:
                    parts.append(job.result())
        # each part holds a contiguous block of runs sorted by (run, key, step): putting the blocks back in order
        # sorts the whole
        parts.sort(key=lambda part: part[0])
        raw = _RawHistory(
            list(run_ids), list(keys), *(np.concatenate([part[i] for part in parts]) for i in range(1, 5))
        )
        return _dedupe(raw)

    def _keys_by_run(self, run_ids: list[str], wanted: set[str]) -> list[list[int]]:
        self._stage(run_ids)
        key_index = {k: i for i, k in enumerate(sorted(wanted))}
        by_run: dict[str, list[int]] = {r: [] for r in run_ids}
        for run_id, key in self.con.execute(
            "SELECT m.run_uuid, m.key FROM latest_metrics m JOIN temp.selected_runs s ON s.run_uuid = m.run_uuid"
        ):
            if key in key_index:
                by_run[run_id].append(key_index[key])
        return [sorted(by_run[r]) for r in run_ids]


def _read_sqlite_histories(
    path: str, run_ids: list[str], keys: list[str], keys_by_run: list[list[int]], first_code: int, progress: bool
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the histories of some runs (also the body of a worker process).

    One query per (run, metric) through the ``(run_uuid, key, step)`` index: rows come back sorted by step (a step
    written twice in write order, so the dedupe keeps the last write), only two numbers per row cross into Python,
    and NaN arrives as NULL (numpy turns None into NaN).

    Returns:
        first_code, then run codes (n,), key codes (n,), steps (n,) and values (n,) sorted by (run, key, step).
    """
    keys = sorted(keys)
    chain_rows = itertools.chain.from_iterable  # C-level flattening of the (step, value) tuples
    con = _connect_ro(Path(path))
    query = "SELECT step, IIF(is_nan, NULL, value) FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY step"
    run_parts, key_parts, step_parts, value_parts = [], [], [], []
    iterator: Iterable = enumerate(run_ids)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(run_ids), desc="reading histories", unit="run")
    try:
        for offset, run_id in iterator:
            for key_code in keys_by_run[offset]:
                rows = con.execute(query, (run_id, keys[key_code])).fetchall()
                if not rows:
                    continue
                flat = np.fromiter(chain_rows(rows), dtype=np.float64, count=2 * len(rows))
                step_parts.append(flat[0::2].astype(np.int64))
                value_parts.append(flat[1::2])
                run_parts.append(np.full(len(rows), first_code + offset, np.int32))
                key_parts.append(np.full(len(rows), key_code, np.int32))
    finally:
        con.close()
    if not step_parts:
        empty = _RawHistory.empty()
        return first_code, empty.run_code, empty.key_code, empty.step, empty.value
    value = _restore_inf(np.concatenate(value_parts))
    return first_code, np.concatenate(run_parts), np.concatenate(key_parts), np.concatenate(step_parts), value


class _ClientReader(_Reader):
    name = "client"

    def __init__(self, tracking_uri: str, progress: bool = False):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.progress = progress
        self._runs: dict[str, object] = {}

    def where(self) -> str:
        return self.tracking_uri

    def experiments(self) -> pd.DataFrame:
        exps = self.client.search_experiments(max_results=50000)
        return pd.DataFrame([(e.experiment_id, e.name) for e in exps], columns=["experiment_id", "experiment"])

    def runs(self, experiment_ids: list[str]) -> pd.DataFrame:
        rows = []
        token = None
        while True:
            page = self.client.search_runs(experiment_ids, max_results=1000, page_token=token)
            for run in page:
                self._runs[run.info.run_id] = run
                rows.append(
                    (
                        run.info.run_id,
                        run.info.run_name,
                        run.info.status,
                        run.info.start_time,
                        run.info.end_time,
                        str(run.info.experiment_id),
                    )
                )
            token = page.token
            if not token:
                break
        frame = pd.DataFrame(rows, columns=["run_id", "run_name", "status", "start_time", "end_time", "experiment_id"])
        return frame.sort_values(["start_time", "run_id"]).reset_index(drop=True)

    def params(self, run_ids: list[str]) -> pd.DataFrame:
        rows = [(r, k, v) for r in run_ids for k, v in self._runs[r].data.params.items()]
        return pd.DataFrame(rows, columns=["run_id", "key", "value"])

    def tags(self, run_ids: list[str]) -> pd.DataFrame:
        rows = [(r, k, v) for r in run_ids for k, v in self._runs[r].data.tags.items()]
        return pd.DataFrame(rows, columns=["run_id", "key", "value"])

    def metric_keys(self, run_ids: list[str]) -> list[str]:
        return sorted({k for r in run_ids for k in self._runs[r].data.metrics})

    def histories(self, run_ids: list[str], keys: list[str]) -> _RawHistory:
        keys = sorted(keys)
        key_index = {k: i for i, k in enumerate(keys)}
        run_code, key_code, steps, values = [], [], [], []
        iterator: Iterable = enumerate(run_ids)
        if self.progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(run_ids), desc="reading histories (client)", unit="run")
        for code, run_id in iterator:
            for key in sorted(self._runs[run_id].data.metrics):
                if key not in key_index:
                    continue
                metrics = self.client.get_metric_history(run_id, key)
                if not metrics:
                    continue
                # the client returns NaN as NaN; order by (step, timestamp) so that "last written" wins the dedupe
                metrics = sorted(metrics, key=lambda m: (m.step, m.timestamp))
                steps.append(np.array([m.step for m in metrics], np.int64))
                values.append(np.array([m.value for m in metrics], np.float64))
                run_code.append(np.full(len(metrics), code, np.int32))
                key_code.append(np.full(len(metrics), key_index[key], np.int32))
        if not steps:
            return _RawHistory.empty(run_ids, keys)
        raw = _RawHistory(
            list(run_ids),
            keys,
            np.concatenate(run_code),
            np.concatenate(key_code),
            np.concatenate(steps),
            _restore_inf(np.concatenate(values)),
        )
        return _dedupe(raw)


# ----------------------------------------------------------------------------------------------------------------------
# assembly


def _restore_inf(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    big = np.abs(values) >= _DBL_MAX
    if big.any():
        values = values.copy()
        values[big] = np.sign(values[big]) * np.inf
    return values


def _dedupe(raw: _RawHistory) -> _RawHistory:
    """Keep the last entry of each (run, key, step); entries are sorted with later writes after earlier ones."""
    n = len(raw.step)
    if n < 2:
        return raw
    same = (raw.run_code[1:] == raw.run_code[:-1]) & (raw.key_code[1:] == raw.key_code[:-1])
    same &= raw.step[1:] == raw.step[:-1]
    if not same.any():
        return raw
    keep = np.ones(n, bool)
    keep[:-1] = ~same
    return _RawHistory(raw.run_ids, raw.keys, raw.run_code[keep], raw.key_code[keep], raw.step[keep], raw.value[keep])


def _select_keys(keys: list[str], wanted: Sequence[str] | None) -> list[str]:
    if wanted is None:
        return sorted(keys)
    chosen = {k for k in keys if k.startswith("compute/")}
    for pattern in wanted:
        chosen |= {k for k in keys if fnmatch.fnmatchcase(k, pattern)}
    return sorted(chosen)


def _to_number(value, run_id: str, key: str) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        warnings.warn(
            f"run {run_id}: param {key}={value!r} is not a number; treated as missing", AnalysisWarning, stacklevel=3
        )
        return math.nan


def _assemble_runs(raw_runs: pd.DataFrame, params: pd.DataFrame, tags: pd.DataFrame) -> pd.DataFrame:
    runs = raw_runs.copy()
    for col in ("start_time", "end_time"):
        runs[col] = pd.to_datetime(pd.to_numeric(runs[col], errors="coerce"), unit="ms", utc=True)
    p = params[params["key"].isin(CONTRACT_PARAMS)]
    param_map = {(r, k): v for r, k, v in p.itertuples(index=False)}
    for key, (col, numeric) in CONTRACT_PARAMS.items():
        values = [param_map.get((r, key)) for r in runs["run_id"]]
        if numeric:
            runs[col] = np.array([_to_number(v, r, key) for v, r in zip(values, runs["run_id"])], dtype=float)
        else:
            runs[col] = pd.Series(values, index=runs.index, dtype=object)
    t = tags[tags["key"].isin(CONTRACT_TAGS)]
    tag_map = {(r, k): v for r, k, v in t.itertuples(index=False)}
    for key, col in CONTRACT_TAGS.items():
        runs[col] = pd.Series([tag_map.get((r, key)) for r in runs["run_id"]], index=runs.index, dtype=object)
    patch = [parse_patch_nums(v) for v in runs["patch_nums"]]
    runs["tokens_per_image"] = [float(sum(p * p for p in pn)) if pn else math.nan for pn in patch]
    return runs


def _summarise_history(raw: _RawHistory) -> pd.DataFrame:
    """Per (run, metric): count, NaN count, min, max, final value and step (last step)."""
    columns = ["run_id", "metric", "count", "n_nan", "min", "max", "final_step", "final"]
    if len(raw.step) == 0:
        return pd.DataFrame(columns=columns)
    group = raw.run_code.astype(np.int64) * max(len(raw.keys), 1) + raw.key_code
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], len(group)]
    finite = np.where(np.isnan(raw.value), np.nan, raw.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups give NaN, as wanted
        mins = np.fmin.reduceat(finite, starts)
        maxs = np.fmax.reduceat(finite, starts)
    n_nan = np.add.reduceat(np.isnan(raw.value).astype(np.int64), starts)
    return pd.DataFrame(
        {
            "run_id": np.asarray(raw.run_ids, dtype=object)[raw.run_code[starts]],
            "metric": np.asarray(raw.keys, dtype=object)[raw.key_code[starts]],
            "count": ends - starts,
            "n_nan": n_nan,
            "min": mins,
            "max": maxs,
            "final_step": raw.step[ends - 1],
            "final": raw.value[ends - 1],
        }
    )


def _add_metrics(runs: pd.DataFrame, summary: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    index = pd.Index(runs["run_id"])
    final = summary.pivot(index="run_id", columns="metric", values="final") if len(summary) else pd.DataFrame()
    mins = summary.pivot(index="run_id", columns="metric", values="min") if len(summary) else pd.DataFrame()
    maxs = summary.pivot(index="run_id", columns="metric", values="max") if len(summary) else pd.DataFrame()
    steps = summary.pivot(index="run_id", columns="metric", values="final_step") if len(summary) else pd.DataFrame()
    new: dict[str, np.ndarray] = {}

    def column(frame: pd.DataFrame, metric: str) -> np.ndarray:
        if metric not in frame.columns:
            return np.full(len(index), np.nan)
        return frame[metric].reindex(index).to_numpy(dtype=float)

    # what the run consumed: steps, images, tokens, FLOPs
    trained = [m for m in steps.columns if m.split("/")[0] in ("train", "val", "compute")]
    last_step = np.full(len(index), np.nan)
    if trained:
        last_step = steps[trained].reindex(index).max(axis=1).to_numpy(dtype=float)
    final_flops = column(final, "compute/flops")
    final_pflops = column(final, "compute/pflops")
    flops = np.where(np.isfinite(final_flops), final_flops, final_pflops * 1e15)
    per_image = runs["flops_per_image"].to_numpy(dtype=float)
    batch = runs["global_batch"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        images_from_flops = flops / per_image
        images = np.where(np.isfinite(images_from_flops), images_from_flops, last_step * batch)
        flops = np.where(np.isfinite(flops), flops, images * per_image)
    runs["final_step"] = last_step
    runs["images_seen"] = images
    runs["tokens_seen"] = images * runs["tokens_per_image"].to_numpy(dtype=float)
    runs["compute_flops"] = flops
    runs["compute_pflops"] = flops / 1e15
    runs["flag"] = "ok"
    for metric in keys:
        new[f"final:{metric}"] = column(final, metric)
    for metric in keys:
        if metric.startswith(_NO_BEST_PREFIXES):
            continue
        new[f"best:{metric}"] = column(maxs if higher_is_better(metric) else mins, metric)
    runs = pd.concat([runs.reset_index(drop=True), pd.DataFrame(new)], axis=1)
    for col in INTEGER_COLUMNS:
        values = runs[col].to_numpy(dtype=float)
        integral = np.isfinite(values) & (np.abs(values - np.round(values)) < 1e-9)
        if np.all(integral | ~np.isfinite(values)):
            runs[col] = pd.array(np.where(integral, np.round(values), np.nan), dtype="Int64")
    ordered = [c for c in RUN_COLUMNS if c in runs.columns]
    return runs[ordered + [c for c in runs.columns if c not in ordered]]


def _flag(runs: pd.DataFrame, summary: pd.DataFrame) -> None:
    """Set ``flag``: run status, a loss whose last logged value is NaN/inf, no metrics at all."""
    status_flag = {"FAILED": "failed", "KILLED": "killed", "RUNNING": "unfinished", "SCHEDULED": "unfinished"}
    has_metrics = set(summary["run_id"]) if len(summary) else set()
    nan_runs: set = set()
    if len(summary):
        losses = summary[summary["metric"].astype(str).str.match(_LOSS_LIKE)]
        final = pd.to_numeric(losses["final"], errors="coerce").to_numpy(dtype=float)
        nan_runs = set(losses["run_id"][~np.isfinite(final)])
    flags = []
    for run_id, status in zip(runs["run_id"], runs["status"]):
        parts = [status_flag[status]] if status in status_flag else []
        if run_id in nan_runs:
            parts.append("nan_loss")
        if run_id not in has_metrics:
            parts.append("no_metrics")
        flags.append(";".join(parts) if parts else "ok")
    runs["flag"] = flags


def _history_frame(raw: _RawHistory, runs: pd.DataFrame) -> pd.DataFrame:
    """Long frame with the compute axis interpolated from each run's compute/pflops (or compute/flops) by step."""
    if len(raw.step) == 0:
        return _empty_history(runs["run_id"].tolist())
    compute = np.full(len(raw.step), np.nan)
    key_of = {k: i for i, k in enumerate(raw.keys)}
    pflops_code, flops_code = key_of.get("compute/pflops"), key_of.get("compute/flops")
    run_starts = np.flatnonzero(np.r_[True, raw.run_code[1:] != raw.run_code[:-1]])
    run_ends = np.r_[run_starts[1:], len(raw.step)]
    per_run = runs.set_index("run_id")
    for start, end in zip(run_starts, run_ends):
        run_id = raw.run_ids[raw.run_code[start]]
        keys = raw.key_code[start:end]
        steps = raw.step[start:end]
        batch = float(per_run.at[run_id, "global_batch"]) if pd.notna(per_run.at[run_id, "global_batch"]) else np.nan
        per_image = float(per_run.at[run_id, "flops_per_image"])
        rate = batch * per_image / 1e15  # PFLOPs per step, when the params are known
        xs = ys = None
        for code, scale in ((pflops_code, 1.0), (flops_code, 1e-15)):
            if code is None:
                continue
            mask = (keys == code) & np.isfinite(raw.value[start:end])
            if mask.any():
                xs, ys = steps[mask].astype(float), raw.value[start:end][mask] * scale
                break
        if xs is None:
            compute[start:end] = steps * rate
        else:
            compute[start:end] = _interp_extrap(steps.astype(float), xs, ys, rate)
    frame = pd.DataFrame(
        {
            "run_id": pd.Categorical.from_codes(raw.run_code, categories=pd.Index(raw.run_ids)),
            "step": raw.step,
            "compute": compute,
            "metric": pd.Categorical.from_codes(raw.key_code, categories=pd.Index(raw.keys)),
            "value": raw.value,
        }
    )
    return frame


def _interp_extrap(x: np.ndarray, xs: np.ndarray, ys: np.ndarray, rate: float) -> np.ndarray:
    """Linear interpolation of cumulative compute; before the first point it falls to 0 at step 0, after the last it
    grows at ``rate`` per step (or the last segment's slope when the rate is unknown)."""
    if xs[0] > 0:
        xs, ys = np.r_[0.0, xs], np.r_[0.0, ys]
    out = np.interp(x, xs, ys)
    after = x > xs[-1]
    if after.any():
        slope = rate if np.isfinite(rate) else ((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0)
        out[after] = ys[-1] + (x[after] - xs[-1]) * slope
    return out


def _empty_history(run_ids: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": pd.Categorical([], categories=pd.Index(list(run_ids))),
            "step": np.zeros(0, np.int64),
            "compute": np.zeros(0),
            "metric": pd.Categorical([]),
            "value": np.zeros(0),
        }
    )


def _run_label(row: pd.Series) -> str:
    name = row.get("run_name") or row.get("run_id")
    point = row.get("point")
    return f"{name} [{point}]" if isinstance(point, str) and point else str(name)


__all__ = [
    "AnalysisWarning",
    "CONTRACT_PARAMS",
    "CONTRACT_TAGS",
    "HISTORY_COLUMNS",
    "RUN_COLUMNS",
    "Study",
    "higher_is_better",
    "load_history",
    "load_runs",
    "load_study",
    "parse_patch_nums",
    "resolve_tracking_uri",
    "usable_runs",
]
