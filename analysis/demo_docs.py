"""Write the demo's numbers into ``docs/`` and the README from the report ``make demo`` produced (``make docs``).

Nothing here is typed by hand: the figure is the report's ``loss_vs_params.png``, the table and the law come from the
report's ``runs.csv`` and ``fits.csv``, the wall time from ``wall_seconds`` (written by ``make demo``). The README's
block between ``<!-- demo:begin -->`` and ``<!-- demo:end -->`` and the results part of ``docs/demo.md`` (below
``<!-- results -->``) are replaced; the rest of both files is left as it is.

Usage: ``python -m analysis.demo_docs [--study demo_out/demo_cpu] [--docs docs] [--readme README.md]``
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

BEGIN, END, RESULTS = "<!-- demo:begin -->", "<!-- demo:end -->", "<!-- results -->"


def _fmt(value, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3g}"


def _col(frame: pd.DataFrame, *names: str):
    """The first of ``names`` that ``frame`` has, else None."""
    return next((n for n in names if n in frame.columns), None)


def _commit(runs: pd.DataFrame | None = None) -> str:
    """The commit the study's runs logged (``git.commit``), else this checkout's HEAD."""
    column = None if runs is None else _col(runs, "git_commit", "git.commit")
    if column is not None:
        commits = {str(c)[:7] for c in runs[column].dropna() if str(c) and str(c) != "unknown"}
        if len(commits) == 1:
            return commits.pop()
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarize(study: Path) -> dict:
    """The demo's numbers from ``<study>/report``: per-size rows, the loss law and the wall time."""
    report = study / "report"
    runs_csv, fits_csv = report / "runs.csv", report / "fits.csv"
    for path in (runs_csv, fits_csv):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `make demo` first (it writes {report})")
    runs = pd.read_csv(runs_csv)
    fits = pd.read_csv(fits_csv)
    var = runs[runs.get("kind", pd.Series("var", index=runs.index)).fillna("var").eq("var")].copy()
    var = var[var["depth"].notna()].sort_values("depth")
    params = _col(var, "params_total", "params_blocks")
    loss = _col(var, "final:val/L_mean")
    columns = {
        "depth": "depth",
        params: "params",
        "final_step": "last step",
        "compute_pflops": "PFLOPs",
        loss: "val/L_mean",
        "final:eval/kid": "KID",
        "final:eval/kid_std": "KID std",
        "final:eval/fid": "FID",
    }
    rows = []
    for _, run in var.iterrows():
        rows.append({label: run.get(col) for col, label in columns.items() if col is not None and col in var.columns})
    targets = {loss, loss.split(":", 1)[-1]} if loss else set()
    law = fits[fits["target"].isin(targets) & fits["x"].isin({params, "N"}) & (fits["form"] == "power_law")]
    wall = study / "wall_seconds"
    return {
        "rows": rows,
        "params_column": params,
        "law": str(law.iloc[0]["law"]).split(", r =")[0] if len(law) else None,
        "x_unit": str(law.iloc[0].get("x_unit", "")) if len(law) else "",
        "tokenizer": _tokenizer_facts(study),
        "r": float(law.iloc[0]["r"]) if len(law) and pd.notna(law.iloc[0].get("r")) else None,
        "wall_s": int(wall.read_text().strip()) if wall.exists() else None,
        "commit": _commit(var),
        "figure": report / "plots" / "loss_vs_params.png",
    }


def _tokenizer_facts(study: Path) -> str | None:
    """PSNR and code usage at the finest scale from the study's tokenizer stage (its DONE summary), when present."""
    import json

    try:
        metrics = json.loads((study / "tokenizer" / "DONE").read_text()).get("metrics", {})
    except (OSError, ValueError, AttributeError):
        return None
    usage = [k for k in metrics if k.startswith("val/usage_scale_")]
    if "val/psnr" not in metrics or not usage:
        return None
    finest = max(usage, key=lambda k: int(k.rsplit("_", 1)[-1]))
    return (
        f"- Tokenizer: validation PSNR {_fmt(metrics['val/psnr'], 4)} dB, "
        f"{_fmt(metrics[finest], 3)}% of the codes used at the finest scale."
    )


def results_markdown(summary: dict) -> str:
    rows = summary["rows"]
    heads = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        cells = [
            str(int(row[h])) if h in ("depth", "last step") and pd.notna(row[h]) else _fmt(row[h], 4) for h in heads
        ]
        lines.append("| " + " | ".join(cells) + " |")
    kid = [r.get("KID") for r in rows]
    std = [r.get("KID std") for r in rows]
    gaps = [a - b for a, b in zip(kid, kid[1:]) if pd.notna(a) and pd.notna(b)]
    stds = [s for s in std if pd.notna(s)]
    decreasing = bool(gaps) and all(g > 0 for g in gaps)
    loss = [r.get("val/L_mean") for r in rows]
    loss_down = all(a > b for a, b in zip(loss, loss[1:]))
    law = summary["law"] or "no law was fitted (see the report's notes)"
    r = f"{summary['r']:.3f}" if summary["r"] is not None else "-"
    wall = f"{summary['wall_s'] / 60:.1f} min" if summary["wall_s"] else "unknown"
    facts = [
        f"- Law of the final validation loss against {summary['params_column']} "
        f"(N in {summary.get('x_unit') or 'units'} in the law): `{law}`, r = {r} (log-log).",
        f"- Final validation loss strictly decreasing with size: {'yes' if loss_down else 'no'}.",
        f"- KID decreasing with size: {'yes' if decreasing else 'no'}; smallest gap between neighbouring sizes "
        f"{_fmt(min(gaps), 2) if gaps else '-'}, largest KID subset std {_fmt(max(stds), 2) if stds else '-'}.",
        f"- Study wall time (tokenizer, tokens, 4 trainings, 4 evaluations, analysis): {wall} on "
        f"{platform.machine()} with {_cpu_count()} CPU cores; commit {summary.get('commit') or _commit()}.",
    ]
    if summary.get("tokenizer"):
        facts.insert(0, summary["tokenizer"])
    return "\n".join(lines + [""] + facts)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _replace_between(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"markers {begin} ... {end} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("demo_out/demo_cpu"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    summary = summarize(args.study)
    table = results_markdown(summary)
    if summary["figure"].exists():
        shutil.copyfile(summary["figure"], args.docs / "demo_loss_vs_params.png")
    demo_md = args.docs / "demo.md"
    text = demo_md.read_text() if demo_md.exists() else f"# The embedded study\n\n{RESULTS}\n"
    head = text.split(RESULTS, 1)[0]
    demo_md.write_text(f"{head}{RESULTS}\n\n{table}\n")
    r = f"{summary['r']:.3f}" if summary["r"] is not None else "-"
    wall = f"{summary['wall_s'] / 60:.0f} minutes" if summary["wall_s"] else "a few minutes"
    block = (
        "![validation loss against parameters, from `make demo`](docs/demo_loss_vs_params.png)\n\n"
        f"*Written by `make docs` from the last `make demo`: four tiny VAR models (depth 1-4) trained on Fashion-MNIST "
        f"with one lr rule and compute-scaled budgets, their final validation loss against parameters and the fitted "
        f"law `{summary['law']}` (r = {r}) with its 95% bootstrap band; the study took {wall} on "
        f"{_cpu_count()} CPU cores. Per-size loss, KID (with its subset std) and FID: [docs/demo.md](docs/demo.md).*"
    )
    args.readme.write_text(_replace_between(args.readme.read_text(), BEGIN, END, block))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
