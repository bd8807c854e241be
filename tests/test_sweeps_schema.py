"""Sweep files: the shipped sweeps expand and validate; bad files give errors naming file, line, key and what is
allowed; expansion gives the release's recipe per depth; dry runs print the exact sbatch / torchrun commands."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from var_lab.config import FitConfig, FitTokenizerConfig, from_dict
from var_lab.sweeps.cli import sweep_main
from var_lab.sweeps.expand import expand, format_points_table
from var_lab.sweeps.launchers import Launcher, sbatch_script, torchrun_command
from var_lab.sweeps.schema import SweepError, load_sweep

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO_ROOT / "sweeps").glob("*.yaml"))
RECIPE = {  # docs/var_reference.md: depth -> global batch, epochs, base lr, alng, final lr ratio, final wd
    16: (768, 200, 1e-4, 1e-3, 0.1, 0.05),
    20: (768, 250, 1e-4, 1e-3, 0.1, 0.05),
    24: (768, 350, 8e-5, 1e-4, 0.01, 0.05),
    30: (1024, 350, 8e-5, 1e-5, 0.01, 0.08),
}


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """\
name: tiny
launcher: local
resources: {gpus_per_node: 0}
base:
  model: {num_classes: 10}
  data: {batch_size: 8}
axes:
  depth: [1, 2]
"""


def test_shipped_sweeps_are_the_four_named():
    assert {p.name for p in SHIPPED} >= {
        "var_imagenet256.yaml",
        "var_scaling_ladder.yaml",
        "tokenizer.yaml",
        "demo_cpu.yaml",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_sweep_expands_and_its_configs_validate(path, tmp_path):
    sweep = load_sweep(path)
    plan = expand(sweep, output_root=str(tmp_path))
    assert plan.runs, "a sweep without runs"
    keys = [t.name for t in plan.runs]
    assert len(set(keys)) == len(keys)
    for task in plan.tasks:
        if task.config is None:
            continue
        cls = FitConfig if (task.stage == "run" and sweep.kind == "var") else FitTokenizerConfig
        cfg = from_dict(cls, task.config)  # the written config is a complete, valid run config
        assert cfg.output_dir == str(tmp_path / sweep.name / task.name)
        assert cfg.tracking.sweep == sweep.name and cfg.tracking.point == task.name
        assert cfg.tracking.experiment == sweep.experiment
        assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
        assert cfg.trainer.devices == task.resources.processes_per_node
        assert cfg.trainer.num_nodes == task.resources.nodes
        if task.resources.world_size > 1:
            assert cfg.trainer.strategy == "ddp"
    assert "point" in format_points_table(plan)


def test_imagenet_sweep_has_the_release_recipe_per_depth():
    plan = expand(load_sweep(REPO_ROOT / "sweeps/var_imagenet256.yaml"))
    assert [t.name for t in plan.runs] == ["depth=16", "depth=20", "depth=24", "depth=30"]
    for task in plan.runs:
        cfg = task.config
        depth = cfg["model"]["depth"]
        global_batch, epochs, base_lr, alng, final_lr_ratio, final_wd = RECIPE[depth]
        res = task.resources
        assert res.nodes >= 2 and res.gpus_per_node == 8
        # the recipe's batch is global: per-GPU batch x GPUs = global
        assert cfg["data"]["batch_size"] * res.nodes * res.gpus_per_node == global_batch
        assert cfg["trainer"]["max_epochs"] == epochs
        assert cfg["optim"]["base_lr"] == pytest.approx(base_lr)
        assert cfg["optim"]["alng"] == pytest.approx(alng)
        assert cfg["optim"]["final_lr_ratio"] == pytest.approx(final_lr_ratio)
        assert cfg["optim"]["final_weight_decay"] == pytest.approx(final_wd)
        assert cfg["tokenizer"]["patch_nums"] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
        assert cfg["data"]["name"] == "tokens"  # the tokenize stage feeds the runs
    assert plan.task("depth=30").resources.nodes == 8


def test_scaling_ladder_takes_each_recipe_from_the_presets():
    """`recipe: release`: every size's recipe is from_depth's, d27 included (d24's, the tie going to the smaller)."""
    from var_lab.models.presets import from_depth

    plan = expand(load_sweep(REPO_ROOT / "sweeps/var_scaling_ladder.yaml"))
    for task in plan.runs:
        cfg, res = task.config, task.resources
        preset = from_depth(cfg["model"]["depth"])
        assert cfg["data"]["batch_size"] * res.nodes * res.gpus_per_node == preset.global_batch
        assert cfg["trainer"]["max_epochs"] == preset.epochs
        assert (cfg["optim"]["base_lr"], cfg["optim"]["alng"]) == (preset.base_lr, preset.alng)
        assert cfg["optim"]["final_lr_ratio"] == preset.final_lr_ratio
        assert cfg["optim"]["final_weight_decay"] == preset.final_weight_decay
    d27 = plan.task("depth=27").config
    assert (d27["optim"]["alng"], d27["optim"]["final_weight_decay"], d27["trainer"]["max_epochs"]) == (1e-4, 0.05, 350)


def test_recipe_release_yields_to_axes_overrides_and_set(tmp_path):
    text = MINIMAL.replace("name: tiny\n", "name: tiny\nrecipe: release\n").replace("data: {batch_size: 8}", "data: {}")
    text += "overrides:\n  depth:\n    2: {optim.base_lr: 3.0e-4}\n"
    plan = expand(load_sweep(write(tmp_path, text)), sets=["trainer.max_epochs=3"])
    d1, d2 = (plan.task(f"depth={d}").config for d in (1, 2))
    assert d1["data"]["batch_size"] == 768 and d1["optim"]["alng"] == 1e-3  # d16's recipe, one CPU process
    assert d1["optim"]["base_lr"] == 1e-4 and d2["optim"]["base_lr"] == 3e-4
    assert d1["trainer"]["max_epochs"] == d2["trainer"]["max_epochs"] == 3


def test_recipe_release_follows_the_depth_whichever_layer_sets_it(tmp_path):
    text = """\
    name: tiny
    recipe: release
    launcher: local
    resources: {gpus_per_node: 0}
    base: {model: {num_classes: 10, depth: 16}}
    axes: {seed: [0, 1]}
    overrides: {seed: {1: {model.depth: 30}}}
    """
    sweep = load_sweep(write(tmp_path, text))
    by_override = expand(sweep).task("seed=1").config
    assert (by_override["data"]["batch_size"], by_override["optim"]["alng"]) == (1024, 1e-5)  # d30's recipe
    by_set = expand(sweep, sets=["model.depth=24"]).task("seed=0").config
    assert (by_set["trainer"]["max_epochs"], by_set["optim"]["alng"]) == (350, 1e-4)  # d24's, not base d16's


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: t\nrecipe: paper\n", "recipe"),
        ("name: t\nkind: tokenizer\nrecipe: release\n", "belongs to sweeps of kind var"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(write(tmp_path, text))
    assert "recipe" in str(info.value)


def test_scaling_ladder_has_twelve_sizes_from_6_to_30_with_a_budget_each():
    plan = expand(load_sweep(REPO_ROOT / "sweeps/var_scaling_ladder.yaml"))
    depths = [t.config["model"]["depth"] for t in plan.runs]
    assert len(depths) == 12 and depths[0] == 6 and depths[-1] == 30 and depths == sorted(depths)
    for task in plan.runs:
        trainer = task.config["trainer"]
        assert trainer["max_epochs"] >= 1 or trainer["max_steps"] > 0


def test_placeholder_paths_expand_but_launch_refuses_them(tmp_path, capsys):
    path = REPO_ROOT / "sweeps/var_imagenet256.yaml"
    plan = expand(load_sweep(path), output_root=str(tmp_path))  # fine at expand
    with pytest.raises(SweepError, match=r"var_imagenet256.yaml:\d+: tokenizer.checkpoint: .*PLACEHOLDER.*placeholder"):
        Launcher(plan, out=lambda line: None).run()
    # the CLI says the same and starts nothing; the dry run still prints everything, with warnings
    assert sweep_main(["launch", str(path), "--output-root", str(tmp_path)]) == 2
    assert "tokenizer.checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "var_imagenet256" / "depth=16" / "config.yaml").exists()
    assert sweep_main(["launch", str(path), "--output-root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=8" in out and "WARNING: launch will refuse" in out


def test_point_keys_are_stable_and_multi_axis(tmp_path):
    path = write(
        tmp_path,
        MINIMAL.replace("axes:\n  depth: [1, 2]", "axes:\n  depth: [1, 2]\n  optim.base_lr: [1.0e-4, 3e-4]"),
    )
    plan = expand(load_sweep(path), output_root=str(tmp_path / "out"))
    assert [t.name for t in plan.runs] == [
        "depth=1,optim.base_lr=0.0001",
        "depth=1,optim.base_lr=0.0003",
        "depth=2,optim.base_lr=0.0001",
        "depth=2,optim.base_lr=0.0003",
    ]
    assert plan.runs[1].config["optim"]["base_lr"] == pytest.approx(3e-4)  # 3e-4 is a float, not a string
    assert plan.runs[1].task_dir == tmp_path / "out" / "tiny" / "depth=1,optim.base_lr=0.0003"


def test_overrides_global_batch_and_per_point_resources(tmp_path):
    path = write(
        tmp_path,
        """\
        name: res
        launcher: slurm
        resources: {nodes: 1, gpus_per_node: 4, time_min: 600, partition: gpu, account: lab, qos: high,
                    constraint: h100, mem_gb: 200, signal_delay_s: 90}
        base:
          data.global_batch: 64
        axes:
          depth: [2, 4]
        overrides:
          depth:
            4: {resources.nodes: 2, data.global_batch: 128, optim.alng: 1.0e-4}
        """,
    )
    plan = expand(load_sweep(path), output_root=str(tmp_path))
    d2, d4 = plan.runs
    assert (d2.resources.nodes, d2.config["data"]["batch_size"]) == (1, 16)  # 64 / (1 x 4)
    assert (d4.resources.nodes, d4.config["data"]["batch_size"]) == (2, 16)  # 128 / (2 x 4)
    assert d4.config["optim"]["alng"] == pytest.approx(1e-4) and d2.config["optim"]["alng"] == pytest.approx(1e-3)
    assert d4.config["trainer"]["num_nodes"] == 2 and d4.config["trainer"]["devices"] == 4
    assert d4.config["trainer"]["accelerator"] == "gpu" and d4.config["trainer"]["strategy"] == "ddp"
    script = sbatch_script(d4, "res")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --signal=USR1@90",  # Lightning's requeue signal, not submitit's USR2
        "#SBATCH --requeue",
        "#SBATCH --time=600",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --mem=200GB",
    ):
        assert line in script, line
    assert "USR2" not in script
    assert "srun" in script and "submitit.core._submit" in script


def test_torchrun_commands_per_node(tmp_path, capsys):
    path = write(
        tmp_path,
        """\
        name: tr
        launcher: torchrun
        torchrun: {rdzv_endpoint: "node0:29400"}
        resources: {nodes: 2, gpus_per_node: 8}
        base: {data.global_batch: 256}
        axes: {depth: [16]}
        """,
    )
    plan = expand(load_sweep(path), output_root=str(tmp_path))
    cmd = torchrun_command(plan.runs[0], 1, "node0:29400")
    joined = " ".join(cmd)
    assert "--nnodes 2 --nproc-per-node 8 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint node0:29400" in joined
    assert joined.endswith(f"-m var_lab.cli fit --config {tmp_path}/tr/depth=16/config.yaml")
    assert sweep_main(["launch", str(path), "--output-root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# node 0: " in out and "# node 1: " in out and "--node-rank 1" in out


def test_expand_write_gives_configs_the_fit_parser_accepts(tmp_path, capsys):
    from var_lab.train import parse_config

    path = write(tmp_path, MINIMAL)
    assert sweep_main(["expand", str(path), "--output-root", str(tmp_path), "--write"]) == 0
    out = capsys.readouterr().out
    assert "depth=1" in out and "depth=2" in out
    config_path = tmp_path / "tiny" / "depth=2" / "config.yaml"
    cfg = parse_config(FitConfig, ["--config", str(config_path)], "var-lab fit", "")
    assert cfg.model.depth == 2 and cfg.tracking.point == "depth=2" and cfg.trainer.accelerator == "cpu"


def test_set_and_patch_options(tmp_path):
    path = write(tmp_path, MINIMAL)
    sweep = load_sweep(path, patches=["axes.depth=[3]", "base.optim.base_lr=2e-4"])
    plan = expand(sweep, output_root=str(tmp_path), sets=["trainer.max_steps=7", "resources.cpus_per_task=3"])
    (run,) = plan.runs
    assert run.name == "depth=3" and run.config["trainer"]["max_steps"] == 7
    assert run.config["optim"]["base_lr"] == pytest.approx(2e-4) and run.resources.cpus_per_task == 3
    with pytest.raises(
        SweepError,
        match=r"command line: trainer.max_stepz: unknown key 'trainer.max_stepz'; .*did you mean 'trainer.max_steps'",
    ):
        expand(sweep, sets=["trainer.max_stepz=7"])
    with pytest.raises(SweepError, match="matches no point; points: depth=3"):
        expand(sweep, only=["depth=9"])


def test_set_data_root_reaches_the_stages_that_read_images(tmp_path):
    # on a machine where the images live elsewhere, one --set moves the tokenizer, tokenize and every point
    sweep = load_sweep(REPO_ROOT / "sweeps" / "gpu_ladder.yaml")
    plan = expand(sweep, output_root=str(tmp_path), sets=["data.root=/elsewhere/fm", "data.batch_size=16"])
    tokenizer, tokenize = plan.task("tokenizer"), plan.task("tokenize")
    assert tokenizer.config["data"]["root"] == "/elsewhere/fm"
    assert tokenizer.config["data"]["batch_size"] == 256  # a batch set for the points stays theirs
    assert tokenize.argv[tokenize.argv.index("--data.root") + 1] == "/elsewhere/fm"
    assert "--data.batch_size" not in tokenize.argv
    assert all(run.config["data"]["root"] == "/elsewhere/fm" for run in plan.runs)


def test_patch_replaces_a_whole_section(tmp_path):
    text = MINIMAL + "overrides:\n  depth:\n    2: {trainer.max_steps: 9}\n"
    path = write(tmp_path, text)
    assert expand(load_sweep(path)).runs[1].config["trainer"]["max_steps"] == 9
    plan = expand(load_sweep(path, patches=["overrides={}", "base={data: {batch_size: 4}}"]))
    assert all(run.config["trainer"].get("max_steps", -1) != 9 for run in plan.runs)
    assert all(run.config["data"]["batch_size"] == 4 for run in plan.runs)


# ------------------------------------------------------------------------------------------------ malformed files

BAD_FILES = {
    "malformed yaml": (
        "name: x\naxes:\n  depth: [1, 2\nbase: {}\n",
        r"sweep.yaml:\d+: malformed YAML \(line \d+, column \d+\)",
    ),
    "unknown top-level key": (
        "name: x\naxis:\n  depth: [1]\n",
        r"sweep.yaml:2: axis: unknown key 'axis'; allowed top-level keys: name, kind, .*axes",
    ),
    "unknown config key in base": (
        "name: x\nbase:\n  optim:\n    bse_lr: 1.0e-4\naxes: {depth: [1]}\n",
        r"sweep.yaml:4: base.optim.bse_lr: unknown key 'optim.bse_lr'; allowed keys here: alng, base_lr, betas",
    ),
    "unknown dotted key in overrides": (
        "name: x\naxes: {depth: [1]}\noverrides:\n  depth:\n    1: {trainer.max_stepz: 3}\n",
        r"sweep.yaml:5: overrides.depth.1.trainer.max_stepz: unknown key 'trainer.max_stepz'",
    ),
    "wrong type of a config value": (
        "name: x\nbase:\n  optim: {base_lr: fast}\naxes: {depth: [1]}\n",
        r"sweep.yaml:3: base.optim.base_lr: optim.base_lr=fast is invalid: expected a number",
    ),
    "wrong type of an axis value": (
        "name: x\naxes:\n  depth: [16, sixteen]\n",
        r"sweep.yaml:3: axes.depth.1: model.depth=sixteen is invalid: expected an integer",
    ),
    "wrong type of a resource": (
        "name: x\nresources:\n  nodes: 1.5\naxes: {depth: [1]}\n",
        r"sweep.yaml:3: resources.nodes: nodes=1.5 is invalid: expected an integer",
    ),
    "axes not a list": (
        "name: x\naxes:\n  depth: 16\n",
        r"sweep.yaml:3: axes.depth: must be a non-empty list of values, got int 16",
    ),
    "depth below 1": (
        "name: x\naxes:\n  depth: [0, 2]\n",
        r"sweep.yaml:3: axes.depth.0: model.depth=0 is invalid: the depth must be an integer >= 1",
    ),
    "nodes below 1": (
        "name: x\nresources: {nodes: 0}\naxes: {depth: [1]}\n",
        r"sweep.yaml:2: resources.nodes: nodes=0 is invalid: it must be an integer >= 1",
    ),
    "unknown launcher": (
        "name: x\nlauncher: pbs\naxes: {depth: [1]}\n",
        r"sweep.yaml:2: launcher: launcher=pbs is invalid: expected one of slurm, torchrun, local",
    ),
    "unknown kind": (
        "name: x\nkind: diffusion\n",
        r"sweep.yaml:2: kind: kind=diffusion is invalid: expected one of var, tokenizer",
    ),
    "unknown resources key": (
        "name: x\nresources: {gpus: 8}\naxes: {depth: [1]}\n",
        r"sweep.yaml:2: resources.gpus: unknown key 'gpus'; allowed keys here: account, constraint, cpus_per_task",
    ),
    "override of a value not on the axis": (
        "name: x\naxes: {depth: [16, 20]}\noverrides:\n  depth:\n    61: {optim.alng: 1.0e-3}\n",
        r"sweep.yaml:5: overrides.depth.61: 61 is not a value of axis 'depth'; values: 16, 20",
    ),
    "override of something that is not an axis": (
        "name: x\naxes: {depth: [16]}\noverrides:\n  optim.base_lr:\n    1: {}\n",
        r"sweep.yaml:4: overrides.optim.base_lr: 'optim.base_lr' is not an axis of this sweep; axes: depth",
    ),
    "a key the sweep owns": (
        "name: x\nbase:\n  output_dir: /tmp/x\naxes: {depth: [1]}\n",
        r"sweep.yaml:3: base.output_dir: set by the sweep; use output_root",
    ),
    "devices set by hand": (
        "name: x\nbase:\n  trainer: {devices: 4}\naxes: {depth: [1]}\n",
        r"sweep.yaml:3: base.trainer.devices: set by the sweep; use resources.gpus_per_node instead",
    ),
    "repeated key": (
        "name: x\naxes:\n  depth: [1]\n  depth: [2]\n",
        r"sweep.yaml:4: axes.depth: key repeated \(first at line 3\)",
    ),
    "bad patch schedule": (
        "name: x\nbase:\n  tokenizer: {patch_nums: [1, 3, 2]}\naxes: {depth: [1]}\n",
        r"sweep.yaml:3: base.tokenizer.patch_nums: tokenizer.patch_nums=\[1, 3, 2\] is invalid: it must list at "
        r"least two strictly increasing",
    ),
    "missing name": ("axes: {depth: [1]}\n", r"sweep.yaml: missing required key 'name'"),
    "not a mapping": ("- depth\n", r"sweep.yaml: a sweep file must be a mapping"),
    "tokenizer stage with both": (
        "name: x\ntokenizer: {checkpoint: a.pth, train: {}}\naxes: {depth: [1]}\n",
        r"sweep.yaml:2: tokenizer: give exactly one of 'checkpoint' \(a file\) or 'train'",
    ),
    "unknown eval option": (
        "name: x\naxes: {depth: [1]}\neval: {samples: 10}\n",
        r"sweep.yaml:3: eval.samples: unknown key 'samples'; allowed keys here: args, batch_size, cfg, num_samples",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_sweep_files_name_file_line_key_and_what_is_allowed(case, tmp_path, capsys):
    text, pattern = BAD_FILES[case]
    path = write(tmp_path, text)
    with pytest.raises(SweepError, match=pattern):
        load_sweep(path)
    # through the command line: exit code 2 and the same message on stderr
    assert sweep_main(["expand", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("var-lab sweep: error: ") and str(path) in err


def test_global_batch_must_divide(tmp_path):
    path = write(
        tmp_path,
        """\
        name: gb
        resources: {nodes: 3, gpus_per_node: 8}
        base: {data.global_batch: 768}
        axes: {depth: [16]}
        overrides:
          depth:
            16: {resources.nodes: 5}
        """,
    )
    pattern = r"point depth=16: data.global_batch 768 is not divisible by .* 5 x 8 x 1 = 40"
    with pytest.raises(SweepError, match=pattern):
        expand(load_sweep(path))


def test_missing_file_and_yaml_float_forms(tmp_path):
    with pytest.raises(SweepError, match="nope.yaml: sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")
    path = write(tmp_path, MINIMAL + "overrides:\n  depth:\n    1: {optim.base_lr: 1e-4, optim.alng: 5E-3}\n")
    cfg = expand(load_sweep(path)).runs[0].config
    assert isinstance(cfg["optim"]["base_lr"], float) and cfg["optim"]["alng"] == pytest.approx(5e-3)


def test_stage_tasks_of_the_demo(tmp_path):
    plan = expand(load_sweep(REPO_ROOT / "sweeps/demo_cpu.yaml"), output_root=str(tmp_path))
    stages = [t.stage for t in plan.tasks]
    assert stages[:2] == ["tokenizer", "tokenize"] and stages[-1] == "analyze"
    assert [t.config["model"]["depth"] for t in plan.runs] == [1, 2, 3, 4]
    tok = plan.task("tokenizer")
    for run in plan.runs:
        # the runs use the trained tokenizer, its architecture, and the token cache
        assert run.config["tokenizer_ckpt"] == str(tmp_path / "demo_cpu/tokenizer/checkpoints/last.ckpt")
        assert run.config["tokenizer"] == tok.config["tokenizer"]
        assert run.config["data"]["name"] == "tokens"
        assert run.config["data"]["token_dir"] == str(tmp_path / "demo_cpu/tokens")
        assert run.depends == ["tokenizer", "tokenize"]
        assert [e.name for e in plan.evals_of(run)] == [f"eval:{run.name}"]
    assert plan.task("tokenize").argv[:5] == [
        "tokenize",
        "--tokenizer-ckpt",
        str(tmp_path / "demo_cpu/tokenizer/checkpoints/last.ckpt"),
        "--out",
        str(tmp_path / "demo_cpu/tokens"),
    ]
    analyze = plan.task("analyze")
    assert "--experiment" in analyze.argv and analyze.argv[analyze.argv.index("--out") + 1] == str(
        tmp_path / "demo_cpu/report"
    )
    assert yaml.safe_load(yaml.safe_dump(plan.runs[0].config)) == plan.runs[0].config
