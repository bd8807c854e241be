"""The sweep file: schema, YAML loading with line numbers, and validation.

A sweep file says what to train at which sizes with which recipe, on what resources, and how to launch it. One file
gives one MLflow experiment with one run per point of the grid ``axes``. Keys (all but ``name`` optional)::

    name: var_imagenet256        # [a-zA-Z0-9_.-]+; the folder <output_root>/<name> and the default experiment
    kind: var                    # var (runs of `var-lab fit`) | tokenizer (runs of `var-lab fit-tokenizer`)
    description: free text
    output_root: outputs/sweeps  # runs go to <output_root>/<name>/<point key>/ (relative to the working directory)
    launcher: slurm              # slurm (submitit) | torchrun | local
    tracking:
      uri: null                  # default sqlite:///<output_root>/mlflow.db (absolute); e.g. http://login1:5000
      experiment: null           # default: the sweep name
    recipe: null                 # kind var: "release" gives every point the release's recipe for its depth
                                 # (var_lab.models.presets.from_depth: data.global_batch, trainer.max_epochs,
                                 # optim.base_lr / alng / final_lr_ratio / final_weight_decay), applied after base
                                 # and before the axis values, overrides and --set (which win)
    base:                        # a partial FitConfig (kind var) or FitTokenizerConfig (kind tokenizer);
      model: {num_classes: 1000} # nested mappings or dotted keys ("optim.base_lr: 1.0e-4") both work
      data.global_batch: 768     # sweep-only key: the GLOBAL batch; data.batch_size = global / (nodes * devices
                                 # * trainer.accumulate_grad_batches), which must divide exactly
    axes:                        # the grid: dotted config key -> list of values; product in file order
      depth: [16, 20, 24, 30]    # "depth" is short for model.depth (kind var)
      optim.base_lr: [1.0e-4]
    overrides:                   # per axis value: dotted keys set for points having that value (applied in axis
      depth:                     # order, after base and the axis values). resources.* keys change the point's
        16: {data.global_batch: 768, trainer.max_epochs: 200, resources.nodes: 2}   # resources
    resources:                   # per run; each overridable per point with resources.<key>
      nodes: 1                   # >= 1
      gpus_per_node: 8           # >= 0; 0 means CPU (one process per node). Processes per node = max(1, gpus)
      cpus_per_task: 10          # CPU cores per process (DataLoader workers + 1 or 2)
      mem_gb: null               # memory per node (null: the partition's default)
      time_min: 2880             # time limit of one job (SLURM requeues it until the run is done)
      partition: null
      account: null
      qos: null
      constraint: null
      signal_delay_s: 120        # SIGUSR1 this long before the time limit (sbatch --signal=USR1@120)
      setup: []                  # shell lines run in the sbatch script before srun (module load, source venv)
      sbatch: {}                 # any other sbatch option, e.g. {gres: "gpu:8", exclusive: true, mail-type: END}
    torchrun:                    # only for launcher torchrun
      rdzv_endpoint: null        # HOST:PORT of node 0, required when nodes > 1 (single node: a free local port)
      rdzv_backend: c10d
      max_restarts: 0
    tokenizer:                   # kind var only; one of:
      checkpoint: /path/to/vae_ch160v4096z32.pth      # a tokenizer checkpoint (checked to exist at launch)
      train: {...}               # or: a FitTokenizerConfig trained once into <output_root>/<name>/tokenizer
      resources: {...}           # (train only) changes to the sweep's resources for that run (default: one node)
    tokenize: true               # or {resources: {...}, args: [...]}: `var-lab tokenize` once into
                                 # <output_root>/<name>/tokens; the runs then read data.name=tokens from there
    eval:                        # `var-lab eval` on each finished run (results in the run's MLflow run)
      num_samples: 500
      per_class: null            # images per class (overrides num_samples when set)
      cfg: 1.5
      top_k: 900
      top_p: 0.96
      reference: null            # reference statistics or image folder (default: the training data's val split)
      batch_size: null
      seed: 0
      args: []                   # further `var-lab eval` options, verbatim
      resources: {...}           # changes to the sweep's resources (default: one node)
    analyze:                     # `var-lab analyze` on the experiment once all runs are done
      out: null                  # default <output_root>/<name>/report
      args: []

The point key names a run: ``axis=value`` joined by commas in axis order (``depth=16`` or
``depth=16,optim.base_lr=0.0001``); ``model.depth`` is written ``depth``. The run's config is, in order: the config's
defaults, the tokenizer stage (tokenizer_ckpt, tokenizer architecture, tokens), ``base``, the axis values, their
``overrides``, ``--set`` options of the command line; then the sweep owns ``output_dir``, ``tracking.*``,
``trainer.devices``, ``trainer.num_nodes`` (from resources; setting them elsewhere is an error), fills
``trainer.accelerator`` (gpu when gpus_per_node > 0, else cpu) and ``trainer.strategy`` (ddp when there is more than
one process) when left at auto, and derives ``data.batch_size`` from ``data.global_batch``.

Errors name the file, the line, the key path and what is allowed (:class:`SweepError`). The one check done only at
launch is that files named by the sweep (a tokenizer checkpoint) exist, so that a shipped sweep with a placeholder path
still expands.

Preemption has exactly one owner: **Lightning's SLURM auto-requeue.** The sbatch script asks for
``--signal=USR1@<signal_delay_s>`` (submitit's own ``--signal=USR2@...`` is overridden); the job function
(:class:`var_lab.sweeps.launchers.SweepJob`) resets the handlers that submitit installs in every task (SIGTERM,
SIGCONT and its preemption signal USR2) to the default before calling ``var-lab fit`` in-process, and defines no
``checkpoint()`` method, so submitit never checkpoints or requeues. Lightning then finds SIGUSR1 free, installs its
handler, saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue $SLURM_JOB_ID``; the requeued job runs the same pickled
job function, which resumes from the newest of ``last.ckpt`` and the HPC checkpoint into the same MLflow run (the run
id is stored in the run folder). Were submitit's handler left on USR1 (``SUBMITIT_PREEMPT_SIGNAL=USR1``), Lightning
would see a handler already there and install none, and submitit would requeue without any checkpoint.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from var_lab.config import (
    ConfigError,
    FitConfig,
    FitTokenizerConfig,
    Section,
    at_least,
    check_keys,
    from_dict,
    in_range,
    invalid_message,
    require,
)

KINDS = ("var", "tokenizer")
LAUNCHERS = ("slurm", "torchrun", "local")
#: Alias used in axes, overrides and point keys.
AXIS_ALIASES = {"depth": "model.depth"}
#: Sweep-only key in base / overrides: the global batch, turned into data.batch_size per device.
GLOBAL_BATCH_KEY = "data.global_batch"
#: Config keys that the sweep sets itself; the message says what to set instead.
OWNED_KEYS = {
    "output_dir": "output_root (runs go to <output_root>/<name>/<point key>)",
    "tracking.tracking_uri": "tracking.uri at the top level of the sweep file",
    "tracking.experiment": "tracking.experiment at the top level of the sweep file",
    "tracking.sweep": "name",
    "tracking.point": "axes (the point key is derived from the axis values)",
    "trainer.devices": "resources.gpus_per_node",
    "trainer.num_nodes": "resources.nodes",
}
#: sbatch options the launcher writes from ``resources``
LAUNCHER_SBATCH = ("signal", "nodes", "ntasks-per-node", "ntasks_per_node", "time", "output", "error")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_PLACEHOLDER_RE = re.compile(r"(?i)(placeholder|/path/to/|<[^>]*>|changeme|set[-_ ]me)")


class SweepError(ValueError):
    """Invalid sweep file or sweep command; the message names the file, line, key path and what is allowed."""

    def __init__(self, message: str, file: Optional[str] = None, key: Optional[str] = None, line: Optional[int] = None):
        self.file, self.key, self.line = file, key, line
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        if key:
            where += f"{key}: "
        super().__init__(where + message)


# --------------------------------------------------------------------------------------------------------------------
# YAML with positions


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (YAML 1.2; PyYAML's 1.1 rules make it a string) and refuses duplicate
    keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML text, returning the data and the 1-based line of every mapping key by key path.

    Raises:
        SweepError: malformed YAML (with line and column) or a key repeated in one mapping.
    """
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        col = f", column {mark.column + 1}" if mark else ""
        problem = " ".join(str(x) for x in (err.context, err.problem) if x)
        raise SweepError(f"malformed YAML (line {line}{col}): {problem}", file=source, line=line) from None
    except yaml.YAMLError as err:
        raise SweepError(f"malformed YAML: {err}", file=source) from None
    if node is None:
        return None, {}
    lines: dict[tuple, int] = {}
    key_loader = _Loader("")

    def walk(n: yaml.Node, path: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in n.value:
                try:
                    key = key_loader.construct_object(key_node, deep=True)
                except yaml.YAMLError:
                    key = getattr(key_node, "value", None)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    key = str(key)
                line = key_node.start_mark.line + 1
                if key in seen:
                    dotted = ".".join(str(p) for p in (*path, key))
                    raise SweepError(
                        f"key repeated (first at line {seen[key]}); each key may appear once per mapping",
                        file=source,
                        key=dotted,
                        line=line,
                    )
                seen[key] = line
                lines[(*path, key)] = line
                walk(value_node, (*path, key))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    walk(node, ())
    key_loader.dispose()
    loader = _Loader(text)
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise SweepError(f"malformed YAML: {err}", file=source, line=line) from None
    finally:
        loader.dispose()
    return data, lines


# --------------------------------------------------------------------------------------------------------------------
# The sweep file's sections: typed dataclasses, checked by the run config's own path (var_lab.config.from_dict)


@dataclass
class Resources(Section):
    """What one run asks for (one SLURM job, one torchrun, or one local process group)."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: Optional[float] = None
    time_min: int = 60
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    signal_delay_s: int = 120
    setup: list[str] = field(default_factory=list)
    sbatch: dict[str, Union[bool, int, float, str]] = field(default_factory=dict)

    def check(self) -> None:
        at_least(self, "nodes", 1)
        at_least(self, "gpus_per_node", 0)
        at_least(self, "cpus_per_task", 1)
        at_least(self, "mem_gb", 0, strict=True)
        at_least(self, "time_min", 1)
        at_least(self, "signal_delay_s", 0)
        for option in self.sbatch:
            rule = f"'{option}' is set by the launcher from resources; remove it from resources.sbatch"
            require(self, "sbatch", option not in LAUNCHER_SBATCH, rule)
        rule = f"it must be shorter than the time limit ({self.time_min} min)"
        require(self, "signal_delay_s", self.signal_delay_s < self.time_min * 60, rule)

    @property
    def processes_per_node(self) -> int:
        """One process per GPU, or one per node on CPU."""
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


@dataclass
class TrackingSpec(Section):
    uri: Optional[str] = None
    experiment: Optional[str] = None


@dataclass
class TorchrunSpec(Section):
    rdzv_endpoint: Optional[str] = None
    rdzv_backend: str = "c10d"
    max_restarts: int = 0

    def check(self) -> None:
        ok = self.rdzv_endpoint is None or re.match(r"^[^:\s]+:\d+$", self.rdzv_endpoint) is not None
        require(self, "rdzv_endpoint", ok, "HOST:PORT")
        at_least(self, "max_restarts", 0)


@dataclass
class TokenizerStage(Section):
    checkpoint: Optional[str] = None
    train: Optional[dict] = None
    resources: Optional[dict] = None


@dataclass
class TokenizeStage(Section):
    resources: Optional[dict] = None
    args: list[str] = field(default_factory=list)


@dataclass
class EvalStage(Section):
    num_samples: int = 500
    per_class: Optional[int] = None
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    reference: Optional[str] = None
    batch_size: Optional[int] = None
    seed: int = 0
    args: list[str] = field(default_factory=list)
    resources: Optional[dict] = None

    def check(self) -> None:
        for name in ("num_samples", "per_class", "batch_size"):
            at_least(self, name, 1)
        at_least(self, "cfg", 0)
        at_least(self, "top_k", 0)
        in_range(self, "top_p", 0, 1)


@dataclass
class AnalyzeStage(Section):
    out: Optional[str] = None
    args: list[str] = field(default_factory=list)
    resources: Optional[dict] = None


@dataclass
class SweepFile(Section):
    """The top level of a sweep file (see the module docstring); the sections are checked one by one after it."""

    name: str = "sweep"
    kind: Literal["var", "tokenizer"] = "var"
    description: str = ""
    output_root: str = "outputs/sweeps"
    launcher: Literal["slurm", "torchrun", "local"] = "local"
    tracking: Optional[dict] = None
    recipe: Optional[Literal["release"]] = None
    base: Optional[dict] = None
    axes: Optional[dict] = None
    overrides: Optional[dict] = None
    resources: Optional[dict] = None
    torchrun: Optional[dict] = None
    tokenizer: Optional[dict] = None
    tokenize: Union[bool, dict, None] = None
    eval: Union[bool, dict, None] = None
    analyze: Union[bool, dict, None] = None

    def check(self) -> None:
        require(
            self, "name", _NAME_RE.match(self.name) is not None, "letters, digits, '_', '.', '-' (it names a folder)"
        )


#: the top-level keys, in the order the module docstring lists them
TOP_LEVEL = tuple(f for f in SweepFile.__dataclass_fields__)


@dataclass
class Sweep:
    """A validated sweep file. ``base`` and ``overrides`` hold flat dotted keys -> values."""

    name: str
    kind: str = "var"
    description: str = ""
    output_root: str = "outputs/sweeps"
    launcher: str = "local"
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    recipe: Optional[str] = None
    base: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    torchrun: TorchrunSpec = field(default_factory=TorchrunSpec)
    tokenizer: Optional[TokenizerStage] = None
    tokenize: Optional[TokenizeStage] = None
    eval: Optional[EvalStage] = None
    analyze: Optional[AnalyzeStage] = None
    source: str = "<sweep>"
    """The file it came from (for messages)."""
    lines: dict = field(default_factory=dict, repr=False)
    """Line of each key path in the file."""

    @property
    def config_class(self) -> type:
        return FitConfig if self.kind == "var" else FitTokenizerConfig

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def sweep_dir(self, output_root: Optional[str] = None) -> Path:
        return Path(output_root or self.output_root).expanduser().resolve() / self.name

    def tracking_uri(self, output_root: Optional[str] = None) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        root = Path(output_root or self.output_root).expanduser().resolve()
        return f"sqlite:///{root / 'mlflow.db'}"

    def error(self, message: str, key: Optional[str] = None) -> SweepError:
        """A SweepError located at ``key`` (a dotted sweep-file path) in this sweep's file."""
        return SweepError(message, file=self.source, key=key, line=_line_of(self.lines, key))


def _line_of(lines: dict, key: Optional[str]) -> Optional[int]:
    """Best line for a dotted key path: the deepest prefix found in the file."""
    if not key:
        return None
    parts: list = [int(part) if part.isdigit() else part for part in key.split(".")]
    # Try progressively shorter prefixes; dotted config keys in the file make the split ambiguous, so also try joining.
    for n in range(len(parts), 0, -1):
        prefix = tuple(parts[:n])
        if prefix in lines:
            return lines[prefix]
        for j in range(1, n):
            joined = (*prefix[:j], ".".join(str(p) for p in prefix[j:]))
            if joined in lines:
                return lines[joined]
            # overrides use numbers as keys
            joined_num = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in joined)
            if joined_num in lines:
                return lines[joined_num]
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


def section(cls: type, data: Any, where: str, err) -> Any:
    """A sweep section (or a run config) through ``var_lab.config.from_dict``, its errors located at ``where``."""
    try:
        return from_dict(cls, {} if data is None else data)
    except ConfigError as exc:
        key = ".".join(part for part in (where, exc.key) if part)
        raise err(exc.message, key or None) from None


# --------------------------------------------------------------------------------------------------------------------
# Config keys: flattening, nesting, checking a layer of dotted overrides against FitConfig / FitTokenizerConfig


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested mapping (possibly with dotted keys) -> flat {dotted key: value}. Lists stay values."""
    out: dict = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and dotted != "resources.sbatch":
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def nest(flat: dict) -> dict:
    """Flat {dotted key: value} -> nested mapping."""
    out: dict = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = copy.deepcopy(value)
    return out


def config_layer(cls: type, data: Any, where: str, err, allow_resources: bool = False) -> dict:
    """Check a (nested or dotted) mapping of overrides through the run config's path; returns it flat.

    A layer is checked as the config it gives on top of the defaults, so each value meets the same key, type and value
    checks as in ``--config`` or ``--a.b`` (``var_lab.config.from_dict``); the error is located at the layer's key.
    Sweep-only keys: ``data.global_batch`` and (with ``allow_resources``) ``resources.*``.

    Args:
        cls: FitConfig or FitTokenizerConfig.
        data: the mapping from the sweep file (or ``--set``).
        where: its sweep-file path (``base``, ``overrides.depth.16``).
        err: error factory ``err(message, sweep_key)``.
        allow_resources: accept ``resources.*`` keys (per-value overrides, ``--set``).

    Raises:
        SweepError: from ``err``.
    """
    if not isinstance(data, dict):
        raise err(f"must be a mapping of {cls.__name__} keys, got {_describe(data)}", where)
    flat: dict = {}
    origin: dict = {}
    for key, value in flatten(data).items():
        dotted = AXIS_ALIASES.get(key, key) if cls is FitConfig else key
        origin[dotted] = f"{where}.{key}"
        flat[dotted] = value
    config: dict = {}
    resources: dict = {}
    for dotted, value in flat.items():
        kwhere = origin[dotted]
        if dotted.startswith("resources."):
            if not allow_resources:
                raise err("resources.* keys belong in 'resources' or in per-value overrides", kwhere)
            resources[dotted.split(".", 1)[1]] = value
        elif dotted in OWNED_KEYS:
            raise err(f"set by the sweep; use {OWNED_KEYS[dotted]} instead", kwhere)
        elif dotted == GLOBAL_BATCH_KEY:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise err(invalid_message(GLOBAL_BATCH_KEY, value, "it must be an integer >= 1"), kwhere)
        else:
            config[dotted] = value
    if resources:
        try:
            check_keys(Resources, resources)  # the values are checked with the resources they change
        except ConfigError as exc:
            raise err(exc.message, f"{where}.resources.{exc.key}") from None
    try:
        from_dict(cls, nest(config))
    except ConfigError as exc:
        located = exc.key if exc.key in origin else next((k for k in origin if exc.key and k.startswith(exc.key)), None)
        raise err(exc.message, origin.get(located, where)) from None
    return flat


def parse_axis_key(sweep: Sweep, key: Any, where: str) -> str:
    """Canonical dotted config key of an axis or override key (``depth`` -> ``model.depth``)."""
    if not isinstance(key, str):
        raise sweep.error(f"axis keys must be strings, got {_describe(key)}", where)
    if key in AXIS_ALIASES:
        if sweep.kind != "var":
            raise sweep.error(f"'{key}' is an axis of kind var only; use a config key of FitTokenizerConfig", where)
        return AXIS_ALIASES[key]
    return key


def axis_label(dotted: str) -> str:
    """Short label of an axis in point keys (``model.depth`` -> ``depth``)."""
    for alias, full in AXIS_ALIASES.items():
        if dotted == full:
            return alias
    return dotted


def is_placeholder(path: Optional[str]) -> bool:
    """True when a path in a shipped sweep is a placeholder the user must replace."""
    return bool(path) and bool(_PLACEHOLDER_RE.search(str(path)))


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_sweep(path: Union[str, Path], patches: Optional[list[str]] = None) -> Sweep:
    """Read and validate a sweep file.

    Args:
        path: the YAML file.
        patches: ``KEY=VALUE`` edits of the sweep document applied before validation (dotted paths into the file,
            e.g. ``axes.depth=[1,2]`` or ``tokenizer.train.trainer.max_steps=5``; VALUE is YAML).

    Raises:
        SweepError: the file is missing, malformed or invalid (naming file, line, key path and what is allowed).
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise SweepError("sweep file not found", file=source)
    data, lines = load_yaml(path.read_text(), source)
    for patch in patches or []:
        data = apply_patch(data, patch, source)
    return validate_sweep(data, source, lines)


def apply_patch(data: Any, patch: str, source: str) -> dict:
    """Apply one ``dotted.path=YAML value`` edit to a sweep document (``--patch`` on the command line)."""
    if "=" not in patch:
        raise SweepError(f"--patch '{patch}' must look like KEY=VALUE (e.g. axes.depth=[1,2])", file=source)
    key, text = patch.split("=", 1)
    value, _ = load_yaml(text, f"--patch {key}")
    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    parts = key.strip().split(".")
    # Sections whose contents are config keys: the rest of the path is one dotted config key. A shorter path
    # replaces the whole section or a part of it (overrides={}, base={...}).
    if parts[0] == "base":
        prefix = 1
    elif parts[:2] == ["tokenizer", "train"]:
        prefix = 2
    elif parts[0] == "overrides":
        prefix = 3
    else:
        prefix = len(parts) - 1
    prefix = min(prefix, len(parts) - 1)
    node = data
    for part in parts[:prefix]:
        if part not in node and part.lstrip("-").isdigit() and int(part) in node:
            part = int(part)  # YAML keys such as overrides.depth.16 are numbers
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[".".join(parts[prefix:])] = value
    return data


def validate_sweep(data: Any, source: str, lines: Optional[dict] = None) -> Sweep:
    """Validate a parsed sweep document; see the module docstring for the schema."""
    lines = lines or {}

    def err(message: str, key: Optional[str] = None) -> SweepError:
        return SweepError(message, file=source, key=key, line=_line_of(lines, key))

    if not isinstance(data, dict):
        raise err(f"a sweep file must be a mapping of keys ({', '.join(TOP_LEVEL)}), got {_describe(data)}")
    for key in data:
        if key not in TOP_LEVEL:
            raise err(f"unknown key '{key}'; allowed top-level keys: {', '.join(TOP_LEVEL)}", str(key))
    if "name" not in data:
        raise err("missing required key 'name' (the sweep's name: letters, digits, _ . -)")
    top = section(SweepFile, {k: v for k, v in data.items() if v is not None}, "", err)
    sweep = Sweep(
        name=top.name,
        kind=top.kind,
        description=top.description,
        output_root=top.output_root,
        launcher=top.launcher,
        source=source,
        lines=lines,
    )
    sweep.tracking = section(TrackingSpec, top.tracking, "tracking", err)
    if top.recipe is not None and sweep.kind != "var":
        raise err("the release's per-depth recipe is for VAR runs; it belongs to sweeps of kind var", "recipe")
    sweep.recipe = top.recipe
    sweep.resources = section(Resources, top.resources, "resources", err)
    sweep.torchrun = section(TorchrunSpec, top.torchrun, "torchrun", err)

    cls = sweep.config_class
    sweep.base = config_layer(cls, top.base or {}, "base", err)

    axes: dict = {}
    for key, values in (top.axes or {}).items():
        where = f"axes.{key}"
        dotted = parse_axis_key(_ErrSweep(sweep, err), key, where)
        if dotted in axes:
            raise err(f"axis given twice (as '{key}' and as '{axis_label(dotted)}')", where)
        if dotted in OWNED_KEYS or dotted.startswith("resources."):
            raise err(f"'{key}' cannot be an axis; the sweep sets it from {OWNED_KEYS.get(dotted, 'resources')}", where)
        if not isinstance(values, list) or not values:
            raise err(f"must be a non-empty list of values, got {_describe(values)}", where)
        for i, value in enumerate(values):
            config_layer(cls, {dotted: value}, where, _at(err, f"{where}.{i}"))
        labels = [format_value(v) for v in values]
        if len(set(labels)) != len(labels):
            raise err(f"values repeat: {labels}", where)
        axes[dotted] = list(values)
    sweep.axes = axes

    overrides: dict = {}
    for key, per_value in (top.overrides or {}).items():
        where = f"overrides.{key}"
        dotted = parse_axis_key(_ErrSweep(sweep, err), key, where)
        if dotted not in axes:
            known = ", ".join(axis_label(a) for a in axes) or "none"
            raise err(f"'{key}' is not an axis of this sweep; axes: {known}", where)
        if not isinstance(per_value, dict):
            raise err(f"must map axis values to overrides, got {_describe(per_value)}", where)
        labels = {format_value(v): v for v in axes[dotted]}
        table: dict = {}
        for value, settings in per_value.items():
            vwhere = f"{where}.{value}"
            label = format_value(value)
            if label not in labels:
                raise err(f"{value!r} is not a value of axis '{key}'; values: {', '.join(labels)}", vwhere)
            if not isinstance(settings, dict):
                raise err(f"must be a mapping of config keys (or resources.*), got {_describe(settings)}", vwhere)
            flat = config_layer(cls, settings, vwhere, err, allow_resources=True)
            resources = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("resources.")}
            build_resources(vars(sweep.resources), resources, f"{vwhere}.resources", err)
            table[label] = flat
        overrides[dotted] = table
    sweep.overrides = overrides

    if top.tokenizer is not None:
        if sweep.kind != "var":
            raise err("the tokenizer stage belongs to sweeps of kind var", "tokenizer")
        stage = section(TokenizerStage, top.tokenizer, "tokenizer", err)
        if (stage.checkpoint is None) == (stage.train is None):
            raise err("give exactly one of 'checkpoint' (a file) or 'train' (a FitTokenizerConfig)", "tokenizer")
        if stage.train is not None:
            # refuses the keys the sweep owns (OWNED_KEYS), as for base and overrides
            stage.train = config_layer(FitTokenizerConfig, stage.train, "tokenizer.train", err)
        if stage.resources is not None:
            build_resources(vars(sweep.resources), stage.resources, "tokenizer.resources", err)
        sweep.tokenizer = stage
    for key, cls_stage in (("tokenize", TokenizeStage), ("eval", EvalStage), ("analyze", AnalyzeStage)):
        value = getattr(top, key)
        if value is None or value is False:
            continue
        if sweep.kind != "var":
            raise err(f"the {key} stage belongs to sweeps of kind var", key)
        stage = section(cls_stage, {} if value is True else value, key, err)
        if stage.resources is not None:
            build_resources(vars(sweep.resources), stage.resources, f"{key}.resources", err)
        setattr(sweep, key, stage)
    if sweep.tokenize is not None and sweep.tokenizer is None:
        raise err("tokenize needs a tokenizer stage (tokenizer.checkpoint or tokenizer.train)", "tokenize")
    return sweep


class _ErrSweep:
    """Adapter giving parse_axis_key a sweep-like object whose error() uses the loader's error factory."""

    def __init__(self, sweep: Sweep, err) -> None:
        self.kind = sweep.kind
        self.error = err


def build_resources(current: dict, data: Any, key: str, err) -> Resources:
    """Resources from ``current`` (a dict of Resources fields) updated by the mapping ``data``, validated."""
    if data is not None and not isinstance(data, dict):
        raise err(f"must be a mapping, got {_describe(data)}", key)
    return section(Resources, {**current, **(data or {})}, key, err)


def _at(err, where: str):
    """An error factory that reports at ``where`` whatever key the checker names."""

    def located(message: str, key: Optional[str] = None) -> SweepError:
        return err(message, where)

    return located


def format_value(value: Any) -> str:
    """Stable text of an axis value in point keys (0.0001 for 1e-4, true/false, lists joined by '-')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    if value is None:
        return "null"
    return str(value).replace("/", "_").replace(",", "_").replace(" ", "_")
