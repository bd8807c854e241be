"""Concurrent tracking: 8 real processes share one sqlite store, and separately one real `mlflow server`.

The processes come from a forkserver that imported var_lab.tracking (and so Lightning and MLflow) once, so that eight
interpreters do not each spend seconds importing torch on a small machine; each process still opens its own store
connection, creates its own run and logs on its own.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow_helpers import MlflowServer

from var_lab.tracking import ensure_store

NUM_PROCESSES = 8
NUM_STEPS = 50
KEYS = ("train/loss", "train/acc_mean", "opt/lr")
EXPERIMENT = "concurrent"


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["var_lab.tracking", __name__])
    return context


def _value(worker: int, step: int, key_index: int) -> float:
    return worker * 1000.0 + step + key_index / 10


def _log_worker(uri: str, output_dir: str, worker: int, barrier, results) -> None:
    """One training process: its own logger and run, logging NUM_STEPS steps of len(KEYS) metrics."""
    try:
        from var_lab.tracking import ResilientMLFlowLogger

        logger = ResilientMLFlowLogger(
            output_dir,
            tracking_uri=uri,
            experiment_name=EXPERIMENT,
            run_name=f"worker-{worker}",
            tags={"var_lab.point": f"worker={worker}"},
            retry_interval_s=0.5,
        )
        barrier.wait(timeout=120)  # start together, so that experiment creation and logging really overlap
        logger.log_hyperparams({"worker": worker})
        for step in range(NUM_STEPS):
            logger.log_metrics({key: _value(worker, step, i) for i, key in enumerate(KEYS)}, step=step)
        logger.finalize("success")
        results.put((worker, logger.run_id, logger.experiment_id, logger.num_spooled, logger.spool.exists(), None))
    except BaseException as exc:  # reported to the test instead of dying silently
        results.put((worker, None, None, 0, False, f"{type(exc).__name__}: {exc}"))


def _ensure_worker(uri: str, barrier, results) -> None:
    try:
        from var_lab.tracking import ensure_store, get_or_create_experiment

        barrier.wait(timeout=120)
        ensure_store(uri)
        results.put((get_or_create_experiment(uri, EXPERIMENT), None))
    except BaseException as exc:
        results.put((None, f"{type(exc).__name__}: {exc}"))


def _run_all(target, args_of_worker, timeout_s: float = 240.0) -> list:
    context = _context()
    barrier = context.Barrier(NUM_PROCESSES)
    results = context.Queue()
    processes = [
        context.Process(target=target, args=(*args_of_worker(worker), barrier, results))
        for worker in range(NUM_PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        collected = [results.get(timeout=timeout_s) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert all(process.exitcode == 0 for process in processes)
    return collected


def _check_every_point_arrived(uri: str, results: list) -> None:
    errors = [r for r in results if r[-1] is not None]
    assert not errors, errors
    assert sorted(r[0] for r in results) == list(range(NUM_PROCESSES))
    assert len({r[1] for r in results}) == NUM_PROCESSES  # one run per process
    assert len({r[2] for r in results}) == 1  # all created / found the same experiment concurrently
    assert not any(r[4] for r in results)  # nothing left in a spool
    client = MlflowClient(uri)
    total = 0
    for worker, run_id, *_ in results:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"worker": str(worker)}
        for i, key in enumerate(KEYS):
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            assert [m.step for m in history] == list(range(NUM_STEPS)), (worker, key)
            assert [m.value for m in history] == [_value(worker, s, i) for s in range(NUM_STEPS)]
            total += len(history)
    assert total == NUM_PROCESSES * NUM_STEPS * len(KEYS)
    assert len(client.search_runs([results[0][2]])) == NUM_PROCESSES


@pytest.mark.slow
def test_concurrent_first_use_creates_the_store_once(tmp_path):
    """8 processes meet a database that does not exist yet: schema and experiment are created exactly once."""
    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    results = _run_all(_ensure_worker, lambda worker: (uri,))
    assert [error for _, error in results if error] == []
    assert len({experiment_id for experiment_id, _ in results}) == 1
    assert [e.name for e in MlflowClient(uri).search_experiments()].count(EXPERIMENT) == 1


@pytest.mark.slow
def test_eight_processes_log_to_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ensure_store(uri)  # the launcher's job, before the processes start
    results = _run_all(_log_worker, lambda worker: (uri, str(tmp_path / f"run{worker}"), worker))
    _check_every_point_arrived(uri, results)


@pytest.mark.slow
def test_eight_processes_log_to_one_mlflow_server(tmp_path):
    backend = f"sqlite:///{tmp_path}/server.db"
    with MlflowServer(backend, log_path=tmp_path / "server.log") as server:
        results = _run_all(_log_worker, lambda worker: (server.uri, str(tmp_path / f"run{worker}"), worker))
        _check_every_point_arrived(server.uri, results)
    # The server wrote into its own database: the same points are there when read directly.
    _check_every_point_arrived(backend, results)
    assert not list(Path(tmp_path).glob("run*/mlflow_spool.jsonl"))
