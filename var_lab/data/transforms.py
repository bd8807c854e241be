"""Image transforms of the release: resize the shorter side to 1.125 x resolution with Lanczos, then crop.

Every image leaves these transforms as a float32 tensor ``img_3HW`` in [-1, 1] (the tokenizer's input range).
The transforms are plain picklable classes (no lambdas), so DataLoader workers started with ``spawn`` work too.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

#: The release resizes the shorter side to this multiple of the final resolution before cropping.
RESIZE_RATIO = 1.125


def mid_resolution(resolution: int) -> int:
    """Side the shorter image edge is resized to before cropping: ``round(1.125 * resolution)``."""
    return round(RESIZE_RATIO * resolution)


def pil_to_pm1(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 tensor in [-1, 1].

    Args:
        img: RGB PIL image of size (W, H).

    Returns:
        img_3HW: float32, values ``2 * v / 255 - 1``.
    """
    array_HW3 = np.asarray(img, dtype=np.uint8)
    return uint8_to_pm1(torch.from_numpy(array_HW3.copy()).permute(2, 0, 1))


def uint8_to_pm1(img_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 tensor (any shape) -> float32 in [-1, 1]: ``v / 127.5 - 1`` (0 -> -1, 255 -> 1 exactly)."""
    return img_uint8.to(torch.float32).div_(127.5).sub_(1.0)


class ReleaseImageTransform:
    """The release's augmentation for one image.

    Train: resize the shorter side to ``round(1.125 * R)`` with Lanczos, random crop R x R, optional horizontal flip.
    Validation (``train=False``): the same resize, then a center crop (deterministic; ``var-lab tokenize`` uses it).

    Args:
        resolution: output side R in pixels.
        train: random crop (and flip) instead of the center crop.
        hflip: random horizontal flip with probability 0.5 (train only; off in the release).
    """

    def __init__(self, resolution: int, train: bool, hflip: bool = False):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.train = train
        self.hflip = hflip and train
        steps: list = [transforms.Resize(mid_resolution(resolution), interpolation=InterpolationMode.LANCZOS)]
        steps.append(transforms.RandomCrop(resolution) if train else transforms.CenterCrop(resolution))
        if self.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        self._pil_steps = transforms.Compose(steps)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Transform one RGB PIL image.

        Returns:
            img_3RR: float32 in [-1, 1].
        """
        return pil_to_pm1(self._pil_steps(img))

    def __repr__(self) -> str:
        return f"ReleaseImageTransform(resolution={self.resolution}, train={self.train}, hflip={self.hflip})"
