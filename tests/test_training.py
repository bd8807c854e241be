"""Training: fast_dev_run of both LightningModules, loss decrease, MLflow contract, resume, compute accounting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient

from var_lab.config import (
    DataConfig,
    FitConfig,
    FitTokenizerConfig,
    OptimConfig,
    TokenizerModelConfig,
    TrackingConfig,
    TrainerConfig,
    VARModelConfig,
)
from var_lab.modules.schedules import release_lr_ratio, release_weight_decay

TINY_TOKENIZER = TokenizerModelConfig(
    vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), patch_nums=(1, 2, 3, 4, 6, 8), using_sa=False
)

CONTRACT_METRICS = {
    "train/loss", "train/L_mean", "train/L_tail", "train/acc_mean", "train/acc_tail",
    "val/L_mean", "val/L_tail", "val/acc_mean", "val/acc_tail",
    "compute/flops", "compute/pflops", "perf/images_per_s", "perf/tokens_per_s", "opt/lr", "opt/grad_norm",
}  # fmt: skip
CONTRACT_PARAMS = {
    "model.depth", "model.width", "model.heads", "model.params_total", "model.params_blocks", "model.params_embed",
    "model.params_adaln", "model.params_head", "model.flops_per_image", "model.patch_nums", "data.name",
    "data.resolution", "train.global_batch", "train.epochs", "train.base_lr", "git.commit",
}  # fmt: skip


def tiny_fit_config(tmp_path, **trainer_overrides) -> FitConfig:
    trainer = TrainerConfig(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        enable_progress_bar=False,
        log_every_n_steps=1,
        **trainer_overrides,
    )
    return FitConfig(
        output_dir=str(tmp_path / "runs" / "d2"),
        tokenizer=TINY_TOKENIZER,
        model=VARModelConfig(depth=2, attn_impl="sdpa"),
        data=DataConfig(batch_size=16, num_workers=0, limit_train=128, limit_val=32),
        optim=OptimConfig(base_lr=4e-3, warmup_epochs=0.1),
        trainer=trainer,
        tracking=TrackingConfig(
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="test", sample_grid_every_n_val=1
        ),
    )


def test_release_schedule_shape():
    ratios = [release_lr_ratio(s, 10, 100, 0.005, 0.1) for s in range(100)]
    assert ratios[0] == pytest.approx(0.005)
    assert max(ratios) == pytest.approx(1.0)
    assert ratios[10] == ratios[12] == 1.0  # held for 5% of the decay phase
    assert ratios[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(ratios[10:], ratios[11:]))
    assert release_weight_decay(0, 100, 0.05, 0.08) == pytest.approx(0.05)
    assert release_weight_decay(99, 100, 0.05, 0.08) == pytest.approx(0.08)


def test_tokenizer_module_fast_dev_run(tmp_path, fashion_mnist_dir):
    from var_lab.data import build_datamodule
    from var_lab.modules.tokenizer import TokenizerModule

    cfg = FitTokenizerConfig(
        output_dir=str(tmp_path / "tok"),
        tokenizer=TINY_TOKENIZER,
        data=DataConfig(batch_size=8, num_workers=0, limit_train=16, limit_val=8),
    )
    module = TokenizerModule(cfg)
    before = module.vqvae.encoder.conv_in.weight.detach().clone()
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=build_datamodule(cfg.data))
    assert not torch.equal(before, module.vqvae.encoder.conv_in.weight)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/psnr" in trainer.callback_metrics


def test_tokenizer_module_with_discriminator_fast_dev_run(tmp_path, fashion_mnist_dir):
    from var_lab.config import TokenizerLossConfig
    from var_lab.data import build_datamodule
    from var_lab.modules.tokenizer import TokenizerModule

    cfg = FitTokenizerConfig(
        output_dir=str(tmp_path / "tok"),
        tokenizer=TINY_TOKENIZER,
        loss=TokenizerLossConfig(disc_weight=0.1),
        data=DataConfig(batch_size=8, num_workers=0, limit_train=16, limit_val=8),
    )
    module = TokenizerModule(cfg)
    d_before = next(module.discriminator.parameters()).detach().clone()
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=build_datamodule(cfg.data))
    assert not torch.equal(d_before, next(module.discriminator.parameters()))
    assert "train/disc_adaptive_weight" in trainer.callback_metrics


def test_perceptual_loss_without_local_weights_is_a_clear_error(tmp_path):
    from var_lab.config import TokenizerLossConfig
    from var_lab.modules.tokenizer import TokenizerModule

    cfg = FitTokenizerConfig(tokenizer=TINY_TOKENIZER, loss=TokenizerLossConfig(perceptual_weight=1.0))
    with pytest.raises(ValueError, match="lpips_weights"):
        TokenizerModule(cfg)
    cfg.loss.lpips_weights = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        TokenizerModule(cfg)


def test_var_module_fast_dev_run(tmp_path, fashion_mnist_dir):
    from var_lab.data import build_datamodule
    from var_lab.modules.tokenizer import build_vqvae
    from var_lab.modules.var import VARModule

    cfg = tiny_fit_config(tmp_path)
    cfg.model.num_classes = 10
    module = VARModule(cfg, vqvae=build_vqvae(TINY_TOKENIZER))
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=build_datamodule(cfg.data))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/L_scale_5" in trainer.callback_metrics


def test_step_validation_spans_epochs_and_the_last_step_is_always_validated(tmp_path, fashion_mnist_dir):
    from var_lab.train import fit

    # 128 images at batch 16: 8 steps per epoch; every 5 steps across epochs; stop at 11 (not a multiple of 5)
    cfg = tiny_fit_config(tmp_path, val_check_interval=5, max_steps=11, limit_val_batches=1)
    cfg.tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="test")
    summary = fit(cfg)
    assert summary["global_step"] == 11
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(summary["mlflow_run_id"], "val/L_mean")
    # after steps 5, 10 and 11; Lightning logs at the 0-based index of the step just taken
    assert sorted({m.step for m in history}) == [4, 9, 10]
    # the lr schedule spans the 11 capped steps, not the 16 of the two epochs: the last step is at the final ratio
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    lrs = sorted(client.get_metric_history(summary["mlflow_run_id"], "opt/lr"), key=lambda m: m.step)
    peak = float(client.get_run(summary["mlflow_run_id"]).data.params["train.peak_lr"])
    assert lrs[-1].value == pytest.approx(peak * cfg.optim.final_lr_ratio, rel=1e-4)


@pytest.mark.slow
def test_fit_learns_logs_the_contract_and_resumes_into_the_same_run(tmp_path, fashion_mnist_dir):
    from var_lab.modules.var import load_var_checkpoint
    from var_lab.train import fit

    cfg = tiny_fit_config(tmp_path, val_check_interval=4, max_steps=12)
    cfg.trainer.max_epochs = 3
    cfg.tracking.system_metrics_every_n_steps = 4
    summary = fit(dataclasses.replace(cfg))
    run_id = summary["mlflow_run_id"]
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    run = client.get_run(run_id)
    assert CONTRACT_METRICS <= set(run.data.metrics)
    assert {f"val/L_scale_{k}" for k in range(6)} <= set(run.data.metrics)
    assert CONTRACT_PARAMS <= set(run.data.params)
    assert run.data.tags["var_lab.kind"] == "var"
    assert int(run.data.params["model.depth"]) == 2
    val = [m.value for m in sorted(client.get_metric_history(run_id, "val/L_mean"), key=lambda m: m.step)]
    assert len(val) >= 3 and val[-1] < val[0] - 0.05, val
    # compute logged == steps x global batch x FLOPs per image
    flops = {m.step: m.value for m in client.get_metric_history(run_id, "compute/flops")}
    per_image = float(run.data.params["model.flops_per_image"])
    global_batch = int(run.data.params["train.global_batch"])
    assert global_batch == 16
    for step, value in flops.items():
        assert value == pytest.approx((step + 1) * global_batch * per_image, rel=1e-6)
    # the sample grids as MLflow images with their step (what the UI's image slider reads)
    grids = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    steps = sorted(int(p.split("+")[2]) for p in grids if p.startswith("images/samples+step+"))
    assert len(steps) >= 3 and steps == sorted(set(steps)), grids
    # the resolved config and the commit, as MLflow users expect them
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
    stored = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert stored == (tmp_path / "runs" / "d2" / "config.yaml").read_text()
    from var_lab.provenance import git_commit

    assert run.data.tags["mlflow.source.git.commit"] == git_commit() == run.data.params["git.commit"]
    # MLflow's system metrics, through the run's logger, at the steps they were sampled
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [3, 7, 11], key
    assert 0 < client.get_metric_history(run_id, "system/system_memory_usage_megabytes")[0].value < 1e7
    # resume: more steps, same MLflow run, no duplicated steps
    cfg2 = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_steps=16))
    summary2 = fit(cfg2)
    assert summary2["mlflow_run_id"] == run_id
    assert summary2["global_step"] == 16
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 15
    assert len(client.search_runs([run.info.experiment_id])) == 1
    vqvae, var, info = load_var_checkpoint(tmp_path / "runs" / "d2" / "checkpoints" / "last.ckpt")
    assert info["mlflow_run_id"] == run_id and info["global_step"] == 16
    assert var.depth == 2 and var.vqvae is vqvae


def test_ema_of_the_weights_is_validated_checkpointed_and_chosen_by_eval_and_sample(tmp_path, fashion_mnist_dir):
    """optim.ema_decay: Lightning's EMAWeightAveraging; the checkpoint holds the average in state_dict and the trained
    weights in current_model_state; load_var_checkpoint / sample / export pick them (the kill test checks resume)."""
    import sys

    import yaml

    sys.path.insert(0, str(Path(__file__).parent))
    from test_reliability import tiny_run_config

    from var_lab.cli import main as cli_main
    from var_lab.config import InvalidValueError, OptimConfig
    from var_lab.models.checkpoints import load_var_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_run_config(tmp_path / "run", uri, "ema")
    config["optim"]["ema_decay"] = 0.9
    config["trainer"].update(max_epochs=1, val_check_interval=None)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["fit", "--config", str(tmp_path / "run.yaml")]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert int(ckpt["averaging_state"]["n_averaged"]) == ckpt["global_step"] == 8
    _, ema, ema_info = load_var_checkpoint(last)
    _, raw, raw_info = load_var_checkpoint(last, weights="raw")
    assert (ema_info["weights"], raw_info["weights"]) == ("ema", "raw")
    assert torch.equal(ema.head.weight, ckpt["state_dict"]["var.head.weight"])
    assert torch.equal(raw.head.weight, ckpt["current_model_state"]["var.head.weight"])
    assert not torch.equal(ema.head.weight, raw.head.weight)
    run = MlflowClient(uri).get_run((tmp_path / "run" / "mlflow_run_id").read_text().strip())
    assert run.data.params["train.ema_decay"] == "0.9"
    for weights in ("ema", "raw"):
        out = tmp_path / f"samples_{weights}"
        argv = ["sample", "--checkpoint", str(last), "--classes", "0", "--per-class", "1", "--out", str(out)]
        assert cli_main([*argv, "--model-weights", weights, "--device", "cpu"]) == 0
        assert (out / "grid.png").is_file()
    # zero-shot editing from the command line: a preset (out-paint the border) and a mask file (in-paint)
    from PIL import Image

    Image.fromarray((torch.rand(28, 28) * 255).to(torch.uint8).numpy()).save(tmp_path / "image.png")
    hole = torch.zeros(32, 32, dtype=torch.uint8)
    hole[8:24, 8:24] = 255
    Image.fromarray(hole.numpy()).save(tmp_path / "hole.png")
    for mask in ("border", str(tmp_path / "hole.png")):
        out = tmp_path / "edits"
        argv = ["sample", "--checkpoint", str(last), "--image", str(tmp_path / "image.png"), "--mask", mask]
        assert cli_main([*argv, "--classes", "0", "1", "--per-class", "2", "--out", str(out), "--device", "cpu"]) == 0
        assert len(list((out / "images").glob("*_edit.png"))) == 4
        with Image.open(out / "grid.png") as grid:  # 2 rows (classes) of image, masked image and 2 edits
            assert grid.size == (4 * 32 + 5 * 2, 2 * 32 + 3 * 2)
    with pytest.raises(InvalidValueError, match=r"ema_decay=1.0 is invalid: it must be a number in \[0, 1\)"):
        OptimConfig(ema_decay=1.0)


def test_lightning_callbacks_and_loggers_by_class_path_beside_mlflow(tmp_path, fashion_mnist_dir, capsys):
    """trainer.callbacks / trainer.logger take any Lightning callback or logger as {class_path, init_args}: here a
    real TensorBoardLogger writes event files next to MLflow, and LearningRateMonitor logs the lr to both."""
    import sys

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sys.path.insert(0, str(Path(__file__).parent))
    from test_reliability import tiny_run_config

    from var_lab.cli import main as cli_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_run_config(tmp_path / "run", uri, "plugins")
    config["trainer"].update(max_epochs=1, val_check_interval=None)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}}
    ]
    config["trainer"]["logger"] = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb")}}
    ]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["fit", "--config", str(tmp_path / "run.yaml")]) == 0
    (events,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss", "val/L_mean", "lr-AdamW/pg1"} <= set(scalars), scalars
    run = MlflowClient(uri).get_run((tmp_path / "run" / "mlflow_run_id").read_text().strip())
    assert "train/loss" in run.data.metrics and "lr-AdamW/pg1" in run.data.metrics  # MLflow still gets everything

    # A class that is not there, not a logger, or init_args its constructor refuses: one line naming the entry,
    # refused by jsonargparse before any folder or MLflow run is made.
    runs_before = len(MlflowClient(uri).search_runs([run.info.experiment_id]))
    for spec, message in (
        ({"class_path": "lightning.pytorch.loggers.NoSuchLogger"}, "trainer.logger[0].class_path="),
        ({"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}, "does not correspond to a subclass of"),
        (
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dri": "x"}},
            "'save_dri' is not accepted",
        ),
    ):
        config["trainer"]["logger"] = [spec]
        config["output_dir"] = str(tmp_path / "bad")
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
        capsys.readouterr()
        assert cli_main(["fit", "--config", str(tmp_path / "bad.yaml")]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()
    assert len(MlflowClient(uri).search_runs([run.info.experiment_id])) == runs_before


class ClipProbe(L.Callback):
    """Records the global gradient norm that reaches the optimiser (after the Trainer's clipping)."""

    seen: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # After optimizer.step and before the next zero_grad: the gradients the step used.
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            ClipProbe.seen.append(float(torch.nn.utils.get_total_norm(grads)))


def test_gradient_clipping_is_the_trainers_and_grad_norm_is_logged_before_it(tmp_path, fashion_mnist_dir):
    """optim.grad_clip becomes the Trainer's gradient_clip_val (so FSDP can own it); opt/grad_norm stays the norm
    before clipping, as the release logs it."""
    import sys

    from var_lab.train import fit, make_trainer

    trainer = make_trainer(TrainerConfig(accelerator="cpu"), tmp_path, None, [], gradient_clip_val=1e-3)
    assert (trainer.gradient_clip_val, trainer.gradient_clip_algorithm) == (1e-3, "norm")
    sys.path.insert(0, str(Path(__file__).parent))
    ClipProbe.seen.clear()
    cfg = tiny_fit_config(tmp_path, max_steps=4, val_check_interval=None, limit_val_batches=1)
    cfg.optim.grad_clip = 1e-3
    cfg.trainer.callbacks = [{"class_path": "test_training.ClipProbe"}]
    summary = fit(cfg)
    assert len(ClipProbe.seen) == 4 and max(ClipProbe.seen) <= 1e-3 * (1 + 1e-4), ClipProbe.seen
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    logged = client.get_metric_history(summary["mlflow_run_id"], "opt/grad_norm")
    assert len(logged) == 4 and min(m.value for m in logged) > 1e-2  # the unclipped norm, far above the threshold
