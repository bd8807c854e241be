"""Summary of the GPU ladder study (sweeps/gpu_ladder.yaml) from its output root: one row per size, printed as a table
and written as JSON (the rows of benchmarks/results.json, ``benchmark: gpu_ladder``).

Per size: parameters, steps, images seen, training PFLOPs, final validation loss, FID and KID (the sweep's eval,
seed 0), training images/s as MLflow recorded it (median of the logged ``perf/images_per_s`` over the second half of
the run), and wall time per task (fit, eval) from the launcher's records (``launches.jsonl``: start and end of every
attempt, summed). Stages (tokenizer, tokenize, analyze) get their wall time too; the tokenizer its final PSNR and
code usage. FID noise: ``--noise DIR`` reads ``DIR/seed*/metrics.json`` (extra eval seeds of one size) and reports
their FIDs with the sweep's own, their standard deviation, and the smallest FID gap between neighbouring sizes.

Usage: python benchmarks/gpu_ladder_summary.py ROOT [--noise DIR] [--noise-point depth=10] [--out summary.json]
       ROOT is the sweep's output root (the folder holding mlflow.db and gpu_ladder/).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
from pathlib import Path

import numpy as np

NAME = "gpu_ladder"


def attempts_seconds(task_dir: Path) -> tuple[float, int]:
    """Wall seconds of every start..end pair in a task's launches.jsonl (an attempt without an end: not counted)."""
    path = task_dir / "launches.jsonl"
    if not path.exists():
        return float("nan"), 0
    starts, total, n = {}, 0.0, 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        when = _dt.datetime.fromisoformat(rec["time"]).timestamp() if "time" in rec else None
        if rec.get("phase") == "start":
            starts[rec.get("pid")] = when
        elif rec.get("phase") == "end" and rec.get("pid") in starts and when is not None:
            total += when - starts.pop(rec["pid"])
            n += 1
    return total, n


def median_second_half(client, run_id: str, key: str) -> float:
    values = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
    half = values[len(values) // 2 :]
    return statistics.median(half) if half else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--noise", type=Path, help="folder of extra eval seeds: seed*/metrics.json")
    parser.add_argument("--noise-point", default="depth=10")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sweep_dir = args.root / NAME
    uri = f"sqlite:///{(args.root / 'mlflow.db').resolve()}"
    from mlflow.tracking import MlflowClient

    from analysis.runs import load_study

    rows: list[dict] = []
    try:
        runs = load_study(NAME, uri, history=False).runs
    except (ValueError, FileNotFoundError) as error:
        print(f"no study yet: {error}")
        runs = None
    client = MlflowClient(tracking_uri=uri)
    stages = {}
    for stage in ("tokenizer", "tokenize", "analyze"):
        seconds, n = attempts_seconds(sweep_dir / stage)
        stages[stage] = {"wall_s": round(seconds, 1), "attempts": n, "done": (sweep_dir / stage / "DONE").exists()}
    done = sweep_dir / "tokenizer" / "DONE"
    if done.exists():
        metrics = json.loads(done.read_text() or "{}").get("metrics", {})
        for key in ("val/psnr", f"val/usage_scale_{len([k for k in metrics if k.startswith('val/usage_scale_')]) - 1}"):
            if key in metrics:
                stages["tokenizer"][key.removeprefix("val/")] = round(float(metrics[key]), 3)
    if runs is not None:
        var = runs[runs["kind"] != "tokenizer"] if "kind" in runs.columns else runs
        var = var[var["depth"].notna()].sort_values(["depth", "final_step"])
        for _, r in var.iterrows():
            point = r.get("point")
            current = sweep_dir / str(point) / "mlflow_run_id"
            if current.exists() and current.read_text().strip() != r["run_id"]:
                continue  # an earlier attempt of this point (started again on a cold machine)
            fit_s, fit_n = attempts_seconds(sweep_dir / str(point))
            eval_s, _ = attempts_seconds(sweep_dir / str(point) / "eval")
            row = {
                "benchmark": NAME,
                "point": point,
                "status": r.get("status"),
                "depth": int(r["depth"]),
                "params_total": int(r["params_total"]),
                "last_step": int(r["final_step"]) if np.isfinite(r.get("final_step", np.nan)) else None,
                "images_seen": r.get("images_seen"),
                "compute_pflops": r.get("compute_pflops"),
                "val_L_mean": r.get("final:val/L_mean"),
                "val_L_tail": r.get("final:val/L_tail"),
                "fid": r.get("final:eval/fid"),
                "kid": r.get("final:eval/kid"),
                "images_per_s": median_second_half(client, r["run_id"], "perf/images_per_s"),
                "fit_wall_s": round(fit_s, 1),
                "fit_attempts": fit_n,
                "eval_wall_s": round(eval_s, 1),
            }
            rows.append({k: (float(v) if isinstance(v, (np.floating,)) else v) for k, v in row.items()})
    noise = None
    if args.noise is not None and args.noise.exists():
        fids = [
            json.loads(p.read_text()).get("metrics", {}).get("fid")
            for p in sorted(args.noise.glob("seed*/metrics.json"))
        ]
        fids = [float(f) for f in fids if f is not None]
        own = [r["fid"] for r in rows if r["point"] == args.noise_point and r["fid"] is not None]
        fids = own[-1:] + fids
        finite = sorted((r["params_total"], r["fid"]) for r in rows if r["fid"] is not None and np.isfinite(r["fid"]))
        gaps = [abs(b[1] - a[1]) for a, b in zip(finite, finite[1:])]
        noise = {"point": args.noise_point, "fids": fids, "std": statistics.stdev(fids) if len(fids) > 1 else None,
                 "smallest_gap": min(gaps) if gaps else None}  # fmt: skip
    summary = {"stages": stages, "rows": rows, "fid_noise": noise}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1, default=str))
    print("stages: " + "; ".join(f"{k} {v['wall_s']} s{' (done)' if v['done'] else ''}" for k, v in stages.items()))
    extra = {k: v for k, v in stages["tokenizer"].items() if k not in ("wall_s", "attempts", "done")}
    if extra:
        print("tokenizer: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    cols = ["point", "status", "params_total", "last_step", "compute_pflops", "val_L_mean", "fid", "images_per_s",
            "fit_wall_s", "eval_wall_s"]  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import print_table

    print_table(rows, cols)
    if noise:
        print(
            f"FID noise at {noise['point']}: seeds {noise['fids']}, std {noise['std']}; "
            f"smallest FID gap between sizes {noise['smallest_gap']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
