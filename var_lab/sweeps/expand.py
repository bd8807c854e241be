"""Expansion: a validated sweep -> the tasks to run (tokenizer, tokenize, one fit per point, eval, analyze).

Each task has a folder (``task_dir``) holding its claim lock, its launch records and logs, and the files that say how
it ended: ``DONE`` (written by ``var-lab fit`` / ``fit-tokenizer`` at a clean end, by the launcher for the other
stages) or ``FAILED`` (the error text). Layout under ``<output_root>/<name>/``::

    tokenizer/            the tokenizer run (stage tokenizer.train): config.yaml, checkpoints/, DONE
    tokenize/             claim and markers of the tokenize stage; the shards go to tokens/
    tokens/               token shards written by `var-lab tokenize`
    <point key>/          one VAR (or tokenizer) run per point: config.yaml, checkpoints/, mlflow_run_id, DONE
    <point key>/eval/     claim and markers of that run's `var-lab eval`
    analyze/              claim and markers of `var-lab analyze`; the report goes to report/
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from var_lab.config import ConfigError, FitConfig, FitTokenizerConfig, from_dict, to_dict
from var_lab.models.presets import from_depth
from var_lab.sweeps.schema import (
    GLOBAL_BATCH_KEY,
    Resources,
    Sweep,
    SweepError,
    axis_label,
    build_resources,
    config_layer,
    flatten,
    format_value,
    load_yaml,
    nest,
)

STAGES = ("tokenizer", "tokenize", "run", "eval", "analyze")


@dataclass
class Task:
    """One thing to run: a ``var-lab`` command with its resources and the folder that tracks it."""

    name: str
    """Unique within the sweep: tokenizer, tokenize, the point key, eval:<point key>, analyze."""
    stage: str
    """One of STAGES."""
    argv: list
    """``var-lab`` arguments, e.g. ["fit", "--config", ".../config.yaml"]."""
    task_dir: Path
    resources: Resources
    distributed: bool = True
    """Launched as nodes x processes (training, tokenize, eval); False: one process (analyze)."""
    config: Optional[dict] = None
    """Full run config written to task_dir/config.yaml (fits only)."""
    depends: list = field(default_factory=list)
    """Names of tasks that must be DONE first."""
    point: Optional[str] = None
    """The point key (runs and their evals)."""
    values: dict = field(default_factory=dict)
    """Axis values of the point (dotted key -> value)."""
    writes_done: bool = True
    """True when the command writes DONE/FAILED itself (fit, fit-tokenizer); else the launcher does."""
    depends_done: list = field(default_factory=list)
    """DONE files of the dependencies: a launcher-written DONE older than one of them is outdated."""

    @property
    def done_file(self) -> Path:
        return self.task_dir / "DONE"

    @property
    def failed_file(self) -> Path:
        return self.task_dir / "FAILED"

    @property
    def config_path(self) -> Path:
        return self.task_dir / "config.yaml"


@dataclass
class Plan:
    """The tasks of a sweep in execution order, and where everything goes."""

    sweep: Sweep
    sweep_dir: Path
    tracking_uri: str
    experiment: str
    tasks: list

    @property
    def runs(self) -> list:
        return [t for t in self.tasks if t.stage == "run"]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def evals_of(self, run: Task) -> list:
        return [t for t in self.tasks if t.stage == "eval" and t.point == run.point]


def parse_sets(sweep: Sweep, sets: Optional[list[str]]) -> dict:
    """``--set KEY=VALUE`` options -> flat validated {dotted key: value} (resources.* allowed)."""
    flat: dict = {}
    for item in sets or []:
        if "=" not in item:
            raise SweepError(f"--set '{item}' must look like KEY=VALUE (e.g. trainer.max_steps=10)")
        key, text = item.split("=", 1)
        value, _ = load_yaml(text, f"--set {key}")

        def err(message: str, where: Optional[str] = None) -> SweepError:
            return SweepError(message, file="command line", key=(where or "").removeprefix("--set."))

        flat.update(config_layer(sweep.config_class, {key.strip(): value}, "--set", err, allow_resources=True))
    return flat


def _shared_data_keys(layer: dict) -> dict:
    """The ``data.*`` keys of a flat layer that describe the images (name, root, resolution, limits), not a batch."""
    skip = ("data.batch_size", GLOBAL_BATCH_KEY, "data.token_dir")
    return {k: v for k, v in layer.items() if k.startswith("data.") and k not in skip}


def _merge(acc: dict, layer: dict) -> None:
    """Apply a flat layer; data.global_batch and data.batch_size replace each other (the later layer wins)."""
    if GLOBAL_BATCH_KEY in layer:
        acc.pop("data.batch_size", None)
    if "data.batch_size" in layer:
        acc.pop(GLOBAL_BATCH_KEY, None)
    for key, value in layer.items():
        if isinstance(value, dict) and not value:
            continue  # an empty section changes nothing
        # a section given as a whole replaces its sub-keys, and a sub-key replaces a whole section
        for other in [k for k in acc if k.startswith(key + ".") or key.startswith(k + ".")]:
            del acc[other]
        acc[key] = copy.deepcopy(value)


def _merged(layers: list[dict]) -> dict:
    """The flat config of layers applied in order (see _merge)."""
    acc: dict = {}
    for layer in layers:
        _merge(acc, layer)
    return acc


def recipe_layer(recipe: Optional[str], depth: int) -> dict:
    """The flat config keys a sweep's ``recipe`` gives a point of this depth (empty without a recipe)."""
    if recipe != "release":
        return {}
    preset = from_depth(depth)
    return {
        GLOBAL_BATCH_KEY: preset.global_batch,
        "trainer.max_epochs": preset.epochs,
        "optim.base_lr": preset.base_lr,
        "optim.alng": preset.alng,
        "optim.final_lr_ratio": preset.final_lr_ratio,
        "optim.final_weight_decay": preset.final_weight_decay,
    }


def _split_resources(flat: dict) -> tuple[dict, dict]:
    config = {k: v for k, v in flat.items() if not k.startswith("resources.")}
    resources = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("resources.")}
    return config, resources


def point_key(values: dict) -> str:
    """Stable key of a point: ``axis=value`` joined by commas in axis order; ``run`` when the sweep has no axes."""
    if not values:
        return "run"
    return ",".join(f"{axis_label(k)}={format_value(v)}" for k, v in values.items())


def tokenizer_checkpoint(task_dir: Path) -> Path:
    """The checkpoint a ``fit-tokenizer`` run leaves for the VAR runs (its DONE names it; else last.ckpt)."""
    return task_dir / "checkpoints" / "last.ckpt"


def finalize_config(
    sweep: Sweep,
    cls: type,
    flat: dict,
    resources: Resources,
    run_dir: Path,
    point: str,
    tracking_uri: str,
    where: str,
) -> dict:
    """Apply what the sweep owns (output_dir, tracking, devices, nodes, batch per device) and validate the config.

    Returns:
        The full config as a nested dict (``to_dict`` of the dataclass), ready for YAML.
    """
    flat = dict(flat)  # every key the sweep owns (OWNED_KEYS, refused in the file) is set here
    flat["output_dir"] = str(run_dir)
    flat["tracking.tracking_uri"] = tracking_uri
    flat["tracking.experiment"] = sweep.experiment
    flat["tracking.sweep"] = sweep.name
    flat["tracking.point"] = point
    flat["trainer.devices"] = resources.processes_per_node
    flat["trainer.num_nodes"] = resources.nodes
    if flat.get("trainer.accelerator", "auto") == "auto":
        flat["trainer.accelerator"] = "gpu" if resources.gpus_per_node > 0 else "cpu"
    if resources.world_size > 1 and flat.get("trainer.strategy", "auto") == "auto":
        flat["trainer.strategy"] = "ddp"
    if GLOBAL_BATCH_KEY in flat:
        global_batch = flat.pop(GLOBAL_BATCH_KEY)
        accumulate = flat.get("trainer.accumulate_grad_batches", 1)
        denominator = resources.world_size * accumulate
        if global_batch % denominator:
            raise sweep.error(
                f"data.global_batch {global_batch} is not divisible by nodes x processes per node x "
                f"accumulate_grad_batches = {resources.nodes} x {resources.processes_per_node} x {accumulate} "
                f"= {denominator}; change the batch or the resources",
                where,
            )
        flat["data.batch_size"] = global_batch // denominator
    try:
        cfg = from_dict(cls, nest(flat))
    except ConfigError as exc:
        raise sweep.error(exc.message, where) from None
    return to_dict(cfg)


def expand(
    sweep: Sweep,
    output_root: Optional[str] = None,
    sets: Optional[list[str]] = None,
    only: Optional[list[str]] = None,
) -> Plan:
    """Expand a sweep into its plan.

    Args:
        sweep: a validated sweep (``schema.load_sweep``).
        output_root: overrides the sweep's ``output_root``.
        sets: ``KEY=VALUE`` config overrides applied to every point after the sweep's own (``--set``).
        only: point keys or shell patterns (``depth=1*``) selecting points; stages stay in the plan.

    Raises:
        SweepError: a point's config is invalid, the global batch does not divide, or ``only`` matches nothing.
    """
    sweep_dir = sweep.sweep_dir(output_root)
    tracking_uri = sweep.tracking_uri(output_root)
    set_layer = parse_sets(sweep, sets)
    set_config, set_resources = _split_resources(set_layer)
    tasks: list = []
    stage_layer: dict = {}
    prereqs: list = []

    # tokenizer stage
    if sweep.tokenizer is not None and sweep.tokenizer.checkpoint is not None:
        stage_layer["tokenizer_ckpt"] = sweep.tokenizer.checkpoint
    elif sweep.tokenizer is not None and sweep.tokenizer.train is not None:
        task_dir = sweep_dir / "tokenizer"
        resources = _stage_resources(sweep, sweep.tokenizer.resources, "tokenizer.resources")
        config = finalize_config(
            sweep,
            FitTokenizerConfig,
            # --set data.* (e.g. data.root: where the images are) reaches the stages that read images too
            {**sweep.tokenizer.train, **_shared_data_keys(set_config)},
            resources,
            task_dir,
            "tokenizer",
            tracking_uri,
            "tokenizer.train",
        )
        tasks.append(
            Task(
                name="tokenizer",
                stage="tokenizer",
                argv=["fit-tokenizer", "--config", str(task_dir / "config.yaml")],
                task_dir=task_dir,
                resources=resources,
                config=config,
            )
        )
        prereqs.append("tokenizer")
        stage_layer["tokenizer_ckpt"] = str(tokenizer_checkpoint(task_dir))
        stage_layer.update(flatten({"tokenizer": config["tokenizer"]}))

    # points
    axes = sweep.axes
    combos = list(itertools.product(*axes.values())) if axes else [()]
    points = []
    for combo in combos:
        values = dict(zip(axes.keys(), combo))
        key = point_key(values)
        points.append((key, values))
    if only:
        selected = [(k, v) for k, v in points if any(fnmatch.fnmatchcase(k, pattern) for pattern in only)]
        if not selected:
            raise SweepError(
                f"--only {' '.join(only)} matches no point; points: {', '.join(k for k, _ in points)}",
                file=sweep.source,
            )
        points = selected

    base_config, _ = _split_resources(sweep.base)
    if sweep.tokenize is not None:
        task_dir = sweep_dir / "tokenize"
        token_dir = sweep_dir / "tokens"
        resources = _stage_resources(sweep, sweep.tokenize.resources, "tokenize.resources")
        data = {**_shared_data_keys(base_config), **_shared_data_keys(set_config)}
        argv = ["tokenize", "--tokenizer-ckpt", stage_layer["tokenizer_ckpt"], "--out", str(token_dir)]
        for dotted, value in data.items():
            argv += [f"--{dotted}", _cli_value(value)]
        if sweep.tokenizer.checkpoint is not None:
            # a plain state dict (the released .pth) carries no architecture: say it
            arch = {k: v for k, v in {**base_config, **set_config}.items() if k.startswith("tokenizer.")}
            for dotted, value in arch.items():
                argv += [f"--{dotted}", _cli_value(value)]
        tasks.append(
            Task(
                name="tokenize",
                stage="tokenize",
                argv=argv + list(sweep.tokenize.args),
                task_dir=task_dir,
                resources=resources,
                depends=list(prereqs),
                writes_done=False,
            )
        )
        prereqs.append("tokenize")

    runs = []
    for key, values in points:
        layers = [stage_layer, base_config, values]
        resource_layer: dict = {}
        for dotted, value in values.items():
            table = sweep.overrides.get(dotted, {}).get(format_value(value), {})
            layer_config, layer_resources = _split_resources(table)
            layers.append(layer_config)
            resource_layer.update(layer_resources)
        layers.append(set_config)
        resource_layer.update(set_resources)
        if sweep.recipe is not None:
            # the recipe of the point's final depth (whichever layer set it), beneath the axes, overrides and --set
            depth = _merged(layers).get("model.depth", FitConfig().model.depth)
            layers.insert(2, recipe_layer(sweep.recipe, depth))
        acc = _merged(layers)
        if sweep.tokenize is not None:
            acc["data.name"] = "tokens"
            acc["data.token_dir"] = str(sweep_dir / "tokens")
        where = f"point {key}"
        resources = build_resources(
            dataclasses.asdict(sweep.resources), resource_layer, f"resources (point {key})", _error_at(sweep, where)
        )
        run_dir = sweep_dir / key
        config = finalize_config(sweep, sweep.config_class, acc, resources, run_dir, key, tracking_uri, where)
        if "tokenizer" in prereqs and config["tokenizer"] != stage_layer_tokenizer(stage_layer):
            raise sweep.error(
                "the runs' tokenizer architecture differs from tokenizer.train's; remove tokenizer.* from base "
                "and overrides (it is taken from the trained tokenizer)",
                where,
            )
        command = "fit" if sweep.kind == "var" else "fit-tokenizer"
        task = Task(
            name=key,
            stage="run",
            argv=[command, "--config", str(run_dir / "config.yaml")],
            task_dir=run_dir,
            resources=resources,
            config=config,
            depends=list(prereqs),
            point=key,
            values=values,
        )
        tasks.append(task)
        runs.append(task)

    if sweep.eval is not None:
        for run in runs:
            tasks.append(_eval_task(sweep, run))
    if sweep.analyze is not None:
        out = Path(sweep.analyze.out).expanduser().resolve() if sweep.analyze.out else sweep_dir / "report"
        argv = ["analyze", "--tracking-uri", tracking_uri, "--experiment", sweep.experiment, "--out", str(out)]
        if "--log-to-mlflow" not in sweep.analyze.args:
            argv.append("--log-to-mlflow")  # the report and plots go to the sweep's parent run
        resources = _stage_resources(sweep, sweep.analyze.resources, "analyze.resources", cpu_only=True)
        tasks.append(
            Task(
                name="analyze",
                stage="analyze",
                argv=argv + list(sweep.analyze.args),
                task_dir=sweep_dir / "analyze",
                resources=resources,
                distributed=False,
                depends=[t.name for t in tasks if t.stage in ("run", "eval")],
                writes_done=False,
            )
        )
    by_name = {t.name: t for t in tasks}
    for task in tasks:
        task.depends_done = [by_name[d].done_file for d in task.depends if d in by_name]
    return Plan(sweep=sweep, sweep_dir=sweep_dir, tracking_uri=tracking_uri, experiment=sweep.experiment, tasks=tasks)


def stage_layer_tokenizer(stage_layer: dict) -> dict:
    """The tokenizer architecture section carried by the stage layer, as a nested dict."""
    return nest({k: v for k, v in stage_layer.items() if k.startswith("tokenizer.")})["tokenizer"]


def _eval_task(sweep: Sweep, run: Task) -> Task:
    spec = sweep.eval
    checkpoint = run.task_dir / "checkpoints" / "last.ckpt"
    argv = ["eval", "--checkpoint", str(checkpoint)]
    if spec.per_class is not None:
        argv += ["--per-class", str(spec.per_class)]
    else:
        argv += ["--num-samples", str(spec.num_samples)]
    argv += ["--cfg", _cli_value(spec.cfg), "--top-k", str(spec.top_k), "--top-p", _cli_value(spec.top_p)]
    argv += ["--seed", str(spec.seed)]
    if spec.reference is not None:
        argv += ["--reference", spec.reference]
    if spec.batch_size is not None:
        argv += ["--batch-size", str(spec.batch_size)]
    argv += ["--out", str(run.task_dir / "eval" / "results")]
    if spec.resources is not None:
        resources = _stage_resources(sweep, spec.resources, "eval.resources")
    else:
        resources = dataclasses.replace(run.resources, nodes=1)
    return Task(
        name=f"eval:{run.point}",
        stage="eval",
        argv=argv + list(spec.args),
        task_dir=run.task_dir / "eval",
        resources=resources,
        depends=[run.name],
        point=run.point,
        values=run.values,
        writes_done=False,
    )


def _stage_resources(sweep: Sweep, given: Optional[dict], where: str, cpu_only: bool = False) -> Resources:
    """A stage's resources: the sweep's on one node (no GPU for analyze), updated by the stage's own."""
    base = dataclasses.asdict(sweep.resources)
    base["nodes"] = 1
    if cpu_only:
        base["gpus_per_node"] = 0
    return build_resources(base, given or {}, where, _error_at(sweep, where))


def _error_at(sweep: Sweep, where: str):
    def err(message: str, key: Optional[str] = None) -> SweepError:
        return sweep.error(message, key or where)

    return err


def _cli_value(value: Any) -> str:
    """A value as one command-line token jsonargparse reads back (lists as YAML flow)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def config_yaml(config: dict) -> str:
    """The YAML text of a run config (the order of the dataclass fields)."""
    return yaml.safe_dump(config, sort_keys=False)


def non_default_items(config: dict, kind: str) -> list[tuple[str, Any]]:
    """The (dotted key, value) pairs of a config that differ from the config class's defaults."""
    cls = FitConfig if kind in ("var", "run") else FitTokenizerConfig
    defaults = flatten(to_dict(cls()))
    return [(k, v) for k, v in flatten(config).items() if defaults.get(k, object()) != v]


def format_points_table(plan: Plan) -> str:
    """A text table of the plan's runs: point, axis values, key recipe numbers and resources."""
    headers = ["point", "nodes x gpus", "batch/dev", "global", "epochs", "max_steps", "base_lr", "time_min"]
    rows = []
    for task in plan.runs:
        cfg = task.config
        res = task.resources
        global_batch = cfg["data"]["batch_size"] * res.world_size * cfg["trainer"]["accumulate_grad_batches"]
        lr = cfg["optim"]["base_lr"] if "optim" in cfg else cfg.get("lr")
        rows.append(
            [
                task.name,
                f"{res.nodes} x {res.gpus_per_node}" if res.gpus_per_node else f"{res.nodes} x cpu",
                str(cfg["data"]["batch_size"]),
                str(global_batch),
                str(cfg["trainer"]["max_epochs"]),
                str(cfg["trainer"]["max_steps"]),
                f"{lr:g}",
                str(res.time_min),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
