"""Multi-node for real: two "nodes" of one CPU process each, started by the sweep's torchrun launcher exactly as on
a cluster without SLURM (`var-lab sweep launch --node-rank R` on each node, c10d rendezvous, gloo), train a tiny VAR
a few steps with DDP; the weights are identical on both ranks and only rank 0 wrote an MLflow run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_identical_weights_and_rank0_writes_the_only_mlflow_run(tmp_path, fashion_mnist_dir):
    import mlflow

    port = free_port()
    sweep = tmp_path / "mn.yaml"
    sweep.write_text(
        f"""\
name: mn
launcher: torchrun
output_root: {tmp_path / "out"}
torchrun: {{rdzv_endpoint: "127.0.0.1:{port}"}}
resources: {{nodes: 2, gpus_per_node: 0, cpus_per_task: 1}}
base:
  seed: 0
  tokenizer: {{vocab_size: 64, z_channels: 8, ch: 16, ch_mult: [1, 2, 2], num_res_blocks: 1,
              patch_nums: [1, 2, 4, 8], using_sa: false, using_mid_sa: false}}
  model: {{num_classes: 10}}
  data: {{name: fashion_mnist, resolution: 32, global_batch: 16, num_workers: 0, limit_train: 128, limit_val: 16}}
  trainer: {{max_epochs: 1, max_steps: 4, log_every_n_steps: 1, limit_val_batches: 1, enable_progress_bar: false}}
  tracking: {{sample_grid_every_n_val: 0}}
axes:
  depth: [2]
"""
    )
    env = {**os.environ, "VAR_LAB_WRITE_RANK_HASH": "1", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "var_lab.cli", "sweep", "launch", str(sweep), "--node-rank", str(rank)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
    assert [n.returncode for n in nodes] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    run_dir = tmp_path / "out" / "mn" / "depth=2"
    # both nodes ran torchrun for the same run with their own rank
    assert "--nnodes 2 --nproc-per-node 1 --node-rank 0" in outputs[0]
    assert "--nnodes 2 --nproc-per-node 1 --node-rank 1" in outputs[1]
    config = (run_dir / "config.yaml").read_text()
    assert "num_nodes: 2" in config and "strategy: ddp" in config and "batch_size: 8" in config
    logs = {p.name.rsplit("-", 1)[1]: p.read_text() for p in (run_dir / "logs").glob("run-*.log")}
    assert "MEMBER: 2/2" in logs["node1.log"] or "MEMBER: 2/2" in logs["node0.log"], "no 2-process DDP group"
    done = json.loads((run_dir / "DONE").read_text())
    assert done["global_step"] == 4
    hashes = [(run_dir / f"weights_rank{r}.sha256").read_text().strip() for r in (0, 1)]
    assert len(hashes[0]) == 64 and hashes[0] == hashes[1]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mn")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("var_lab.kind") == "sweep"]  # the sweep's parent run
    (run,) = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.info.run_id == done["mlflow_run_id"] == (run_dir / "mlflow_run_id").read_text().strip()
    assert run.data.tags["var_lab.point"] == "depth=2" and run.data.tags["var_lab.sweep"] == "mn"
    assert run.data.params["train.global_batch"] == "16"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == sorted(set(steps)) and len(steps) >= 3  # one writer: no duplicated steps
