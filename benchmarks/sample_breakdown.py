"""Where a sampled image's time goes on the GPU: VAR token sampling, the VQVAE decoder, the Inception features.

VAR-d{depth} and the release's tokenizer with random weights (AdaLN gammas 0.5 so the blocks do work), cfg 1.5,
top-k 900, top-p 0.96, bf16 autocast, as ``var-lab eval`` samples. Per sampling batch size: seconds per image of
``sample_tokens``, of ``fhat_to_img`` in NCHW and in channels_last (what ``var-lab eval`` now uses on CUDA), and of
the FID features (fp32, TF32 off: torch-fidelity's numerics; the installed weights, else random ones), with the
model FLOPs per image of each part and the rate reached.

Usage: python benchmarks/sample_breakdown.py [--depth 16] [--batch-size 64 256 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, device_name, print_table, today, write_json  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "sample_breakdown.json")
    args = parser.parse_args()
    from torch.utils.flop_counter import FlopCounterMode

    from var_lab.metrics.fid import InceptionFeatures, to_uint8
    from var_lab.metrics.fid_weights import default_weights_path
    from var_lab.models import VAR, VQVAE

    sys.path.insert(0, str(HERE))
    from eval_fid import random_inception_weights

    device = torch.device("cuda")
    torch.manual_seed(0)
    vqvae = VQVAE().to(device).eval().requires_grad_(False)
    var = VAR(vqvae=vqvae, depth=args.depth, init_adaln_gamma=0.5).to(device).eval().requires_grad_(False)
    weights = default_weights_path()
    real = weights.is_file()
    if not real:
        weights = random_inception_weights(Path("/tmp/random_inception.pth"))
    extractor = InceptionFeatures(weights, device=device, batch_size=500)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vqvae.fhat_to_img(torch.randn(1, vqvae.Cvae, 16, 16, device=device))
    decode_flops = fc.get_total_flops()
    rows = []
    for batch in args.batch_size:
        labels = torch.arange(batch, device=device) % 1000
        gen = torch.Generator(device=device)

        def tokens(labels=labels, gen=gen):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return var.sample_tokens(labels, cfg=1.5, top_k=900, top_p=0.96, generator=gen.manual_seed(0))

        try:
            t_tokens, (_, f_hat) = timed(tokens, args.repeats)

            def decode(f_hat=f_hat):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return vqvae.fhat_to_img(f_hat)

            vqvae.post_quant_conv.to(memory_format=torch.contiguous_format)
            vqvae.decoder.to(memory_format=torch.contiguous_format)
            t_dec_nchw, img = timed(decode, args.repeats)
            vqvae.post_quant_conv.to(memory_format=torch.channels_last)
            vqvae.decoder.to(memory_format=torch.channels_last)
            t_dec_nhwc, img_cl = timed(decode, args.repeats)
            diff = (img.float() - img_cl.float()).abs().max().item()
            u8 = to_uint8(img.float().add(1).mul(0.5)).contiguous()
            t_feat, _ = timed(lambda u8=u8: extractor(u8), args.repeats)
        except torch.OutOfMemoryError:
            rows.append({"batch": batch, "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        token_flops = 2 * 2 * sum(p.numel() for p in var.blocks.parameters()) * var.L  # cfg: 2 sequences
        row = {
            "device": device_name(),
            "depth": args.depth,
            "batch": batch,
            "tokens_ms_per_img": 1e3 * t_tokens / batch,
            "decode_nchw_ms_per_img": 1e3 * t_dec_nchw / batch,
            "decode_nhwc_ms_per_img": 1e3 * t_dec_nhwc / batch,
            "features_ms_per_img": 1e3 * t_feat / batch,
            "img_per_s_nhwc": batch / (t_tokens + t_dec_nhwc),
            "img_per_s_nchw": batch / (t_tokens + t_dec_nchw),
            "tokens_tflops": token_flops * batch / t_tokens / 1e12,
            "decode_nchw_tflops": decode_flops * batch / t_dec_nchw / 1e12,
            "decode_nhwc_tflops": decode_flops * batch / t_dec_nhwc / 1e12,
            "nhwc_vs_nchw_max_abs_diff": diff,
            "projected_50k_s": 50_000 * (t_tokens + t_dec_nhwc + t_feat) / batch,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "inception_weights": "installed" if real else "random",
            "date": today(),
        }
        rows.append(row)
        print_table([row], ["batch", "tokens_ms_per_img", "decode_nchw_ms_per_img", "decode_nhwc_ms_per_img",
                            "features_ms_per_img", "projected_50k_s"])  # fmt: skip
        torch.cuda.reset_peak_memory_stats()
    print()
    print_table(
        rows,
        ["batch", "tokens_ms_per_img", "decode_nchw_ms_per_img", "decode_nhwc_ms_per_img", "features_ms_per_img",
         "img_per_s_nhwc", "tokens_tflops", "decode_nchw_tflops", "decode_nhwc_tflops", "nhwc_vs_nchw_max_abs_diff",
         "projected_50k_s", "peak_gib"],
    )  # fmt: skip
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
