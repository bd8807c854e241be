"""Speed and accuracy of the scaling-law fits (CPU), and the coverage of their bootstrap intervals.

Rows:

* the approach-3 fit of ``L(N, D)`` on ``--points`` synthetic points (default 250) from the full 4,500-start grid:
  batched L-BFGS + SciPy polish (the default) with 1 process and with ``--workers``, and SciPy L-BFGS-B from every
  start (the reference, on ``--scipy-starts`` evenly spread starts, default 450, its full-grid time extrapolated),
  with the objective each reached and the largest parameter difference to the default;
* the chinchilla bootstrap (``--chinchilla-bootstrap`` replicates);
* one-variable fits with bootstrap (power law, saturating);
* coverage of nominal 95% intervals of the power-law exponent over ``--trials`` synthetic studies of 10 and 40 runs,
  for the default expanded interval and the plain percentile interval.

    .venv/bin/python benchmarks/analysis_fit.py [--points 250] [--workers 2] [--trials 400] [--scipy-starts 4500]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, print_table, today, write_json  # noqa: E402

from analysis import fit as F  # noqa: E402
from analysis.synthetic import PlantedLaw, chinchilla_sample  # noqa: E402

TRUTH = PlantedLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=250)
    parser.add_argument("--noise", type=float, default=0.005)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scipy-starts", type=int, default=450,
                        help="evenly spread grid starts for the SciPy-from-every-start reference (4500: all; 0 skips "
                             "it); its full-grid time is extrapolated")  # fmt: skip
    parser.add_argument("--chinchilla-bootstrap", type=int, default=100)
    parser.add_argument("--trials", type=int, default=400, help="synthetic studies per coverage row")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "analysis_fit.json")
    args = parser.parse_args()

    N, D, L = chinchilla_sample(args.points, TRUTH, noise=args.noise, seed=0)
    rows = []

    def fit_row(name, seconds, result, reference=None, **extra):
        row = {"fit": name, "seconds": seconds, "objective": result.get("objective")}
        for key in ("E", "A", "B", "alpha", "beta"):
            row[key] = result.get(key)
        if reference is not None:
            row["max_rel_diff"] = max(abs(result[k] / reference[k] - 1) for k in ("E", "A", "B", "alpha", "beta"))
        row.update(extra)
        rows.append(row)
        print(f"  {name}: {seconds:.2f} s")

    print(f"approach 3 on {args.points} points, {len(F.CHINCHILLA_GRID)} starts ({os.cpu_count()} cores)")
    s1, default_1 = clock(lambda: F.fit_chinchilla(N, D, L, workers=1))
    fit_row("chinchilla batched L-BFGS + polish, 1 process", s1, default_1)
    s2, default_w = clock(lambda: F.fit_chinchilla(N, D, L, workers=args.workers))
    fit_row(f"chinchilla batched L-BFGS + polish, {args.workers} processes", s2, default_w, default_1)
    if args.scipy_starts:
        starts = F.CHINCHILLA_GRID[:: max(1, len(F.CHINCHILLA_GRID) // args.scipy_starts)][: args.scipy_starts]
        s3, reference = clock(lambda: F.fit_chinchilla(N, D, L, method="scipy", starts=starts, workers=args.workers))
        fit_row(f"chinchilla SciPy L-BFGS-B from {len(starts)} starts, {args.workers} processes", s3, reference,
                default_1, full_grid_seconds_estimate=s3 * len(F.CHINCHILLA_GRID) / len(starts))  # fmt: skip
    s4, boot = clock(lambda: F.fit_chinchilla(N, D, L, bootstrap=args.chinchilla_bootstrap, workers=args.workers))
    covered = [
        k for k in ("E", "A", "B", "alpha", "beta") if boot[f"{k}_ci"][0] <= getattr(TRUTH, k) <= boot[f"{k}_ci"][1]
    ]
    fit_row(f"chinchilla fit + {args.chinchilla_bootstrap} bootstrap replicates", s4, boot, default_1,
            truth_in_interval=",".join(covered))  # fmt: skip

    x = np.geomspace(1e7, 1e10, 12)
    y = (1.8 + 300 * x**-0.3) * np.exp(np.random.default_rng(0).normal(0, 0.003, x.size))
    s, r = clock(lambda: F.fit_power_law(x / 1e9, y, bootstrap=1000))
    rows.append({"fit": "power law, 12 points + 1000 bootstrap", "seconds": s, "alpha": r["b"]})
    s, r = clock(lambda: F.fit_saturating(x, y, bootstrap=200))
    rows.append({"fit": "saturating, 12 points + 200 bootstrap", "seconds": s, "E": r["E"], "A": r["A"],
                 "alpha": r["alpha"]})  # fmt: skip

    print(f"coverage of 95% intervals over {args.trials} studies")
    for n_runs in (10, 40):
        x = np.geomspace(0.01, 3.0, n_runs)
        hits = {"expanded": 0, "percentile": 0}
        t0 = time.perf_counter()
        for trial in range(args.trials):
            noise = np.random.default_rng(10_000 + trial).normal(0, 0.02, x.size)
            result = F.fit_power_law(x, (2.5 * x) ** -0.2 * np.exp(noise), bootstrap=1000, seed=trial)
            lo, hi = result["b_ci"]
            hits["expanded"] += lo <= -0.2 <= hi
            lo, hi = F.percentile_interval(result.samples["b"], 0.95)
            hits["percentile"] += lo <= -0.2 <= hi
        for kind, count in hits.items():
            name = f"coverage, power-law exponent, {n_runs} runs, {kind} interval"
            per_trial = (time.perf_counter() - t0) / args.trials
            rows.append({"fit": name, "seconds": per_trial, "coverage": count / args.trials})

    print()
    columns = ["fit", "seconds", "objective", "E", "A", "B", "alpha", "beta", "max_rel_diff", "coverage"]
    print_table(rows, columns + ["full_grid_seconds_estimate"])
    print(f"load average during the run: {os.getloadavg()}")
    for row in rows:
        row.update({"date": today(), "cpu_count": os.cpu_count(), "points": args.points,
                    "load_average": os.getloadavg()})  # fmt: skip
    write_json(rows, args.out)


if __name__ == "__main__":
    main()
