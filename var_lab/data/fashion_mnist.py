"""Fashion-MNIST, the embedded default dataset, read from Debian's package ``dataset-fashion-mnist``.

The package installs the four original IDX files (gzip) under ``/usr/share/datasets/fashion-mnist/``:
``train-images-idx3-ubyte.gz`` (60,000 x 28 x 28), ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``
(10,000) and ``t10k-labels-idx1-ubyte.gz``. They are parsed with numpy + gzip (no torchvision download code).

Each 28 x 28 grey image is padded by 2 px of background (0, black) on every side to 32 x 32 (so the tokenizer's
downsampling by 4 gives an 8 x 8 latent), repeated to 3 channels and mapped to [-1, 1]. Any other resolution resizes
the padded 32 x 32 image with Lanczos. The split ``val`` is the 10,000-image test set (``t10k``).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from var_lab.data.transforms import uint8_to_pm1

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: split name -> file prefix of the original release
_SPLIT_PREFIX = {"train": "train", "val": "t10k", "test": "t10k"}
#: pixels of background added on each side: 28 + 2 * 2 = 32
PAD = 2
BACKGROUND = 0
#: IDX type codes (third byte of the magic number) -> numpy dtype (big-endian)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FashionMNISTNotFoundError(FileNotFoundError):
    """The Fashion-MNIST files are missing; the message says how to install them."""


def missing_dataset_message(root: Path, missing: list[str]) -> str:
    """The error text for a missing Fashion-MNIST folder or file."""
    what = f"folder {root} does not exist" if not root.exists() else f"{root} lacks {', '.join(missing)}"
    return (
        f"Fashion-MNIST not found: {what}. Install Debian's package dataset-fashion-mnist "
        f"(`apt-get update && apt-get install dataset-fashion-mnist`, or `make data`), which puts the IDX files in "
        f"{DEFAULT_ROOT}; or pass data.root=<folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz>."
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) into a numpy array.

    The format: two zero bytes, a type byte (0x08 = uint8, ...), the number of dimensions, one big-endian uint32 per
    dimension, then the data in C order.

    Args:
        path: ``*.gz`` or an uncompressed IDX file.

    Returns:
        Array of the file's shape and dtype (native byte order).

    Raises:
        ValueError: naming the file when the header is not IDX or the data is truncated or too long.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise ValueError(f"{path}: cannot read IDX data ({err}); the file is corrupt or truncated") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise ValueError(
            f"{path}: IDX data has {len(raw) - header_size} bytes but the header {shape} needs {expected}; "
            "the file is corrupt or truncated"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


@functools.lru_cache(maxsize=4)
def _load_split_cached(images_path: str, labels_path: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    # `stamp` (size, mtime of both files) makes a replaced file miss the cache.
    images_NHW = read_idx(images_path)
    labels_N = read_idx(labels_path)
    if images_NHW.ndim != 3 or images_NHW.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images (N, H, W), got {images_NHW.dtype} {images_NHW.shape}")
    if labels_N.ndim != 1 or len(labels_N) != len(images_NHW):
        raise ValueError(
            f"{labels_path}: expected {len(images_NHW)} labels to match {images_path}, got shape {labels_N.shape}"
        )
    if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= len(CLASS_NAMES)):
        raise ValueError(f"{labels_path}: labels outside 0..{len(CLASS_NAMES) - 1}")
    padded_NHW = np.pad(images_NHW, ((0, 0), (PAD, PAD), (PAD, PAD)), constant_values=BACKGROUND)
    return padded_NHW, labels_N.astype(np.int64)


def load_fashion_mnist(root: Optional[str | os.PathLike], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split, padded to 32 x 32.

    Args:
        root: folder with the four IDX files; None means Debian's ``/usr/share/datasets/fashion-mnist``.
        split: ``train`` or ``val`` (the t10k test set; ``test`` is an alias).

    Returns:
        images_NHW: uint8 (N, 32, 32), background 0.
        labels_N: int64 (N,), class indices 0..9.

    Raises:
        FashionMNISTNotFoundError: when the folder or a file is missing (says how to install the package).
        ValueError: for an unknown split or a corrupt file.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split '{split}'; allowed: train, val (test is an alias of val)")
    root = Path(root) if root is not None else DEFAULT_ROOT
    prefix = _SPLIT_PREFIX[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p.name for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise FashionMNISTNotFoundError(missing_dataset_message(root, missing))
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (images_path, labels_path))
    return _load_split_cached(str(images_path), str(labels_path), stamp)


class FashionMNIST(Dataset):
    """Fashion-MNIST as 3-channel images in [-1, 1].

    Args:
        root: folder with the IDX files; None means Debian's ``/usr/share/datasets/fashion-mnist``.
        split: ``train`` or ``val``.
        resolution: output side; 32 keeps the padded images, any other side resizes them with Lanczos.
        hflip: random horizontal flip (use for training only).

    Items are ``(img_3RR float32 in [-1, 1], label int)``; the default collate turns labels into int64.
    """

    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES

    def __init__(
        self, root: Optional[str | os.PathLike] = None, split: str = "train", resolution: int = 32, hflip: bool = False
    ):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.root = Path(root) if root is not None else DEFAULT_ROOT
        self.split = split
        self.resolution = resolution
        self.hflip = hflip
        self.images_NHW, self.labels_N = load_fashion_mnist(self.root, split)

    def __len__(self) -> int:
        return len(self.labels_N)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image_HW = self.images_NHW[index]
        if self.resolution != image_HW.shape[0]:
            image = Image.fromarray(image_HW)  # 2-D uint8 -> mode "L"
            image_HW = np.asarray(image.resize((self.resolution, self.resolution), Image.Resampling.LANCZOS))
        img_1HW = uint8_to_pm1(torch.from_numpy(np.array(image_HW))).unsqueeze(0)
        if self.hflip and torch.rand(()) < 0.5:
            img_1HW = img_1HW.flip(-1)
        return img_1HW.expand(3, -1, -1).contiguous(), int(self.labels_N[index])

    def __repr__(self) -> str:
        return f"FashionMNIST(root={self.root}, split={self.split}, n={len(self)}, resolution={self.resolution})"
