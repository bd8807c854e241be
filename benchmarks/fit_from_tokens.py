"""End-to-end training throughput through the real commands: ``var-lab tokenize`` then ``var-lab fit``.

Makes an ImageFolder of random images and a random tokenizer of the release's architecture (timings only), encodes
it once into token shards, then trains VAR-d{depth} from the shards for ``--steps`` steps with ``var-lab fit`` (bf16 on
a GPU) and reports the steady-state images/s that the run logged (``perf/images_per_s``, median of the last half of
the steps), with the release's 191 images/s (d16, batch 64, H100) as the reference.

Usage: python benchmarks/fit_from_tokens.py [--depth 16] [--batch 64] [--steps 300] [--work DIR]
       (tiny CPU check: --depth 2 --batch 8 --steps 10 --resolution 32 --images 64 --tiny-tokenizer)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, RELEASE_TRAIN, device_name, print_table, today, write_json  # noqa: E402

from var_lab.models import VQVAE  # noqa: E402

TINY = ["--tokenizer.vocab_size", "64", "--tokenizer.z_channels", "8", "--tokenizer.ch", "32",
        "--tokenizer.ch_mult", "[1,2,2]", "--tokenizer.patch_nums", "[1,2,3,4,6,8]"]  # fmt: skip


def make_folder(root: Path, images: int, classes: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(images // 10, classes))):
        for i in range(count):
            folder = root / split / f"class{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:06d}.png"
            if not path.exists():
                pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=3200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--tiny-tokenizer", action="store_true", help="a 32px toy tokenizer (CPU check)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs: >1 launches DDP through torchrun (NCCL)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/var_lab_fit_bench"))
    parser.add_argument("--out", type=Path, default=HERE / "out" / "fit_from_tokens.json")
    args = parser.parse_args()
    work = args.work
    make_folder(work / "images", args.images, args.classes, args.resolution)
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
    subprocess.run(
        cli + ["tokenize", "--tokenizer-ckpt", str(tokenizer_path), "--out", str(work / "tokens"), *data, *tok_args],
        check=True,
    )
    run_dir = work / f"run_d{args.depth}_x{args.nproc}"
    epochs = max(1, -(-args.steps * args.batch // args.images))
    fit = cli + [
        "fit", "--output_dir", str(run_dir), "--resume", "never", "--tokenizer_ckpt", str(tokenizer_path), *tok_args,
        "--data.name", "tokens", "--data.token_dir", str(work / "tokens"), "--data.resolution", str(args.resolution),
        "--data.batch_size", str(args.batch), "--data.num_workers", "4", "--model.depth", str(args.depth),
        "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", str(epochs), "--trainer.log_every_n_steps",
        "1", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", "--trainer.compile",
        str(args.compile).lower(), "--tracking.tracking_uri", "none", "--tracking.sample_grid_every_n_val", "0",
    ]  # fmt: skip
    if args.nproc > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
        fit = torchrun + ["-m", "var_lab.cli"] + fit[3:]
        fit += ["--trainer.devices", str(args.nproc), "--trainer.strategy", "ddp"]
    env = dict(os.environ, VAR_LAB_WRITE_RANK_HASH="1")
    subprocess.run(fit, check=True, env=env)
    hashes = sorted({p.read_text().strip() for p in run_dir.glob("weights_rank*.sha256")})
    metrics_files = sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    with metrics_files[-1].open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/images_per_s")]
    speeds = [float(r["perf/images_per_s"]) for r in rows]
    steady = speeds[len(speeds) // 2 :]
    images_per_s = statistics.median(steady)
    done = json.loads((run_dir / "DONE").read_text())
    release = RELEASE_TRAIN.get(args.depth)
    result = {
        "benchmark": "fit_from_tokens",
        "depth": args.depth,
        "batch": args.batch,
        "steps": done["global_step"],
        "images_per_s": images_per_s,
        "release_images_per_s": release[2] if release else None,
        "ratio_vs_release": images_per_s / release[2] if release and release[0] == args.batch else None,
        "compile": args.compile,
        "gpus": args.nproc,
        "identical_weights_on_all_ranks": len(hashes) == 1,
        "final_train_loss": done["metrics"].get("train/loss"),
        "device": device_name(),
        "date": today(),
    }
    print_table([result], list(result))
    write_json([result], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
