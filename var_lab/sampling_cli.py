"""``var-lab sample``: a checkpoint (ours or the released one) -> a PNG grid and a folder of PNGs.

With ``--image I --mask M`` it edits instead (zero-shot in-painting, out-painting, class-conditional editing): the
image's tokens outside the mask are teacher-forced at every scale and the masked region is sampled for each class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from var_lab.inputs import ArgumentParser, BadInputError, check_output_dir, positive_int
from var_lab.models.checkpoints import WEIGHT_CHOICES, load_var_model


def sample_main(argv: list[str]) -> int:
    """Sample ``--per-class`` images of each class in ``--classes`` and save a grid and the single images."""
    parser = ArgumentParser(prog="var-lab sample", description=__doc__)
    parser.add_argument("--checkpoint", help="a var-lab fit checkpoint (.ckpt)")
    parser.add_argument("--release-var", help="a released var_d{16,20,24,30}.pth")
    parser.add_argument("--release-tokenizer", help="the released vae_ch160v4096z32.pth")
    parser.add_argument("--depth", type=int, default=None, help="expected depth of --release-var")
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="class labels (default: the first 8)")
    parser.add_argument("--image", help="edit this image (PNG/JPEG, resized to the tokenizer's resolution)")
    parser.add_argument(
        "--mask", help=f"with --image: what to generate, a mask image (white = generate, black = keep) or one of "
        f"{', '.join(MASK_PRESETS)} (centre hole, out-paint the border, or a half)",
    )  # fmt: skip
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

    if (args.image is None) != (args.mask is None):
        raise BadInputError("--image and --mask go together: give both to edit an image, or neither to sample")
    if args.image is not None:
        for flag, path in (("--image", args.image), *([] if args.mask in MASK_PRESETS else [("--mask", args.mask)])):
            if not Path(path).is_file():
                raise BadInputError(f"{flag} {path}: no such file; give a PNG or JPEG image")
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
    edit = None
    if args.image is not None:  # read both before anything is written
        edit = read_image(args.image, vqvae.resolution, "--image"), generate_mask(args.mask, vqvae.resolution)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if edit is not None:
        return _edit(args, var, labels, device, generator, out, *edit)
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


MASK_PRESETS = ("center", "border", "left", "right", "top", "bottom")


def read_image(path: str, resolution: int, flag: str, mode: str = "RGB") -> torch.Tensor:
    """An image file -> (1, C, resolution, resolution) in [0, 1] (bicubic resize; nearest for masks)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            resample = Image.NEAREST if mode == "L" else Image.BICUBIC
            image = image.resize((resolution, resolution), resample)
            return pil_to_tensor(image).float().div(255).unsqueeze(0)
    except (UnidentifiedImageError, OSError) as err:
        raise BadInputError(f"{flag} {path}: not a readable image ({err}); give a PNG or JPEG file") from None


def generate_mask(spec: str, resolution: int) -> torch.Tensor:
    """A ``--mask`` preset or file -> (1, 1, R, R): 1 where the image is generated."""
    r, q = resolution, resolution // 4
    mask = torch.zeros(1, 1, r, r)
    if spec == "center":
        mask[..., q : r - q, q : r - q] = 1
    elif spec == "border":
        mask[:] = 1
        mask[..., q : r - q, q : r - q] = 0
    elif spec in ("left", "right"):
        mask[..., : r // 2] = 1 if spec == "left" else 0
        mask[..., r // 2 :] = 1 if spec == "right" else 0
    elif spec in ("top", "bottom"):
        mask[..., : r // 2, :] = 1 if spec == "top" else 0
        mask[..., r // 2 :, :] = 1 if spec == "bottom" else 0
    else:
        mask = (read_image(spec, resolution, "--mask", mode="L") > 0.5).float()
    if not mask.any():
        raise BadInputError(f"--mask {spec}: nothing to generate (no white pixel); white marks what to generate")
    return mask


def _edit(args, var, labels, device, generator, out: Path, img_13HW: torch.Tensor, generate_11HW: torch.Tensor) -> int:
    """``--image`` / ``--mask``: one grid row per class: the image, the masked image, then the edits."""
    from torchvision.utils import save_image

    keep_11HW = 1 - generate_11HW
    results = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for start in range(0, len(labels), args.batch_size):
        batch = labels[start : start + args.batch_size].to(device)
        n = len(batch)
        with autocast:
            edited = var.edit(
                img_13HW.expand(n, -1, -1, -1).to(device), keep_11HW.expand(n, -1, -1, -1).to(device), batch,
                cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, generator=generator,
            )  # fmt: skip
        results.append(edited.float().cpu())
    edits_N3HW = torch.cat(results)
    for i, (img, label) in enumerate(zip(edits_N3HW, labels.tolist())):
        save_image(img, out / "images" / f"{i:06d}_class{label:04d}_edit.png")
    masked_13HW = img_13HW * keep_11HW + 0.5 * generate_11HW  # the region to generate shown grey
    rows = [
        torch.cat([img_13HW, masked_13HW, edits_N3HW[i : i + args.per_class]])
        for i in range(0, len(edits_N3HW), args.per_class)
    ]
    save_image(torch.cat(rows), out / "grid.png", nrow=args.per_class + 2)
    print(
        f"wrote {len(edits_N3HW)} edits of {args.image} (mask {args.mask}) to {out / 'images'} and the grid "
        f"(image, masked image, {args.per_class} edits per class) to {out / 'grid.png'}"
    )
    return 0
