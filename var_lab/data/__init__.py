"""Data: Fashion-MNIST and image folders as LightningDataModules, and the token cache of ``var-lab tokenize``.

Images leave every dataset as float32 ``img_3RR`` in [-1, 1] with an int label (int64 once collated).

- ``ImageDataModule(config)``: ``config.name`` fashion_mnist (Debian's ``dataset-fashion-mnist``) or folder
  (``root/train/<class>/*``, ``root/val/<class>/*``, the release's resize-1.125x-and-crop augmentation).
- ``TokenDataModule(config, tokenizer=None, expected_fingerprint=None)``: ``config.name`` tokens, reading the shards
  that ``var-lab tokenize`` wrote to ``config.token_dir``; batches are ``(idx_BL int64, labels_B int64)``.
- ``build_datamodule(config, ...)`` picks one of the two from ``config.name``.

The names are imported lazily so that ``import var_lab.data.transforms`` does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from var_lab.config import DataConfig

_LAZY = {
    "ImageDataModule": "var_lab.data.folders",
    "ImageFolderDataset": "var_lab.data.folders",
    "build_image_dataset": "var_lab.data.folders",
    "fixed_subset": "var_lab.data.folders",
    "FashionMNIST": "var_lab.data.fashion_mnist",
    "ReleaseImageTransform": "var_lab.data.transforms",
    "TokenDataModule": "var_lab.data.tokens",
    "TokenShardDataset": "var_lab.data.tokens",
    "TokenCacheError": "var_lab.data.tokens",
    "TokenizerMismatchError": "var_lab.data.tokens",
    "tokenizer_fingerprint": "var_lab.data.tokens",
    "split_scales": "var_lab.data.tokens",
    "merge_scales": "var_lab.data.tokens",
}

__all__ = [*sorted(_LAZY), "build_datamodule"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'var_lab.data' has no attribute '{name}'")


def build_datamodule(config: DataConfig, tokenizer: Any = None, expected_fingerprint: Optional[str] = None) -> Any:
    """The DataModule for ``config.name``: ``TokenDataModule`` for tokens, else ``ImageDataModule``.

    Args:
        config: the data section of the run config.
        tokenizer: the frozen VQVAE; with tokens, the cache's fingerprint must match it.
        expected_fingerprint: alternatively the fingerprint string the cache must carry.
    """
    if config.name == "tokens":
        from var_lab.data.tokens import TokenDataModule

        return TokenDataModule(config, tokenizer=tokenizer, expected_fingerprint=expected_fingerprint)
    from var_lab.data.folders import ImageDataModule

    return ImageDataModule(config)
