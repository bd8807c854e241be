"""End-to-end training throughput through the real commands: ``var-lab tokenize`` then ``var-lab fit``.

Makes an ImageFolder of random images and a random tokenizer of the release's architecture (timings only), encodes
it once into token shards with ``var-lab tokenize`` (timed: images/s), then trains VAR-d{depth} from the shards for
``--steps`` steps with ``var-lab fit`` (bf16 on a GPU, the default sqlite MLflow store next to the run). ``fit`` runs
in this process through the CLI's own entry point (``var_lab.train.fit_main``, what ``var-lab fit`` calls), with one
extra Lightning callback that measures, without changing the run:

- wall time per step (host clock at every ``on_train_batch_start``: data loading, logging and checkpoints included);
- GPU busy time: torch.profiler (CUDA activity only) over ``--profile-steps`` steps of the steady state; the sum of
  kernel and copy times over the window's wall time. 100% means the GPU never waited for the loader or the host;
- torch.compile's work: graphs compiled, graph breaks, and whether dynamo hit its recompile limit.

Reported: ``perf/images_per_s`` as MLflow recorded it (median of the last half of the logged steps), the wall-clock
images/s of the same steps, and, with ``--bare-json`` (benchmarks/train_step.py's output from the same call), the
framework's overhead against the bare training step.

Usage: python benchmarks/fit_from_tokens.py [--depth 16] [--batch 64] [--steps 300] [--compile] [--work DIR]
       (tiny CPU check: --depth 2 --batch 8 --steps 20 --resolution 32 --images 64 --tiny-tokenizer)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, device_name, print_table, today, write_json  # noqa: E402

from var_lab.models import VQVAE  # noqa: E402

TINY = ["--tokenizer.vocab_size", "64", "--tokenizer.z_channels", "8", "--tokenizer.ch", "32",
        "--tokenizer.ch_mult", "[1,2,2]", "--tokenizer.patch_nums", "[1,2,3,4,6,8]"]  # fmt: skip


def _write_image(job: tuple[Path, int, int]) -> None:
    path, seed, resolution = job
    if not path.exists():
        pixels = np.random.default_rng(seed).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, compress_level=1)


def make_folder(root: Path, images: int, classes: int, resolution: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, count in (("train", images), ("val", max(images // 10, classes))):
        for i in range(count):
            folder = root / split / f"class{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{i:06d}.png", len(jobs), resolution))
    with ProcessPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_image, jobs, chunksize=64))


class StepProbe:
    """A Lightning callback (built lazily so that importing this file needs no Lightning): see the module doc."""

    def __new__(cls, profile_from: int, profile_steps: int):
        import lightning as L

        class _Probe(L.Callback):
            def __init__(self):
                self.starts: list[tuple[int, float]] = []
                self.profile_from, self.profile_to = profile_from, profile_from + profile_steps
                self.prof = None
                self.window: dict = {}

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                step = trainer.global_step
                self.starts.append((step, time.perf_counter()))
                cuda = torch.cuda.is_available()
                if step == self.profile_from and cuda and self.prof is None:
                    torch.cuda.synchronize()
                    self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    self.prof.__enter__()
                    self.window["t0"] = time.perf_counter()
                elif step == self.profile_to and self.prof is not None and "t1" not in self.window:
                    torch.cuda.synchronize()
                    self.window["t1"] = time.perf_counter()
                    self.prof.__exit__(None, None, None)
                    self.window["busy_s"] = _device_busy_seconds(self.prof)
                    self.window["steps"] = self.profile_to - self.profile_from

        return _Probe()


def _device_busy_seconds(prof) -> float:
    """Sum of the kernel / memcpy / memset durations the profiler saw on the GPU (one stream: no overlap)."""
    total_us = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total_us += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    return total_us / 1e6


class _CompileLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.limit_hits: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if "recompile_limit" in text or "cache_size_limit" in text:
            self.limit_hits.append(text.splitlines()[0][:300])


def mlflow_history(tracking_uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient(tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=3200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--tiny-tokenizer", action="store_true", help="a 32px toy tokenizer (CPU check)")
    parser.add_argument("--compile", action="store_true", help="--trainer.compile true")
    parser.add_argument("--scope", default="block", choices=("block", "model"), help="what compile compiles")
    parser.add_argument("--profile-steps", type=int, default=20, help="steady-state steps under torch.profiler")
    parser.add_argument("--bare-json", type=Path, help="train_step.py's output (same call) for the overhead")
    parser.add_argument("--bare-variant", default=None, help="its row to compare with (default: by --compile)")
    parser.add_argument("--commit", default=os.environ.get("VAR_LAB_COMMIT", ""))
    parser.add_argument("--work", type=Path, default=Path("/tmp/var_lab_fit_bench"))
    parser.add_argument("--out", type=Path, default=HERE / "out" / "fit_from_tokens.json")
    args = parser.parse_args()
    work = args.work.resolve()
    t0 = time.perf_counter()
    make_folder(work / "images", args.images, args.classes, args.resolution)
    print(f"random image folder: {time.perf_counter() - t0:.1f} s")
    tok_args = TINY if args.tiny_tokenizer else []
    tokenizer_path = work / "tokenizer.pth"
    if not tokenizer_path.exists():
        torch.manual_seed(0)
        if args.tiny_tokenizer:
            vqvae = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), patch_nums=(1, 2, 3, 4, 6, 8))
        else:
            vqvae = VQVAE()
        torch.save(vqvae.state_dict(), tokenizer_path)
    cli = [sys.executable, "-m", "var_lab.cli"]
    data = ["--data.name", "folder", "--data.root", str(work / "images"), "--data.resolution", str(args.resolution)]
    tokenize_s = None
    if not (work / "tokens").exists():
        t0 = time.perf_counter()
        subprocess.run(
            cli + ["tokenize", "--tokenizer-ckpt", str(tokenizer_path), "--out", str(work / "tokens"), *data,
                   *tok_args], check=True,
        )  # fmt: skip
        tokenize_s = time.perf_counter() - t0
    tag = f"d{args.depth}_b{args.batch}_{'compile-' + args.scope if args.compile else 'eager'}"
    run_dir = work / "runs" / tag
    epochs = max(1, -(-args.steps * args.batch // args.images))
    fit_argv = [
        "--output_dir", str(run_dir), "--resume", "never", "--tokenizer_ckpt", str(tokenizer_path), *tok_args,
        "--data.name", "tokens", "--data.token_dir", str(work / "tokens"), "--data.resolution", str(args.resolution),
        "--data.batch_size", str(args.batch), "--data.num_workers", str(args.num_workers),
        "--model.depth", str(args.depth), "--trainer.max_steps", str(args.steps), "--trainer.max_epochs",
        str(epochs), "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.compile", str(args.compile).lower(), "--tracking.experiment", "fit_e2e",
        "--tracking.run_name", tag, "--tracking.sample_grid_every_n_val", "0",
    ]  # fmt: skip
    command = "var-lab fit " + " ".join(fit_argv)

    import var_lab.train as train

    # The profiled window lies inside one epoch (an epoch's end validates and writes a checkpoint; with a small
    # image folder epochs are short, unlike ImageNet's): it starts 3 steps into the last epoch that holds it.
    per_epoch = max(1, args.images // args.batch)
    profile_steps = min(args.profile_steps, per_epoch - 5)
    profile_from = (args.steps - profile_steps - 1) // per_epoch * per_epoch + 3
    if profile_from + profile_steps >= args.steps:
        profile_from = max(3, args.steps - profile_steps - 2)
    probe = StepProbe(profile_from, profile_steps)
    make_trainer = train.make_trainer
    train.make_trainer = lambda cfg, out, logger, callbacks: make_trainer(cfg, out, logger, [*callbacks, probe])
    compile_log = _CompileLog()
    logging.getLogger("torch._dynamo").addHandler(compile_log)
    os.environ["VAR_LAB_COMPILE_SCOPE"] = args.scope
    t0 = time.perf_counter()
    rc = train.fit_main(fit_argv)
    fit_s = time.perf_counter() - t0
    if rc != 0:
        print(f"var-lab fit failed (exit {rc})")
        return rc
    from torch._dynamo.utils import counters

    done = json.loads((run_dir / "DONE").read_text())
    tracking_uri = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    hist = mlflow_history(tracking_uri, done["mlflow_run_id"], "perf/images_per_s")
    steady = [m.value for m in hist[len(hist) // 2 :]]
    mlflow_images_per_s = statistics.median(steady) if steady else None
    half = [t for s, t in probe.starts if s >= args.steps // 2]
    intervals = [b - a for a, b in zip(half, half[1:])]
    # median step: the steady state, data loading and logging included; all: epoch ends (val, checkpoint) too
    wall_images_per_s = args.batch / statistics.median(intervals) if intervals else None
    wall_all_images_per_s = args.batch * len(intervals) / (half[-1] - half[0]) if intervals else None
    window = probe.window
    gpu_busy = window["busy_s"] / (window["t1"] - window["t0"]) if "busy_s" in window else None
    bare = None
    if args.bare_json and args.bare_json.exists():
        variant = args.bare_variant or ("flex+compile" if args.compile else "flex")
        rows = [r for r in json.loads(args.bare_json.read_text()) if r.get("variant") == variant]
        rows = [r for r in rows if r.get("depth") == args.depth and r.get("batch") == args.batch]
        bare = rows[0]["images_per_s"] if rows else None
    result = {
        "benchmark": "fit_e2e",
        "depth": args.depth,
        "batch": args.batch,
        "compile": args.compile,
        "compile_scope": args.scope if args.compile else None,
        "steps": done["global_step"],
        "mlflow_images_per_s": mlflow_images_per_s,
        "wall_images_per_s": wall_images_per_s,
        "wall_all_images_per_s": wall_all_images_per_s,
        "steps_per_epoch": per_epoch,
        "bare_images_per_s": bare,
        "overhead_pct": 100 * (1 - mlflow_images_per_s / bare) if bare and mlflow_images_per_s else None,
        "wall_overhead_pct": 100 * (1 - wall_images_per_s / bare) if bare and wall_images_per_s else None,
        "gpu_busy_pct": 100 * gpu_busy if gpu_busy is not None else None,
        "profiled_steps": window.get("steps"),
        "fit_wall_s": fit_s,
        "tokenize_images_per_s": (args.images + max(args.images // 10, args.classes)) / tokenize_s
        if tokenize_s
        else None,
        "compiled_graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompile_limit_hits": len(compile_log.limit_hits),
        "recompile_limit_messages": compile_log.limit_hits[:3],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "final_train_loss": done["metrics"].get("train/loss"),
        "tracking": "mlflow sqlite",
        "device": device_name(),
        "torch": torch.__version__,
        "date": today(),
        "commit": args.commit,
        "command": command,
    }
    print_table(
        [result],
        ["depth", "batch", "compile_scope", "steps", "mlflow_images_per_s", "wall_images_per_s", "bare_images_per_s",
         "overhead_pct", "gpu_busy_pct", "compiled_graphs", "graph_breaks", "recompile_limit_hits", "fit_wall_s"],
    )  # fmt: skip
    write_json([result], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
