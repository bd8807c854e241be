"""The large-model path on CPUs: ``trainer.strategy: fsdp2`` (FSDP2 ``fully_shard`` per VAR block through Lightning's
ModelParallelStrategy) in two real processes over gloo trains the same weights as DDP, writes one full checkpoint that
loads on the usual path and exports to the released format, and resumes from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).parent))
from test_reliability import REPO_ROOT, subprocess_env, tiny_run_config, write_config  # noqa: E402


def two_process_fit(tmp_path: Path, name: str, strategy: str, max_epochs: int, resume: str = "auto") -> Path:
    config = tiny_run_config(tmp_path / name, f"sqlite:///{tmp_path / 'mlflow.db'}", name)
    config["model"].update(depth=2, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    config["trainer"].update(
        devices=2, strategy=strategy, max_epochs=max_epochs, checkpoint_every_n_steps=None, val_check_interval=None
    )
    config["optim"]["warmup_epochs"] = 0.25
    config["tracking"]["sample_grid_every_n_val"] = 1  # a sharded model samples its grid on every rank
    config["resume"] = resume
    path = write_config(tmp_path / f"{name}.yaml", config)
    done = subprocess.run(
        [sys.executable, "-m", "var_lab.cli", "fit", "--config", str(path)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path / name


def weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("var.")}


def grad_norms(tmp_path: Path, run: Path) -> list[float]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history((run / "mlflow_run_id").read_text().strip(), "opt/grad_norm")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_ddp_checkpoints_exports_and_resumes(tmp_path, fashion_mnist_dir):
    from var_lab.models.checkpoints import load_var_checkpoint
    from var_lab.models.release import load_release_var

    ddp = two_process_fit(tmp_path, "ddp", "ddp", max_epochs=2)
    fsdp = two_process_fit(tmp_path, "fsdp", "fsdp2", max_epochs=2)
    reference, sharded = weights(ddp), weights(fsdp)
    assert reference.keys() == sharded.keys() and len(reference) > 20
    for key in reference:  # the same training up to the order of float reductions
        torch.testing.assert_close(sharded[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    # opt/grad_norm is the global norm over both shards (as DDP's), not a shard's
    assert grad_norms(tmp_path, fsdp) == pytest.approx(grad_norms(tmp_path, ddp), rel=1e-4)
    assert (fsdp / "samples").is_dir() and list((fsdp / "samples").glob("*.png"))

    # one full checkpoint file: loads on the usual path and exports to the released format
    vqvae, var, info = load_var_checkpoint(fsdp / "checkpoints" / "last.ckpt")
    assert info["global_step"] == 8 and var.depth == 2  # 64 images, 2 processes x 8: 4 steps an epoch
    out = tmp_path / "export" / "var_d2.pth"
    from var_lab.cli import main as cli_main

    assert cli_main(["export", str(fsdp / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    released = load_release_var(out, vqvae)
    assert all(torch.equal(a, b) for a, b in zip(released.state_dict().values(), var.state_dict().values()))

    # resumed from the checkpoint of its first epoch (full weights and optimiser state, re-sharded on load), a
    # sharded run ends where the uninterrupted one did
    resumed = two_process_fit(tmp_path, "fsdp_resumed", "fsdp2", 2, resume=str(fsdp / "checkpoints" / "epoch000.ckpt"))
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == 8
    for key, value in weights(resumed).items():
        torch.testing.assert_close(value, sharded[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fsdp2_refuses_what_needs_a_whole_model_before_anything_is_written(tmp_path):
    from var_lab.cli import main as cli_main

    for flag in ("--eval.every_n_epochs=1", "--optim.ema_decay=0.99"):
        out = tmp_path / "run"
        assert cli_main(["fit", "--trainer.strategy", "fsdp2", "--output_dir", str(out), flag]) == 2
        assert not out.exists()
