"""FID, KID, precision/recall and Inception Score through torch-fidelity, with offline weights and cached references.

The numbers are torch-fidelity's own: features come from its ``FeatureExtractorInceptionV3`` (the TensorFlow FID
Inception, loaded from the local weights file that ``var-lab fid-weights`` installs; nothing is downloaded) and the
metrics from its ``fid_statistics_to_metric``, ``kid_features_to_metric``, ``prc_features_to_metric`` and
``isc_features_to_metric``. What var-lab adds:

* feature extraction batched on the GPU when there is one (TF32 off, so GPU features match CPU ones closely), with a
  progress bar, from in-memory batches, so generated images never have to be written to disk;
* reference statistics (mean, covariance and the features for KID / precision / recall) computed once from an image
  folder, the training data or an ADM-style ``.npz`` reference batch, and cached in a file whose name and content
  carry a key over the dataset identity, resolution, extractor weights (sha256) and image count, so a different
  dataset, resolution or extractor never reuses a stale file;
* the ADM reference batch reader (``arr_0`` uint8 NHWC, streamed from the zip without loading it whole; optional
  ``mu`` / ``sigma`` over the full training set, which then define the FID reference as in the ADM evaluator).

Conventions: images enter as ``img_B3HW`` uint8 in [0, 255] (what PNG files hold); generated images in [0, 1] are
converted with :func:`to_uint8` exactly as ``torchvision.utils.save_image`` does, so in-memory features equal the
features of the saved PNGs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from var_lab.metrics.fid_weights import WeightsInfo, build_feature_extractor, require_classifier, weights_info

#: torch-fidelity feature names: 2048-d pool features (FID, KID, precision/recall) and classifier logits (IS).
POOL_FEATURES = "2048"
LOGITS_FEATURES = "logits_unbiased"
#: Bump when the cache layout or the preprocessing changes, so old cache files are never reused.
CACHE_VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def default_cache_dir() -> Path:
    """``$VAR_LAB_CACHE/fid_reference`` (default ``~/.cache/var-lab/fid_reference``)."""
    root = os.environ.get("VAR_LAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "var-lab")
    return Path(root) / "fid_reference"


def to_uint8(img_B3HW: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8, rounding like ``torchvision.utils.save_image`` (``x * 255 + 0.5``, clamped).

    Args:
        img_B3HW: float tensor in [0, 1] (values outside are clamped).

    Returns:
        uint8 tensor of the same shape, on the same device.
    """
    return img_B3HW.float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def pm1_to_uint8(img_B3HW: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (the data pipeline's range, ``v / 127.5 - 1``) -> the original uint8 values."""
    return img_B3HW.float().add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


@contextlib.contextmanager
def _no_tf32():
    # TF32 convolutions would perturb the features by ~1e-3 relative; FID is computed in full fp32 precision.
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionFeatures:
    """torch-fidelity's FID Inception-v3 with local weights, on the GPU when there is one.

    Args:
        weights_path: the weights file; None means ``$TORCH_HOME/hub/checkpoints/weights-inception-...pth``.
        device: where to run; None picks ``cuda`` (the current device) when available, else the CPU.
        batch_size: images per forward pass.
        with_logits: also extract the classifier logits for Inception Score.

    Raises:
        MissingInceptionWeightsError: the weights are not installed (the message names the command).
        InceptionScoreUnavailableError: ``with_logits`` with weights that have no classifier.
    """

    def __init__(
        self,
        weights_path: Optional[str | os.PathLike] = None,
        device: Optional[str | torch.device] = None,
        batch_size: int = 200,
        with_logits: bool = False,
    ):
        self.info: WeightsInfo = weights_info(weights_path)
        if with_logits:
            require_classifier(self.info)
        self.names = (POOL_FEATURES, LOGITS_FEATURES) if with_logits else (POOL_FEATURES,)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        # The network is randomly initialised before its weights load: keep that off the caller's RNG stream (a
        # callback building it mid-training must not change the run's dropout or label drops).
        with torch.random.fork_rng(devices=[]):
            self.model = build_feature_extractor(Path(self.info.path), self.names).to(self.device)

    @property
    def identity(self) -> dict:
        """What determines the features: extractor, weights and torch-fidelity version (part of cache keys)."""
        import torch_fidelity

        return {
            "extractor": "inception-v3-compat",
            "weights_sha256": self.info.sha256,
            "torch_fidelity": torch_fidelity.__version__,
        }

    @torch.no_grad()
    def __call__(self, img_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of one batch.

        Args:
            img_B3HW: uint8 images, any size (torch-fidelity resizes to 299 like TensorFlow 1.x bilinear).

        Returns:
            ``{"2048": (B, 2048)}`` (and ``"logits_unbiased": (B, 1008)`` with logits), float32 on the CPU.
        """
        if img_B3HW.dtype != torch.uint8 or img_B3HW.dim() != 4 or img_B3HW.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {img_B3HW.dtype} {tuple(img_B3HW.shape)}")
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        with _no_tf32():
            for chunk in img_B3HW.split(self.batch_size):
                feats = self.model(chunk.to(self.device, non_blocking=True))
                for name, value in zip(self.names, feats):
                    out[name].append(value.float().cpu())
        return {name: torch.cat(values) for name, values in out.items()}

    def extract(
        self, batches: Iterable[torch.Tensor], total: Optional[int] = None, desc: str = "Inception features"
    ) -> dict[str, torch.Tensor]:
        """Features of a stream of uint8 batches, with a progress bar over images.

        Returns:
            ``{"2048": (N, 2048), ...}`` float32 on the CPU, in the order of the batches.
        """
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=quiet()) as bar:
            for batch in batches:
                for name, value in self(batch).items():
                    out[name].append(value)
                bar.update(len(batch))
        if not out[POOL_FEATURES]:
            raise ValueError(f"{desc}: no images")
        return {name: torch.cat(values) for name, values in out.items()}


def quiet() -> bool:
    """True when ``VAR_LAB_QUIET`` is set (not empty or 0): progress bars are off (tests, batch logs)."""
    return os.environ.get("VAR_LAB_QUIET", "") not in ("", "0")


# --------------------------------------------------------------------------------------------------------------------
# Statistics and metrics (torch-fidelity's functions)


def feature_statistics(features_ND: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features, computed by torch-fidelity (float32 mean, float64 covariance)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features_ND.float().cpu())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians, by torch-fidelity's ``fid_statistics_to_metric``.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``; when the two sets of statistics have
    different dtypes (e.g. an ADM ``.npz`` in float64), both are promoted to float64.

    Args:
        mu1, mu2: means (D,).
        sigma1, sigma2: covariances (D, D).
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    arrays = [np.asarray(a) for a in (mu1, sigma1, mu2, sigma2)]
    if arrays[0].shape != arrays[2].shape or arrays[1].shape != arrays[3].shape:
        raise ValueError(
            f"statistics do not match: mu {arrays[0].shape} vs {arrays[2].shape}, "
            f"sigma {arrays[1].shape} vs {arrays[3].shape}"
        )
    if arrays[0].dtype != arrays[2].dtype or arrays[1].dtype != arrays[3].dtype:
        arrays = [a.astype(np.float64) for a in arrays]
    stat1 = {"mu": arrays[0], "sigma": arrays[1]}
    stat2 = {"mu": arrays[2], "sigma": arrays[3]}
    return float(fid_statistics_to_metric(stat1, stat2, verbose=False)[KEY_METRIC_FID])


@dataclass
class MetricOptions:
    """Settings of KID, precision/recall and IS (torch-fidelity's defaults; subsets shrink for small sets)."""

    kid_subsets: int = 100
    """Number of random subsets KID averages over."""
    kid_subset_size: int = 1000
    """Images per KID subset, capped at half the smaller set so that subsets differ and ``kid_std`` measures KID's
    spread (a subset as large as the set is the same every time: std 0)."""
    prc_neighborhood: int = 3
    """k of the k-nearest-neighbour manifolds of precision/recall."""
    prc_batch_size: int = 10000
    """Rows per distance block in precision/recall."""
    isc_splits: int = 10
    """Splits of the Inception Score."""
    rng_seed: int = 2020
    """Seed of KID subsets and IS shuffling (torch-fidelity's default)."""


@dataclass
class ReferenceStats:
    """FID reference: Gaussian statistics and (for KID / precision / recall) the features themselves.

    Attributes:
        mu: mean (2048,).
        sigma: covariance (2048, 2048).
        features: (N, 2048) float32, or None when only statistics are known.
        num_images: images the statistics were computed from.
        description: human-readable origin (logged as ``eval.reference``).
        key: the cache key (dataset identity, resolution, extractor, N).
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[torch.Tensor]
    num_images: int
    description: str
    key: dict = field(default_factory=dict)


def compute_metrics(
    gen: dict[str, torch.Tensor],
    ref: ReferenceStats,
    *,
    fid: bool = True,
    kid: bool = True,
    prc: bool = True,
    isc: bool = False,
    options: Optional[MetricOptions] = None,
    device: Optional[str | torch.device] = None,
) -> dict[str, float]:
    """Metrics of generated features against a reference, with torch-fidelity's functions.

    Args:
        gen: features of the generated images: ``"2048"`` (N, 2048) and, for IS, ``"logits_unbiased"`` (N, 1008).
        ref: the reference (its ``features`` are needed for KID and precision/recall).
        fid, kid, prc, isc: which metrics.
        options: KID / precision-recall / IS settings.
        device: where the precision/recall distances are computed (the GPU is much faster for 50,000 images).

    Returns:
        Keys among ``fid``, ``kid``, ``kid_std``, ``precision``, ``recall``, ``is``, ``is_std``.

    Raises:
        ValueError: KID or precision/recall without reference features, or too few images.
    """
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    options = options or MetricOptions()
    feats = gen[POOL_FEATURES].float().cpu()
    out: dict[str, float] = {}
    if fid:
        stats = feature_statistics(feats)
        out["fid"] = frechet_distance(stats["mu"], stats["sigma"], ref.mu, ref.sigma)
    if (kid or prc) and ref.features is None:
        raise ValueError(
            f"KID and precision/recall need the reference features, but the reference '{ref.description}' holds only "
            "statistics (an .npz with mu/sigma but no images?); pass kid=False, prc=False or a reference with images"
        )
    if kid:
        smaller = min(len(feats), len(ref.features))
        subset = min(options.kid_subset_size, smaller // 2)
        if subset < 2:
            raise ValueError(f"KID needs at least 4 images on each side, got {len(feats)} and {len(ref.features)}")
        result = kid_features_to_metric(
            feats,
            ref.features.float().cpu(),
            kid_subsets=options.kid_subsets,
            kid_subset_size=subset,
            rng_seed=options.rng_seed,
            verbose=False,
        )
        out["kid"], out["kid_std"] = result[KEY_METRIC_KID_MEAN], result[KEY_METRIC_KID_STD]
    if prc:
        need = options.prc_neighborhood + 1
        if min(len(feats), len(ref.features)) < need:
            raise ValueError(f"precision/recall needs at least {need} images on each side")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        result = prc_features_to_metric(
            feats.to(dev),
            ref.features.float().to(dev),
            prc_neighborhood=options.prc_neighborhood,
            prc_batch_size=options.prc_batch_size,
            save_cpu_ram=len(feats) * len(ref.features) > 10**8,  # blockwise above ~400 MB of distances
            verbose=False,
        )
        out["precision"], out["recall"] = float(result["precision"]), float(result["recall"])
    if isc:
        if LOGITS_FEATURES not in gen:
            raise ValueError("Inception Score needs the classifier logits: extract with InceptionFeatures(with_logits)")
        result = isc_features_to_metric(gen[LOGITS_FEATURES].cpu(), options.isc_splits, True, options.rng_seed)
        out["is"], out["is_std"] = result["inception_score_mean"], result["inception_score_std"]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Image sources for references


class ImageSource:
    """A finite, deterministic stream of uint8 image batches with an identity for cache keys."""

    description: str = ""
    slug: str = "images"

    def __len__(self) -> int:
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield uint8 ``img_B3HW`` batches covering every image once, in a fixed order."""
        raise NotImplementedError

    def stored_statistics(self) -> Optional[dict[str, np.ndarray]]:
        """Precomputed ``mu`` / ``sigma`` shipped with the source (ADM ``.npz``), else None."""
        return None


def _files_digest(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def center_crop_resize(image: Any, resolution: int) -> Any:
    """ADM's ``center_crop_arr``: box-downsample by halves, bicubic to the short side, center crop (PIL in/out)."""
    from PIL import Image

    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return Image.fromarray(arr[top : top + resolution, left : left + resolution])


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], resolution: Optional[int]):
        self.paths = paths
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except Exception as error:  # noqa: BLE001 - any decoder failure
            raise ValueError(f"cannot read image {path}: {error}") from error
        if self.resolution is not None and image.size != (self.resolution, self.resolution):
            image = center_crop_resize(image, self.resolution)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class FolderImages(ImageSource):
    """Every image file under a folder (recursively), sorted by relative path.

    Args:
        root: the folder.
        resolution: center-crop and resize every image to this side (ADM's preprocessing); None keeps the files'
            size (they must then all have the same size, as for a folder of generated samples).
        limit: use only the first ``limit`` files (sorted order).
        num_workers: DataLoader processes decoding images.
    """

    slug = "folder"

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: Optional[int] = None,
        limit: Optional[int] = None,
        num_workers: int = 2,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"reference folder {self.root} does not exist")
        paths = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.paths = paths[:limit] if limit else paths
        self.resolution = resolution
        self.num_workers = num_workers
        self.description = f"folder:{self.root}" + (f"@{resolution}" if resolution else "")

    def __len__(self) -> int:
        return len(self.paths)

    def identity(self) -> dict:
        return {
            "kind": "folder",
            "path": str(self.root.resolve()),
            "files": _files_digest(self.paths, self.root),
            "resolution": self.resolution,
        }

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        loader = torch.utils.data.DataLoader(
            _FolderDataset(self.paths, self.resolution),
            batch_size=batch_size,
            num_workers=self.num_workers,
            shuffle=False,
        )
        try:
            yield from loader
        except RuntimeError as error:
            raise ValueError(
                f"images under {self.root} could not be batched ({error}); they must all have the same size, "
                "or pass a resolution to center-crop and resize them"
            ) from error


class NpzImages(ImageSource):
    """An ADM-style reference batch: ``arr_0`` uint8 (N, H, W, 3); optional ``mu`` (2048,) and ``sigma``.

    ``arr_0`` is streamed from the archive batch by batch (the ImageNet reference batch is 2 GB uncompressed).
    """

    slug = "npz"

    def __init__(self, path: str | os.PathLike, limit: Optional[int] = None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"reference batch {self.path} does not exist")
        if not zipfile.is_zipfile(self.path):
            raise ValueError(f"{self.path}: not an .npz archive (expected np.savez output with arr_0)")
        with zipfile.ZipFile(self.path) as archive:
            self.members = {name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")}
        if "arr_0" not in self.members and not {"mu", "sigma"} <= self.members:
            raise ValueError(
                f"{self.path}: has arrays {sorted(self.members)}; expected 'arr_0' (uint8 images N x H x W x 3) "
                "and/or 'mu' and 'sigma' (Inception statistics)"
            )
        self.shape: Optional[tuple[int, ...]] = None
        if "arr_0" in self.members:
            shape, dtype = self._arr0_header()
            if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
                raise ValueError(f"{self.path}: 'arr_0' must be uint8 (N, H, W, 3), got {dtype} {shape}")
            self.shape = shape
        self.limit = limit
        self.description = f"npz:{self.path}"

    def _open_arr0(self):
        archive = zipfile.ZipFile(self.path)
        handle = archive.open("arr_0.npy")
        major, _minor = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        if fortran:
            raise ValueError(f"{self.path}: 'arr_0' is stored in Fortran order; save it in C order")
        return archive, handle, tuple(shape), np.dtype(dtype)

    def _arr0_header(self) -> tuple[tuple[int, ...], np.dtype]:
        archive, handle, shape, dtype = self._open_arr0()
        handle.close()
        archive.close()
        return shape, dtype

    def __len__(self) -> int:
        if self.shape is None:
            return 0
        return min(self.shape[0], self.limit) if self.limit else self.shape[0]

    def identity(self) -> dict:
        stat = self.path.stat()
        return {
            "kind": "npz",
            "path": str(self.path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "shape": list(self.shape) if self.shape else None,
        }

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        if self.shape is None:
            raise ValueError(f"{self.path}: has no 'arr_0' images")
        archive, handle, shape, _ = self._open_arr0()
        per_image = int(np.prod(shape[1:]))
        remaining = len(self)
        try:
            while remaining > 0:
                count = min(batch_size, remaining)
                raw = handle.read(count * per_image)
                if len(raw) != count * per_image:
                    raise ValueError(f"{self.path}: 'arr_0' is truncated")
                img_BHW3 = np.frombuffer(raw, dtype=np.uint8).reshape(count, *shape[1:])
                yield torch.from_numpy(img_BHW3.copy()).permute(0, 3, 1, 2).contiguous()
                remaining -= count
        finally:
            handle.close()
            archive.close()

    def stored_statistics(self) -> Optional[dict[str, np.ndarray]]:
        if not {"mu", "sigma"} <= self.members:
            return None
        with np.load(self.path) as data:
            mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{self.path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} do not form D and D x D")
        return {"mu": mu, "sigma": sigma}


class DatasetImages(ImageSource):
    """A var-lab image dataset (Fashion-MNIST or an image folder) with the training pipeline's deterministic transform.

    Args:
        name: ``fashion_mnist`` or ``folder``.
        root: dataset root (None: Debian's Fashion-MNIST).
        resolution: image side, as in training.
        split: ``train`` or ``val``.
        limit: a fixed random subset of this many images (the same one every time).
        num_workers: DataLoader processes.
    """

    slug = "data"

    def __init__(
        self,
        name: str,
        root: Optional[str] = None,
        resolution: int = 32,
        split: str = "train",
        limit: Optional[int] = None,
        num_workers: int = 2,
    ):
        from var_lab.config import DataConfig
        from var_lab.data.folders import build_image_dataset, fixed_subset

        self.config = DataConfig(name=name, root=root, resolution=resolution)
        self.dataset = build_image_dataset(self.config, split, train=False)
        indices = fixed_subset(len(self.dataset), limit)
        if indices is not None:
            self.dataset = torch.utils.data.Subset(self.dataset, indices)
        self.name, self.root, self.resolution, self.split, self.limit = name, root, resolution, split, limit
        self.num_workers = num_workers
        self.slug = name
        self.description = f"data:{name}:{split}@{resolution}" + (f":{root}" if root else "")

    def __len__(self) -> int:
        return len(self.dataset)

    def identity(self) -> dict:
        base = self.dataset.dataset if isinstance(self.dataset, torch.utils.data.Subset) else self.dataset
        digest = hashlib.sha256()
        if hasattr(base, "samples"):  # image folder: paths, labels and file stats
            for path, label in base.samples:
                stat = os.stat(path)
                digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        elif hasattr(base, "images_NHW"):  # Fashion-MNIST: the pixels themselves (47 MB, hashed in ~0.1 s)
            digest.update(np.ascontiguousarray(base.images_NHW).tobytes())
        return {
            "kind": "data",
            "name": self.name,
            "root": str(Path(self.root).resolve()) if self.root else None,
            "split": self.split,
            "resolution": self.resolution,
            "limit": self.limit,
            "content": digest.hexdigest(),
        }

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, num_workers=self.num_workers, shuffle=False
        )
        for img_B3HW, _labels in loader:
            yield pm1_to_uint8(img_B3HW)


def cache_key(source: ImageSource, extractor: InceptionFeatures) -> dict:
    """Everything a cached reference depends on: dataset identity, resolution, extractor weights, image count."""
    return {
        "version": CACHE_VERSION,
        "source": source.identity(),
        "num_images": len(source),
        "extractor": extractor.identity,
        "layer": POOL_FEATURES,
    }


def cache_path(cache_dir: Path, source: ImageSource, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"ref-{source.slug}-{len(source)}-{digest}.pt"


def reference_statistics(
    source: ImageSource,
    extractor: InceptionFeatures,
    cache_dir: Optional[str | os.PathLike] = None,
    use_cache: bool = True,
) -> ReferenceStats:
    """Reference statistics and features of an image source, computed once and cached.

    The cache file name holds a hash of :func:`cache_key`, and the file stores the key itself, which is compared in
    full on load: a different dataset (or changed files), resolution, extractor or image count never reuses it.
    For an ADM ``.npz`` with ``mu`` / ``sigma``, those define the FID reference (as in the ADM evaluator) and the
    features of its ``arr_0`` images serve KID and precision/recall.

    Args:
        source: the reference images.
        extractor: the Inception feature extractor.
        cache_dir: where cache files live (default :func:`default_cache_dir`).
        use_cache: read and write the cache.

    Returns:
        The reference (``key`` set; ``features`` None only for an ``.npz`` holding statistics without images).
    """
    stored = source.stored_statistics()
    key = cache_key(source, extractor)
    path = cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), source, key)
    features: Optional[torch.Tensor] = None
    stats: Optional[dict] = None
    if use_cache and path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a truncated or foreign file is simply recomputed
            cached = None
        if isinstance(cached, dict) and cached.get("key") == key:
            features, stats = cached["features"], {"mu": cached["mu"], "sigma": cached["sigma"]}
    if stats is None and len(source) > 0:
        features = extractor.extract(
            source.batches(extractor.batch_size), total=len(source), desc=f"reference {source.description}"
        )[POOL_FEATURES]
        stats = feature_statistics(features)
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            torch.save({"key": key, "mu": stats["mu"], "sigma": stats["sigma"], "features": features}, tmp)
            os.replace(tmp, path)
    if stored is not None:
        stats = stored
    assert stats is not None
    return ReferenceStats(
        mu=stats["mu"],
        sigma=stats["sigma"],
        features=features,
        num_images=len(source),
        description=source.description,
        key=key | {"cache_file": str(path)},
    )
