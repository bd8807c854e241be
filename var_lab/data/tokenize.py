"""``var-lab tokenize``: encode a dataset once with a frozen tokenizer into token shards.

Example (Fashion-MNIST with a tokenizer trained by ``var-lab fit-tokenizer``)::

    var-lab tokenize --tokenizer-ckpt outputs/tokenizer/checkpoints/last.ckpt --data.name fashion_mnist \\
        --out tokens/fmnist32 --split train,val

Across several processes (each encodes the shards ``i % world_size == rank``; gloo for the final barrier)::

    torchrun --nproc_per_node 8 -m var_lab.cli tokenize --tokenizer-ckpt vae_ch160v4096z32.pth \\
        --data.name folder --data.root /data/imagenet --data.resolution 256 --out tokens/in256

Resumable: a shard is written to a temporary file and renamed, so a finished shard file is always complete; running
the same command again skips the shards that are already there and still match (tokenizer fingerprint, dataset,
positions), re-encodes missing or unreadable ones, and writes the manifest last.

Images are encoded without augmentation (resize 1.125x, center crop). The release instead encodes a fresh random
crop at every training step, so caching trades that augmentation away for a training step without the tokenizer;
``--augment-copies K`` keeps some of it by also encoding K - 1 random crops of every training image (the dataset
then picks one of the K at random per access). See ``var_lab.data.tokens`` for the file layout.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from var_lab.atomic import write_atomic
from var_lab.config import DataConfig, TokenizerModelConfig, from_namespace, type_error
from var_lab.data.folders import build_image_dataset, find_classes, fixed_subset
from var_lab.data.tokens import (
    CACHE_FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_FORMAT,
    TokenCacheError,
    load_shard,
    merge_scales,
    shard_name,
    split_dir,
    token_dtype,
    tokenizer_fingerprint,
)
from var_lab.inputs import (
    TOKENIZER_CKPT_FIX,
    BadInputError,
    check_checkpoint_file,
    check_option_names,
    check_output_dir,
    checkpoint_load_errors,
    respell_options,
)
from var_lab.ranks import barrier, init_from_env, process_group

SPLITS = ("train", "val")


# ----------------------------------------------------------------------------------------------------------------------
# Encoding


def _source(config: DataConfig, split: str, total: int, limit: Optional[int]) -> dict:
    """What a shard was encoded from; a resumed run must match it exactly."""
    from var_lab.data.fashion_mnist import DEFAULT_ROOT

    root = config.root or (str(DEFAULT_ROOT) if config.name == "fashion_mnist" else None)
    return {
        "dataset": config.name,
        "root": str(Path(root).resolve()) if root else None,
        "resolution": int(config.resolution),
        "split": split,
        "total": int(total),
        "limit": limit,
    }


def _shard_matches(path: Path, expected: dict, source_indices: torch.Tensor) -> Optional[str]:
    """None when the shard file at ``path`` is the one we would write, else why not (raises if unreadable)."""
    shard = load_shard(path)
    for key, value in expected.items():
        if shard.get(key) != value:
            return f"{key} is {shard.get(key)!r}, this run needs {value!r}"
    if not torch.equal(shard["source_indices"], source_indices):
        return "it holds other images"
    return None


def _reusable(path: Path, meta: dict, rows: torch.Tensor, overwrite: bool) -> bool:
    """Whether the shard file at ``path`` is already the one this run would write.

    Removes temporary files of a killed run. An unreadable (e.g. truncated) shard is re-encoded with a warning; a
    readable shard written for something else stops the run unless ``overwrite``.
    """
    for stale in path.parent.glob(f"{path.name}.tmp*"):
        stale.unlink(missing_ok=True)
    if not path.is_file():
        return False
    try:
        why = _shard_matches(path, meta, rows)
    except TokenCacheError as err:
        warnings.warn(f"re-encoding {path}: {err}", stacklevel=3)
        return False
    if why is not None and not overwrite:
        raise TokenCacheError(
            f"{path} was written for something else ({why}); use a new --out folder, or --overwrite to re-encode it"
        )
    return why is None


@torch.no_grad()
def _encode(
    vqvae: nn.Module,
    dataset: Any,
    indices: list[int],
    batch_size: int,
    workers: int,
    device: torch.device,
    seed: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``dataset[indices]`` in order; returns idx_NL (int64, on CPU) and labels_N (int64).

    ``seed`` (run seed, shard, copy) fixes the random crops of an augmented view, with or without workers.
    """
    seed = int.from_bytes(hashlib.sha256(repr(seed).encode()).digest()[:7], "little")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers, generator=generator
    )
    idx_chunks, label_chunks = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random crops of --augment-copies are reproducible with num_workers=0 too
        for img_B3HW, labels_B in loader:
            idx_list = vqvae.img_to_idx(img_B3HW.to(device, non_blocking=True))
            idx_chunks.append(merge_scales(idx_list).cpu())
            label_chunks.append(labels_B.to(torch.int64))
    return torch.cat(idx_chunks), torch.cat(label_chunks)


def tokenize_dataset(
    vqvae: nn.Module,
    data_config: DataConfig,
    out_dir: str | os.PathLike,
    splits: tuple[str, ...] | list[str] = SPLITS,
    shard_size: int = 4096,
    batch_size: Optional[int] = None,
    augment_copies: int = 1,
    seed: int = 0,
    device: Optional[str | torch.device] = None,
    overwrite: bool = False,
    tokenizer_ckpt: Optional[str] = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Encode image splits into token shards under ``out_dir/<split>/``; resumable and rank-parallel.

    Under ``torch.distributed`` (initialised by the caller, e.g. ``tokenize_main`` under torchrun) rank r encodes the
    shards ``i % world_size == r``; after a barrier rank 0 checks every shard and writes the manifest.

    Args:
        vqvae: frozen tokenizer (``img_to_idx``, ``patch_nums``, ``vocab_size``).
        data_config: the images (``name`` fashion_mnist | folder, ``root``, ``resolution``, ``num_workers``;
            ``limit_train`` / ``limit_val`` encode only that fixed subset).
        out_dir: cache folder (``data.token_dir`` of the VAR run).
        splits: which splits to encode.
        shard_size: images per shard file.
        batch_size: encoding batch; None means ``data_config.batch_size``.
        augment_copies: K >= 1 encodings per training image: the center crop plus K - 1 random crops
            (validation always gets the center crop only).
        seed: seed of the random crops.
        device: where to encode; None means ``cuda:<LOCAL_RANK>`` when CUDA is available, else CPU.
        overwrite: re-encode shards written for another tokenizer or dataset instead of stopping.
        tokenizer_ckpt: recorded in the manifest.
        progress: show tqdm bars.

    Returns:
        The manifest of each split.

    Raises:
        TokenCacheError: when ``out_dir`` holds shards of another tokenizer or dataset and ``overwrite`` is off.
        ValueError: for a resolution the tokenizer cannot encode, or invalid sizes.
    """
    if shard_size <= 0 or augment_copies <= 0:
        raise ValueError(f"shard_size and augment_copies must be positive, got {shard_size}, {augment_copies}")
    tokenizer_resolution = getattr(vqvae, "resolution", None)
    if tokenizer_resolution is not None and tokenizer_resolution != data_config.resolution:
        raise ValueError(
            f"data.resolution={data_config.resolution} but the tokenizer encodes {tokenizer_resolution}px images "
            f"(last patch_num {vqvae.patch_nums[-1]} x downsampling); set --data.resolution {tokenizer_resolution}"
        )
    rank, world = process_group()
    if device is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    vqvae = vqvae.to(device).eval().requires_grad_(False)
    fingerprint = tokenizer_fingerprint(vqvae)
    dtype = token_dtype(int(vqvae.vocab_size))
    patch_nums = [int(p) for p in vqvae.patch_nums]
    seq_len = sum(p * p for p in patch_nums)
    batch_size = batch_size or data_config.batch_size
    class_names = find_classes(Path(data_config.root) / "train") if data_config.name == "folder" else None

    manifests = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; allowed: {', '.join(SPLITS)}")
        plain = build_image_dataset(data_config, split, train=False, class_names=class_names)
        copies = augment_copies if split == "train" else 1
        augmented = build_image_dataset(data_config, split, train=True, class_names=class_names) if copies > 1 else None
        if augmented is not None and data_config.name == "fashion_mnist" and not data_config.hflip:
            warnings.warn(
                "Fashion-MNIST has no random crop: without --data.hflip true the augmented copies equal the original",
                stacklevel=2,
            )
        limit = data_config.limit_train if split == "train" else data_config.limit_val
        subset = fixed_subset(len(plain), limit)
        source_indices = torch.arange(len(plain)) if subset is None else torch.tensor(subset, dtype=torch.int64)
        count = len(source_indices)
        source = _source(data_config, split, len(plain), limit)
        folder = split_dir(out_dir, split)
        folder.mkdir(parents=True, exist_ok=True)
        num_shards = math.ceil(count / shard_size)
        manifest = {
            "format": CACHE_FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "patch_nums": patch_nums,
            "vocab_size": int(vqvae.vocab_size),
            "seq_len": seq_len,
            "dtype": str(dtype).removeprefix("torch."),
            "dataset": data_config.name,
            "root": source["root"],
            "resolution": int(data_config.resolution),
            "split": split,
            "count": count,
            "num_classes": len(plain.class_names),
            "class_names": list(plain.class_names),
            "augment_copies": copies,
            "seed": seed,
            "shard_size": shard_size,
            "limit": limit,
            "source_total": len(plain),
            "tokenizer_ckpt": tokenizer_ckpt,
            "shards": [
                {"file": shard_name(i), "start": i * shard_size, "count": min(shard_size, count - i * shard_size)}
                for i in range(num_shards)
            ],
        }
        _check_existing_manifest(folder, manifest, overwrite, rank)
        barrier()  # rank 0 may have removed a stale manifest

        mine = [i for i in range(num_shards) if i % world == rank]
        total = sum(manifest["shards"][i]["count"] for i in mine) * copies
        bar = tqdm(
            total=total,
            desc=f"tokenize {split}" + (f" [rank {rank}/{world}]" if world > 1 else ""),
            unit="img",
            disable=not progress,
            position=rank if world > 1 else None,
            file=sys.stderr,
        )
        for i in mine:
            entry = manifest["shards"][i]
            rows = source_indices[entry["start"] : entry["start"] + entry["count"]]
            meta = {
                "fingerprint": fingerprint,
                "split": split,
                "shard": i,
                "start": entry["start"],
                "count": entry["count"],
                "augment_copies": copies,
                "seed": seed,
                "source": source,
            }
            if _reusable(folder / entry["file"], meta, rows, overwrite):
                bar.update(entry["count"] * copies)
                continue
            encoded = []  # copy 0: center crop; copies 1..K-1: random crops
            for k, view in enumerate([plain] + [augmented] * (copies - 1)):
                workers = data_config.num_workers
                encoded.append(_encode(vqvae, view, rows.tolist(), batch_size, workers, device, seed=(seed, i, k)))
                bar.update(entry["count"])
            idx = encoded[0][0] if copies == 1 else torch.stack([idx_NL for idx_NL, _ in encoded], dim=1)  # (N, K, L)
            if int(idx.max()) >= int(vqvae.vocab_size) or int(idx.min()) < 0:
                raise RuntimeError(f"tokenizer produced indices outside 0..{vqvae.vocab_size - 1}")
            shard = {
                "format": SHARD_FORMAT,
                **meta,
                "idx": idx.to(dtype).contiguous(),
                "labels": encoded[0][1].contiguous(),
                "source_indices": rows.clone(),
            }
            _atomic_save(shard, folder / entry["file"])
        bar.close()
        skipped = sum(getattr(view, "num_skipped", 0) for view in (plain, augmented) if view is not None)
        if skipped:
            warnings.warn(
                f"{split}: {skipped} unreadable image(s) under {data_config.root} were skipped (each replaced by the "
                "next readable image in the cache)" + (f" on rank {rank}" if world > 1 else ""),
                stacklevel=2,
            )

        barrier()
        if rank == 0:
            _finish_manifest(folder, manifest)
        barrier()
        manifests[split] = manifest
    return manifests


def _check_existing_manifest(folder: Path, manifest: dict, overwrite: bool, rank: int) -> None:
    """Stop (or, with overwrite, drop the manifest) when the folder holds a cache of something else."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        old = {}
    keys = ("fingerprint", "dataset", "root", "resolution", "split", "count", "shard_size", "augment_copies", "seed")
    differing = [k for k in keys if old.get(k) != manifest[k]]
    if not differing:
        return
    what = ", ".join(f"{k}: {old.get(k)!r} -> {manifest[k]!r}" for k in differing)
    if not overwrite:
        raise TokenCacheError(
            f"{folder} already holds a token cache of something else ({what}); use a new --out folder, or --overwrite "
            "to replace it"
        )
    if rank == 0:
        path.unlink(missing_ok=True)


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _finish_manifest(folder: Path, manifest: dict) -> None:
    """Check every shard (written by any rank) and write the manifest, atomically."""
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise TokenCacheError(f"{path} is missing after encoding; did a rank fail? Re-run to resume")
        shard = load_shard(path)
        if shard["fingerprint"] != manifest["fingerprint"] or shard["count"] != entry["count"]:
            raise TokenCacheError(f"{path} does not match the manifest being written; re-run to resume")
    manifest = {**manifest, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_atomic(folder / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    """The jsonargparse parser of ``var-lab tokenize`` (help texts come from the config field docstrings)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="var-lab tokenize",
        exit_on_error=False,  # a wrong value is one line (tokenize_main), not the whole usage first
        description="Encode a dataset once with a frozen tokenizer into token shards (resumable; under torchrun "
        "each rank encodes a share). Images are center-cropped: the release's per-step random crop is traded away "
        "unless --augment-copies K > 1.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below.")
    parser.add_argument(
        "--tokenizer-ckpt",
        "--tokenizer_ckpt",
        dest="tokenizer_ckpt",
        type=str,
        required=True,
        help="Tokenizer: a fit-tokenizer Lightning checkpoint, or a plain state dict (e.g. the released "
        "vae_ch160v4096z32.pth; its architecture comes from --tokenizer.*).",
    )
    parser.add_argument("--out", type=str, required=True, help="Cache folder (data.token_dir of the VAR run).")
    parser.add_argument("--split", type=str, default="train,val", help="Comma-separated splits to encode.")
    options = [
        ("shard_size", int, 4096, "Images per shard file."),
        ("batch_size", Optional[int], None, "Encoding batch size (default: data.batch_size)."),
        ("augment_copies", int, 1, "Encodings per training image: the center crop plus K - 1 random crops."),
    ]
    for name, kind, default, text in options:
        flags = (f"--{name.replace('_', '-')}", f"--{name}")
        parser.add_argument(*flags, dest=name, type=kind, default=default, help=text)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random crops of --augment-copies.")
    parser.add_argument("--device", type=str, default="auto", help="auto (cuda:<LOCAL_RANK> if available), cpu, cuda.")
    parser.add_argument(
        "--overwrite", type=bool, default=False, help="Re-encode shards of another tokenizer or dataset in --out."
    )
    parser.add_argument("--progress", type=bool, default=True, help="Show progress bars.")
    parser.add_class_arguments(TokenizerModelConfig, "tokenizer")
    parser.add_class_arguments(DataConfig, "data")
    return parser


def _load_tokenizer(path: str, model_config: TokenizerModelConfig) -> nn.Module:
    """The frozen tokenizer: a fit-tokenizer Lightning checkpoint (carries its architecture) or a plain state dict."""
    from var_lab.models.checkpoints import load_tokenizer
    from var_lab.models.release import ReleaseFormatError

    # A Lightning checkpoint carries its own architecture and load_tokenizer rejects a differing one, so the
    # --tokenizer.* options count only when the user changed them (they then describe a plain state dict).
    given = None if model_config == TokenizerModelConfig() else model_config
    check_checkpoint_file(path, "--tokenizer-ckpt", TOKENIZER_CKPT_FIX)
    try:
        with checkpoint_load_errors(path, "--tokenizer-ckpt", TOKENIZER_CKPT_FIX):
            return load_tokenizer(path, given)
    except ReleaseFormatError as err:
        raise ValueError(f"{err}; pass the --tokenizer.* options of the architecture the file was saved with") from err


def tokenize_main(argv: list[str]) -> int:
    """Entry point of ``var-lab tokenize``; returns the exit code."""
    from jsonargparse import ArgumentError

    parser = build_parser()
    argv = respell_options(argv, parser._option_string_actions)  # --data.batch-size is --data.batch_size
    try:
        check_option_names(parser, argv)  # a typo gets one line with the nearest option, not the whole usage first
        try:
            args = parser.parse_args(argv)
        except ArgumentError as err:  # a value of the wrong type, a missing required option
            raise type_error(err) from None
    except BadInputError as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"var-lab tokenize: error: {message} (var-lab tokenize --help lists every option)", file=sys.stderr)
        return 2
    try:  # the sections' value checks, as for `var-lab fit` (var_lab.config)
        data_config = from_namespace(DataConfig, args.data, "data.")
        model_config = from_namespace(TokenizerModelConfig, args.tokenizer, "tokenizer.")
    except BadInputError as err:
        print(f"var-lab tokenize: error: {err}", file=sys.stderr)
        return 2
    splits = [s.strip() for s in args.split.split(",") if s.strip()]

    # Under torchrun: gloo suffices (only barriers), whatever device encodes.
    created_group = init_from_env("gloo", timeout=datetime.timedelta(hours=6))
    rank = process_group()[0]
    try:
        check_output_dir(args.out, "--out")
        vqvae = _load_tokenizer(args.tokenizer_ckpt, model_config)
        device = None if args.device == "auto" else args.device
        manifests = tokenize_dataset(
            vqvae,
            data_config,
            args.out,
            splits=splits,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            augment_copies=args.augment_copies,
            seed=args.seed,
            device=device,
            overwrite=args.overwrite,
            tokenizer_ckpt=str(Path(args.tokenizer_ckpt).resolve()),
            progress=args.progress,
        )
    except BadInputError as err:
        print(f"var-lab tokenize: error: {err}", file=sys.stderr)
        return 2
    except (TokenCacheError, FileNotFoundError, ValueError) as err:
        print(f"var-lab tokenize: error: {err}", file=sys.stderr)
        return 1
    finally:
        if created_group:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    if rank == 0:
        for split, manifest in manifests.items():
            print(
                f"{split}: {manifest['count']} images -> {split_dir(args.out, split)} "
                f"({len(manifest['shards'])} shards, {manifest['seq_len']} tokens each, {manifest['dtype']}, "
                f"tokenizer {manifest['fingerprint']})"
            )
    return 0
