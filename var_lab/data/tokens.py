"""The token cache: images encoded once by a frozen tokenizer, read back as ``(idx_BL, labels_B)`` batches.

``var-lab tokenize`` (``var_lab.data.tokenize``) writes one folder per split::

    <token_dir>/train/manifest.json       what the shards hold (see below); written last, so it marks completion
    <token_dir>/train/shard_00000.pt      torch.save dict: idx (N, L) int16 (int32 when V > 32767), labels (N,) int64,
    <token_dir>/train/shard_00001.pt      source_indices (N,) int64, and the shard's fingerprint, start and count
    <token_dir>/val/...

``idx`` holds each image's token indices of all scales concatenated, smallest scale first (``merge_scales``); with
``--augment-copies K > 1`` it is (N, K, L) and the dataset picks one of the K encoded crops per access.

The manifest records the tokenizer fingerprint (``tokenizer_fingerprint``), patch_nums, vocabulary size, token dtype,
dataset name, root, resolution, split, image count, class names and the shard list. ``TokenDataModule`` refuses a
cache whose fingerprint differs from the tokenizer it is given, since the indices would then mean other codes.

Augmentation trade-off: the release re-encodes a fresh random crop of every image at every step, so VAR never sees
the same tokens twice. The cache encodes the deterministic center crop once (``--augment-copies K`` adds K - 1
random crops per training image) and takes the tokenizer out of the training step in exchange.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from var_lab.config import DataConfig
from var_lab.data.folders import SplitDataModule, limit_dataset
from var_lab.inputs import short_reason

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "var-lab-token-cache"
SHARD_FORMAT = "var-lab-token-shard"
FORMAT_VERSION = 1
#: state dict entries that do not change the tokens (codebook usage statistics) and stay out of the fingerprint
_FINGERPRINT_EXCLUDED_SUFFIXES = ("ema_vocab_hit_SV",)


class TokenCacheError(RuntimeError):
    """A token cache folder is missing, incomplete, corrupt or was written for something else."""


class TokenizerMismatchError(TokenCacheError):
    """The token cache was written by another tokenizer than the one in use (fingerprints differ)."""


def tokenizer_fingerprint(vqvae: nn.Module) -> str:
    """A short hash identifying a tokenizer's encoding: same fingerprint, same tokens for the same image.

    Hashes every state dict entry (name, dtype, shape and bytes; the codebook-usage statistics excluded because
    encoding ignores them), the patch_nums, the vocabulary size and the phi mixing ratios (not in the state dict).

    Args:
        vqvae: the tokenizer (``VQVAE``), on any device.

    Returns:
        16 hex characters.
    """
    hasher = hashlib.sha256()
    ratios = [float(m.resi_ratio) for m in vqvae.modules() if hasattr(m, "resi_ratio")]
    header = {"patch_nums": [int(p) for p in vqvae.patch_nums], "vocab_size": int(vqvae.vocab_size), "phi": ratios}
    hasher.update(json.dumps(header, sort_keys=True).encode())
    state = vqvae.state_dict()
    for key in sorted(state):
        if key.endswith(_FINGERPRINT_EXCLUDED_SUFFIXES):
            continue
        value = state[key].detach().to("cpu").contiguous()
        hasher.update(f"{key}|{value.dtype}|{tuple(value.shape)}".encode())
        hasher.update(value.reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()[:16]


def split_scales(idx_BL: torch.Tensor, patch_nums: tuple[int, ...] | list[int]) -> list[torch.Tensor]:
    """Cut concatenated token indices into one tensor per scale (the input ``vqvae.idx_to_var_input`` takes).

    Args:
        idx_BL: (B, L) indices of all scales, smallest scale first; L = sum(p * p).
        patch_nums: side of each scale.

    Returns:
        A list of K views ``idx_Bl`` of shape (B, p_k * p_k).

    Raises:
        ValueError: when L does not match patch_nums.
    """
    sizes = [int(p) * int(p) for p in patch_nums]
    if idx_BL.dim() != 2 or idx_BL.shape[1] != sum(sizes):
        shape = tuple(idx_BL.shape)
        raise ValueError(f"idx_BL has shape {shape}; patch_nums {tuple(patch_nums)} need (B, {sum(sizes)})")
    return list(torch.split(idx_BL, sizes, dim=1))


def merge_scales(idx_list: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-scale token indices (``vqvae.img_to_idx`` output) into one (B, L) tensor.

    Args:
        idx_list: K tensors ``idx_Bl`` of shape (B, p_k * p_k), smallest scale first.

    Returns:
        idx_BL: (B, L), same dtype.
    """
    return torch.cat([idx_Bl.reshape(idx_Bl.shape[0], -1) for idx_Bl in idx_list], dim=1)


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed dtype holding indices 0 .. vocab_size - 1: int16 up to 32768 codes, else int32."""
    return torch.int16 if vocab_size <= 32768 else torch.int32


def split_dir(token_dir: str | os.PathLike, split: str) -> Path:
    return Path(token_dir) / split


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.pt"


def read_manifest(token_dir: str | os.PathLike, split: str) -> dict:
    """The manifest of one split of a token cache.

    Raises:
        TokenCacheError: naming the folder when the split is missing, incomplete or its manifest unreadable.
    """
    folder = split_dir(token_dir, split)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        state = "is incomplete (shards but no manifest)" if folder.is_dir() else "does not exist"
        raise TokenCacheError(
            f"token cache {folder} {state}; write it with `var-lab tokenize --out {token_dir} --split {split} ...` "
            "(re-running the same command resumes an interrupted run)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TokenCacheError(f"{path}: unreadable manifest ({err}); re-run `var-lab tokenize`") from err
    if manifest.get("format") != CACHE_FORMAT:
        raise TokenCacheError(f"{path}: not a var-lab token cache manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        version = manifest.get("version")
        raise TokenCacheError(f"{path}: token cache version {version}, this code reads {FORMAT_VERSION}")
    return manifest


def check_fingerprint(
    manifest: dict, token_dir: str | os.PathLike, expected: str, tokenizer: Optional[nn.Module] = None
) -> None:
    """Raise ``TokenizerMismatchError`` when the cache was written by another tokenizer.

    Args:
        manifest: from ``read_manifest``.
        token_dir: the cache folder (for the message).
        expected: the fingerprint the cache must carry (``tokenizer_fingerprint`` of the tokenizer in use).
        tokenizer: the tokenizer in use, when at hand: its patch_nums and vocabulary size are checked too.
    """
    found = manifest["fingerprint"]
    if found != expected:
        raise TokenizerMismatchError(
            f"token cache {split_dir(token_dir, manifest['split'])} was written by tokenizer {found} "
            f"(checkpoint {manifest.get('tokenizer_ckpt')}), but the tokenizer in use has fingerprint {expected}; "
            "its indices would mean other codes. Re-run `var-lab tokenize` with this tokenizer into a new --out folder."
        )
    if tokenizer is not None:
        patch_nums = [int(p) for p in tokenizer.patch_nums]
        if patch_nums != manifest["patch_nums"] or int(tokenizer.vocab_size) != manifest["vocab_size"]:
            raise TokenizerMismatchError(
                f"token cache {token_dir}: patch_nums {manifest['patch_nums']} / V {manifest['vocab_size']} but the "
                f"tokenizer has {patch_nums} / V {tokenizer.vocab_size}"
            )


def load_shard(path: str | os.PathLike, mmap: bool = True) -> dict:
    """Load one shard file (memory-mapped by default, so only the rows read are paged in).

    Raises:
        TokenCacheError: when the file is unreadable or not a shard.
    """
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - a truncated zip raises several different errors
        raise TokenCacheError(f"{path}: unreadable token shard ({type(err).__name__}: {err})") from err
    if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
        raise TokenCacheError(f"{path}: not a var-lab token shard")
    return shard


def tokenize_command(token_dir: str | os.PathLike, manifest: dict) -> str:
    """The ``var-lab tokenize`` command that (re)writes the split of ``manifest``, from what the manifest records.

    Re-running it keeps the finished shards and re-encodes missing or unreadable ones.
    """
    split = manifest.get("split", "train")
    parts = ["var-lab tokenize", f"--tokenizer-ckpt {manifest.get('tokenizer_ckpt') or 'TOKENIZER'}"]
    parts += [f"--out {token_dir}", f"--split {split}", f"--data.name {manifest.get('dataset', 'DATASET')}"]
    if manifest.get("root"):
        parts.append(f"--data.root {manifest['root']}")
    if manifest.get("resolution"):
        parts.append(f"--data.resolution {manifest['resolution']}")
    if manifest.get("limit") is not None:
        parts.append(f"--data.limit_{split} {manifest['limit']}")
    for key, flag, default in (("shard_size", "--shard-size", 4096), ("augment_copies", "--augment-copies", 1),
                               ("seed", "--seed", 0)):  # fmt: skip
        if manifest.get(key, default) != default:
            parts.append(f"{flag} {manifest[key]}")
    if not str(manifest.get("tokenizer_ckpt") or "").endswith(".ckpt"):
        parts.append("[the --tokenizer.* options used before]")  # a plain state dict does not carry its architecture
    return " ".join(parts)


class TokenShardDataset(Dataset):
    """One split of a token cache; items are ``(idx_L int64, label int)``.

    Every shard is opened (memory-mapped) and checked against the manifest when the dataset is built, so a truncated
    or foreign shard stops a run at start-up, naming the file and the command that rewrites it, not mid-training.
    DataLoader workers open their own maps.

    Args:
        token_dir: the cache folder given to ``var-lab tokenize --out``.
        split: ``train`` or ``val``.
        manifest: the split's manifest (read when None).
        verify: open and check every shard now (else on first access).

    Raises:
        TokenCacheError: a shard is missing, unreadable or belongs to another cache.
    """

    def __init__(self, token_dir: str | os.PathLike, split: str, manifest: Optional[dict] = None, verify: bool = True):
        self.token_dir = Path(token_dir)
        self.split = split
        self.manifest = manifest if manifest is not None else read_manifest(token_dir, split)
        self.shard_files = [split_dir(token_dir, split) / s["file"] for s in self.manifest["shards"]]
        self.shard_counts = [int(s["count"]) for s in self.manifest["shards"]]
        self.starts = np.cumsum([0, *self.shard_counts])
        if self.starts[-1] != self.manifest["count"]:
            raise TokenCacheError(f"{self.token_dir / split}: manifest shard counts do not add up to its count")
        missing = [str(p) for p in self.shard_files if not p.is_file()]
        if missing:
            raise TokenCacheError(
                f"token cache {self.token_dir / split} lacks {len(missing)} shard(s) listed in its manifest "
                f"(e.g. {missing[0]}); re-encode them with `{tokenize_command(self.token_dir, self.manifest)}` "
                "(finished shards are kept)"
            )
        self._shards: dict[int, dict] = {}
        if verify:
            for s in range(len(self.shard_files)):
                self._shard(s)  # memory-mapped: reads each file's index, not its rows

    def _shard(self, s: int) -> dict:
        shard = self._shards.get(s)
        if shard is None:
            path = self.shard_files[s]
            try:
                shard = load_shard(path)
            except TokenCacheError as err:
                cause = short_reason(err.__cause__ or err)
                raise TokenCacheError(
                    f"token shard {path} is truncated or corrupt ({cause}); re-encode it with "
                    f"`{tokenize_command(self.token_dir, self.manifest)}` (only the broken shards are rewritten)"
                ) from err
            if shard["fingerprint"] != self.manifest["fingerprint"] or int(shard["count"]) != self.shard_counts[s]:
                raise TokenCacheError(
                    f"{path} does not belong to its manifest (fingerprint {shard['fingerprint']} vs "
                    f"{self.manifest['fingerprint']}, count {shard['count']} vs {self.shard_counts[s]}); re-encode it "
                    f"with `{tokenize_command(self.token_dir, self.manifest)} --overwrite true`"
                )
            self._shards[s] = shard
        return shard

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        shard = self._shard(s)
        row = index - int(self.starts[s])
        idx = shard["idx"][row]
        if idx.dim() == 2:  # (K, L): K encoded crops of this image, pick one
            idx = idx[int(torch.randint(idx.shape[0], ()))]
        return idx.long(), int(shard["labels"][row])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = {}  # never pickle memory-mapped tensors into workers; each process maps its own
        return state


class TokenDataModule(SplitDataModule):
    """VAR training data from a token cache: batches ``(idx_BL int64, labels_B int64)``.

    The training step turns a batch into the transformer input with
    ``vqvae.idx_to_var_input(split_scales(idx_BL, vqvae.patch_nums))``. Under DDP Lightning adds the
    ``DistributedSampler``; training batches are full (``drop_last``).

    Args:
        config: data section; ``token_dir`` is the cache folder, ``batch_size``, ``num_workers``, ``limit_train`` and
            ``limit_val`` apply as for images.
        tokenizer: the frozen tokenizer the VAR will use; the cache's fingerprint must match it.
        expected_fingerprint: alternatively, the fingerprint string the cache must carry.

    Raises:
        TokenCacheError: when the cache is missing or incomplete, or a shard is truncated or corrupt (every shard is
            checked here, at start-up).
        TokenizerMismatchError: when a fingerprint differs (the message names both and the cache folder).
    """

    def __init__(
        self, config: DataConfig, tokenizer: Optional[nn.Module] = None, expected_fingerprint: Optional[str] = None
    ):
        super().__init__()
        if not config.token_dir:
            raise ValueError("data.name=tokens needs data.token_dir (the --out folder of `var-lab tokenize`)")
        self.config = config
        self.token_dir = Path(config.token_dir)
        self.manifests = {"train": read_manifest(self.token_dir, "train")}
        if (split_dir(self.token_dir, "val") / MANIFEST_NAME).is_file() or split_dir(self.token_dir, "val").is_dir():
            self.manifests["val"] = read_manifest(self.token_dir, "val")
        if tokenizer is not None:
            expected_fingerprint = tokenizer_fingerprint(tokenizer)
        for manifest in self.manifests.values():
            # Without a tokenizer or fingerprint, at least both splits must come from one tokenizer.
            wanted = expected_fingerprint or self.manifests["train"]["fingerprint"]
            check_fingerprint(manifest, self.token_dir, wanted, tokenizer=tokenizer)
        train = self.manifests["train"]
        if config.resolution != train["resolution"]:
            warnings.warn(
                f"data.resolution={config.resolution} but the token cache {self.token_dir} holds "
                f"{train['resolution']}px images; using the cache's resolution",
                stacklevel=2,
            )
        # Every shard is checked now, at start-up, before a logger or trainer exists (see TokenShardDataset).
        self._datasets = {
            split: TokenShardDataset(self.token_dir, split, manifest) for split, manifest in self.manifests.items()
        }
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None

    @property
    def fingerprint(self) -> str:
        return self.manifests["train"]["fingerprint"]

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.manifests["train"]["patch_nums"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifests["train"]["vocab_size"])

    @property
    def resolution(self) -> int:
        return int(self.manifests["train"]["resolution"])

    @property
    def dataset_name(self) -> str:
        return self.manifests["train"]["dataset"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifests["train"]["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = limit_dataset(self._datasets["train"], self.config.limit_train)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            if "val" not in self.manifests:
                raise TokenCacheError(
                    f"token cache {self.token_dir} has no val split; run `var-lab tokenize --split val --out "
                    f"{self.token_dir} ...`"
                )
            self.val_dataset = limit_dataset(self._datasets["val"], self.config.limit_val)
