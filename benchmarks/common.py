"""Shared helpers of the GPU benchmarks: release baselines, matmul peak, CUDA-event timing, result files."""

from __future__ import annotations

import datetime as _dt
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

# The release measured on one H100 80GB (docs/var_reference.md): depth -> (batch, step s, images/s, peak GiB).
RELEASE_TRAIN = {16: (64, 0.335, 191, 45), 20: (48, 0.420, 114, 55), 24: (32, 0.429, 75, 58), 30: (16, 0.395, 41, 61)}
RELEASE_TRAIN_COMPILED_D16 = (64, 0.182, 351)
# Sampling 64 images with cfg and a KV cache: depth -> (seconds, images/s).
RELEASE_SAMPLING = {16: (0.55, 116), 30: (1.23, 52)}
RELEASE_SAMPLING_BATCH = 64
RELEASE_DEVICE = "NVIDIA H100 80GB HBM3"

HERE = Path(__file__).resolve().parent


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def today() -> str:
    return _dt.date.today().isoformat()


def time_cuda(fn: Callable[[], None], warmup: int = 3, repeats: int = 10) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` (CUDA events; wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        import time

        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_tflops(n: int = 8192) -> float:
    """Measured bf16 dense matmul throughput (TFLOP/s) of this GPU, the denominator of the MFU columns."""
    if not torch.cuda.is_available():
        return float("nan")
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = time_cuda(lambda: a @ b, warmup=3, repeats=10)
    return 2 * n**3 / seconds / 1e12


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns}  # rows may be empty
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_json(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {path}")
