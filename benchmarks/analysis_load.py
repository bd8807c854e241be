"""How fast a study loads from MLflow into the runs and history frames (CPU).

Builds a sqlite MLflow store with a synthetic sweep that follows the MLflow contract (experiment, runs, params and
tags through the MLflow client; metric rows through the client's ``log_batch`` or, for large stores, bulk-inserted into
MLflow's own tables: see analysis/synthetic.py), then times:

* ``load_study`` through the sqlite fast path with 1 worker and with worker processes (runs + full history);
* ``load_runs`` (runs frame only: SQL aggregates, no history);
* ``load_study`` through the MLflow client API, on a smaller experiment of the same store (it makes one call per run
  and metric, so it is timed on ``--client-runs`` runs and reported per point).

The issue's target is 1,000 runs x 10,000 points: ``--runs 1000 --points 10000`` (building that store takes a few
minutes; ``--store PATH --reuse`` keeps and reuses it). The default, 200 runs x 10,000 points, runs in about a minute on
2 cores. "Points" are metric values per run over all metrics (about 24 metrics x 415 logged steps).

    .venv/bin/python benchmarks/analysis_load.py [--runs 200] [--points 10000] [--client-runs 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, print_table, today, write_json  # noqa: E402

from analysis.runs import load_runs, load_study  # noqa: E402
from analysis.synthetic import SyntheticRun, SyntheticStudy, log_steps, write_synthetic_study  # noqa: E402

METRICS_PER_STEP = 24  # per logged step with the default 10-scale patch schedule; eval/* adds 5 single points


def build(uri: str, experiment: str, runs: int, points: int, writer: str, seed: int) -> int:
    steps = 100 * points
    log_points = max(2, (points - 5) // METRICS_PER_STEP)
    # early log-spaced steps round to the same integer: add steps until the distinct ones reach the target
    while len(log_steps(steps, log_points)) * METRICS_PER_STEP + 5 < points:
        log_points += 1
    sweep = [SyntheticRun(depth=2 + i % 15, steps=steps, global_batch=256) for i in range(runs)]
    study = SyntheticStudy(runs=sweep, log_points=log_points, seed=seed)
    truth = write_synthetic_study(uri, experiment, study, writer=writer, progress=True)
    return int(truth["points"].sum())


def timed(label: str, fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    print(f"  {label}: {best:.2f} s")
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--points", type=int, default=10_000, help="metric values per run (all metrics)")
    parser.add_argument("--client-runs", type=int, default=20, help="runs of the experiment timed through the client")
    parser.add_argument("--writer", choices=["sql", "client"], default="sql")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the parallel fast-path row")
    parser.add_argument("--repeats", type=int, default=2, help="timings keep the best of this many loads")
    parser.add_argument("--store", type=Path, default=None, help="sqlite file to build (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="reuse --store when it already holds the experiments")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "analysis_load.json")
    args = parser.parse_args()

    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory(prefix="analysis_load_")
        args.store = Path(tmp.name) / "mlflow.db"
    uri = f"sqlite:///{args.store.resolve()}"
    big, small = f"bench-{args.runs}x{args.points}", f"bench-client-{args.client_runs}x{args.points}"
    t0 = time.perf_counter()
    if not (args.reuse and args.store.exists()):
        print(f"building {args.runs} runs x {args.points} points in {args.store} ({args.writer} writer)")
        build(uri, big, args.runs, args.points, args.writer, seed=0)
        if args.client_runs:
            build(uri, small, args.client_runs, args.points, "client", seed=1)
    build_s = time.perf_counter() - t0
    print(f"store ready in {build_s:.0f} s")

    rows = []

    def row(backend: str, what: str, experiment: str, seconds: float, study_runs, history_rows: int | None):
        rows.append(
            {
                "backend": backend,
                "what": what,
                "runs": len(study_runs),
                "history_rows": history_rows,
                "seconds": seconds,
                "rows_per_s": (history_rows / seconds) if history_rows else None,
                "experiment": experiment,
            }
        )

    print("timing")
    s, study = timed("sqlite, 1 worker", lambda: load_study(big, uri, workers=1), args.repeats)
    row("sqlite", "runs + history, 1 worker", big, s, study.runs, len(study.history))
    parallel = lambda: load_study(big, uri, workers=args.workers)  # noqa: E731
    s, study = timed(f"sqlite, {args.workers} workers", parallel, args.repeats)
    row("sqlite", f"runs + history, {args.workers} workers", big, s, study.runs, len(study.history))
    s, runs = timed("sqlite, runs only", lambda: load_runs(big, uri), args.repeats)
    row("sqlite", "runs only (SQL aggregates)", big, s, runs, None)
    if args.client_runs:
        s, fast = timed("sqlite, client-sized experiment", lambda: load_study(small, uri, workers=1), args.repeats)
        row("sqlite", "runs + history, 1 worker", small, s, fast.runs, len(fast.history))
        s, slow = timed("MLflow client", lambda: load_study(small, uri, backend="client"), 1)
        row("client", "runs + history (get_metric_history per run and metric)", small, s, slow.runs, len(slow.history))
        assert len(slow.history) == len(fast.history), "the two backends disagree"
    print()
    print_table(rows, ["backend", "what", "runs", "history_rows", "seconds", "rows_per_s"])
    for r in rows:
        r.update({"date": today(), "cpu_count": os.cpu_count(), "points_per_run": args.points})
    write_json(rows, args.out)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
