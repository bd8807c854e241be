"""The token cache: `var-lab tokenize` equals on-the-fly tokenisation, resumes, and refuses a foreign tokenizer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from var_lab.cli import main as cli_main
from var_lab.config import DataConfig, TokenizerModelConfig
from var_lab.data import build_datamodule
from var_lab.data.folders import ImageDataModule
from var_lab.data.tokenize import tokenize_dataset, tokenize_main
from var_lab.data.tokens import (
    TokenCacheError,
    TokenDataModule,
    TokenizerMismatchError,
    TokenShardDataset,
    load_shard,
    merge_scales,
    split_scales,
    tokenizer_fingerprint,
)
from var_lab.modules.tokenizer import build_vqvae

REPO_ROOT = Path(__file__).resolve().parents[1]
PATCH_NUMS = (1, 2, 3, 4, 6, 8)
TINY = TokenizerModelConfig(
    vocab_size=64,
    z_channels=8,
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    patch_nums=PATCH_NUMS,
    using_sa=False,
    using_mid_sa=False,
)
TINY_FLAGS = [
    "--tokenizer.vocab_size=64",
    "--tokenizer.z_channels=8",
    "--tokenizer.ch=32",
    "--tokenizer.ch_mult=[1,2,2]",
    "--tokenizer.num_res_blocks=1",
    "--tokenizer.patch_nums=[1,2,3,4,6,8]",
    "--tokenizer.using_sa=false",
    "--tokenizer.using_mid_sa=false",
]


def tiny_vqvae(seed: int = 0):
    torch.manual_seed(seed)
    return build_vqvae(TINY).eval().requires_grad_(False)


@pytest.fixture
def tokenizer_pth(tmp_path):
    """A random tiny tokenizer saved as a plain state dict (the release's format)."""
    vqvae = tiny_vqvae()
    path = tmp_path / "tokenizer.pth"
    torch.save(vqvae.state_dict(), path)
    return vqvae, path


def run_tokenize(fm_root, tokenizer_path, out, *extra: str) -> int:
    argv = [
        "--tokenizer-ckpt", str(tokenizer_path), "--out", str(out), "--shard-size", "16", "--batch-size", "7",
        "--data.name", "fashion_mnist", "--data.root", str(fm_root), "--data.limit_train", "40",
        "--data.limit_val", "20", "--data.num_workers", "0", "--progress", "false", *TINY_FLAGS, *extra,
    ]  # fmt: skip
    return tokenize_main(argv)


def cache_contents(out: Path, split: str) -> dict[str, torch.Tensor]:
    return {p.name: load_shard(p, mmap=False)["idx"].clone() for p in sorted((out / split).glob("shard_*.pt"))}


# ----------------------------------------------------------------------------------------------------------------------


def test_split_and_merge_scales_round_trip():
    L = sum(p * p for p in PATCH_NUMS)
    idx_BL = torch.randint(0, 64, (5, L))
    parts = split_scales(idx_BL, PATCH_NUMS)
    assert [tuple(t.shape) for t in parts] == [(5, p * p) for p in PATCH_NUMS]
    assert torch.equal(parts[1], idx_BL[:, 1:5]) and torch.equal(parts[-1], idx_BL[:, L - 64 :])
    assert torch.equal(merge_scales(parts), idx_BL)
    with pytest.raises(ValueError, match=r"shape \(5, 129\); patch_nums \(1, 2, 3, 4, 6, 8\) need \(B, 130\)"):
        split_scales(idx_BL[:, :-1], PATCH_NUMS)


def test_fingerprint_tracks_weights_and_schedule_not_usage_statistics():
    a, b = tiny_vqvae(0), tiny_vqvae(0)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.quantize.ema_vocab_hit_SV.add_(3.0)  # codebook-usage statistics do not change the tokens
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    with torch.no_grad():
        b.quantize.embedding.weight[0, 0] += 1e-6
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(tiny_vqvae(1))
    torch.manual_seed(0)
    other_schedule = build_vqvae(TokenizerModelConfig(**{**TINY.__dict__, "patch_nums": (1, 2, 4, 8)}))
    state = {k: v for k, v in a.state_dict().items() if "ema_vocab_hit" not in k}
    other_schedule.load_state_dict(state, strict=False)
    assert tokenizer_fingerprint(other_schedule) != tokenizer_fingerprint(a)


def test_token_cache_equals_on_the_fly_tokenisation(fashion_mnist_dir, tokenizer_pth, tmp_path):
    vqvae, path = tokenizer_pth
    out = tmp_path / "cache"
    assert run_tokenize(fashion_mnist_dir, path, out) == 0

    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["fingerprint"] == tokenizer_fingerprint(vqvae)
    assert manifest["patch_nums"] == list(PATCH_NUMS) and manifest["vocab_size"] == 64
    assert manifest["count"] == 40 and manifest["dataset"] == "fashion_mnist" and manifest["resolution"] == 32
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 8] and manifest["dtype"] == "int16"
    shard = load_shard(out / "train" / "shard_00000.pt")
    assert shard["idx"].dtype == torch.int16 and shard["idx"].shape == (16, 130)
    assert shard["labels"].dtype == torch.int64

    config = DataConfig(name="tokens", token_dir=str(out), batch_size=8, num_workers=0)
    tokens = build_datamodule(config, tokenizer=vqvae)
    assert isinstance(tokens, TokenDataModule) and tokens.num_classes == 10 and tokens.patch_nums == PATCH_NUMS
    tokens.setup("fit")
    images = ImageDataModule(
        DataConfig(name="fashion_mnist", root=str(fashion_mnist_dir), limit_train=40, limit_val=20, num_workers=0)
    )
    images.setup("fit")
    for split in ("train", "val"):
        token_set = tokens.train_dataset if split == "train" else tokens.val_dataset
        image_set = images.train_dataset if split == "train" else images.val_dataset
        assert len(token_set) == len(image_set) == (40 if split == "train" else 20)
        img_B3HW = torch.stack([image_set[i][0] for i in range(len(image_set))])
        labels_B = torch.tensor([image_set[i][1] for i in range(len(image_set))])
        expected_BL = merge_scales(vqvae.img_to_idx(img_B3HW))  # on the fly, all images in one batch
        cached_BL = torch.stack([token_set[i][0] for i in range(len(token_set))])
        cached_labels = torch.tensor([token_set[i][1] for i in range(len(token_set))])
        assert torch.equal(cached_BL, expected_BL), f"{split}: cached tokens differ from on-the-fly tokens"
        assert torch.equal(cached_labels, labels_B)

    idx_BL, labels_B = next(iter(tokens.val_dataloader()))
    assert idx_BL.dtype == torch.int64 and idx_BL.shape == (8, 130) and labels_B.dtype == torch.int64
    x_BLCv = vqvae.idx_to_var_input(split_scales(idx_BL, tokens.patch_nums))
    assert x_BLCv.shape == (8, 129, 8)


def test_resume_skips_finished_shards_and_repairs_broken_ones(fashion_mnist_dir, tokenizer_pth, tmp_path):
    _, path = tokenizer_pth
    out = tmp_path / "cache"
    assert run_tokenize(fashion_mnist_dir, path, out, "--split", "train") == 0
    before = cache_contents(out, "train")
    stats = {p.name: os.stat(p) for p in (out / "train").glob("shard_*.pt")}

    # An interrupted run: one shard never written, a temporary file left behind, one shard truncated, no manifest.
    (out / "train" / "manifest.json").unlink()
    (out / "train" / "shard_00001.pt").unlink()
    (out / "train" / "shard_00001.pt.tmp12345").write_bytes(b"partial")
    data = (out / "train" / "shard_00002.pt").read_bytes()
    (out / "train" / "shard_00002.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenCacheError, match=r"train is incomplete .*var-lab tokenize"):
        TokenDataModule(DataConfig(name="tokens", token_dir=str(out)))

    with pytest.warns(UserWarning, match=r"re-encoding .*shard_00002.pt: .*unreadable token shard"):
        assert run_tokenize(fashion_mnist_dir, path, out, "--split", "train") == 0
    after = {p.name: os.stat(p) for p in (out / "train").glob("shard_*.pt")}
    assert (after["shard_00000.pt"].st_ino, after["shard_00000.pt"].st_mtime_ns) == (
        stats["shard_00000.pt"].st_ino,
        stats["shard_00000.pt"].st_mtime_ns,
    )  # finished shard untouched
    assert after["shard_00002.pt"].st_ino != stats["shard_00002.pt"].st_ino  # repaired (written anew, renamed)
    assert not list((out / "train").glob("*.tmp*"))
    assert (out / "train" / "manifest.json").is_file()
    again = cache_contents(out, "train")
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before)

    # A complete cache: a third run encodes nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard_*.pt")}
    assert run_tokenize(fashion_mnist_dir, path, out, "--split", "train") == 0
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard_*.pt")}


def test_fingerprint_mismatch_is_refused(fashion_mnist_dir, tokenizer_pth, tmp_path, capsys):
    vqvae, path = tokenizer_pth
    out = tmp_path / "cache"
    small = ("--split", "train", "--data.limit_train", "16")
    assert run_tokenize(fashion_mnist_dir, path, out, *small) == 0
    config = DataConfig(name="tokens", token_dir=str(out), num_workers=0)
    other = tiny_vqvae(seed=1)
    with pytest.raises(TokenizerMismatchError) as info:
        TokenDataModule(config, tokenizer=other)
    message = str(info.value)
    assert tokenizer_fingerprint(vqvae) in message and tokenizer_fingerprint(other) in message
    assert str(out) in message
    with pytest.raises(TokenizerMismatchError, match="fingerprint 0123456789abcdef"):
        TokenDataModule(config, expected_fingerprint="0123456789abcdef")
    TokenDataModule(config, expected_fingerprint=tokenizer_fingerprint(vqvae))  # the right one passes

    # Tokenizing into the same folder with another tokenizer stops (exit 1) unless --overwrite.
    other_path = tmp_path / "other.pth"
    torch.save(other.state_dict(), other_path)
    capsys.readouterr()
    assert run_tokenize(fashion_mnist_dir, other_path, out, *small) == 1
    assert "already holds a token cache of something else (fingerprint" in capsys.readouterr().err
    assert run_tokenize(fashion_mnist_dir, other_path, out, *small, "--overwrite", "true") == 0
    TokenDataModule(config, tokenizer=other)


def test_missing_cache_and_wrong_architecture_errors(fashion_mnist_dir, tokenizer_pth, tmp_path, capsys):
    with pytest.raises(TokenCacheError, match=r"token cache .*nowhere/train does not exist; write it with"):
        TokenDataModule(DataConfig(name="tokens", token_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="needs data.token_dir"):
        TokenDataModule(DataConfig(name="tokens"))
    _, path = tokenizer_pth
    # Without the --tokenizer.* flags the release architecture is assumed: the state dict does not fit it.
    argv = ["--tokenizer-ckpt", str(path), "--out", str(tmp_path / "x"), "--data.root", str(fashion_mnist_dir)]
    assert cli_main(["tokenize", *argv]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "pass the --tokenizer.* options" in err
    # A resolution the tokenizer cannot encode.
    assert run_tokenize(fashion_mnist_dir, path, tmp_path / "y", "--data.resolution", "64") == 1
    assert "set --data.resolution 32" in capsys.readouterr().err


def test_augment_copies_hold_center_and_random_encodings(fashion_mnist_dir, tokenizer_pth, tmp_path):
    vqvae, path = tokenizer_pth
    out = tmp_path / "cache"
    flags = ("--split", "train", "--augment-copies", "2", "--data.hflip", "true", "--data.limit_train", "12")
    assert run_tokenize(fashion_mnist_dir, path, out, *flags) == 0
    shard = load_shard(out / "train" / "shard_00000.pt")
    assert shard["idx"].shape == (12, 2, 130)
    images = ImageDataModule(DataConfig(name="fashion_mnist", root=str(fashion_mnist_dir), limit_train=12))
    images.setup("fit")
    img_B3HW = torch.stack([images.train_base[int(i)][0] for i in shard["source_indices"]])
    plain_BL = merge_scales(vqvae.img_to_idx(img_B3HW))
    flipped_BL = merge_scales(vqvae.img_to_idx(img_B3HW.flip(-1)))
    assert torch.equal(shard["idx"][:, 0].long(), plain_BL)  # copy 0: no augmentation
    copy1 = shard["idx"][:, 1].long()
    is_flip = (copy1 == flipped_BL).all(1)
    assert ((copy1 == plain_BL).all(1) | is_flip).all() and is_flip.any()
    dataset = TokenShardDataset(out, "train")
    picks = {tuple(dataset[0][0].tolist()) for _ in range(30)}
    assert picks <= {tuple(plain_BL[0].tolist()), tuple(copy1[0].tolist())}


def test_tokenize_from_a_fit_tokenizer_lightning_checkpoint(fashion_mnist_dir, tmp_path):
    import lightning as L

    from var_lab.config import FitTokenizerConfig
    from var_lab.modules.tokenizer import TokenizerModule

    torch.manual_seed(0)
    module = TokenizerModule(FitTokenizerConfig(tokenizer=TINY))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "tokenizer.ckpt")
    out = tmp_path / "cache"
    argv = [
        "tokenize", "--tokenizer-ckpt", str(tmp_path / "tokenizer.ckpt"), "--out", str(out), "--split", "val",
        "--data.root", str(fashion_mnist_dir), "--data.limit_val", "8", "--data.num_workers", "0",
        "--progress", "false",
    ]  # fmt: skip
    assert cli_main(argv) == 0  # no --tokenizer.* flags: the checkpoint carries its architecture
    manifest = json.loads((out / "val" / "manifest.json").read_text())
    assert manifest["fingerprint"] == tokenizer_fingerprint(module.vqvae) and manifest["count"] == 8
    assert manifest["tokenizer_ckpt"] == str((tmp_path / "tokenizer.ckpt").resolve())


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_tokenize_image_folder_with_a_corrupt_file(tmp_path):
    from test_data import add_corrupt_images, make_image_folder

    root = make_image_folder(tmp_path / "imgs", per_class=2)
    add_corrupt_images(root / "train" / "cat")
    vqvae = tiny_vqvae()
    config = DataConfig(name="folder", root=str(root), num_workers=0, batch_size=4)
    with pytest.warns(UserWarning, match=r"train: 2 unreadable image\(s\) under .*imgs were skipped"):
        manifests = tokenize_dataset(vqvae, config, tmp_path / "cache", shard_size=5, progress=False)
    assert manifests["train"]["count"] == 8 and manifests["val"]["count"] == 6
    assert manifests["train"]["class_names"] == ["cat", "dog", "eel"] == manifests["val"]["class_names"]
    module = TokenDataModule(DataConfig(name="tokens", token_dir=str(tmp_path / "cache")), tokenizer=vqvae)
    assert module.num_classes == 3 and module.dataset_name == "folder"


@pytest.mark.slow
def test_tokenize_under_torchrun_equals_single_process(fashion_mnist_dir, tokenizer_pth, tmp_path):
    _, path = tokenizer_pth
    single = tmp_path / "single"
    assert run_tokenize(fashion_mnist_dir, path, single) == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
        "-m", "var_lab.cli", "tokenize", "--tokenizer-ckpt", str(path), "--out", str(tmp_path / "multi"),
        "--shard-size", "16", "--data.root", str(fashion_mnist_dir), "--data.limit_train", "40",
        "--data.limit_val", "20", "--data.num_workers", "0", "--progress", "false", *TINY_FLAGS,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("train: 40 images") == 1  # only rank 0 reports
    for split in ("train", "val"):
        a, b = cache_contents(single, split), cache_contents(tmp_path / "multi", split)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ma = json.loads((single / split / "manifest.json").read_text())
        mb = json.loads((tmp_path / "multi" / split / "manifest.json").read_text())
        assert {k: v for k, v in ma.items() if k != "created"} == {k: v for k, v in mb.items() if k != "created"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the merged cache passes the fingerprint check silently
        TokenDataModule(DataConfig(name="tokens", token_dir=str(tmp_path / "multi")), tokenizer=tiny_vqvae())
