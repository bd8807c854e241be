"""ImageNet-style image folders: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``.

Classes are the sorted sub-folder names of ``root/train``; the validation split uses the same class indices. Images
are found recursively inside each class folder (extensions in ``IMAGE_EXTENSIONS``, case-insensitive).

Unreadable or corrupt images are skipped, not fatal. The folder is not verified up front (opening 1.28M ImageNet files
costs minutes), so a bad file is found when it is first loaded: the item then returns the next readable image, the
file's index is flagged in a shared-memory array (visible to the DataLoader workers and the main process, so each bad
file is counted once and never opened again), and the first one warns with its path. ``num_skipped`` reads the count;
``ImageDataModule`` reports the total when it tears down.

Training loaders are ``ResumableDataLoader``: an epoch's order depends only on the global seed and the epoch
(``EpochRandomSampler``), and Lightning checkpoints the position inside the epoch, so a run resumed in the middle of an
epoch skips the batches it already trained on and sees the rest in the same order.
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.context
import os
import signal
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from var_lab.config import DataConfig
from var_lab.data.transforms import ReleaseImageTransform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def expected_layout(root: str | os.PathLike) -> str:
    """The folder layout that ``data.name=folder`` expects, for error messages."""
    return (
        f"expected layout: {root}/train/<class>/<image> and {root}/val/<class>/<image> "
        f"(one sub-folder per class; image extensions {', '.join(IMAGE_EXTENSIONS)})"
    )


def find_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class sub-folder names of one split folder (hidden folders ignored).

    Raises:
        FileNotFoundError: naming the folder and the expected layout when it is missing or has no class folders.
    """
    split_dir = Path(split_dir)
    root = split_dir.parent
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image folder {split_dir} does not exist; {expected_layout(root)}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"image folder {split_dir} has no class sub-folders; {expected_layout(root)}")
    return classes


def scan_images(split_dir: str | os.PathLike, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """List ``(path, class index)`` of every image under ``split_dir/<class>/`` in a deterministic order.

    Args:
        split_dir: ``root/train`` or ``root/val``.
        class_to_idx: class folder name -> index (from the training split).

    Raises:
        FileNotFoundError: when the folder is missing, has no class folders, or holds no image at all.
        ValueError: when a class folder of this split is not a class of the training split.
    """
    split_dir = Path(split_dir)
    classes = find_classes(split_dir)
    unknown = [c for c in classes if c not in class_to_idx]
    if unknown:
        raise ValueError(
            f"{split_dir} has class folders that {split_dir.parent}/train lacks: {', '.join(unknown[:10])}"
            f"{' ...' if len(unknown) > 10 else ''}; every class must have a training folder"
        )
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for name in classes:
        found = []
        for folder, dirs, files in os.walk(split_dir / name, followlinks=True):
            dirs.sort()
            found.extend(os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            empty.append(name)
        samples.extend((path, class_to_idx[name]) for path in found)
    if not samples:
        raise FileNotFoundError(f"image folder {split_dir} holds no images; {expected_layout(split_dir.parent)}")
    if empty:
        warnings.warn(
            f"{split_dir}: {len(empty)} class folder(s) without images: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}",
            stacklevel=2,
        )
    return samples


class ImageFolderDataset(Dataset):
    """One split of an ImageNet-style folder, with the release's augmentation.

    Args:
        root: dataset root holding ``train/`` and ``val/``.
        split: ``train`` or ``val``.
        resolution: output side R.
        train: random crop (and optional flip) instead of the center crop.
        hflip: random horizontal flip (train only).
        class_names: class folder names defining the label indices; None reads them from ``root/train``.
        max_new_failures: how many not-yet-known unreadable files one item may step over before it gives up
            (a guard against a folder that is mostly broken, e.g. an unmounted network share).

    Items are ``(img_3RR float32 in [-1, 1], label int)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        resolution: int,
        train: bool,
        hflip: bool = False,
        class_names: Optional[list[str]] = None,
        max_new_failures: int = 64,
    ):
        self.root = Path(root)
        self.split = split
        self.split_dir = self.root / split
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist; {expected_layout(self.root)}")
        self.class_names = list(class_names) if class_names is not None else find_classes(self.root / "train")
        self.class_to_idx = {name: i for i, name in enumerate(self.class_names)}
        self.samples = scan_images(self.split_dir, self.class_to_idx)
        self.transform = ReleaseImageTransform(resolution, train=train, hflip=hflip)
        self.max_new_failures = max_new_failures
        # Shared memory: DataLoader workers flag bad files here and the main process reads the count.
        self._bad = multiprocessing.RawArray("b", len(self.samples))
        self._warned = multiprocessing.RawValue("b", 0)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable files found so far (in this process and its DataLoader workers)."""
        return int(np.frombuffer(self._bad, dtype=np.int8).sum())

    @property
    def skipped_paths(self) -> list[str]:
        """Paths of the unreadable files found so far."""
        flags = np.frombuffer(self._bad, dtype=np.int8)
        return [self.samples[i][0] for i in np.flatnonzero(flags)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        new_failures = 0
        for offset in range(n):
            i = (index + offset) % n
            if self._bad[i]:
                continue
            path, label = self.samples[i]
            try:
                with Image.open(path) as opened:
                    image = opened.convert("RGB")  # forces the full decode, so truncated files fail here
            except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable"
                self._flag_bad(i, path, err)
                new_failures += 1
                if new_failures >= self.max_new_failures:
                    raise RuntimeError(
                        f"{new_failures} unreadable images in a row in {self.split_dir} (last: {path}: {err}); "
                        "is the dataset folder intact?"
                    ) from err
                continue
            return self.transform(image), label
        raise RuntimeError(f"no readable image left in {self.split_dir}: all {n} files failed to decode")

    def _flag_bad(self, i: int, path: str, err: Exception) -> None:
        self._bad[i] = 1
        if not self._warned.value:
            self._warned.value = 1
            warnings.warn(
                f"skipping unreadable image {path} ({type(err).__name__}: {err}); further unreadable images are "
                "skipped and counted (the total is reported at the end)",
                stacklevel=2,
            )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            # Pickled outside of starting a process (deepcopy, plain pickle): shared memory cannot travel, so the
            # copy gets its own flags, initialised with what is known now.
            state["_bad"] = bytes(self._bad)
            state["_warned"] = int(self._warned.value)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["_bad"], bytes):
            flags = state["_bad"]
            state["_bad"] = multiprocessing.RawArray("b", len(flags))
            state["_bad"][:] = list(flags)
            state["_warned"] = multiprocessing.RawValue("b", state["_warned"])
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"ImageFolderDataset({self.split_dir}, n={len(self)}, classes={self.num_classes}, {self.transform})"


def fixed_subset(total: int, limit: Optional[int], seed: int = 0) -> Optional[list[int]]:
    """Indices of a fixed, sorted random subset of ``limit`` out of ``total`` items (None: use everything).

    A random subset rather than the first ``limit`` items, because class folders are scanned class by class (the
    first items would all be one class). The same seed on every rank and in ``var-lab tokenize`` gives the same
    images everywhere.

    Raises:
        ValueError: when ``limit`` is not positive.
    """
    if limit is None or limit >= total:
        return None
    if limit <= 0:
        raise ValueError(f"limit_train/limit_val must be positive or None, got {limit}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:limit].sort().values.tolist()


def build_image_dataset(
    config: DataConfig, split: str, train: bool, class_names: Optional[list[str]] = None
) -> Dataset:
    """The full image dataset of one split (no ``limit_*`` applied).

    Args:
        config: ``name`` is ``fashion_mnist`` or ``folder``; ``root``, ``resolution`` and ``hflip`` are read.
        split: ``train`` or ``val``.
        train: with augmentation (random crop, optional flip) instead of the deterministic center crop.
        class_names: folder classes in label order; None reads them from ``root/train`` (so ``val`` shares them).

    Returns:
        A dataset of ``(img_3RR float32 in [-1, 1], label int)`` with ``num_classes`` and ``class_names``.

    Raises:
        ValueError: for an unknown ``config.name``, or ``folder`` without ``root``.
        FileNotFoundError: when the data is missing (the message says what is expected).
    """
    if config.name == "fashion_mnist":
        from var_lab.data.fashion_mnist import FashionMNIST

        return FashionMNIST(config.root, split, config.resolution, hflip=config.hflip and train)
    if config.name == "folder":
        if not config.root:
            raise ValueError(f"data.name=folder needs data.root; {expected_layout('<root>')}")
        return ImageFolderDataset(
            config.root, split, config.resolution, train=train, hflip=config.hflip, class_names=class_names
        )
    if config.name == "tokens":
        raise ValueError("data.name=tokens holds token shards, not images: use TokenDataModule (var_lab.data.tokens)")
    raise ValueError(f"unknown data.name '{config.name}'; allowed: fashion_mnist, folder, tokens")


class SplitDataModule(L.LightningDataModule):
    """The loaders shared by the image and token data modules; subclasses fill ``train_dataset`` and ``val_dataset``
    in ``setup`` and hold the data section of the run config as ``config``."""

    config: DataConfig
    train_dataset: Optional[Dataset]
    val_dataset: Optional[Dataset]

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        batch_size = self.config.batch_size
        drop_last = len(self.train_dataset) >= batch_size
        if not drop_last:
            warnings.warn(
                f"the training set has {len(self.train_dataset)} samples, fewer than data.batch_size={batch_size}: "
                "training batches are partial",
                stacklevel=2,
            )
        return make_loader(self.train_dataset, self.config, shuffle=True, drop_last=drop_last)  # resumable mid-epoch

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return make_loader(self.val_dataset, self.config, shuffle=False, drop_last=False)


class ImageDataModule(SplitDataModule):
    """Images for the tokenizer (or for VAR with on-the-fly tokenisation): Fashion-MNIST or an image folder.

    Batches are ``(img_B3RR float32 in [-1, 1], labels_B int64)``. The train loader shuffles; under DDP Lightning
    replaces its sampler with a ``DistributedSampler`` (the default ``use_distributed_sampler=True``), so every rank
    sees a disjoint part of each epoch. Training batches are full (``drop_last``) so that every optimiser step sees
    the global batch the compute accounting assumes.

    Args:
        config: the data section of the run config (``name`` fashion_mnist | folder).
    """

    def __init__(self, config: DataConfig):
        super().__init__()
        if config.name not in ("fashion_mnist", "folder"):
            build_image_dataset(config, "train", train=True)  # raises the right error
        self.config = config
        self.train_base: Optional[Dataset] = None
        self.val_base: Optional[Dataset] = None
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None
        self._class_names: Optional[list[str]] = None
        self._reported_skipped = 0

    @property
    def class_names(self) -> list[str]:
        """Class names (label i is ``class_names[i]``); reads only the folder names, not the images."""
        if self._class_names is None:
            if self.config.name == "fashion_mnist":
                from var_lab.data.fashion_mnist import CLASS_NAMES

                self._class_names = list(CLASS_NAMES)
            else:
                if not self.config.root:
                    raise ValueError(f"data.name=folder needs data.root; {expected_layout('<root>')}")
                self._class_names = find_classes(Path(self.config.root) / "train")
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_base = build_image_dataset(self.config, "train", train=True)
            self._class_names = list(self.train_base.class_names)
            self.train_dataset = limit_dataset(self.train_base, self.config.limit_train)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            class_names = self.class_names if self.config.name == "folder" else None
            self.val_base = build_image_dataset(self.config, "val", train=False, class_names=class_names)
            self.val_dataset = limit_dataset(self.val_base, self.config.limit_val)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable images skipped so far in this process (train + val; always 0 for Fashion-MNIST)."""
        return sum(getattr(d, "num_skipped", 0) for d in (self.train_base, self.val_base) if d is not None)

    def teardown(self, stage: Optional[str] = None) -> None:
        bases = [d for d in (self.train_base, self.val_base) if d is not None]
        skipped = [path for d in bases for path in getattr(d, "skipped_paths", [])]
        if len(skipped) > self._reported_skipped:  # report once per new finding, not at every teardown
            self._reported_skipped = len(skipped)
            warnings.warn(
                f"{len(skipped)} unreadable image(s) were skipped under {self.config.root}: "
                f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                stacklevel=2,
            )


def limit_dataset(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """The dataset itself, or a ``Subset`` of ``limit`` items chosen by ``fixed_subset``."""
    indices = fixed_subset(len(dataset), limit)
    return dataset if indices is None else Subset(dataset, indices)


class EpochRandomSampler(RandomSampler):
    """Shuffles each epoch with a permutation that depends only on ``seed + epoch``, as ``DistributedSampler`` does.

    Lightning calls ``set_epoch`` at the start of every epoch; iterated again without it (outside Lightning), the
    sampler moves on to the next epoch by itself. The order never depends on the global RNG or on how often an
    iterator was created, so a resumed run can replay it.

    Args:
        data_source: the dataset.
        seed: base seed of the permutations.
    """

    def __init__(self, data_source: Dataset, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = int(seed)
        self.epoch = 0
        self._epoch_given = True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_given = True

    def __iter__(self):
        if not self._epoch_given:
            self.epoch += 1
        self._epoch_given = False
        self.generator.manual_seed(self.seed + self.epoch)
        yield from super().__iter__()


class _SkipFirstBatches:
    """The index sampler of a ``ResumableDataLoader``: skips the batches a resumed epoch already trained on.

    Its length stays the full epoch's (Lightning counts the skipped batches as already fetched). The number to skip
    is taken from the loader when an iteration starts, so the persistent-worker iterator, which keeps this object,
    works too.
    """

    def __init__(self, loader: ResumableDataLoader, sampler: Any):
        self.loader = loader
        self.sampler = sampler

    def __iter__(self):
        # Read when the iteration starts, not when it is created: the worker iterator creates one it never uses.
        loader = self.loader
        skip, loader._skip_next = loader._skip_next, 0
        if getattr(loader.sampler, "epoch", None) != loader._skip_epoch:
            skip = 0  # Lightning began another epoch (a checkpoint written when max_steps ended one early)
        loader._batches_done = skip
        yield from itertools.islice(self.sampler, skip, None)

    def __len__(self) -> int:
        return len(self.sampler)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position inside an epoch Lightning checkpoints and restores (``state_dict``).

    ``state_dict`` holds the sampler's epoch and the number of batches handed out in it; after ``load_state_dict``
    the next iteration replays that epoch's order (``EpochRandomSampler``, or Lightning's ``DistributedSampler``
    under DDP: both are functions of seed and epoch) and skips those batches without loading them. Lightning 2.x
    saves this state with every checkpoint of the fit loop and restores it before creating the epoch's iterator.

    With ``num_workers > 0`` the order is exact, but a random augmentation inside the workers restarts from the
    epoch's worker seeds, so augmented pixels can differ after a mid-epoch resume.
    """

    _skip_next = 0
    _skip_epoch: Optional[int] = None
    _batches_done = 0

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirstBatches(self, super()._index_sampler)

    def __iter__(self):
        return _CountingIterator(super().__iter__(), self)

    def state_dict(self) -> dict[str, Any]:
        """``epoch`` of the sampler and ``batches_done`` in it (0 once the epoch is over)."""
        done = self._batches_done if self._batches_done < len(self) else 0
        return {"epoch": getattr(self.sampler, "epoch", None), "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if state_dict.get("epoch") is not None and callable(set_epoch):
            set_epoch(int(state_dict["epoch"]))
        self._skip_epoch = getattr(self.sampler, "epoch", None)
        self._skip_next = int(state_dict.get("batches_done", 0))


class _CountingIterator:
    """Counts the batches a ``ResumableDataLoader`` hands out."""

    def __init__(self, iterator: Any, loader: ResumableDataLoader):
        self.iterator = iterator
        self.loader = loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader._batches_done += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT, and SIGTERM from anyone but their parent: the training process stops after
    its step with a checkpoint, then stops its workers.

    ``scancel``, a SLURM time limit, ``timeout`` and Ctrl-C signal the whole process group. A worker killed by it
    would fail the training process ("DataLoader worker ... is killed by signal") before it could stop cleanly. The
    parent's own SIGTERM (``Process.terminate``: PyTorch's shutdown of a worker that does not stop, Python's exit
    handler for daemonic children) still ends the worker; ignoring that one too left a process that exits with live
    persistent workers waiting for them forever. Python handlers do not see a signal's sender, so SIGTERM is blocked
    and a thread takes it with ``sigwaitinfo``, which does.
    """
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: SIGTERM keeps its default action
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask

    def obey_only_the_parent() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:
                os._exit(0)  # a clean exit: PyTorch reports a worker that dies by a signal or non-zero

    threading.Thread(target=obey_only_the_parent, name="sigterm-from-parent", daemon=True).start()


def make_loader(dataset: Dataset, config: DataConfig, shuffle: bool, drop_last: bool) -> DataLoader:
    """The DataLoader of a DataModule: a ``ResumableDataLoader`` with an ``EpochRandomSampler`` for training.

    No iteration draws from the global RNG (the model's): the training order comes from the global seed
    (``torch.initial_seed()``, which ``seed_everything`` sets) and the epoch, and both loaders get their own generator
    for the worker seeds, so validation, which a resumed run may run at other points, leaves the global RNG alone.

    Args:
        dataset: the split.
        config: ``batch_size`` and ``num_workers`` are read.
        shuffle: the training loader (shuffled, resumable) or a validation loader (in order).
        drop_last: drop a last partial batch.
    """
    workers = config.num_workers
    seed = torch.initial_seed()
    kwargs: dict[str, Any] = dict(
        batch_size=config.batch_size,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed if shuffle else 0),
        worker_init_fn=_leave_stop_signals_to_the_trainer if workers > 0 else None,
    )
    if shuffle:
        return ResumableDataLoader(dataset, sampler=EpochRandomSampler(dataset, seed), **kwargs)
    return DataLoader(dataset, shuffle=False, **kwargs)
