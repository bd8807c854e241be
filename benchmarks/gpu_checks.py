"""GPU correctness of the attention kernels and bf16 (issue: core, GPU attention). Prints figures, asserts nothing.

1. FlexAttention (block mask) vs the dense-mask release kernel vs SDPA, float32, depth 16: relative logit error.
2. bf16 autocast + FlexAttention vs the float32 path at depth 16 (random, perturbed weights): relative logit error
   (the target is <= 1e-2).
3. The KV-cached sampler agrees with teacher forcing on its own tokens (greedy, float32).

Usage: python benchmarks/gpu_checks.py [--depth 16] [--batch 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, device_name, print_table, today, write_json  # noqa: E402

from var_lab.models import VAR, VQVAE  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "gpu_checks.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_checks.py needs a CUDA GPU")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    vqvae = VQVAE().cuda().eval().requires_grad_(False)
    # AdaLN gammas at 0.5 instead of 1e-3 so that every block changes the output (random weights otherwise make the
    # blocks nearly the identity and any comparison trivially passes).
    var = VAR(vqvae=vqvae, depth=args.depth, init_adaln_gamma=0.5).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    idx_list = [torch.randint(0, 4096, (args.batch, p * p), device="cuda", generator=g) for p in var.patch_nums]
    labels_B = torch.randint(0, 1000, (args.batch,), device="cuda", generator=g)
    x_BLCv = vqvae.idx_to_var_input(idx_list)
    out = {}
    with torch.no_grad():
        for impl in ("math", "sdpa", "flex"):
            var.attn_impl = impl
            var._mask_cache = {}
            out[f"fp32_{impl}"] = var(labels_B, x_BLCv)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out[f"bf16_{impl}"] = var(labels_B, x_BLCv)
    ref = out["fp32_math"]
    rows = [
        {"check": f"{key} vs fp32_math", "relative_error": rel(value, ref), "target": 1e-2 if "bf16" in key else 1e-5}
        for key, value in out.items()
        if key != "fp32_math"
    ]
    var.attn_impl = "flex"
    var._mask_cache = {}
    idx, _ = var.sample_tokens(labels_B, cfg=0.0, top_k=1, top_p=0.0, generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        logits = var(labels_B, vqvae.idx_to_var_input(idx))
    agree = (logits.argmax(-1) == torch.cat(idx, 1)).float().mean().item()
    rows.append({"check": "cached greedy sample == teacher-forcing argmax (fraction)", "relative_error": 1 - agree,
                 "target": 0.0})  # fmt: skip
    for row in rows:
        row.update(device=device_name(), date=today(), depth=args.depth, batch=args.batch)
    print_table(rows, ["check", "relative_error", "target"])
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
