"""Class-conditional sampling throughput with classifier-free guidance and the KV cache (batch 64), depths 16-30.

Variants:
    fp32          the plain path: float32, eager (the reference for identical images)
    bf16          bf16 autocast, preallocated (static) KV cache
    bf16+compile  bf16 and torch.compile of every block (one graph per scale size)

The decode to pixels (256px) is included, as in the release's timing. Images of each variant are compared with the
plain path for the same seed: identical token maps are counted; bf16 changes logits slightly, so the fraction of
identical tokens and the mean absolute pixel difference are reported instead of asserted.

Usage: python benchmarks/sampling.py [--depths 16 20 24 30] [--batch 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, RELEASE_SAMPLING, device_name, print_table, time_cuda, today, write_json  # noqa: E402

from var_lab.models import VAR, VQVAE  # noqa: E402


def sample_fn(var: VAR, labels_B: torch.Tensor, variant: str, seed: int):
    def run():
        generator = torch.Generator(device="cuda").manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=variant != "fp32"):
            idx_list, f_hat = var.sample_tokens(labels_B, cfg=1.5, top_k=900, top_p=0.96, generator=generator)
            img = var.vqvae.fhat_to_img(f_hat)
        return idx_list, img

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 20, 24, 30])
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "bf16+compile"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "sampling.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sampling.py needs a CUDA GPU (the release baselines are H100 figures)")
        return 1
    rows = []
    for depth in args.depths:
        torch.manual_seed(0)
        vqvae = VQVAE().cuda().eval().requires_grad_(False)
        var = VAR(vqvae=vqvae, depth=depth, init_adaln_gamma=0.5).cuda().eval()
        labels_B = torch.arange(args.batch, device="cuda") % 1000
        reference = None
        for variant in args.variants:
            if "compile" in variant:
                for block in var.blocks:
                    block.compile(dynamic=False)
            fn = sample_fn(var, labels_B, variant, seed=1)
            torch.cuda.reset_peak_memory_stats()
            seconds = time_cuda(fn, warmup=2, repeats=args.repeats)
            idx_list, img = fn()
            tokens = torch.cat(idx_list, dim=1)
            if reference is None:
                reference = (tokens, img.float())
            same_tokens = (tokens == reference[0]).float().mean().item()
            pixel_diff = (img.float() - reference[1]).abs().mean().item()
            release = RELEASE_SAMPLING.get(depth)
            images_per_s = args.batch / seconds
            rows.append(
                {
                    "benchmark": "sampling",
                    "depth": depth,
                    "batch": args.batch,
                    "variant": variant,
                    "seconds": seconds,
                    "images_per_s": images_per_s,
                    "identical_tokens_vs_fp32": same_tokens,
                    "mean_abs_pixel_diff_vs_fp32": pixel_diff,
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "release_images_per_s": release[1] if release else None,
                    "ratio_vs_release": images_per_s / release[1] if release and args.batch == 64 else None,
                    "device": device_name(),
                    "date": today(),
                }
            )
            print_table(rows[-1:], ["depth", "variant", "seconds", "images_per_s", "identical_tokens_vs_fp32"])
        del var, vqvae
        torch.cuda.empty_cache()
    cols = ["depth", "batch", "variant", "seconds", "images_per_s", "ratio_vs_release", "identical_tokens_vs_fp32",
            "mean_abs_pixel_diff_vs_fp32", "peak_mem_gib"]  # fmt: skip
    print_table(rows, cols)
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
