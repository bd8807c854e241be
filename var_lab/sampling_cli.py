"""``var-lab sample``: a checkpoint (ours or the released one) -> a PNG grid and a folder of PNGs."""

from __future__ import annotations

from pathlib import Path

import torch

from var_lab.inputs import ArgumentParser, check_output_dir, positive_int
from var_lab.models.checkpoints import WEIGHT_CHOICES, load_var_model


def sample_main(argv: list[str]) -> int:
    """Sample ``--per-class`` images of each class in ``--classes`` and save a grid and the single images."""
    parser = ArgumentParser(prog="var-lab sample", description=__doc__)
    parser.add_argument("--checkpoint", help="a var-lab fit checkpoint (.ckpt)")
    parser.add_argument("--release-var", help="a released var_d{16,20,24,30}.pth")
    parser.add_argument("--release-tokenizer", help="the released vae_ch160v4096z32.pth")
    parser.add_argument("--depth", type=int, default=None, help="expected depth of --release-var")
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="class labels (default: the first 8)")
    parser.add_argument("--per-class", type=positive_int, default=4, help="images per class")
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance ratio")
    parser.add_argument("--top-k", type=int, default=900, help="top-k sampling (0: off)")
    parser.add_argument("--top-p", type=float, default=0.96, help="top-p sampling (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--out", default="samples", help="output folder (grid.png and images/)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model-weights", default="ema", choices=WEIGHT_CHOICES,
        help="a checkpoint of a run with optim.ema_decay: its moving average (ema) or its trained weights (raw)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from torchvision.utils import save_image
    from tqdm import tqdm

    check_output_dir(args.out, "--out")  # before minutes of sampling
    # a BadInputError is reported by var_lab.cli
    vqvae, var, _ = load_var_model(
        args.checkpoint, args.release_var, args.release_tokenizer, args.depth, weights=args.model_weights
    )
    device = torch.device(args.device)
    vqvae.to(device)
    var.to(device)
    classes = args.classes if args.classes else list(range(min(8, var.num_classes)))
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(args.per_class)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for start in tqdm(range(0, len(labels), args.batch_size), desc="sampling", unit="batch"):
        batch = labels[start : start + args.batch_size].to(device)
        with autocast:
            img = var.sample(batch, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, generator=generator)
        images.append(img.float().cpu())
    img_N3HW = torch.cat(images)
    for i, (img, label) in enumerate(zip(img_N3HW, labels.tolist())):
        save_image(img, out / "images" / f"{i:06d}_class{label:04d}.png")
    save_image(img_N3HW, out / "grid.png", nrow=args.per_class)
    print(f"wrote {len(img_N3HW)} images to {out / 'images'} and the grid to {out / 'grid.png'}")
    return 0
