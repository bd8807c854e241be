"""Training-step throughput of VAR at depths 16-30 from token ids (tokenizer out of the step), bf16 on one GPU.

Variants (each measured, so every optimisation has a before and after):
    sdpa         PyTorch SDPA with the dense block-causal mask: the release's configuration on the H100 baseline
    math         the release's own slow_attn arithmetic (scores materialised; runs out of memory at batch 64)
    flex         FlexAttention block mask (compiled kernel), blocks eager
    flex+compile FlexAttention and torch.compile of the whole forward as one graph
    flex+regional FlexAttention and the block's teacher-forcing path compiled once for all blocks (what
                 `var-lab fit --trainer.compile true` does)
    +ckpt        activation checkpointing of the blocks (memory for compute; for the largest depths)

Each step is what ``VARModule.training_step`` does with token files: teacher-forcing input from the token ids through
the frozen quantizer, forward, cross-entropy, backward, grad-norm clipping, fused AdamW. Reports images/s, model
TFLOP/s (docs/var_reference.md's formula), % of the measured bf16 matmul peak, peak memory and the ratio to the release.

Usage: python benchmarks/train_step.py [--depths 16 20 24 30] [--variants release flex+compile] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    HERE,
    RELEASE_TRAIN,
    device_name,
    matmul_peak_tflops,
    print_table,
    time_cuda,
    today,
    write_json,
)

from var_lab.models import VAR, VQVAE  # noqa: E402
from var_lab.models.var import loss_per_token  # noqa: E402

DEFAULT_BATCH = {d: b for d, (b, *_) in RELEASE_TRAIN.items()}


def build(depth: int, variant: str, device: torch.device) -> tuple[VQVAE, VAR, torch.optim.Optimizer]:
    torch.manual_seed(0)
    vqvae = VQVAE().to(device).eval().requires_grad_(False)
    impl = variant.split("+")[0]
    var = VAR(vqvae=vqvae, depth=depth, attn_impl=impl).to(device).train()
    if "compile" in variant:
        var.block_causal_mask(device)  # built eagerly, outside the traced graph
        var.compile(dynamic=False)  # the whole forward as one graph
    elif "regional" in variant:
        # what `var-lab fit --trainer.compile true` does: the repeated block compiled once, shared by all blocks
        for block in var.blocks:
            block.compile_teacher_forcing(dynamic=False)
    var.activation_checkpointing = "ckpt" in variant
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    return vqvae, var, opt


def make_step(vqvae: VQVAE, var: VAR, opt, batch: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    idx_list = [torch.randint(0, vqvae.vocab_size, (batch, p * p), device=device, generator=g) for p in var.patch_nums]
    labels_B = torch.randint(0, 1000, (batch,), device=device, generator=g)
    target_BL = torch.cat(idx_list, dim=1)

    def step():
        with torch.no_grad():
            x_BLCv = vqvae.idx_to_var_input(idx_list)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits_BLV = var(labels_B, x_BLCv)
        loss = loss_per_token(logits_BLV, target_BL).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run(depths, variants, batches, repeats: int, peak: float) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for depth in depths:
        batch = batches.get(depth, DEFAULT_BATCH.get(depth, 32))
        for variant in variants:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                vqvae, var, opt = build(depth, variant, device)
                step = make_step(vqvae, var, opt, batch, device)
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                first_step_s = time.perf_counter() - t0  # compilation included
                seconds = time_cuda(step, warmup=2, repeats=repeats)
            except torch.OutOfMemoryError:
                print(f"depth {depth} batch {batch} {variant}: out of memory")
                rows.append({"benchmark": "train_step", "depth": depth, "batch": batch, "variant": variant,
                             "error": "out of memory"})  # fmt: skip
                continue
            images_per_s = batch / seconds
            tflops = var.estimate_flops() * images_per_s / 1e12
            release = RELEASE_TRAIN.get(depth)
            ratio = images_per_s / release[2] if release and release[0] == batch else None
            stats = torch.cuda.memory_stats()
            rows.append(
                {
                    "benchmark": "train_step",
                    "alloc_retries": stats.get("num_alloc_retries", 0),
                    "depth": depth,
                    "batch": batch,
                    "variant": variant,
                    "step_s": seconds,
                    "first_step_s": first_step_s,
                    "images_per_s": images_per_s,
                    "tflops": tflops,
                    "pct_matmul_peak": 100 * tflops / peak,
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "release_images_per_s": release[2] if release else None,
                    "release_peak_gib": release[3] if release else None,
                    "ratio_vs_release": ratio,
                    "device": device_name(),
                    "date": today(),
                }
            )
            print_table(rows[-1:], ["depth", "batch", "variant", "step_s", "images_per_s", "tflops"])
            del vqvae, var, opt, step
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[16, 20, 24, 30])
    parser.add_argument("--variants", nargs="+", default=["sdpa", "flex", "flex+compile"])
    parser.add_argument("--batch", type=int, nargs="*", default=None, help="batch per depth (default: the release's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "train_step.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("train_step.py needs a CUDA GPU (the release baselines are H100 figures)")
        return 1
    batches = dict(zip(args.depths, args.batch)) if args.batch else {}
    peak = matmul_peak_tflops()
    print(f"device: {device_name()}  measured bf16 matmul peak: {peak:.0f} TFLOP/s")
    rows = run(args.depths, args.variants, batches, args.repeats, peak)
    for row in rows:
        row["matmul_peak_tflops"] = peak
    cols = ["depth", "batch", "variant", "step_s", "images_per_s", "tflops", "pct_matmul_peak", "peak_mem_gib",
            "release_images_per_s", "ratio_vs_release"]  # fmt: skip
    print_table(rows, cols)
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
