"""``var-lab sweep expand|launch|status|resume|cancel FILE``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from var_lab.inputs import ArgumentParser
from var_lab.sweeps.schema import SweepError

USAGE = """\
var-lab sweep expand FILE [--write]              the points of a sweep (and their config.yaml with --write)
var-lab sweep launch FILE [--dry-run]            start pending and unfinished runs (finished ones are skipped)
var-lab sweep status FILE                        pending / running / finished / failed per run, step, loss, compute
var-lab sweep resume FILE                        retry failed and unfinished runs only
var-lab sweep cancel FILE                        cancel SLURM jobs, stop local / torchrun processes

The sweep file format is documented in var_lab/sweeps/schema.py and at the top of every file in sweeps/.
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="sweep YAML file")
    parser.add_argument("--output-root", help="override the sweep's output_root")
    parser.add_argument(
        "--only", action="append", metavar="POINT", help="only these points (keys or shell patterns, repeatable)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config key of every point, after the sweep's overrides (e.g. trainer.max_steps=10, "
        "resources.gpus_per_node=0); data.* keys other than the batch (e.g. data.root) also reach the tokenizer "
        "and tokenize stages; VALUE is YAML; repeatable",
    )
    parser.add_argument(
        "--patch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="edit the sweep document before validation (e.g. axes.depth=[2,3], tokenizer.train.trainer.max_steps=5)",
    )


def _launch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts / commands and configs only")
    parser.add_argument("--launcher", choices=("slurm", "torchrun", "local"), help="override the sweep's launcher")
    parser.add_argument("--node-rank", type=int, default=0, help="torchrun over several nodes: this node's rank")
    parser.add_argument("--rdzv-endpoint", help="torchrun: HOST:PORT of node 0 (overrides torchrun.rdzv_endpoint)")
    parser.add_argument(
        "--submitit-cluster",
        choices=("slurm", "local"),
        default="slurm",
        help="slurm launcher: 'local' runs the same submitit job function through submitit's LocalExecutor",
    )
    parser.add_argument("--wait", action="store_true", help="slurm launcher: wait until the submitted jobs end")
    parser.add_argument(
        "--reconfigure", action="store_true", help="allow a started run to continue with a changed config"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="var-lab sweep",
        description="Expand, launch and follow sweeps of VAR (or tokenizer) runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=USAGE,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{expand,launch,status,resume,cancel}")
    p = sub.add_parser("expand", help="print the points; --write writes their config.yaml")
    _common(p)
    p.add_argument("--write", action="store_true", help="write <output_root>/<name>/<point>/config.yaml")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    for name, text in (("launch", "start pending and unfinished runs"), ("resume", "retry failed and unfinished runs")):
        p = sub.add_parser(name, help=text)
        _common(p)
        _launch_options(p)
    p = sub.add_parser("status", help="state, step, loss and compute per run")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-mlflow", action="store_true", help="read the run folders only")
    p = sub.add_parser("cancel", help="cancel SLURM jobs and stop local / torchrun processes of the sweep")
    _common(p)
    p.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    return parser


def _plan(args: argparse.Namespace):
    from var_lab.sweeps.expand import expand
    from var_lab.sweeps.schema import load_sweep

    sweep = load_sweep(args.file, patches=args.patch)
    return expand(sweep, output_root=args.output_root, sets=args.set, only=args.only)


def sweep_main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``var-lab sweep``; returns the exit code (2 for a bad sweep file or option)."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except SweepError as exc:
        print(f"var-lab sweep: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    plan = _plan(args)
    from var_lab.inputs import check_output_dir

    # Before any run folder or claim is written; a dry run, status and cancel only read it.
    writes = (args.command in ("launch", "resume") and not args.dry_run) or (args.command == "expand" and args.write)
    fix = "pass another --output-root (or change output_root in the sweep file)"
    check_output_dir(plan.sweep_dir, "sweep folder", fix, writable=writes)
    if args.command == "expand":
        from var_lab.sweeps.expand import config_yaml, format_points_table

        if args.json:
            print(json.dumps([_task_json(t) for t in plan.tasks], indent=2, default=str))
        else:
            print(f"sweep {plan.sweep.name} ({plan.sweep.kind}, launcher {plan.sweep.launcher}): {plan.sweep_dir}")
            print(f"tracking {plan.tracking_uri} (experiment {plan.experiment})")
            stages = [t.name for t in plan.tasks if t.stage != "run"]
            if stages:
                print("stages: " + ", ".join(stages))
            print()
            print(format_points_table(plan))
        if args.write:
            from var_lab.atomic import write_atomic

            for task in plan.tasks:
                if task.config is not None:
                    write_atomic(task.config_path, config_yaml(task.config))
                    print(f"wrote {task.config_path}")
        return 0
    if args.command in ("launch", "resume"):
        from var_lab.sweeps.launchers import Launcher

        launcher = Launcher(
            plan,
            launcher=args.launcher,
            mode=args.command,
            node_rank=args.node_rank,
            rdzv_endpoint=args.rdzv_endpoint,
            submitit_cluster=args.submitit_cluster,
            wait=args.wait,
            reconfigure=args.reconfigure,
            out=lambda line: print(line, flush=True),
        )
        return launcher.run(dry_run=args.dry_run)
    if args.command == "status":
        from var_lab.sweeps.status import collect_status, format_status, status_json

        rows = collect_status(plan, use_mlflow=not args.no_mlflow)
        print(status_json(rows, plan) if args.json else format_status(rows, plan))
        return 0
    if args.command == "cancel":
        from var_lab.sweeps.launchers import cancel_plan

        return cancel_plan(plan, out=lambda line: print(line, flush=True), grace_s=args.grace)
    raise SweepError(f"unknown command {args.command}")


def _task_json(task) -> dict:
    return {
        "name": task.name,
        "stage": task.stage,
        "argv": task.argv,
        "task_dir": str(task.task_dir),
        "resources": task.resources.__dict__,
        "depends": task.depends,
        "config": task.config,
    }


if __name__ == "__main__":
    sys.exit(sweep_main())
