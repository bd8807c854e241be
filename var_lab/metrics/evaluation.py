"""Sampling a VAR across every rank and scoring it: the core of ``var-lab eval`` and of the FID callback.

Protocol (the release's, all configurable): image ``i`` has class ``floor(i * C / N)`` (class-balanced, class-major
order as the release samples them). Images are generated in global batches ``[j * B, (j + 1) * B)``; batch ``j`` runs
on rank ``j % W`` with a generator seeded from ``(seed, j * B)``, so one process or any number of processes produce
the same images for the same seed and batch size. Every rank extracts the Inception features of its own images right
after sampling; only features (and a few grid images) are gathered, then rank 0 computes the metrics.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from var_lab.atomic import write_atomic
from var_lab.metrics.fid import (
    InceptionFeatures,
    MetricOptions,
    ReferenceStats,
    compute_metrics,
    quiet,
    to_uint8,
)
from var_lab.ranks import process_group

distributed_context = process_group  # (rank, world size); kept under its old name

METRIC_NAMES = ("fid", "kid", "prc", "is")


# --------------------------------------------------------------------------------------------------------------------
# The sampling plan


@dataclass
class SamplingConfig:
    """What to generate."""

    num_samples: int
    """Total images N."""
    num_classes: int
    """Classes C; image i has class floor(i * C / N)."""
    cfg: float = 1.5
    """Classifier-free guidance ratio."""
    top_k: int = 900
    """Top-k sampling (0: off)."""
    top_p: float = 0.96
    """Top-p sampling (0: off)."""
    seed: int = 0
    """Base seed; batch j uses a generator seeded from (seed, j * batch_size)."""
    batch_size: int = 64
    """Images per sampling batch (part of the seeding: keep it to reproduce a set)."""


def class_balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Labels (N,) with ``label[i] = floor(i * C / N)``: N / C images per class when C divides N, class-major."""
    if num_samples <= 0 or num_classes <= 0:
        raise ValueError(f"num_samples and num_classes must be positive, got {num_samples} and {num_classes}")
    return torch.arange(num_samples, dtype=torch.long) * num_classes // num_samples


def batch_ranges(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """Global batches ``[(start, end), ...]`` covering ``range(num_samples)``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


def batch_seed(seed: int, start: int) -> int:
    """Seed of the batch that starts at global image index ``start`` (well mixed: no overlap between nearby seeds)."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1, dtype=np.uint64)[0] >> 1)


def grid_indices(labels_N: torch.Tensor, num_classes: int, grid_classes: int, grid_per_class: int) -> list[int]:
    """Global indices of a grid: ``grid_classes`` evenly spaced classes x their first ``grid_per_class`` images."""
    if grid_classes <= 0 or grid_per_class <= 0:
        return []
    classes = np.unique(np.linspace(0, num_classes - 1, min(grid_classes, num_classes)).round().astype(int))
    out: list[int] = []
    for c in classes:
        members = torch.nonzero(labels_N == int(c)).flatten()[:grid_per_class]
        out += members.tolist()
    return out


@dataclass
class GeneratedSet:
    """Generated images of one rank (or, after :func:`gather_generated`, of all ranks, sorted by index).

    Attributes:
        indices: global image indices (N,).
        labels: their class labels (N,).
        features: Inception features per name, e.g. ``"2048"``: (N, 2048); empty without an extractor.
        grid: global index -> uint8 image (3, H, W) for the images of the grid.
        images: uint8 images (N, H, W, 3) when kept (for an .npz), else None.
        resolution: image side.
        seconds: wall time of sampling and feature extraction (this rank; max over ranks after gathering).
    """

    indices: torch.Tensor
    labels: torch.Tensor
    features: dict[str, torch.Tensor]
    grid: dict[int, torch.Tensor]
    images: Optional[np.ndarray] = None
    resolution: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def sample_and_extract(
    var: torch.nn.Module,
    sampling: SamplingConfig,
    *,
    extractor: Optional[InceptionFeatures] = None,
    device: Union[str, torch.device] = "cpu",
    rank: int = 0,
    world_size: int = 1,
    png_dir: Optional[Union[str, Path]] = None,
    keep_images: bool = False,
    grid: list[int] = (),
    precision: str = "bf16",
    progress: bool = True,
) -> GeneratedSet:
    """Generate this rank's share of the images and extract their features right away.

    Args:
        var: a VAR with its tokenizer attached (``var.vqvae``), already on ``device``.
        sampling: the plan (N, classes, cfg, top-k, top-p, seed, batch size).
        extractor: Inception features (None: images only).
        device: the device of ``var``.
        rank, world_size: this process's share: batches ``rank, rank + W, ...``.
        png_dir: write every image as ``{index:06d}.png`` there.
        keep_images: keep the uint8 images in memory (for an .npz).
        grid: global indices whose images are kept for the grid.
        precision: ``bf16`` (default on CUDA), ``fp16`` or ``fp32`` for sampling (features are always fp32).
        progress: show a progress bar (rank 0 only).

    Returns:
        This rank's :class:`GeneratedSet`.
    """
    device = torch.device(device)
    labels_all = class_balanced_labels(sampling.num_samples, sampling.num_classes)
    my_batches = batch_ranges(sampling.num_samples, sampling.batch_size)[rank::world_size]
    total = sum(end - start for start, end in my_batches)
    grid_set = set(grid)
    out_dir = Path(png_dir) if png_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    indices, features, kept, grid_images = [], {}, [], {}
    seconds = {"sampling": 0.0, "features": 0.0}
    resolution = 0
    # PNG encoding (zlib) releases the GIL: a few threads keep it off the sampling loop's critical path.
    writer = ThreadPoolExecutor(max_workers=4) if out_dir is not None else None
    pending = []
    bar = tqdm(
        total=total,
        desc=f"sampling (rank {rank}/{world_size})" if world_size > 1 else "sampling",
        unit="img",
        dynamic_ncols=True,
        disable=not progress or rank != 0 or quiet(),
    )
    try:
        for start, end in my_batches:
            labels_B = labels_all[start:end].to(device)
            generator = torch.Generator(device=device).manual_seed(batch_seed(sampling.seed, start))
            t0 = time.perf_counter()
            with _autocast(device, precision):
                img_B3HW = var.sample(
                    labels_B, cfg=sampling.cfg, top_k=sampling.top_k, top_p=sampling.top_p, generator=generator
                )
            img_B3HW = to_uint8(img_B3HW)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            seconds["sampling"] += t1 - t0
            resolution = img_B3HW.shape[-1]
            if extractor is not None:
                for name, value in extractor(img_B3HW).items():
                    features.setdefault(name, []).append(value)
                seconds["features"] += time.perf_counter() - t1
            img_cpu = img_B3HW.cpu()
            indices.append(torch.arange(start, end))
            for offset, index in enumerate(range(start, end)):
                if index in grid_set:
                    grid_images[index] = img_cpu[offset].clone()
            if keep_images or writer is not None:
                img_BHW3 = img_cpu.permute(0, 2, 3, 1).contiguous().numpy()
                if keep_images:
                    kept.append(img_BHW3)
                if writer is not None:
                    pending = [f for f in pending if not f.done()]
                    pending.append(writer.submit(_write_pngs, out_dir, start, img_BHW3))
            bar.update(end - start)
    finally:
        bar.close()
        if writer is not None:
            writer.shutdown(wait=True)
    for future in pending:
        future.result()  # re-raise a failed write
    indices_N = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    return GeneratedSet(
        indices=indices_N,
        labels=labels_all[indices_N],
        features={name: torch.cat(values) for name, values in features.items()},
        grid=grid_images,
        images=np.concatenate(kept) if kept else None,
        resolution=resolution,
        seconds=seconds,
    )


def _write_pngs(folder: Path, start: int, img_BHW3: np.ndarray) -> None:
    from PIL import Image

    for offset, image in enumerate(img_BHW3):
        Image.fromarray(image).save(folder / f"{start + offset:06d}.png")


def gather_generated(local: GeneratedSet, world_size: int) -> GeneratedSet:
    """All ranks' features, indices and grid images on every rank, sorted by global index (images stay local)."""
    payload = (local.indices, local.labels, local.features, local.grid, local.resolution, local.seconds)
    parts: list = [payload]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, payload)
    indices_N = torch.cat([p[0] for p in parts])
    order = torch.argsort(indices_N)
    names = parts[0][2].keys()
    return GeneratedSet(
        indices=indices_N[order],
        labels=torch.cat([p[1] for p in parts])[order],
        features={name: torch.cat([p[2][name] for p in parts])[order] for name in names},
        grid={k: v for p in parts for k, v in p[3].items()},
        images=None,
        resolution=max(p[4] for p in parts),
        seconds={key: max(p[5][key] for p in parts) for key in local.seconds},
    )


# --------------------------------------------------------------------------------------------------------------------
# Outputs


def _write_array_member(archive: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype, chunks) -> None:
    """Stream an array into an .npz member without holding it whole (zip64 for > 4 GB)."""
    with archive.open(name + ".npy", "w", force_zip64=True) as handle:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(handle, header)
        for chunk in chunks:
            handle.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def write_npz(
    path: Union[str, Path], shards: list[tuple[np.ndarray, np.ndarray]], labels_N: torch.Tensor, chunk: int = 1024
) -> Path:
    """ADM-format ``.npz`` (``arr_0`` uint8 N x H x W x 3, ``arr_1`` labels) from shards ``(indices, images)``.

    Shards may be memory-mapped; images are copied in global index order, ``chunk`` at a time.
    """
    path = Path(path)
    num = sum(len(indices) for indices, _ in shards)
    if num != len(labels_N):
        raise ValueError(f"{num} images in the shards but {len(labels_N)} labels")
    owner = np.empty(num, dtype=np.int64)
    row = np.empty(num, dtype=np.int64)
    for s, (indices, _) in enumerate(shards):
        owner[indices] = s
        row[indices] = np.arange(len(indices))
    image_shape = shards[0][1].shape[1:]

    def chunks():
        for begin in range(0, num, chunk):
            sel = slice(begin, min(begin + chunk, num))
            out = np.empty((sel.stop - sel.start, *image_shape), dtype=np.uint8)
            for s, (_, images) in enumerate(shards):
                mask = owner[sel] == s
                if mask.any():
                    out[mask] = images[row[sel][mask]]
            yield out

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        _write_array_member(archive, "arr_0", (num, *image_shape), np.uint8, chunks())
        _write_array_member(archive, "arr_1", (num,), np.int64, [labels_N.numpy()])
    os.replace(tmp, path)
    return path


def save_npz_distributed(local: GeneratedSet, path: Path, labels_N: torch.Tensor, rank: int, world: int) -> None:
    """Each rank writes its images as a shard next to ``path``; rank 0 merges them into the .npz (shared filesystem)."""
    if local.images is None:
        raise ValueError("save_npz_distributed needs keep_images=True")
    if world == 1:
        write_npz(path, [(local.indices.numpy(), local.images)], labels_N)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    shard = path.with_name(f".{path.name}.rank{rank}-of-{world}.npz")
    np.savez(shard, indices=local.indices.numpy(), images=local.images)
    dist.barrier()
    if rank == 0:
        paths = [path.with_name(f".{path.name}.rank{r}-of-{world}.npz") for r in range(world)]
        loaded = [np.load(p) for p in paths]
        write_npz(path, [(d["indices"], d["images"]) for d in loaded], labels_N)
        for d, p in zip(loaded, paths):
            d.close()
            p.unlink()
    dist.barrier()


def save_grid(generated: GeneratedSet, indices: list[int], per_class: int, path: Path) -> Optional[Path]:
    """PNG grid: one row per class, ``per_class`` samples per row."""
    from torchvision.utils import save_image

    images = [generated.grid[i] for i in indices if i in generated.grid]
    if not images:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.stack(images).float() / 255, path, nrow=per_class, padding=2, pad_value=1.0)
    return path


# --------------------------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class EvalResult:
    """What an evaluation produced (rank 0 has everything; other ranks get the metrics)."""

    metrics: dict[str, float]
    num_samples: int
    resolution: int
    reference: str
    seconds: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def evaluate_var(
    var: torch.nn.Module,
    sampling: SamplingConfig,
    reference: Union[ReferenceStats, Callable[[int], ReferenceStats]],
    *,
    extractor: InceptionFeatures,
    metrics: tuple[str, ...] = ("fid", "kid", "prc"),
    device: Union[str, torch.device] = "cpu",
    out_dir: Optional[Union[str, Path]] = None,
    save_png: bool = False,
    save_npz: bool = False,
    grid_classes: int = 8,
    grid_per_class: int = 8,
    precision: str = "bf16",
    options: Optional[MetricOptions] = None,
    progress: bool = True,
    skipped: Optional[dict[str, str]] = None,
) -> EvalResult:
    """Sample on every rank, gather the features, compute the metrics on rank 0 and share them with all ranks.

    Args:
        var: VAR with its tokenizer attached, on ``device``.
        sampling: the sampling plan.
        reference: the reference statistics, or a function of the image resolution that builds them (called on
            rank 0 only, after sampling).
        extractor: the Inception features (its ``names`` must include the logits for IS).
        metrics: subset of ``fid``, ``kid``, ``prc`` (precision/recall), ``is``.
        device: where sampling runs.
        out_dir: where grid.png, images/, samples.npz and metrics.json go (rank 0; PNGs from every rank).
        save_png, save_npz: write the samples.
        grid_classes, grid_per_class: the grid (0 disables it).
        precision: sampling precision (bf16, fp16, fp32).
        options: KID / precision-recall / IS settings.
        progress: progress bars.
        skipped: metrics left out and why (recorded in metrics.json).

    Returns:
        The result on every rank (files only on rank 0).
    """
    unknown = set(metrics) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; allowed: {', '.join(METRIC_NAMES)}")
    rank, world = distributed_context()
    out = Path(out_dir) if out_dir is not None else None
    if (save_png or save_npz) and out is None:
        raise ValueError("save_png / save_npz need out_dir")
    labels_N = class_balanced_labels(sampling.num_samples, sampling.num_classes)
    grid = grid_indices(labels_N, sampling.num_classes, grid_classes, grid_per_class) if out is not None else []
    t_start = time.perf_counter()
    local = sample_and_extract(
        var,
        sampling,
        extractor=extractor,
        device=device,
        rank=rank,
        world_size=world,
        png_dir=out / "images" if save_png else None,
        keep_images=save_npz,
        grid=grid,
        precision=precision,
        progress=progress,
    )
    files: dict[str, str] = {}
    if save_npz:
        save_npz_distributed(local, out / "samples.npz", labels_N, rank, world)
        files["npz"] = str(out / "samples.npz")
    if save_png:
        files["png_dir"] = str(out / "images")
    generated = gather_generated(local, world)
    seconds = dict(generated.seconds)
    seconds["generate_total"] = time.perf_counter() - t_start
    payload: list[Any] = [None]
    if rank == 0:
        t0 = time.perf_counter()
        ref = reference(generated.resolution) if callable(reference) else reference
        seconds["reference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        values = compute_metrics(
            generated.features,
            ref,
            fid="fid" in metrics,
            kid="kid" in metrics,
            prc="prc" in metrics,
            isc="is" in metrics,
            options=options,
            device=device,
        )
        seconds["metrics"] = time.perf_counter() - t0
        if out is not None:
            grid_path = save_grid(generated, grid, grid_per_class, out / "grid.png")
            if grid_path is not None:
                files["grid"] = str(grid_path)
        payload = [(values, ref.description)]
    if world > 1:
        dist.broadcast_object_list(payload, src=0)
    values, description = payload[0]
    seconds["total"] = time.perf_counter() - t_start
    result = EvalResult(
        metrics=values,
        num_samples=sampling.num_samples,
        resolution=generated.resolution,
        reference=description,
        seconds=seconds,
        skipped=dict(skipped or {}),
        files=files,
    )
    if rank == 0 and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.json"
        write_atomic(path, json.dumps({"sampling": asdict(sampling), **asdict(result)}, indent=2) + "\n")
        result.files["metrics_json"] = str(path)
    return result


def training_images(data: Optional[dict]) -> Optional[dict]:
    """``{name, root, resolution}`` of the images a run trained on (its ``data`` config; token caches resolved).

    Returns None when the config names no image dataset.
    """
    if not data:
        return None
    if data.get("name") in ("fashion_mnist", "folder"):
        return {"name": data["name"], "root": data.get("root"), "resolution": data.get("resolution")}
    if data.get("name") == "tokens" and data.get("token_dir"):
        from var_lab.data.tokens import read_manifest

        manifest = read_manifest(data["token_dir"], "train")  # records what the tokens were encoded from
        if manifest.get("dataset") in ("fashion_mnist", "folder"):
            return {"name": manifest["dataset"], "root": manifest.get("root"), "resolution": manifest["resolution"]}
    return None
