"""Synthetic scaling studies written to a real MLflow store, following the var-lab MLflow contract.

Tests, the notebook, the benchmarks and the documentation need a study whose true law is known. This module plants
``L(N, D) = E + A / N**alpha + B / D**beta`` (N = parameters, D = training tokens seen) into runs that carry exactly the
tags, params and step metrics that training and evaluation log (the names of ``var_lab.contract``), so the loaders
and fits are exercised on the same names as a real sweep.

Two writers:

* ``"client"`` logs through :class:`mlflow.tracking.MlflowClient` (``log_batch``), as training does;
* ``"sql"`` creates experiments, runs, params and tags through the client, then bulk-inserts the metric rows into
  MLflow's own ``metrics`` / ``latest_metrics`` tables (sqlite URIs only). It exists so that a benchmark can build a
  store of 10 million points in a minute instead of an hour; what it writes reads back identically through the client.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from var_lab.contract import TAG_KIND, TAG_POINT, TAG_SWEEP

DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass
class PlantedLaw:
    """True law of a synthetic study: ``L(N, D) = E + A / N**alpha + B / D**beta`` in nats."""

    E: float = 4.9
    A: float = 120.0
    B: float = 400.0
    alpha: float = 0.34
    beta: float = 0.28

    def __call__(self, N, D):
        N = np.asarray(N, dtype=float)
        D = np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta


@dataclass
class PlantedFID:
    """True FID law of a synthetic study, in the paper's form ``FID = (a * N_billions) ** b``."""

    a: float = 0.05
    b: float = -0.3

    def __call__(self, N):
        return (self.a * np.asarray(N, dtype=float) / 1e9) ** self.b


def var_param_counts(
    depth: int, vocab_size: int = 4096, cvae: int = 32, num_classes: int = 1000, patch_nums=DEFAULT_PATCH_NUMS
) -> dict[str, int]:
    """Parameter counts of a VAR-d{depth} by group (docs/var_reference.md: width 64 * depth).

    Returns:
        dict with keys ``total``, ``blocks`` (attention + MLP), ``embed``, ``adaln`` (every AdaLN linear) and
        ``head``; d16 gives about 310M in total, as the release.
    """
    C = 64 * depth
    L = sum(p * p for p in patch_nums)
    attn = 3 * C * C + 2 * C + C * C + C + depth  # qkv, q/v bias, proj, per-head scale
    mlp = C * 4 * C + 4 * C + 4 * C * C + C
    blocks = depth * (attn + mlp)
    adaln = depth * (C * 6 * C + 6 * C) + (C * 2 * C + 2 * C)
    embed = (num_classes + 1) * C + cvae * C + C + C + L * C + len(patch_nums) * C
    head = C * vocab_size + vocab_size
    return {"total": blocks + adaln + embed + head, "blocks": blocks, "embed": embed, "adaln": adaln, "head": head}


def var_flops_per_image(depth: int, vocab_size: int = 4096, cvae: int = 32, patch_nums=DEFAULT_PATCH_NUMS) -> float:
    """Training FLOPs per image of VAR-d{depth}: ``3 * (2 L (12 d C^2 + C V + Cvae C) + 4 d L^2 C)``."""
    C = 64 * depth
    L = sum(p * p for p in patch_nums)
    return 3.0 * (2 * L * (12 * depth * C * C + C * vocab_size + cvae * C) + 4 * depth * L * L * C)


@dataclass
class SyntheticRun:
    """One planted run: its sweep point, size, training length and what happens to it."""

    depth: int
    steps: int
    global_batch: int = 256
    status: str = "FINISHED"
    nan_after: float | None = None
    """Fraction of training after which every loss turns NaN (a diverged run), or None."""


@dataclass
class SyntheticStudy:
    """A planted study: runs, laws and logging density."""

    runs: list[SyntheticRun]
    law: PlantedLaw = field(default_factory=PlantedLaw)
    tail_law: PlantedLaw = field(default_factory=lambda: PlantedLaw(E=4.4, A=150.0, B=500.0, alpha=0.3, beta=0.26))
    fid: PlantedFID = field(default_factory=PlantedFID)
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    log_points: int = 50
    """Logged steps per run (log-spaced between the first and the last step)."""
    noise: float = 0.003
    """Relative (log-normal) noise on every loss."""
    fid_noise: float = 0.01
    images_per_epoch: int = 1_281_167
    seed: int = 0


def depth_sweep(
    depths: Sequence[int] = (2, 4, 6, 8, 12, 16),
    epochs: Sequence[float] = (0.25, 1.0, 4.0),
    global_batch: int = 256,
    images_per_epoch: int = 1_281_167,
) -> list[SyntheticRun]:
    """A depth x training-length grid of runs (every combination), e.g. for an approach-3 fit."""
    runs = []
    for depth in depths:
        for ep in epochs:
            runs.append(
                SyntheticRun(
                    depth=depth, steps=max(2, int(ep * images_per_epoch / global_batch)), global_batch=global_batch
                )
            )
    return runs


def log_steps(total_steps: int, points: int) -> np.ndarray:
    """Distinct logged steps in 1..total_steps: about ``points`` of them, half log-spaced, half evenly spaced."""
    # half log-spaced (early curve for log-log plots), half evenly spaced (the long tail)
    points = max(points, 2)
    geo = np.geomspace(1, total_steps, num=points // 2 + 1)
    lin = np.linspace(1, total_steps, num=points - points // 2)
    return np.unique(np.round(np.concatenate([geo, lin])).astype(np.int64))


def _run_metrics(study: SyntheticStudy, run: SyntheticRun, rng: np.random.Generator) -> dict[str, tuple]:
    """Metric histories of one run: name -> (steps, values)."""
    counts = var_param_counts(run.depth, patch_nums=study.patch_nums)
    N = counts["total"]
    flops_per_image = var_flops_per_image(run.depth, patch_nums=study.patch_nums)
    tokens_per_image = sum(p * p for p in study.patch_nums)
    steps = log_steps(run.steps, study.log_points)
    images = steps * run.global_batch
    D = images * tokens_per_image

    def noisy(x, sigma):
        return x * np.exp(rng.normal(0.0, sigma, size=np.shape(x)))

    out: dict[str, tuple] = {}
    L_mean = noisy(study.law(N, D), study.noise)
    L_tail = noisy(study.tail_law(N, D), study.noise)
    out["val/L_mean"] = (steps, L_mean)
    out["val/L_tail"] = (steps, L_tail)
    out["train/loss"] = (steps, noisy(study.law(N, D), 3 * study.noise))
    out["train/L_mean"] = (steps, noisy(study.law(N, D), 3 * study.noise))
    out["train/L_tail"] = (steps, noisy(study.tail_law(N, D), 3 * study.noise))
    # token error falls slowly with size and data, as in the paper (Err = (c N)^-0.01 .. ^-0.016)
    err_mean = np.clip(noisy(0.5 * (N / 1e8) ** -0.02 * (D / 1e9) ** -0.01, study.noise), 0, 1)
    err_tail = np.clip(noisy(0.6 * (N / 1e8) ** -0.03 * (D / 1e9) ** -0.015, study.noise), 0, 1)
    out["val/acc_mean"] = (steps, 1 - err_mean)
    out["val/acc_tail"] = (steps, 1 - err_tail)
    out["train/acc_mean"] = (steps, 1 - noisy(err_mean, study.noise))
    out["train/acc_tail"] = (steps, 1 - noisy(err_tail, study.noise))
    K = len(study.patch_nums)
    for k in range(K):
        # coarse scales are easier to predict than fine ones
        out[f"val/L_scale_{k}"] = (steps, noisy(study.law(N, D) * (0.55 + 0.5 * k / max(K - 1, 1)), study.noise))
    flops = images * flops_per_image
    out["compute/flops"] = (steps, flops.astype(float))
    out["compute/pflops"] = (steps, flops / 1e15)
    out["perf/images_per_s"] = (steps, noisy(np.full(len(steps), 2e5 / N**0.5 * 1e3), 0.05))
    out["opt/lr"] = (steps, 1e-4 * run.global_batch / 256 * np.minimum(1.0, steps / max(steps[-1] / 50, 1)))
    out["opt/grad_norm"] = (steps, noisy(np.full(len(steps), 1.0), 0.1))
    if run.nan_after is not None:
        cut = steps >= run.nan_after * steps[-1]
        for name in ("val/L_mean", "val/L_tail", "train/loss", "train/L_mean", "train/L_tail"):
            s, v = out[name]
            v = v.copy()
            v[cut] = np.nan
            out[name] = (s, v)
    elif run.status == "FINISHED":
        last = steps[-1:]
        fid = float(noisy(study.fid(N), study.fid_noise))
        out["eval/fid"] = (last, np.array([fid]))
        out["eval/kid"] = (last, np.array([fid / 1000.0]))
        out["eval/is"] = (last, np.array([300.0 / fid]))
        out["eval/precision"] = (last, np.array([0.8]))
        out["eval/recall"] = (last, np.array([0.5]))
    return out


def _run_params(study: SyntheticStudy, run: SyntheticRun) -> dict[str, str]:
    counts = var_param_counts(run.depth, patch_nums=study.patch_nums)
    images = run.steps * run.global_batch
    return {
        "model.depth": str(run.depth),
        "model.width": str(64 * run.depth),
        "model.heads": str(run.depth),
        "model.params_total": str(counts["total"]),
        "model.params_blocks": str(counts["blocks"]),
        "model.params_embed": str(counts["embed"]),
        "model.params_adaln": str(counts["adaln"]),
        "model.params_head": str(counts["head"]),
        "model.flops_per_image": repr(var_flops_per_image(run.depth, patch_nums=study.patch_nums)),
        "model.patch_nums": str(tuple(study.patch_nums)),
        "data.name": "synthetic",
        "data.resolution": str(16 * study.patch_nums[-1]),
        "train.global_batch": str(run.global_batch),
        "train.epochs": repr(images / study.images_per_epoch),
        "train.base_lr": "0.0001",
        "git.commit": "synthetic",
    }


def write_synthetic_study(
    tracking_uri: str,
    experiment: str,
    study: SyntheticStudy,
    writer: str = "client",
    progress: bool = False,
) -> pd.DataFrame:
    """Write a planted study into an MLflow store, one run per :class:`SyntheticRun`.

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///...`` for the ``"sql"`` writer).
        experiment: experiment name; created when missing.
        study: the planted study.
        writer: ``"client"`` (``MlflowClient.log_batch``) or ``"sql"`` (bulk insert, sqlite only).
        progress: show a tqdm bar over runs.

    Returns:
        One row per run with the planted truth: run_id, depth, N (params_total), D (tokens seen), steps, status,
        points (metric values written).
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    if writer not in ("client", "sql"):
        raise ValueError(f"writer must be 'client' or 'sql', got {writer!r}")
    if writer == "sql" and not tracking_uri.startswith("sqlite:///"):
        raise ValueError(f"the 'sql' writer needs a sqlite:/// tracking URI, got {tracking_uri!r}")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    experiment_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    rng = np.random.default_rng(study.seed)
    tokens_per_image = sum(p * p for p in study.patch_nums)
    rows = []
    sql_rows: list[tuple] = []
    sql_latest: list[tuple] = []
    iterator = study.runs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"writing {experiment}", unit="run")
    base_ms = int(time.time() * 1000)
    for i, run in enumerate(iterator):
        point = f"depth={run.depth},steps={run.steps}"
        tags = {TAG_SWEEP: experiment, TAG_POINT: point, TAG_KIND: "var"}
        mlflow_run = client.create_run(experiment_id, start_time=base_ms + i, tags=tags, run_name=f"d{run.depth}-{i}")
        run_id = mlflow_run.info.run_id
        params = _run_params(study, run)
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        metrics = _run_metrics(study, run, rng)
        points = 0
        if writer == "client":
            batch: list = []
            for name, (steps, values) in metrics.items():
                for s, v in zip(steps.tolist(), values.tolist()):
                    batch.append(Metric(name, float(v), base_ms + int(s), int(s)))
                    if len(batch) == 1000:
                        client.log_batch(run_id, metrics=batch)
                        points += len(batch)
                        batch = []
            if batch:
                client.log_batch(run_id, metrics=batch)
                points += len(batch)
        else:
            for name, (steps, values) in metrics.items():
                is_nan = np.isnan(values)
                stored = np.where(is_nan, 0.0, values)
                ts = base_ms + steps
                sql_rows.extend(
                    zip(
                        [name] * len(steps),
                        stored.tolist(),
                        ts.tolist(),
                        [run_id] * len(steps),
                        steps.tolist(),
                        is_nan.astype(int).tolist(),
                    )
                )
                sql_latest.append((name, float(stored[-1]), int(ts[-1]), int(steps[-1]), int(is_nan[-1]), run_id))
                points += len(steps)
            if len(sql_rows) > 2_000_000:
                _sql_insert(tracking_uri, sql_rows, sql_latest)
                sql_rows, sql_latest = [], []
        client.set_terminated(run_id, status=run.status)
        counts = var_param_counts(run.depth, patch_nums=study.patch_nums)
        rows.append(
            {
                "run_id": run_id,
                "depth": run.depth,
                "N": counts["total"],
                "D": float(run.steps * run.global_batch * tokens_per_image),
                "steps": run.steps,
                "status": run.status,
                "nan_after": run.nan_after,
                "points": points,
            }
        )
    if writer == "sql" and sql_rows:
        _sql_insert(tracking_uri, sql_rows, sql_latest)
    return pd.DataFrame(rows)


def _sql_insert(tracking_uri: str, rows: list[tuple], latest: list[tuple]) -> None:
    path = tracking_uri[len("sqlite:///") :]
    con = sqlite3.connect(path, timeout=60)
    try:
        with con:
            con.executemany(
                "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
            con.executemany(
                "INSERT OR REPLACE INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                latest,
            )
    finally:
        con.close()


def study_truth(study: SyntheticStudy) -> dict:
    """The planted laws of a study as a plain dict (for reports and assertions)."""
    return {"law": asdict(study.law), "tail_law": asdict(study.tail_law), "fid": asdict(study.fid)}


def chinchilla_sample(
    n_points: int = 250,
    law: PlantedLaw | None = None,
    noise: float = 0.005,
    seed: int = 0,
    log10_N: tuple[float, float] = (7.0, 10.0),
    log10_D: tuple[float, float] = (9.0, 12.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random (N, D, loss) points of a planted law with log-normal noise (for fit tests and benchmarks).

    Returns:
        N (n,), D (n,), loss (n,).
    """
    law = law or PlantedLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    rng = np.random.default_rng(seed)
    N = 10 ** rng.uniform(*log10_N, size=n_points)
    D = 10 ** rng.uniform(*log10_D, size=n_points)
    loss = law(N, D) * np.exp(rng.normal(0, noise, size=n_points))
    return N, D, loss


__all__ = [
    "DEFAULT_PATCH_NUMS",
    "PlantedFID",
    "PlantedLaw",
    "SyntheticRun",
    "SyntheticStudy",
    "chinchilla_sample",
    "depth_sweep",
    "log_steps",
    "study_truth",
    "var_flops_per_image",
    "var_param_counts",
    "write_synthetic_study",
]
