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
import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from var_lab import config as config_module
from var_lab.config import FitConfig, FitTokenizerConfig

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
# The sweep dataclasses


@dataclass
class Resources:
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
    setup: list = field(default_factory=list)
    sbatch: dict = field(default_factory=dict)

    @property
    def processes_per_node(self) -> int:
        """One process per GPU, or one per node on CPU."""
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


@dataclass
class TrackingSpec:
    uri: Optional[str] = None
    experiment: Optional[str] = None


@dataclass
class TorchrunSpec:
    rdzv_endpoint: Optional[str] = None
    rdzv_backend: str = "c10d"
    max_restarts: int = 0


@dataclass
class TokenizerStage:
    checkpoint: Optional[str] = None
    train: Optional[dict] = None
    resources: Optional[dict] = None


@dataclass
class TokenizeStage:
    resources: Optional[dict] = None
    args: list = field(default_factory=list)


@dataclass
class EvalStage:
    num_samples: int = 500
    per_class: Optional[int] = None
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    reference: Optional[str] = None
    batch_size: Optional[int] = None
    seed: int = 0
    args: list = field(default_factory=list)
    resources: Optional[dict] = None


@dataclass
class AnalyzeStage:
    out: Optional[str] = None
    args: list = field(default_factory=list)
    resources: Optional[dict] = None


@dataclass
class Sweep:
    """A validated sweep file. ``base`` and ``overrides`` hold flat dotted keys -> values."""

    name: str
    kind: str = "var"
    description: str = ""
    output_root: str = "outputs/sweeps"
    launcher: str = "local"
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
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


# Allowed top-level keys with their types (the sub-structures are checked by _build_section).
_TOP_LEVEL = {
    "name": str,
    "kind": str,
    "description": str,
    "output_root": str,
    "launcher": str,
    "tracking": dict,
    "base": dict,
    "axes": dict,
    "overrides": dict,
    "resources": dict,
    "torchrun": dict,
    "tokenizer": dict,
    "tokenize": (bool, dict),
    "eval": (bool, dict),
    "analyze": (bool, dict),
}

# Value constraints on resources: key -> (predicate, what is allowed)
_RESOURCE_RULES = {
    "nodes": (lambda v: v >= 1, "an integer >= 1"),
    "gpus_per_node": (lambda v: v >= 0, "an integer >= 0 (0: CPU)"),
    "cpus_per_task": (lambda v: v >= 1, "an integer >= 1"),
    "mem_gb": (lambda v: v is None or v > 0, "a number > 0 or null"),
    "time_min": (lambda v: v >= 1, "an integer >= 1 (minutes)"),
    "signal_delay_s": (lambda v: v >= 0, "an integer >= 0 (seconds)"),
}


def _is_increasing(v: Any) -> bool:
    return len(v) >= 1 and all(isinstance(p, int) and p >= 1 for p in v) and all(a < b for a, b in zip(v, v[1:]))


# Value constraints on run configs (dotted keys of FitConfig / FitTokenizerConfig): key -> (predicate, allowed)
_CONFIG_RULES: dict[str, tuple] = {
    "model.depth": (lambda v: v >= 1, "an integer >= 1"),
    "model.num_classes": (lambda v: v >= 1, "an integer >= 1"),
    "model.mlp_ratio": (lambda v: v > 0, "a number > 0"),
    "model.attn_impl": (lambda v: v in ("auto", "flex", "sdpa", "math"), "one of auto, flex, sdpa, math"),
    "tokenizer.vocab_size": (lambda v: v >= 2, "an integer >= 2"),
    "tokenizer.z_channels": (lambda v: v >= 1, "an integer >= 1"),
    "tokenizer.ch": (lambda v: v >= 1, "an integer >= 1"),
    "tokenizer.patch_nums": (_is_increasing, "a strictly increasing list of integers >= 1, e.g. [1, 2, 3, 4, 6, 8]"),
    "tokenizer.ch_mult": (lambda v: len(v) >= 1 and all(m >= 1 for m in v), "a non-empty list of integers >= 1"),
    "data.name": (lambda v: v in ("fashion_mnist", "folder", "tokens"), "one of fashion_mnist, folder, tokens"),
    "data.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.global_batch": (lambda v: v >= 1, "an integer >= 1"),
    "data.resolution": (lambda v: v >= 8, "an integer >= 8 (pixels)"),
    "data.num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "data.limit_train": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "data.limit_val": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "optim.base_lr": (lambda v: v > 0, "a number > 0"),
    "lr": (lambda v: v > 0, "a number > 0"),
    "optim.final_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "optim.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optim.final_weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optim.grad_clip": (lambda v: v >= 0, "a number >= 0 (0 disables)"),
    "trainer.accelerator": (lambda v: v in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"), "auto, cpu, gpu, cuda, mps"),
    "trainer.max_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.max_steps": (lambda v: v == -1 or v >= 1, "-1 (all epochs) or an integer >= 1"),
    "trainer.accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, "an integer >= 1"),
}


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


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true/false",
    dict: "a mapping",
    list: "a list",
}


def _type_name(tp: Any) -> str:
    if isinstance(tp, tuple):
        return " or ".join(_type_name(t) for t in tp)
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


def _check_plain(value: Any, tp: Any, key: str, err) -> Any:
    """Check a value against a simple python type (or tuple of types); ints pass as floats; bools are not ints."""
    types = tp if isinstance(tp, tuple) else (tp,)
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int stays an int: Lightning reads limit_val_batches=8 and 8.0 differently
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t not in (int, float) and isinstance(value, t):
            return value
    raise err(f"must be {_type_name(tp)}, got {_describe(value)}", key)


def _build_section(cls: type, data: Any, key: str, err, rules: Optional[dict] = None) -> Any:
    """Build one of the small sweep dataclasses from a mapping, checking keys, types and value rules."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise err(f"must be a mapping, got {_describe(data)}", key)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        sub = f"{key}.{name}"
        if name not in fields:
            raise err(f"unknown key '{name}'; allowed keys here: {', '.join(sorted(fields))}", sub)
        kwargs[name] = _check_annotation(value, hints[name], sub, err)
        if rules and name in rules:
            ok, allowed = rules[name]
            if not ok(kwargs[name]):
                raise err(f"bad value {kwargs[name]!r}; allowed: {allowed}", sub)
    return cls(**kwargs)


def _check_annotation(value: Any, tp: Any, key: str, err) -> Any:
    """Check ``value`` against a type annotation of a config or sweep dataclass field; returns it normalised."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None:
            if type(None) in args:
                return None
            raise err(f"must not be null; allowed: {' or '.join(_annotation_name(a) for a in args)}", key)
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _check_annotation(value, a, key, err)
            except SweepError as e:
                errors.append(e)
        allowed = " or ".join(_annotation_name(a) for a in args)
        raise err(f"must be {allowed}, got {_describe(value)}", key)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise err(f"must be {_annotation_name(tp)}, got {_describe(value)}", key)
        if not args:
            return list(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return [_check_annotation(v, args[0], f"{key}.{i}", err) for i, v in enumerate(value)]
        if origin is tuple:
            if len(value) != len(args):
                raise err(f"must be {_annotation_name(tp)} ({len(args)} items), got {len(value)} items", key)
            return [_check_annotation(v, a, f"{key}.{i}", err) for i, (v, a) in enumerate(zip(value, args))]
        return [_check_annotation(v, args[0], f"{key}.{i}", err) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise err(f"must be a mapping, got {_describe(value)}", key)
        return value
    if tp in (int, float, str, bool):
        value = _check_plain(value, tp, key, err)
        if tp is float and not math.isfinite(value):
            raise err(f"must be a finite number, got {value!r}", key)
        return value
    return value


def _annotation_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Union:
        return " or ".join(_annotation_name(a) for a in args)
    if origin in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_annotation_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
        if args:
            return f"a list [{', '.join(_annotation_name(a) for a in args)}]"
        return "a list"
    if tp is Any:
        return "any value"
    return _type_name(tp)


# --------------------------------------------------------------------------------------------------------------------
# Config keys: flattening, nesting, checking against FitConfig / FitTokenizerConfig


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested mapping (possibly with dotted keys) -> flat {dotted key: value}. Lists stay values."""
    out: dict = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
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


def config_field(cls: type, dotted: str) -> tuple[bool, Any, list[str], str]:
    """Resolve a dotted key in a config dataclass.

    Returns:
        (found, annotation, allowed keys at the level where resolution stopped, the prefix that resolved).
    """
    parts = dotted.split(".")
    current = cls
    done: list[str] = []
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(current)}
        if part not in fields:
            return False, None, sorted(fields), ".".join(done)
        hints = typing.get_type_hints(current, vars(config_module))
        tp = hints[part]
        done.append(part)
        default = _field_default(fields[part])
        if dataclasses.is_dataclass(default):
            if i == len(parts) - 1:
                return True, type(default), [], ".".join(done)
            current = type(default)
        elif i < len(parts) - 1:
            return False, None, [], ".".join(done)
        else:
            return True, tp, [], ".".join(done)
    return True, current, [], ".".join(done)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def check_config_value(cls: type, dotted: str, value: Any, err, where: str) -> Any:
    """Check one dotted config key and its value against the config class; returns the normalised value.

    Args:
        cls: FitConfig or FitTokenizerConfig.
        dotted: the key in the config (e.g. ``optim.base_lr``).
        value: the value from the sweep file.
        err: error factory ``err(message, sweep_key)``.
        where: the sweep-file path of this key, for messages (e.g. ``overrides.depth.16.optim.base_lr``).
    """
    if dotted == GLOBAL_BATCH_KEY:
        value = _check_plain(value, int, where, err)
    else:
        found, tp, allowed, resolved = config_field(cls, dotted)
        if not found:
            if allowed:
                level = f"under '{resolved}'" if resolved else "at the top level"
                extra = f", {GLOBAL_BATCH_KEY.split('.')[-1]}" if resolved == "data" else ""
                bad = dotted[len(resolved) + 1 :].split(".")[0] if resolved else dotted.split(".")[0]
                raise err(
                    f"unknown config key '{bad}' {level} of {cls.__name__}; allowed: {', '.join(allowed)}{extra}",
                    where,
                )
            raise err(f"'{resolved}' of {cls.__name__} has no sub-keys", where)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise err(f"must be a mapping of {tp.__name__} keys, got {_describe(value)}", where)
            return {k: check_config_value(cls, f"{dotted}.{k}", v, err, f"{where}.{k}") for k, v in value.items()}
        value = _check_annotation(value, tp, where, err)
    rule = _CONFIG_RULES.get(dotted)
    if rule is not None and value is not None:
        ok, allowed_text = rule
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise err(f"bad value {value!r}; allowed: {allowed_text}", where)
    return value


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
        raise err(f"a sweep file must be a mapping of keys ({', '.join(_TOP_LEVEL)}), got {_describe(data)}")
    for key, value in data.items():
        if key not in _TOP_LEVEL:
            raise err(f"unknown key '{key}'; allowed top-level keys: {', '.join(_TOP_LEVEL)}", str(key))
        if value is not None or key in ("tokenize", "eval", "analyze"):
            _check_plain(value if value is not None else {}, _TOP_LEVEL[key], str(key), err)
    if "name" not in data:
        raise err("missing required key 'name' (the sweep's name: letters, digits, _ . -)")
    name = data["name"]
    if not _NAME_RE.match(name):
        raise err(f"bad value {name!r}; allowed: letters, digits, '_', '.', '-' (it names a folder)", "name")
    kind = data.get("kind") or "var"
    if kind not in KINDS:
        raise err(f"bad value {kind!r}; allowed: {', '.join(KINDS)}", "kind")
    launcher = data.get("launcher") or "local"
    if launcher not in LAUNCHERS:
        raise err(f"bad value {launcher!r}; allowed: {', '.join(LAUNCHERS)}", "launcher")

    sweep = Sweep(
        name=name,
        kind=kind,
        description=data.get("description") or "",
        output_root=data.get("output_root") or "outputs/sweeps",
        launcher=launcher,
        source=source,
        lines=lines,
    )
    sweep.tracking = _build_section(TrackingSpec, data.get("tracking"), "tracking", err)
    sweep.resources = build_resources({}, data.get("resources"), "resources", err)
    sweep.torchrun = _build_section(TorchrunSpec, data.get("torchrun"), "torchrun", err)
    if sweep.torchrun.rdzv_endpoint is not None and not re.match(r"^[^:\s]+:\d+$", sweep.torchrun.rdzv_endpoint):
        raise err(f"bad value {sweep.torchrun.rdzv_endpoint!r}; allowed: HOST:PORT", "torchrun.rdzv_endpoint")

    cls = sweep.config_class
    # base
    base = data.get("base") or {}
    sweep.base = _check_config_mapping(cls, base, "base", err)

    # axes
    axes_raw = data.get("axes") or {}
    axes: dict = {}
    for key, values in axes_raw.items():
        where = f"axes.{key}"
        dotted = parse_axis_key(_ErrSweep(sweep, err), key, where)
        if dotted in axes:
            raise err(f"axis given twice (as '{key}' and as '{axis_label(dotted)}')", where)
        if dotted in OWNED_KEYS or dotted.startswith("resources."):
            raise err(f"'{key}' cannot be an axis; the sweep sets it from {OWNED_KEYS.get(dotted, 'resources')}", where)
        if not isinstance(values, list) or not values:
            raise err(f"must be a non-empty list of values, got {_describe(values)}", where)
        checked = [check_config_value(cls, dotted, v, err, f"{where}.{i}") for i, v in enumerate(values)]
        labels = [format_value(v) for v in checked]
        if len(set(labels)) != len(labels):
            raise err(f"values repeat: {labels}", where)
        axes[dotted] = checked
    sweep.axes = axes

    # overrides
    overrides_raw = data.get("overrides") or {}
    overrides: dict = {}
    for key, per_value in overrides_raw.items():
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
            label = format_value(check_config_value(cls, dotted, value, err, vwhere))
            if label not in labels:
                raise err(f"{value!r} is not a value of axis '{key}'; values: {', '.join(labels)}", vwhere)
            if not isinstance(settings, dict):
                raise err(f"must be a mapping of config keys (or resources.*), got {_describe(settings)}", vwhere)
            table[label] = _check_config_mapping(cls, settings, vwhere, err, allow_resources=True)
        overrides[dotted] = table
    sweep.overrides = overrides

    # stages
    tok = data.get("tokenizer")
    if tok is not None:
        if kind != "var":
            raise err("the tokenizer stage belongs to sweeps of kind var", "tokenizer")
        stage = _build_section(TokenizerStage, tok, "tokenizer", err)
        if (stage.checkpoint is None) == (stage.train is None):
            raise err("give exactly one of 'checkpoint' (a file) or 'train' (a FitTokenizerConfig)", "tokenizer")
        if stage.train is not None:
            # refuses the keys the sweep owns (OWNED_KEYS), as for base and overrides
            stage.train = _check_config_mapping(FitTokenizerConfig, stage.train, "tokenizer.train", err)
        if stage.resources is not None:
            build_resources(dataclasses.asdict(sweep.resources), stage.resources, "tokenizer.resources", err)
        sweep.tokenizer = stage
    for key, cls_stage in (("tokenize", TokenizeStage), ("eval", EvalStage), ("analyze", AnalyzeStage)):
        value = data.get(key)
        if value is None or value is False:
            continue
        if kind != "var":
            raise err(f"the {key} stage belongs to sweeps of kind var", key)
        stage = _build_section(cls_stage, {} if value is True else value, key, err, _STAGE_RULES.get(key))
        if any(not isinstance(a, str) for a in stage.args):
            raise err("must be a list of strings (command-line arguments)", f"{key}.args")
        if stage.resources is not None:
            build_resources(dataclasses.asdict(sweep.resources), stage.resources, f"{key}.resources", err)
        setattr(sweep, key, stage)
    if sweep.tokenize is not None and sweep.tokenizer is None:
        raise err("tokenize needs a tokenizer stage (tokenizer.checkpoint or tokenizer.train)", "tokenize")
    return sweep


_STAGE_RULES = {
    "eval": {
        "num_samples": (lambda v: v >= 1, "an integer >= 1"),
        "per_class": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
        "cfg": (lambda v: v >= 0, "a number >= 0"),
        "top_k": (lambda v: v >= 0, "an integer >= 0 (0: off)"),
        "top_p": (lambda v: 0 <= v <= 1, "a number in [0, 1] (0: off)"),
        "batch_size": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    }
}


class _ErrSweep:
    """Adapter giving parse_axis_key a sweep-like object whose error() uses the loader's error factory."""

    def __init__(self, sweep: Sweep, err) -> None:
        self.kind = sweep.kind
        self.error = err


def build_resources(current: dict, data: Any, key: str, err) -> Resources:
    """Resources from ``current`` (a dict of Resources fields) updated by the mapping ``data``, validated."""
    merged = {**current, **(data or {})} if isinstance(data, dict) or data is None else data
    res = _build_section(Resources, merged, key, err, _RESOURCE_RULES)
    if any(not isinstance(line, str) for line in res.setup):
        raise err("must be a list of shell lines (strings)", f"{key}.setup")
    for opt, value in res.sbatch.items():
        if not isinstance(opt, str) or not isinstance(value, (str, int, float, bool)):
            raise err(f"sbatch options map an option name to a string, number or true; got {opt!r}: {value!r}", key)
        if opt in ("signal", "nodes", "ntasks-per-node", "ntasks_per_node", "time", "output", "error"):
            raise err(
                f"'{opt}' is set by the launcher from resources; remove it from resources.sbatch", f"{key}.sbatch"
            )
    if res.signal_delay_s >= res.time_min * 60:
        raise err(
            f"signal_delay_s ({res.signal_delay_s}) must be shorter than the time limit ({res.time_min} min)",
            f"{key}.signal_delay_s",
        )
    return res


def _check_config_mapping(cls: type, data: Any, where: str, err, allow_resources: bool = False) -> dict:
    """Validate a (nested or dotted) mapping of config keys; returns it flat {dotted: value}."""
    if not isinstance(data, dict):
        raise err(f"must be a mapping of {cls.__name__} keys, got {_describe(data)}", where)
    flat: dict = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise err(f"config keys must be strings, got {_describe(key)}", where)
        dotted_key = AXIS_ALIASES.get(key, key) if cls is FitConfig else key
        if isinstance(value, dict) and value and not _is_leaf_mapping(cls, dotted_key):
            # nested section: recurse so that errors carry the full path
            sub = _check_config_mapping(
                cls, {f"{dotted_key}.{k}": v for k, v in value.items()}, where, err, allow_resources
            )
            flat.update(sub)
            continue
        kwhere = f"{where}.{key}"
        if dotted_key.startswith("resources."):
            if not allow_resources:
                raise err("resources.* keys belong in 'resources' or in per-value overrides", kwhere)
            res_key = dotted_key.split(".", 1)[1]
            fields = {f.name for f in dataclasses.fields(Resources)}
            if res_key not in fields:
                raise err(f"unknown resources key '{res_key}'; allowed: {', '.join(sorted(fields))}", kwhere)
            _build_section(
                Resources, {res_key: value}, "resources", functools.partial(_at, err, kwhere), _RESOURCE_RULES
            )
            flat[dotted_key] = value
            continue
        if dotted_key in OWNED_KEYS:
            raise err(f"set by the sweep; use {OWNED_KEYS[dotted_key]} instead", kwhere)
        flat[dotted_key] = check_config_value(cls, dotted_key, value, err, kwhere)
    return flat


def _at(err, where: str, message: str, key: Optional[str] = None) -> SweepError:
    """An error reported at ``where`` whatever key the checker names."""
    return err(message, where)


def _is_leaf_mapping(cls: type, dotted: str) -> bool:
    """Whether a dict value at ``dotted`` is a value itself (not a config section)."""
    if dotted.startswith("resources."):
        return dotted.split(".", 1)[1] == "sbatch"
    found, tp, _, _ = config_field(cls, dotted)
    return found and not dataclasses.is_dataclass(tp)


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
