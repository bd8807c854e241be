"""``var-lab analyze``: load MLflow experiments, fit scaling laws, write plots, CSVs and a markdown report."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from var_lab.inputs import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="var-lab analyze",
        description=(
            "Fit power laws to a scaling study tracked in MLflow and write plots (PNG + SVG), CSVs and report.md. "
            "Small studies degrade gracefully: a fit without enough runs is skipped with a note in the report."
        ),
    )
    parser.add_argument("--experiment", action="append", required=True, metavar="NAME",
                        help="MLflow experiment name or id (repeat for several)")  # fmt: skip
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI), e.g. sqlite:///runs/mlflow.db",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for report.md, CSVs and plots/")
    parser.add_argument(
        "--irreducible",
        type=float,
        default=None,
        metavar="E",
        help="subtract this irreducible loss before the power-law fits (reducible loss)",
    )
    parser.add_argument(
        "--paper-reference", action="store_true", help="add the VAR paper's reported FIDs and laws as reference columns"
    )
    parser.add_argument(
        "--loss-metric",
        action="append",
        default=None,
        metavar="NAME",
        help="loss metric to fit (repeatable; default val/L_mean and val/L_tail)",
    )
    parser.add_argument(
        "--error-metric",
        action="append",
        default=None,
        metavar="NAME",
        help="accuracy metric whose 1 - acc is fitted (default val/acc_* else train/acc_*)",
    )
    parser.add_argument("--fid-metric", default="eval/fid")
    parser.add_argument(
        "--params-column",
        default="params_total",
        choices=["params_total", "params_blocks"],
        help="parameter count used as N",
    )
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates of the one-variable fits")
    parser.add_argument(
        "--chinchilla-bootstrap", type=int, default=100, help="bootstrap replicates of the two-variable fit L(N, D)"
    )
    parser.add_argument(
        "--chinchilla-points",
        default="auto",
        choices=["auto", "final", "history", "off"],
        help="points of the two-variable fit: final value per run, points along histories, or auto",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--holdout-largest",
        action="store_true",
        help="ladder check: refit without the largest size and predict its final loss and FID (holdout.csv, report)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "sqlite", "client"],
        help="how to read the store (auto: direct sqlite read when possible)",
    )
    parser.add_argument(
        "--log-to-mlflow",
        action="store_true",
        help="also log the report folder as artifacts of a new run (tag var_lab.kind=analysis) and, when the "
        "experiment holds a launched sweep, of its parent run (under report/)",
    )
    return parser  # fmt: skip


def analyze_main(argv: list[str]) -> int:
    """Entry point of ``var-lab analyze``; returns 0 when report.md is written, 2 on bad input (a missing store or
    experiment, an experiment without runs), 1 when the store cannot be read."""
    args = build_parser().parse_args(argv)
    from analysis.report import UNEXPECTED, AnalysisOptions, analyze
    from analysis.runs import load_study

    if args.bootstrap < 0 or args.chinchilla_bootstrap < 0:
        print("var-lab analyze: --bootstrap and --chinchilla-bootstrap must be >= 0", file=sys.stderr)
        return 2
    from var_lab.inputs import check_output_dir

    check_output_dir(args.out, "--out")  # before the study is read (a BadInputError is reported by var_lab.cli)
    try:
        study = load_study(args.experiment, args.tracking_uri, backend=args.backend, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as error:
        print(f"var-lab analyze: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a store that cannot be read: one line, not a traceback
        where = args.tracking_uri or "$MLFLOW_TRACKING_URI"
        print(f"var-lab analyze: could not read {', '.join(args.experiment)} from {where}: {type(error).__name__}: "
              f"{error}", file=sys.stderr)  # fmt: skip
        return 1
    print(
        f"loaded {len(study.runs)} runs, {len(study.history):,} metric points from {', '.join(study.experiments)} "
        f"in {study.load_seconds:.1f} s ({study.backend} reader)"
    )
    options = AnalysisOptions(
        fid_metric=args.fid_metric,
        params_column=args.params_column,
        irreducible=args.irreducible,
        bootstrap=args.bootstrap,
        chinchilla_bootstrap=args.chinchilla_bootstrap,
        chinchilla_points=args.chinchilla_points,
        seed=args.seed,
        paper_reference=args.paper_reference,
        holdout_largest=args.holdout_largest,
    )
    if args.loss_metric:
        options.loss_metrics = tuple(args.loss_metric)
    if args.error_metric:
        options.error_metrics = tuple(args.error_metric)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        result = analyze(study, args.out, options)
    for _, row in result.fits.iterrows():
        print(f"  {row['target']} vs {row['x']} ({row['form']}): {row['law']}")
    unexpected = [n for n in result.notes if UNEXPECTED in n]
    if unexpected:
        print(f"warning: {len(unexpected)} part(s) of the analysis {UNEXPECTED}; see the notes in report.md and "
              f"{args.out / 'errors.log'}", file=sys.stderr)  # fmt: skip
    print(f"report: {result.report}")
    print(f"plots:  {args.out / 'plots'} ({len(result.figures)} files)")
    if args.log_to_mlflow:
        run_id = log_report(study, args.out)
        print(f"logged the report folder to MLflow run {run_id}")
    return 0


def log_report(study, out_dir: Path) -> str:
    """Log a report folder as the artifacts of a new run in the first analysed experiment; returns its run id.

    It writes as training and eval do (:func:`var_lab.tracking.deliver_or_spool`): once the run exists, a store
    that goes down keeps the report's files in ``<out_dir>/mlflow_spool.jsonl`` for ``var-lab sync``.
    """
    from mlflow.tracking import MlflowClient

    from var_lab.contract import TAG_KIND, TAG_PARENT_RUN, TAG_SWEEP
    from var_lab.tracking.spool import SPOOL_FILENAME, deliver_or_spool

    client = MlflowClient(tracking_uri=study.tracking_uri)
    experiment = client.get_experiment_by_name(study.experiments[0])
    parent = _sweep_parent_run(client, experiment.experiment_id, study)
    tags = {TAG_KIND: "analysis", TAG_SWEEP: study.experiments[0]}
    if parent is not None:
        tags[TAG_PARENT_RUN] = parent
    run_id = client.create_run(experiment.experiment_id, tags=tags, run_name="analysis").info.run_id

    # One record per entry of the folder (a folder's record logs its contents), so that the spool, which lives in
    # the same folder, never copies itself. The sweep's parent run gets the same files (under report/) and is
    # marked FINISHED: its sweep has been analysed.
    entries = [entry for entry in sorted(Path(out_dir).iterdir()) if not entry.name.startswith("mlflow_spool")]
    records = []
    for target, folder in [(run_id, "analysis"), *([(parent, "report")] if parent else [])]:
        records += [
            {
                "uri": study.tracking_uri,
                "run_id": target,
                "type": "artifact",
                "path": str(entry),
                "artifact_path": folder if entry.is_file() else f"{folder}/{entry.name}",
            }
            for entry in entries
        ]
        records.append(
            {"uri": study.tracking_uri, "run_id": target, "type": "status", "status": "FINISHED", "end_time": None}
        )
    delivery = deliver_or_spool(records, Path(out_dir) / SPOOL_FILENAME)
    if delivery.remaining:
        print(
            f"warning: the MLflow store is unreachable ({delivery.error}); the report of run {run_id} is kept in "
            f"{delivery.path}: deliver it with `var-lab sync --output-dir {out_dir}`",
            file=sys.stderr,
        )
    return run_id


def _sweep_parent_run(client, experiment_id: str, study) -> str | None:
    """The parent run (``var_lab.kind=sweep``) of the sweep whose points the study read, if the experiment has one.

    With several sweeps in one experiment, the one most of the study's runs belong to (their ``var_lab.sweep`` tag).
    """
    from var_lab.contract import TAG_KIND, TAG_SWEEP

    parents = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'sweep'", order_by=["attributes.start_time ASC"]
    )
    by_sweep: dict[str, str] = {}
    for run in parents:
        by_sweep.setdefault(run.data.tags.get(TAG_SWEEP, ""), run.info.run_id)
    if not by_sweep:
        return None
    sweeps = study.runs["sweep"].dropna() if "sweep" in study.runs.columns else None
    if sweeps is not None and len(sweeps):
        for name in sweeps.value_counts().index:
            if name in by_sweep:
                return by_sweep[name]
    return next(iter(by_sweep.values())) if len(by_sweep) == 1 else None
