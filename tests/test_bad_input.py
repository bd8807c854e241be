"""Bad input to `var-lab fit` gets a clear error naming the file, key or value, and loses nothing.

Covered elsewhere (not repeated here):
- a mistyped value (``depth: sixteen``) and an unknown key at the parser level: tests/test_configs.py
- a missing Fashion-MNIST folder, bad image-folder layouts, corrupt images skipped and counted (also across DataLoader
  workers), a folder of only corrupt images: tests/test_data.py
- a token cache of another tokenizer refused by fingerprint at the DataModule level, a missing cache:
  tests/test_tokens.py
- malformed sweep files (file, line, key, allowed values): tests/test_sweeps_schema.py
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FASHION_MNIST_DIR
from mlflow.tracking import MlflowClient
from PIL import Image
from test_reliability import REPO_ROOT, subprocess_env, tiny_run_config, write_config

from var_lab.cli import main as cli_main


def small_config(tmp_path: Path, max_steps: int = 2, **data: object) -> Path:
    """The tiny fit config of test_reliability, ``max_steps`` steps, a checkpoint after each."""
    config = tiny_run_config(tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}", "bad-input")
    config["trainer"].update(max_steps=max_steps, val_check_interval=None, deterministic=False)
    config["data"].update(data)
    return write_config(tmp_path / "run.yaml", config)


def fit(*argv: str) -> int:
    return cli_main(["fit", *argv])


# ------------------------------------------------------------------------------------------------------ config files
def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: 2\n data:\n    name: folder\n")
    with pytest.raises(SystemExit) as exit_info:
        fit("--config", str(bad))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}: malformed YAML at line 3, column 2" in err
    bad.write_text("model: [1, 2\n")
    with pytest.raises(SystemExit):
        fit("--config", str(bad))
    assert f"{bad}: malformed YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fit("--config", str(tmp_path / "missing.yaml"))
    assert f"config file {tmp_path / 'missing.yaml'} does not exist" in capsys.readouterr().err


def test_unknown_key_in_a_run_config_exits_nonzero_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depht: 2\ntrainer:\n  max_steps: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "var_lab.cli", "fit", "--config", str(bad)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert f"{bad}: unknown key 'model.depht'; allowed keys here: " in proc.stderr
    assert "depth" in proc.stderr.split("allowed keys here:")[1]


def test_unknown_top_level_key_and_a_section_that_is_not_a_mapping(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainr:\n  max_steps: 1\n")
    with pytest.raises(SystemExit):
        fit("--config", str(bad))
    assert "unknown key 'trainr'; allowed keys here: " in capsys.readouterr().err
    bad.write_text("model: 3\n")
    with pytest.raises(SystemExit):
        fit("--config", str(bad))
    assert "'model' must be a mapping, got int" in capsys.readouterr().err


def test_option_names_are_checked_but_abbreviations_still_work(capsys):
    from var_lab.config import FitConfig
    from var_lab.train import parse_config

    assert parse_config(FitConfig, ["--model.dept", "3"], "var-lab fit", "").model.depth == 3  # argparse's prefix
    with pytest.raises(SystemExit) as exit_info:
        parse_config(FitConfig, ["--xyzzy", "3"], "var-lab fit", "")
    assert exit_info.value.code == 2
    expected = "var-lab fit: error: unknown option --xyzzy (var-lab fit --help lists every option)\n"
    assert capsys.readouterr().err == expected


def test_one_flag_style_hyphen_or_underscore_means_the_same_option(tmp_path, capsys):
    """Command options are spelt with hyphens and config keys as in YAML; the other separator is an alias."""
    from var_lab.config import FitConfig
    from var_lab.data.tokenize import build_parser as tokenize_parser
    from var_lab.inputs import respell_options
    from var_lab.sweeps.cli import build_parser as sweep_parser
    from var_lab.train import parse_config

    cfg = parse_config(FitConfig, ["--data.batch-size", "3", "--trainer.max_steps=5"], "var-lab fit", "")
    assert (cfg.data.batch_size, cfg.trainer.max_steps) == (3, 5)
    for spelling in ("--tokenizer_ckpt", "--tokenizer-ckpt"):
        args = tokenize_parser().parse_args([spelling, "t.ckpt", "--out", str(tmp_path)])
        assert args.tokenizer_ckpt == "t.ckpt"
    args = sweep_parser().parse_args(["status", "s.yaml", "--output_root", "/x"])
    assert args.output_root == "/x"
    # Nothing else changes: known names, values, unknown names and what follows "--".
    # tokenize: a value of the wrong type or a missing option is one line, not the usage first
    from var_lab.data.tokenize import tokenize_main

    capsys.readouterr()
    assert tokenize_main(["--tokenizer-ckpt", "t", "--out", str(tmp_path / "o"), "--data.batch-size", "abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.batch_size" in err and "abc" in err, err
    assert tokenize_main(["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer" in err, err
    argv = ["--a_b", "--data.x-y=1_2", "--zz-top", "--", "--a_b"]
    assert respell_options(argv, {"--a-b", "--data.x_y"}) == ["--a-b", "--data.x_y=1_2", "--zz-top", "--", "--a_b"]


@pytest.mark.parametrize("depth", ["0", "-2"])
def test_invalid_depth_is_refused_before_anything_is_loaded(tmp_path, capsys, depth):
    assert fit("--config", str(small_config(tmp_path)), "--model.depth", depth) == 2
    err = capsys.readouterr().err
    assert f"var-lab fit: error: model.depth={depth} is invalid: the depth must be an integer >= 1" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()  # nothing written


@pytest.mark.parametrize(
    "patch_nums, needle",
    [
        (
            "[1,2,2,4,8]",
            "tokenizer.patch_nums=[1, 2, 2, 4, 8] is invalid: it must list at least two strictly increasing",
        ),
        ("[1,3,2,8]", "tokenizer.patch_nums=[1, 3, 2, 8] is invalid"),
        ("[8]", "tokenizer.patch_nums=[8] is invalid"),
        ("[1,2,3,4,6]", "tokenizer.patch_nums ends at 6, but 32px images (data.resolution) give a 8 x 8 latent"),
    ],
)
def test_invalid_patch_schedule_is_refused(tmp_path, capsys, patch_nums, needle):
    assert fit("--config", str(small_config(tmp_path)), "--tokenizer.patch_nums", patch_nums) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------------------- data
def write_image_folder(root: Path, per_class: int = 8, corrupt: int = 0) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for i in range(corrupt):
        (root / "train" / "cat" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_missing_or_empty_dataset_folder_is_named(tmp_path, capsys):
    config = str(small_config(tmp_path))
    missing = tmp_path / "nowhere"
    assert fit("--config", config, "--data.name", "folder", "--data.root", str(missing)) == 1
    err = capsys.readouterr().err
    assert f"dataset root {missing} does not exist" in err or f"image folder {missing / 'train'} does not exist" in err
    assert "expected layout" in err

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    assert fit("--config", config, "--data.name", "folder", "--data.root", str(empty)) == 1
    assert f"image folder {empty / 'train'} has no class sub-folders" in capsys.readouterr().err

    (empty / "train" / "cat").mkdir()
    (empty / "val" / "cat").mkdir(parents=True)
    assert fit("--config", config, "--data.name", "folder", "--data.root", str(empty)) == 1
    assert f"image folder {empty / 'train'} holds no images" in capsys.readouterr().err
    assert "holds no images" in (tmp_path / "run" / "FAILED").read_text()


@pytest.mark.slow
def test_corrupt_images_are_skipped_and_counted_not_fatal(tmp_path, capsys):
    # 16 readable images and 2 corrupt ones, batches of 3: one epoch visits every file.
    root = write_image_folder(tmp_path / "images", per_class=8, corrupt=2)
    config = small_config(tmp_path, max_steps=6, name="folder", root=str(root), batch_size=3, limit_train=None)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*broken\d\.png"):
        assert fit("--config", str(config), "--trainer.max_epochs", "1") == 0
    done = json.loads((tmp_path / "run" / "DONE").read_text())
    assert done["global_step"] == 6 and done["skipped_images"] == 2


def test_token_cache_of_another_tokenizer_is_refused_by_fingerprint(tmp_path, capsys, fashion_mnist_dir):
    from var_lab.config import TokenizerModelConfig
    from var_lab.data.tokenize import tokenize_main
    from var_lab.data.tokens import tokenizer_fingerprint
    from var_lab.modules.tokenizer import build_vqvae

    config = yaml.safe_load(small_config(tmp_path).read_text())
    flags = [f"--tokenizer.{key}={json.dumps(value)}" for key, value in config["tokenizer"].items()]
    tokenizers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        vqvae = build_vqvae(TokenizerModelConfig(**config["tokenizer"]))
        torch.save(vqvae.state_dict(), tmp_path / f"tokenizer{seed}.pth")
        tokenizers.append(vqvae)
    cache = tmp_path / "tokens"
    for split in ("train", "val"):
        argv = ["--tokenizer-ckpt", str(tmp_path / "tokenizer0.pth"), "--out", str(cache), "--split", split,
                "--data.limit_train", "16", "--data.limit_val", "8", "--data.num_workers", "0", "--progress", "false",
                *flags]  # fmt: skip
        assert tokenize_main(argv) == 0
    capsys.readouterr()
    argv = ["--config", str(tmp_path / "run.yaml"), "--data.name", "tokens", "--data.token_dir", str(cache),
            "--tokenizer_ckpt", str(tmp_path / "tokenizer1.pth")]  # fmt: skip
    assert fit(*argv) == 1
    err = capsys.readouterr().err
    assert "TokenizerMismatchError" in err and str(cache / "train") in err
    assert tokenizer_fingerprint(tokenizers[0]) in err and tokenizer_fingerprint(tokenizers[1]) in err
    assert fit(*argv[:-1], str(tmp_path / "tokenizer0.pth"), "--trainer.max_steps", "1") == 0  # the right one trains


# ------------------------------------------------------------------------------------------------------ checkpoints
def test_resuming_a_checkpoint_of_another_depth_names_both_depths(tmp_path, capsys, fashion_mnist_dir):
    config = str(small_config(tmp_path, max_steps=1))
    assert fit("--config", config) == 0
    capsys.readouterr()
    assert fit("--config", config, "--model.depth", "2", "--trainer.max_steps", "2") == 1
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "last.ckpt" in err
    assert "model.depth=1 in the checkpoint but 2 in this run" in err
    assert "Error(s) in loading state_dict" not in err
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VAR_LAB_FAULT_NAN_AT_STEP", "3")  # test hook read by VARModule
    assert fit("--config", str(small_config(tmp_path, max_steps=6))) == 1
    failed = (tmp_path / "run" / "FAILED").read_text()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert failed.startswith("FloatingPointError: non-finite training loss (nan) at step 3;")
    assert f"the last good checkpoint {last} is kept" in failed
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items() if k != "var.attn_bias_for_masking")
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [0, 1, 2]
    # Fixed (here: the hook removed), the same command resumes from that checkpoint into the same run.
    monkeypatch.delenv("VAR_LAB_FAULT_NAN_AT_STEP")
    assert fit("--config", str(tmp_path / "run.yaml"), "--trainer.max_steps", "6") == 0
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(6))


def _limit_file_size(limit_bytes: int):
    def apply() -> None:  # in the child, before exec: writes past the limit fail with EFBIG instead of SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


@pytest.mark.slow
def test_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_where(tmp_path, fashion_mnist_dir):
    config = small_config(tmp_path, max_steps=2)
    assert fit("--config", str(config)) == 0
    ckpt_dir = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpt_dir.glob("*.ckpt")}
    assert min(len(b) for b in before.values()) > 3_000_000 > (tmp_path / "mlflow.db").stat().st_size
    # A real write error from the kernel: files may not grow past 3 MB (RLIMIT_FSIZE), checkpoints need ~5 MB.
    proc = subprocess.run(
        [sys.executable, "-m", "var_lab.cli", "fit", "--config", str(config), "--trainer.max_steps", "4"],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit_file_size(3_000_000),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the disk is full" in proc.stderr and f"cannot write checkpoint {ckpt_dir}" in proc.stderr
    failed = (tmp_path / "run" / "FAILED").read_text()
    assert failed.startswith("CheckpointDiskFullError") and "the disk is full" in failed and str(ckpt_dir) in failed
    assert "The previous checkpoints in" in failed
    # Nothing lost: the checkpoints are untouched, no half-written file is left, and with space back it resumes.
    assert {p.name: p.read_bytes() for p in ckpt_dir.glob("*.ckpt")} == before
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".")]
    assert fit("--config", str(config), "--trainer.max_steps", "4") == 0
    assert json.loads((tmp_path / "run" / "DONE").read_text())["global_step"] == 4


# ------------------------------------------------------------------------------------- bad input through the real CLI
TEXT_FILE = "not a checkpoint\n"


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file and folder under ``root`` with its bytes (folders: b"<dir>")."""
    return {str(p.relative_to(root)): b"<dir>" if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What the bad commands must leave alone: a finished tiny VAR run, its tokenizer, a token cache (and a copy with a
    truncated shard), a text file posing as a checkpoint, an empty YAML file and the run's config."""
    from var_lab.config import TokenizerModelConfig
    from var_lab.modules.tokenizer import build_vqvae

    if not (FASHION_MNIST_DIR.is_dir() and any(FASHION_MNIST_DIR.iterdir())):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("world")
    config = tiny_run_config(root / "run", "none", "bad-input")
    config["trainer"].update(max_steps=1, val_check_interval=None, deterministic=False)
    torch.manual_seed(0)
    torch.save(build_vqvae(TokenizerModelConfig(**config["tokenizer"])).state_dict(), root / "tokenizer.pth")
    config["tokenizer_ckpt"] = str(root / "tokenizer.pth")
    write_config(root / "run.yaml", config)
    assert cli_main(["fit", "--config", str(root / "run.yaml")]) == 0
    flags = [f"--tokenizer.{key}={json.dumps(value)}" for key, value in config["tokenizer"].items()]
    argv = ["--tokenizer-ckpt", str(root / "tokenizer.pth"), "--out", str(root / "tokens"), "--shard-size", "16",
            "--data.limit_train", "32", "--data.limit_val", "8", "--data.num_workers", "0", "--progress", "false",
            *flags]  # fmt: skip
    assert cli_main(["tokenize", *argv]) == 0
    shutil.copytree(root / "tokens", root / "tokens_truncated")
    shard = root / "tokens_truncated" / "train" / "shard_00001.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (root / "text.ckpt").write_text(TEXT_FILE)
    (root / "empty.yaml").write_text("")
    return {"root": root, "flags": flags}


def _case(world: dict, name: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    """(argv after ``var-lab``, the texts the last line of stderr must hold) of one bad-input case."""
    root = world["root"]
    text, run_yaml, ckpt = root / "text.ckpt", str(root / "run.yaml"), str(root / "run" / "checkpoints" / "last.ckpt")
    fit_existing = ["fit", "--config", run_yaml]  # the finished run's own folder: nothing there may change
    under_file = str(text / "sub")  # a path whose parent is a regular file
    cases = {
        "sample-missing-checkpoint": (
            ["sample", "--checkpoint", "MISSING"],
            ["var-lab sample: error: --checkpoint MISSING does not exist", "written by `var-lab fit`"],
        ),
        "sample-text-checkpoint": (
            ["sample", "--checkpoint", str(text)],
            [f"--checkpoint {text} is not a checkpoint: a text file", "written by `var-lab fit`"],
        ),
        "sample-image-without-mask": (
            ["sample", "--checkpoint", ckpt, "--image", str(text)],
            ["var-lab sample: error: --image and --mask go together"],
        ),
        "sample-image-not-an-image": (
            ["sample", "--checkpoint", ckpt, "--image", str(text), "--mask", "center"],
            [f"--image {text}: not a readable image", "give a PNG or JPEG file"],
        ),
        "eval-text-checkpoint": (
            ["eval", "--checkpoint", str(text), "--no-mlflow"],
            [f"var-lab eval: error: --checkpoint {text} is not a checkpoint", "RUN/checkpoints/last.ckpt"],
        ),
        "fit-text-tokenizer": (
            [*fit_existing, "--tokenizer_ckpt", str(text)],
            [f"var-lab fit: error: tokenizer_ckpt {text} is not a checkpoint", "`var-lab fit-tokenizer`"],
        ),
        "fit-text-resume": (
            [*fit_existing, "--resume", str(text)],
            [f"resume checkpoint {text} is not a checkpoint", "--resume auto", "never"],
        ),
        "fit-tokenizer-text-resume": (
            ["fit-tokenizer", "--resume", str(text), "--output_dir", str(root / "tokenizer_run")],
            [f"var-lab fit-tokenizer: error: resume checkpoint {text} is not a checkpoint", "--resume auto"],
        ),
        "tokenize-text-tokenizer": (
            ["tokenize", "--tokenizer-ckpt", str(text), "--out", str(root / "tokens"), *world["flags"]],
            [f"var-lab tokenize: error: --tokenizer-ckpt {text} is not a checkpoint", "`var-lab fit-tokenizer`"],
        ),
        "config-is-a-folder": (
            ["fit", "--config", str(root)],
            [f"var-lab fit: error: config file {root} is a folder, not a YAML file", "configs/*.yaml"],
        ),
        "config-is-empty": (
            ["fit", "--config", str(root / "empty.yaml")],
            [f"config file {root / 'empty.yaml'} is empty", "leave --config out"],
        ),
        "eval-zero-samples": (
            ["eval", "--checkpoint", ckpt, "--num-samples", "0", "--per-class", "1", "--no-mlflow"],
            ["var-lab eval: error: argument --num-samples: 0 is not allowed; give a whole number >= 1"],
        ),
        "eval-negative-samples": (
            ["eval", "--checkpoint", ckpt, "--num-samples", "-3", "--per-class", "1", "--no-mlflow"],
            ["var-lab eval: error: argument --num-samples: -3 is not allowed; give a whole number >= 1"],
        ),
        "fit-output-under-a-file": (
            [*fit_existing, "--output_dir", under_file],
            [f"output_dir {under_file} cannot be created: {text} is a file", "pass another output_dir"],
        ),
        "fit-output-unwritable": (  # root may write anywhere, but nothing can be created under /proc
            [*fit_existing, "--output_dir", "/proc/var-lab-test/out"],
            ["output_dir /proc/var-lab-test/out is not writable", "pass another output_dir"],
        ),
        "fit-output-is-a-file": (
            [*fit_existing, "--output_dir", str(text)],
            [f"output_dir {text} is a file, not a folder", "pass another output_dir"],
        ),
        "tokenize-output-under-a-file": (
            ["tokenize", "--tokenizer-ckpt", str(root / "tokenizer.pth"), "--out", under_file, *world["flags"]],
            [f"var-lab tokenize: error: --out {under_file} cannot be created: {text} is a file", "another --out"],
        ),
        "analyze-output-is-a-file": (
            ["analyze", "--experiment", "bad-input", "--out", str(text)],
            [f"var-lab analyze: error: --out {text} is a file, not a folder", "pass another --out"],
        ),
        "analyze-output-under-a-file": (
            ["analyze", "--experiment", "bad-input", "--out", under_file],
            [f"var-lab analyze: error: --out {under_file} cannot be created: {text} is a file"],
        ),
        "sweep-output-root-under-a-file": (
            ["sweep", "launch", str(REPO_ROOT / "sweeps" / "demo_cpu.yaml"), "--output-root", under_file],
            [f"var-lab sweep: error: sweep folder {under_file}/demo_cpu cannot be created", "--output-root"],
        ),
        "fit-negative-depth": (  # in an empty working directory with the default output_dir (outputs/var)
            ["fit", "--model.depth", "-3"],
            ["var-lab fit: error: model.depth=-3 is invalid: the depth must be an integer >= 1"],
        ),
        "fit-mistyped-option": (
            ["fit", "--model.depht", "3"],
            ["var-lab fit: error: unknown option --model.depht; did you mean --model.depth?", "--help"],
        ),
        "fit-truncated-token-shard": (
            [
                *fit_existing,
                "--data.name",
                "tokens",
                "--data.token_dir",
                str(root / "tokens_truncated"),
                "--output_dir",
                str(tmp_path / "tokens_run"),
            ],  # fmt: skip
            [
                f"token shard {root / 'tokens_truncated' / 'train' / 'shard_00001.pt'} is truncated or corrupt",
                f"re-encode it with `var-lab tokenize --tokenizer-ckpt {root / 'tokenizer.pth'} --out "
                f"{root / 'tokens_truncated'} --split train",
            ],  # fmt: skip
        ),
    }
    return cases[name]


BAD_INPUT_CASES = [
    "sample-missing-checkpoint", "sample-text-checkpoint", "sample-image-without-mask", "sample-image-not-an-image",
    "eval-text-checkpoint", "fit-text-tokenizer",
    "fit-text-resume", "fit-tokenizer-text-resume", "tokenize-text-tokenizer", "config-is-a-folder",
    "config-is-empty", "eval-zero-samples", "eval-negative-samples", "fit-output-under-a-file",
    "fit-output-unwritable", "fit-output-is-a-file", "tokenize-output-under-a-file", "analyze-output-is-a-file",
    "analyze-output-under-a-file", "sweep-output-root-under-a-file", "fit-negative-depth", "fit-mistyped-option",
    "fit-truncated-token-shard",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_INPUT_CASES)
def test_bad_input_through_the_real_cli_is_one_line_and_touches_nothing(world, name, tmp_path, request):
    argv, needles = _case(world, name, tmp_path)
    if name == "eval-text-checkpoint":  # eval looks for the FID weights first: give it some
        argv += ["--weights", str(request.getfixturevalue("converted_weights"))]
    before = _snapshot(world["root"])
    cwd = tmp_path / "cwd"  # an empty working directory: relative defaults (outputs/var, samples) land here
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "var_lab.cli", *argv],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, f"{needle!r} not in the last line {last!r}"
    assert _snapshot(world["root"]) == before  # nothing already written is touched, nothing is added
    assert not list(cwd.iterdir())
    if name == "fit-mistyped-option":  # the error comes first, not after the usage
        assert proc.stderr.strip().splitlines()[0] == last
    if name == "fit-truncated-token-shard":  # refused at start-up, before any training step
        assert not (tmp_path / "tokens_run" / "checkpoints").exists()
