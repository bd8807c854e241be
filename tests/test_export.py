"""`var-lab export`: a fit checkpoint in the released format (strict load, identical logits) and its model card."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_evaluate import make_checkpoint

from var_lab.commands import run_command
from var_lab.config import TokenizerModelConfig
from var_lab.models.checkpoints import load_var_checkpoint
from var_lab.models.release import load_release_var
from var_lab.models.vqvae import VQVAE
from var_lab.tracking import get_or_create_experiment


def test_export_round_trips_through_the_release_loader_and_writes_a_card(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(get_or_create_experiment(uri, "sweep")).info.run_id
    client.log_param(run_id, "train.global_batch", "16")
    for step, loss in ((5, 3.5), (10, 3.125)):
        client.log_metric(run_id, "val/L_mean", loss, step=step)
    client.log_metric(run_id, "eval/fid", 87.5, step=10)
    ckpt = make_checkpoint(tmp_path / "last.ckpt", 10, run_id, uri, {"name": "fashion_mnist", "batch_size": 8})

    out = tmp_path / "export" / "var_d1.pth"
    assert run_command("export", [str(ckpt), "--out", str(out)]) == 0
    assert "model card" in capsys.readouterr().out

    vqvae, var, info = load_var_checkpoint(ckpt)
    tokenizer = VQVAE.from_config(TokenizerModelConfig(**info["fit_config"]["tokenizer"]))
    tokenizer.load_state_dict(torch.load(out.with_name("vae.pth"), weights_only=True), strict=True)
    released = load_release_var(out, vqvae=tokenizer, depth=1, attn_impl="sdpa").eval()  # strict inside
    assert released.state_dict().keys() == var.state_dict().keys()
    torch.manual_seed(0)
    labels_B = torch.tensor([0, 3])
    x_BLCv = torch.randn(2, var.L - var.first_l, var.Cvae)
    with torch.no_grad():
        assert torch.equal(released(labels_B, x_BLCv), var(labels_B, x_BLCv))

    card = out.with_suffix(".md").read_text()
    assert "# VAR depth 1: var_d1.pth" in card and run_id in card
    assert "| val/L_mean | 3.125 |" in card and "| eval/fid | 87.5 |" in card  # the run's latest values
    assert "| global batch | 16 |" in card and "| images seen | 160 |" in card
    assert f"| tokens seen | {160 * var.L:,} |" in card


def test_export_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert run_command("export", [str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert run_command("export", [str(junk)]) == 2
    err = capsys.readouterr().err
    assert "is not a var-lab fit checkpoint" in err and len(err.strip().splitlines()) == 1
    ckpt = make_checkpoint(tmp_path / "last.ckpt", 3, None, None, {"name": "fashion_mnist", "batch_size": 8})
    assert run_command("export", [str(ckpt)]) == 0
    card = (tmp_path / "var_d1.md").read_text()
    assert "the checkpoint names no MLflow run" in card
    assert run_command("export", [str(ckpt)]) == 2  # the files exist now
    assert "--force" in capsys.readouterr().err
    assert run_command("export", [str(ckpt), "--force"]) == 0


@pytest.mark.parametrize("argv", [["--help"]])
def test_export_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_command("export", argv)
    assert exit_info.value.code == 0 and "released format" in capsys.readouterr().out
