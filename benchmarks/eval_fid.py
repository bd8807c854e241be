"""Time ``var-lab eval``'s pipeline: sample N class-balanced images with VAR-d{depth} and score them (FID/KID/P/R/IS).

Runs exactly the code of ``var-lab eval`` (``var_lab.evaluate.evaluate_var``): per-batch seeded sampling with cfg 1.5,
top-k 900, top-p 0.96 and the KV cache (bf16 on a GPU), Inception features of every batch right after sampling (fp32,
TF32 off), then the metrics through torch-fidelity against a reference batch (like ADM's 10,000 images). The target:
50,000 images at depth 16 in under 10 minutes on one H100.

Weights are random (timings only; the metric values are meaningless): the VAR and its tokenizer (the release's
architecture) are freshly initialised, and ``--weights random`` builds a randomly initialised Inception of
torch-fidelity's exact architecture (same cost per image as the real one) where the FID weights are not installed.
The reference images are random too, and their feature extraction is timed separately.

A randomly initialised Inception gives degenerate (near-constant) features, so the metric step is then faster than
with real weights. The real weights (95 MB) exceed what can be carried to some machines: ``--write-half-weights FILE``
writes an fp16 copy (48 MB) of the installed weights, which ``--weights FILE`` loads (into fp32) for realistic timings.

Usage:
    python benchmarks/eval_fid.py                                   # GPU: d16, 50,000 images, release tokenizer
    python benchmarks/eval_fid.py --num-samples 2000 --batch-size 64 256   # throughput per sampling batch size
    python benchmarks/eval_fid.py --tiny --depth 2 --num-samples 20 --reference-images 20 --batch-size 10   # CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, device_name, print_table, today, write_json  # noqa: E402

from var_lab.evaluate import SamplingConfig, evaluate_var  # noqa: E402
from var_lab.metrics.fid import ImageSource, InceptionFeatures, MetricOptions, reference_statistics  # noqa: E402

TINY_TOKENIZER = dict(
    vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4, 6, 8)
)


class RandomImages(ImageSource):
    """``count`` random uint8 images (a stand-in reference batch), generated batch by batch."""

    slug = "random"

    def __init__(self, count: int, resolution: int, seed: int = 0):
        self.count, self.resolution, self.seed = count, resolution, seed
        self.description = f"random:{count}x{resolution}"

    def __len__(self) -> int:
        return self.count

    def identity(self) -> dict:
        return {"kind": "random", "count": self.count, "resolution": self.resolution, "seed": self.seed}

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.count, batch_size):
            n = min(batch_size, self.count - start)
            yield torch.randint(
                0, 256, (n, 3, self.resolution, self.resolution), generator=generator, dtype=torch.uint8
            )


def random_inception_weights(path: Path) -> Path:
    """A randomly initialised torch-fidelity Inception state dict (with a finite classifier, so IS is timed too)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # The constructor insists on loading weights: hand it nothing and keep its random initialisation.
    saved = torch.load, fe.FeatureExtractorInceptionV3.load_state_dict
    torch.load = lambda *args, **kwargs: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state, *args, **kwargs: None
    try:
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    finally:
        torch.load, fe.FeatureExtractorInceptionV3.load_state_dict = saved
    torch.save(model.state_dict(), path)
    return path


def build_var(args, device: torch.device):
    from var_lab.models import VAR, VQVAE

    torch.manual_seed(0)
    vqvae = VQVAE(**TINY_TOKENIZER) if args.tiny else VQVAE()
    var = VAR(vqvae=vqvae, num_classes=args.num_classes, depth=args.depth, init_adaln_gamma=0.5)
    vqvae.to(device).eval().requires_grad_(False)
    return var.to(device).eval().requires_grad_(False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256], help="sampling batch per run")
    parser.add_argument("--feature-batch-size", type=int, default=500)
    parser.add_argument("--reference-images", type=int, default=10_000, help="size of the random reference batch")
    parser.add_argument("--metrics", default="fid,kid,prc,is")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--weights", default="random", help="'random' (timing only) or a weights file")
    parser.add_argument("--write-half-weights", type=Path, help="write an fp16 copy of the installed weights; exit")
    parser.add_argument("--tiny", action="store_true", help="a tiny tokenizer (8x8 latent, 32px) for CPU checks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "eval_fid.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write_half_weights:
        from var_lab.metrics.fid_weights import resolve_weights_path

        state = torch.load(resolve_weights_path(), map_location="cpu", weights_only=True)
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        torch.save(half, args.write_half_weights)
        print(f"wrote {args.write_half_weights} (fp16 copy of {resolve_weights_path()}; timing use only)")
        return 0
    device = torch.device(args.device)
    metrics = tuple(m for m in args.metrics.split(",") if m)

    workdir = Path(tempfile.mkdtemp(prefix="eval_fid_"))
    t0 = time.perf_counter()
    weights = random_inception_weights(workdir / "inception.pth") if args.weights == "random" else args.weights
    if args.weights == "random":
        print("note: random Inception weights give degenerate features; the metric step is faster than with real ones")
    extractor = InceptionFeatures(
        weights, device=device, batch_size=args.feature_batch_size, with_logits="is" in metrics
    )
    var = build_var(args, device)
    build_s = time.perf_counter() - t0
    resolution = var.vqvae.resolution
    params = var.num_scaling_params()["total"]
    print(f"device {device_name() if device.type == 'cuda' else 'cpu'}; VAR-d{args.depth} ({params / 1e6:.1f}M params, "
          f"random weights), {resolution}px, {args.num_samples} images, metrics {','.join(metrics)}")  # fmt: skip

    t0 = time.perf_counter()
    reference = reference_statistics(RandomImages(args.reference_images, resolution), extractor, use_cache=False)
    reference_s = time.perf_counter() - t0

    rows = []
    for batch_size in args.batch_size:
        sampling = SamplingConfig(num_samples=args.num_samples, num_classes=args.num_classes, batch_size=batch_size)
        # Warm-up: kernels, cuDNN autotuning and allocator growth stay out of the timed run.
        warm = SamplingConfig(num_samples=batch_size, num_classes=args.num_classes, batch_size=batch_size)
        evaluate_var(var, warm, reference, extractor=extractor, metrics=("fid",), device=device, progress=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = evaluate_var(
            var,
            sampling,
            reference,
            extractor=extractor,
            metrics=metrics,
            device=device,
            precision=args.precision,
            options=MetricOptions(kid_subset_size=min(1000, args.num_samples, args.reference_images)),
        )
        s = result.seconds
        other = s["generate_total"] - s["sampling"] - s["features"]
        rows.append(
            {
                "device": device_name() if device.type == "cuda" else "cpu",
                "depth": args.depth,
                "resolution": resolution,
                "images": args.num_samples,
                "batch": batch_size,
                "precision": args.precision,
                "sampling_s": s["sampling"],
                "sampling_img_per_s": args.num_samples / s["sampling"],
                "inception_s": s["features"],
                "inception_img_per_s": args.num_samples / s["features"],
                "other_s": other,
                "metrics_s": s["metrics"],
                "total_s": s["total"],
                "total_min": s["total"] / 60,
                "reference_images": args.reference_images,
                "reference_s": reference_s,
                "build_s": build_s,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                "metrics": result.metrics,
                "date": today(),
                "torch": torch.__version__,
            }
        )
    print()
    print_table(
        rows,
        ["device", "depth", "images", "batch", "sampling_s", "sampling_img_per_s", "inception_s",
         "inception_img_per_s", "other_s", "metrics_s", "total_s", "total_min", "peak_gib"],
    )  # fmt: skip
    print(f"\nreference: {args.reference_images} images in {reference_s:.1f} s (done once; cached by var-lab eval)")
    print("total_s = sampling + Inception features + PNG-free bookkeeping + metrics (FID, KID, precision/recall, IS)")
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
