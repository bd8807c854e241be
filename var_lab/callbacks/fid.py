"""A Lightning callback that computes a small-N FID of the model being trained every K epochs (off by default).

At the end of every K-th training epoch, every rank samples its share of ``num_samples`` class-balanced images with
``pl_module.var`` (seeded per batch, so the set does not depend on the number of processes), extracts their Inception
features on its device, and rank 0 computes the FID against reference statistics built once (and cached on disk)
from the training images. The value is logged as ``eval/fid`` with ``pl_module.log`` (so the MLflow logger records it
at the current global step, and checkpointing can monitor it); ``metrics=("fid", "kid")`` adds ``eval/kid``.

Small-N FID is biased upwards (it depends on N); compare values at the same N only.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from var_lab.metrics.evaluation import SamplingConfig, distributed_context, evaluate_var, training_images
from var_lab.metrics.fid import (
    DatasetImages,
    FolderImages,
    ImageSource,
    InceptionFeatures,
    MetricOptions,
    NpzImages,
    ReferenceStats,
    reference_statistics,
)


class FIDCallback(Callback):
    """Small-N FID (and optionally KID) every ``every_n_epochs`` training epochs.

    Args:
        every_n_epochs: evaluate after every N-th epoch (0: never; the default keeps it off).
        num_samples: generated images per evaluation (class-balanced).
        cfg, top_k, top_p: sampling settings.
        seed: base seed (the same images are generated at every evaluation for the same weights).
        batch_size: images per sampling batch per rank.
        reference_data: the training data config as a dict (``name``, ``root``, ``resolution``, ``token_dir``); token
            caches are resolved to the images they were encoded from.
        reference_npz: an ADM-style ``.npz`` instead.
        reference_folder: an image folder instead.
        reference_limit: reference images (default: ``num_samples``; 0: all).
        reference_split: ``train`` or ``val`` split of a dataset reference.
        weights_path: FID Inception weights (default: the torch hub location).
        cache_dir: reference statistics cache.
        feature_batch_size: images per Inception forward pass.
        metrics: among ``fid``, ``kid``, ``prc``.
        precision: sampling precision on CUDA (bf16, fp16, fp32).
    """

    def __init__(
        self,
        every_n_epochs: int = 0,
        num_samples: int = 200,
        cfg: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        seed: int = 0,
        batch_size: int = 64,
        reference_data: Optional[dict] = None,
        reference_npz: Optional[str] = None,
        reference_folder: Optional[str] = None,
        reference_limit: Optional[int] = None,
        reference_split: str = "train",
        weights_path: Optional[str] = None,
        cache_dir: Optional[str] = None,
        feature_batch_size: int = 100,
        metrics: tuple[str, ...] = ("fid",),
        precision: str = "bf16",
    ):
        super().__init__()
        if every_n_epochs < 0 or num_samples < 2:
            raise ValueError(f"every_n_epochs must be >= 0 and num_samples >= 2, got {every_n_epochs}, {num_samples}")
        if not set(metrics) <= {"fid", "kid", "prc"}:
            raise ValueError(f"FIDCallback metrics must be among fid, kid, prc; got {metrics}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.cfg, self.top_k, self.top_p, self.seed, self.batch_size = cfg, top_k, top_p, seed, batch_size
        self.reference_data = reference_data
        self.reference_npz = reference_npz
        self.reference_folder = reference_folder
        self.reference_limit = num_samples if reference_limit is None else (reference_limit or None)
        self.reference_split = reference_split
        self.weights_path = weights_path
        self.cache_dir = cache_dir
        self.feature_batch_size = feature_batch_size
        self.metrics = tuple(metrics)
        self.precision = precision
        self._extractor: Optional[InceptionFeatures] = None
        self._reference: Optional[ReferenceStats] = None
        #: (epoch, global_step, metrics) of every evaluation so far
        self.history: list[tuple[int, int, dict[str, float]]] = []

    @classmethod
    def from_config(cls, eval_config: Any, data_config: Any, **kwargs: Any) -> FIDCallback:
        """From ``FitConfig.eval`` (every_n_epochs, num_samples, cfg, top_k, top_p) and ``FitConfig.data``."""
        from var_lab.config import to_dict

        data = to_dict(data_config) if not isinstance(data_config, dict) else data_config
        return cls(
            every_n_epochs=eval_config.every_n_epochs,
            num_samples=eval_config.num_samples,
            cfg=eval_config.cfg,
            top_k=eval_config.top_k,
            top_p=eval_config.top_p,
            reference_data=data,
            **kwargs,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.every_n_epochs > 0 and stage == "fit":
            from var_lab.metrics.fid_weights import weights_info

            weights_info(self.weights_path)  # missing weights: fail now, not after the first epoch
            if trainer.is_global_zero:
                self._source()  # a missing reference: fail now too

    def _source(self) -> ImageSource:
        if self.reference_npz:
            return NpzImages(self.reference_npz)
        if self.reference_folder:
            return FolderImages(self.reference_folder, limit=self.reference_limit)
        images = training_images(self.reference_data)
        if images is None:
            raise ValueError(
                "FIDCallback: no reference images; the training data "
                f"'{(self.reference_data or {}).get('name')}' names no image dataset; pass reference_npz or "
                "reference_folder"
            )
        return DatasetImages(
            images["name"], images["root"], images["resolution"] or 32, self.reference_split, self.reference_limit
        )

    def _reference_stats(self, resolution: int) -> ReferenceStats:
        if self._reference is None:
            self._reference = reference_statistics(self._source(), self._extractor, cache_dir=self.cache_dir)
        return self._reference

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs <= 0 or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run one evaluation now (all ranks) and log ``eval/*``; returns the metrics."""
        var = pl_module.var
        device = pl_module.device
        if self._extractor is None or self._extractor.device != device:
            self._extractor = InceptionFeatures(self.weights_path, device=device, batch_size=self.feature_batch_size)
        rank, _world = distributed_context()
        sampling = SamplingConfig(
            num_samples=self.num_samples,
            num_classes=var.num_classes,
            cfg=self.cfg,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            batch_size=self.batch_size,
        )
        started = time.perf_counter()
        result = evaluate_var(
            var,
            sampling,
            self._reference_stats,
            extractor=self._extractor,
            metrics=self.metrics,
            device=device,
            precision=self.precision,
            options=MetricOptions(kid_subset_size=min(1000, self.num_samples)),
            progress=rank == 0,
        )
        values = {f"eval/{name}": value for name, value in result.metrics.items() if name in ("fid", "kid")}
        values |= {f"eval/{name}": result.metrics[name] for name in ("precision", "recall") if name in result.metrics}
        for name, value in values.items():
            # Every rank holds the same value (broadcast from rank 0): no reduction needed.
            pl_module.log(name, torch.tensor(value, dtype=torch.float32), on_step=False, on_epoch=True, sync_dist=False)
        pl_module.log("perf/eval_seconds", time.perf_counter() - started, on_step=False, on_epoch=True)
        self.history.append((trainer.current_epoch, trainer.global_step, dict(result.metrics)))
        return result.metrics
