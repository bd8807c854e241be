"""Image data: Fashion-MNIST (IDX parsing, padding), image folders (release transform, bad input), DataModules."""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from var_lab.config import DataConfig
from var_lab.data.fashion_mnist import (
    CLASS_NAMES,
    FashionMNIST,
    FashionMNISTNotFoundError,
    load_fashion_mnist,
    read_idx,
)
from var_lab.data.folders import ImageDataModule, ImageFolderDataset, build_image_dataset, fixed_subset
from var_lab.data.transforms import ReleaseImageTransform, mid_resolution

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# helpers: tiny synthetic datasets on disk


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an uint8 array in the IDX format (gzip-compressed when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(data)


def make_fashion_mnist(root: Path, n_train: int = 24, n_val: int = 12, seed: int = 0) -> Path:
    """A miniature Fashion-MNIST folder: random 28x28 images, labels cycling through the 10 classes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return root


def make_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 3, seed: int = 0) -> Path:
    """root/{train,val}/<class>/ with RGB JPEGs and PNGs (a grey one and an RGBA one among them), assorted sizes."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i == 1 and c == 0:
                    image = image.convert("L")
                if i == 1 and c == 1:
                    image = image.convert("RGBA")
                image.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


# ----------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_read_idx_round_trip_and_corrupt_files(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    write_idx(tmp_path / "a-idx3-ubyte.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), array)
    write_idx(tmp_path / "plain-idx3-ubyte", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-idx3-ubyte"), array)

    raw = gzip.decompress((tmp_path / "a-idx3-ubyte.gz").read_bytes())
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(raw[:-10])  # data shorter than the header says
    with pytest.raises(ValueError, match=r"short\.gz.*corrupt or truncated"):
        read_idx(tmp_path / "short.gz")
    with gzip.open(tmp_path / "magic.gz", "wb") as handle:
        handle.write(b"\x12\x34" + raw[2:])
    with pytest.raises(ValueError, match=r"magic\.gz: not an IDX file"):
        read_idx(tmp_path / "magic.gz")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "a-idx3-ubyte.gz").read_bytes()[:20])  # truncated gzip stream
    with pytest.raises(ValueError, match=r"cut\.gz: cannot read IDX data"):
        read_idx(tmp_path / "cut.gz")


def test_fashion_mnist_pads_to_32_with_background_and_three_channels(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm")
    raw_NHW = read_idx(root / "train-images-idx3-ubyte.gz")
    dataset = FashionMNIST(root, "train")
    assert len(dataset) == 24 and dataset.num_classes == 10
    img, label = dataset[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == 3
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(img[:, border] == -1.0)  # background 0 -> -1
    expected = torch.from_numpy(raw_NHW[3].astype(np.float32)) / 127.5 - 1
    assert torch.equal(img[0, 2:30, 2:30], expected)
    assert img.min() >= -1 and img.max() <= 1

    val = FashionMNIST(root, "val", resolution=48)
    img, label = val[11]
    assert len(val) == 12 and img.shape == (3, 48, 48) and label == 1
    assert img.min() >= -1 and img.max() <= 1

    flipped = FashionMNIST(root, "train", hflip=True)
    torch.manual_seed(0)
    outcomes = {torch.equal(flipped[0][0], dataset[0][0].flip(-1)) for _ in range(20)}
    assert outcomes == {True, False}  # both flipped and unflipped occur


def test_fashion_mnist_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(FashionMNISTNotFoundError) as info:
        FashionMNIST(tmp_path / "nowhere", "train")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message
    assert str(tmp_path / "nowhere") in message
    root = make_fashion_mnist(tmp_path / "partial")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FashionMNISTNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(root, "val")
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'dev'"):
        load_fashion_mnist(root, "dev")


def test_fashion_mnist_labels_must_match_images(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm", n_train=10)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(9, dtype=np.uint8))
    with pytest.raises(ValueError, match="expected 10 labels"):
        load_fashion_mnist(root, "train")


def test_fashion_mnist_debian_package(fashion_mnist_dir):
    train = FashionMNIST(fashion_mnist_dir, "train")
    val = FashionMNIST(fashion_mnist_dir, "val")
    assert len(train) == 60_000 and len(val) == 10_000
    assert np.bincount(train.labels_N, minlength=10).tolist() == [6000] * 10
    img, label = train[0]
    assert img.shape == (3, 32, 32) and 0 <= label < 10 and train.class_names == CLASS_NAMES
    assert img.min() == -1.0 and img.max() <= 1.0


# ----------------------------------------------------------------------------------------------------------------------
# image folders


def test_release_transform_matches_pil_lanczos_and_center_crop():
    pixels = np.random.default_rng(1).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)  # H=40, W=56
    image = Image.fromarray(pixels)
    out = ReleaseImageTransform(32, train=False)(image)
    # The release: shorter side -> round(1.125 * 32) = 36 with Lanczos, then the central 32 x 32.
    assert mid_resolution(32) == 36
    resized = np.asarray(image.resize((50, 36), Image.Resampling.LANCZOS))  # 56 * 36 / 40 = 50.4 -> 50
    top, left = round((36 - 32) / 2), round((50 - 32) / 2)
    expected = torch.from_numpy(resized[top : top + 32, left : left + 32].astype(np.float32)).permute(2, 0, 1)
    assert torch.equal(out, expected / 127.5 - 1)

    train = ReleaseImageTransform(32, train=True)
    torch.manual_seed(0)
    crops = [train(image) for _ in range(8)]
    assert all(c.shape == (3, 32, 32) and c.min() >= -1 and c.max() <= 1 for c in crops)
    assert len({c.sum().item() for c in crops}) > 1  # random crops differ


def test_image_folder_dataset_classes_modes_and_labels(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    train = ImageFolderDataset(root, "train", 32, train=True)
    assert train.class_names == ["cat", "dog", "eel"] and len(train) == 9
    labels = [train[i][1] for i in range(len(train))]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(len(train)):  # grey and RGBA files come out as 3 channels too
        img, _ = train[i]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and -1 <= img.min() and img.max() <= 1
    val = ImageFolderDataset(root, "val", 32, train=False, class_names=train.class_names)
    assert torch.equal(val[4][0], val[4][0])  # center crop: deterministic


def test_image_folder_bad_layouts_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset root .*missing does not exist; expected layout"):
        ImageFolderDataset(tmp_path / "missing", "train", 32, train=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/train does not exist; expected layout: .*/train/<class>"):
        ImageFolderDataset(tmp_path / "empty", "train", 32, train=True)
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/train has no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty", "train", 32, train=True)
    (tmp_path / "empty" / "train" / "cat").mkdir()
    (tmp_path / "empty" / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"empty/train holds no images"):
        ImageFolderDataset(tmp_path / "empty", "train", 32, train=True)

    root = make_image_folder(tmp_path / "imgs")
    (root / "val" / "yak").mkdir()
    with pytest.raises(ValueError, match=r"class folders that .*/train lacks: yak"):
        ImageFolderDataset(root, "val", 32, train=False)
    with pytest.raises(ValueError, match="data.name=folder needs data.root"):
        build_image_dataset(DataConfig(name="folder"), "train", train=True)
    with pytest.raises(ValueError, match="unknown data.name 'imagenet'; allowed: fashion_mnist, folder, tokens"):
        ImageDataModule(DataConfig(name="imagenet"))


def add_corrupt_images(folder: Path) -> list[Path]:
    garbage = folder / "zz_garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg at all" * 10)
    good = next(folder.glob("*.png"))
    truncated = folder / "zz_truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    return [garbage, truncated]


def test_corrupt_images_are_skipped_counted_and_warned_once(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    bad = add_corrupt_images(root / "train" / "dog")
    dataset = ImageFolderDataset(root, "train", 32, train=True)
    assert len(dataset) == 8
    bad_index = [i for i, (path, _) in enumerate(dataset.samples) if Path(path) in bad]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))]
        items += [dataset[i] for i in bad_index]  # known-bad files are not opened or counted again
    skip_warnings = [w for w in caught if "skipping unreadable image" in str(w.message)]
    assert len(skip_warnings) == 1
    assert all(img.shape == (3, 32, 32) for img, _ in items)
    assert dataset.num_skipped == 2 and sorted(dataset.skipped_paths) == sorted(map(str, bad))
    # a bad file is replaced by the next readable one: the first good file of the next class (eel, label 2)
    assert [items[i][1] for i in bad_index] == [2, 2]


def test_corrupt_images_counted_across_dataloader_workers(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    bad = add_corrupt_images(root / "train" / "cat")
    module = ImageDataModule(DataConfig(name="folder", root=str(root), batch_size=4, num_workers=2))
    module.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(module.train_dataloader())
    assert sum(len(labels) for _, labels in batches) == 8
    assert module.num_skipped == 2  # flagged by the workers, read in the main process
    with pytest.warns(UserWarning, match=r"2 unreadable image\(s\) were skipped under .*zz_"):
        module.teardown("fit")
    assert sorted(module.train_base.skipped_paths) == sorted(map(str, bad))


def test_all_images_corrupt_is_an_error(tmp_path):
    folder = tmp_path / "broken" / "train" / "cat"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"junk")
    dataset = ImageFolderDataset(tmp_path / "broken", "train", 32, train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no readable image left in .*broken/train: all 3 files failed"):
            dataset[0]
    dataset = ImageFolderDataset(tmp_path / "broken", "train", 32, train=True, max_new_failures=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="2 unreadable images in a row"):
            dataset[0]


def test_dataset_survives_deepcopy_with_its_skip_flags(tmp_path):
    import copy

    root = make_image_folder(tmp_path / "imgs", per_class=2)
    add_corrupt_images(root / "train" / "eel")
    dataset = ImageFolderDataset(root, "train", 32, train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(dataset)):
            dataset[i]
    clone = copy.deepcopy(dataset)
    assert clone.num_skipped == dataset.num_skipped == 2


# ----------------------------------------------------------------------------------------------------------------------
# DataModule


def test_fixed_subset_is_deterministic_sorted_and_spread():
    a = fixed_subset(1000, 50)
    assert a == fixed_subset(1000, 50) and a == sorted(a) and len(set(a)) == 50
    assert max(a) > 500  # not simply the first 50
    assert fixed_subset(10, None) is None and fixed_subset(10, 10) is None and fixed_subset(10, 99) is None
    with pytest.raises(ValueError, match="must be positive"):
        fixed_subset(10, 0)


def test_image_datamodule_fashion_mnist_batches(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm", n_train=30, n_val=12)
    config = DataConfig(name="fashion_mnist", root=str(root), batch_size=8, num_workers=0, limit_train=20)
    module = ImageDataModule(config)
    assert module.num_classes == 10
    module.setup("fit")
    assert len(module.train_dataset) == 20 and len(module.val_dataset) == 12
    batches = list(module.train_dataloader())
    assert len(batches) == 2  # drop_last: 20 // 8
    img, labels = batches[0]
    assert img.shape == (8, 3, 32, 32) and img.dtype == torch.float32 and labels.dtype == torch.int64
    val = list(module.val_dataloader())
    assert [len(labels) for _, labels in val] == [8, 4]
    assert torch.equal(val[0][1], torch.arange(8) % 10)


def test_image_datamodule_folder_shares_classes_between_splits(tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=("b", "a", "c"), per_class=2)
    (root / "val" / "c").rename(root / "val" / "c_gone")  # val may lack a class ...
    for f in (root / "val" / "c_gone").iterdir():
        f.unlink()
    (root / "val" / "c_gone").rmdir()
    module = ImageDataModule(DataConfig(name="folder", root=str(root), batch_size=2, num_workers=0, resolution=32))
    assert module.class_names == ["a", "b", "c"] and module.num_classes == 3
    module.setup("fit")
    assert sorted({module.val_dataset[i][1] for i in range(len(module.val_dataset))}) == [0, 1]
    img, labels = next(iter(module.train_dataloader()))
    assert img.shape == (2, 3, 32, 32) and labels.dtype == torch.int64


@pytest.mark.slow
def test_ddp_ranks_see_disjoint_parts_of_an_epoch(tmp_path):
    """Two real processes under torchrun (gloo on CPU): Lightning's DistributedSampler splits each epoch."""
    root = make_fashion_mnist(tmp_path / "fm", n_train=32, n_val=8)
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, torch, lightning as L
            from var_lab.config import DataConfig
            from var_lab.data.folders import ImageDataModule

            class Probe(L.LightningModule):
                def __init__(self):
                    super().__init__()
                    self.weight = torch.nn.Parameter(torch.zeros(()))
                    self.seen = []
                def training_step(self, batch, batch_idx):
                    img, labels = batch
                    self.seen += [float(x.sum()) for x in img]
                    return (self.weight * img.mean()).sum()
                def configure_optimizers(self):
                    return torch.optim.SGD(self.parameters(), lr=0.0)

            torch.set_num_threads(1)
            config = DataConfig(name="fashion_mnist", root={str(root)!r}, batch_size=4, num_workers=0)
            probe = Probe()
            trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
            trainer.fit(probe, datamodule=ImageDataModule(config))
            sampler = type(trainer.train_dataloader.sampler).__name__
            with open(os.path.join({str(tmp_path)!r}, f"rank{{trainer.global_rank}}.json"), "w") as f:
                json.dump({{"seen": probe.seen, "sampler": sampler}}, f)
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, str(script)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sampler"] == "DistributedSampler" for r in ranks)
    seen0, seen1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 16
    assert not seen0 & seen1
    everything = {float(FashionMNIST(root, "train")[i][0].sum()) for i in range(32)}
    assert seen0 | seen1 == everything
