"""Run configuration: one typed tree of dataclasses per run, and the one path that validates it.

Every way a run config is given goes through :func:`from_dict` (a mapping: a sweep point, a checkpoint's stored
config) or :func:`parse_argv` (``var-lab fit --config run.yaml --model.depth 20``), which share their three steps:
the key names (:func:`check_keys`: an unknown key is named with the nearest valid one), the types (jsonargparse, from
the annotations: ``Literal`` for the closed sets of values), and the values (each dataclass's ``check``, run by
``__post_init__``). A bad value gives the same one-line message, ``model.depth=0 is invalid: ...``, whatever route it
came by; a sweep adds the file and line. Derived values (width, heads, drop path, the learning rate from the global
batch) are not fields: ``var_lab.models.presets`` and the training module compute them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from var_lab.inputs import BadInputError

DEFAULT_PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DEFAULT_PATCH_NUMS_32 = (1, 2, 3, 4, 6, 8)

#: what a valid depth is (also the message of ``var_lab.models.VAR`` built directly)
DEPTH_RULE = "the depth must be an integer >= 1 (width = 64 * depth, heads = depth)"
PATCH_NUMS_RULE = (
    "it must list at least two strictly increasing positive scale sides, smallest first, the last one equal to the "
    "latent side (e.g. [1, 2, 3, 4, 6, 8] for 32px images with ch_mult [1, 2, 2])"
)


def depth_is_valid(depth: Any) -> bool:
    """Whether ``depth`` is a model depth: an integer >= 1."""
    return isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1


class ConfigError(BadInputError):
    """A run config key or value is invalid; one line naming the key, the value and what is allowed.

    Attributes:
        key: the dotted key (``model.depth``), None for a problem of the whole mapping.
        message: the text without the source.
        source: where the config came from (a file), or None.
    """

    def __init__(self, message: str, key: Optional[str] = None, source: Optional[str] = None):
        self.key, self.message, self.source = key, message, source
        super().__init__(f"{source}: {message}" if source else message)


class InvalidValueError(ValueError):
    """Raised by a section's ``check``; the loader adds the section's path to ``name``."""

    def __init__(self, name: str, value: Any, rule: str):
        self.name, self.value, self.rule = name, value, rule
        super().__init__(invalid_message(name, value, rule))


def show(value: Any) -> str:
    """A value as the messages write it (tuples as lists, strings quoted)."""
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


def invalid_message(key: str, value: Any, rule: str) -> str:
    return f"{key}={show(value)} is invalid: {rule}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[__name__]))


@dataclass
class Section:
    """Base of the config sections (run configs and the sweep file's): ``__post_init__`` refuses null for a field
    that does not allow it and an empty string where the default is not one, then runs the section's ``check``."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and type(None) not in typing.get_args(hints[f.name]) and hints[f.name] is not Any:
                raise InvalidValueError(f.name, value, "it must not be null")
            if isinstance(value, str) and not value.strip() and f.default != "":
                raise InvalidValueError(f.name, value, "it must not be empty (leave the key out for the default)")
        self.check()

    def check(self) -> None:
        """Value rules of the section (``InvalidValueError`` naming the field)."""


def require(section: Any, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise InvalidValueError(name, getattr(section, name), rule)


def at_least(section: Any, name: str, low: float, strict: bool = False) -> None:
    value = getattr(section, name)
    if value is None:
        return
    ok = value > low if strict else value >= low
    kind = "an integer" if isinstance(value, int) else "a number"
    require(section, name, ok, f"it must be {kind} {'>' if strict else '>='} {low:g}")


def in_range(section: Any, name: str, low: float, high: float, closed: bool = True) -> None:
    value = getattr(section, name)
    if value is None:
        return
    ok = low <= value <= high if closed else low <= value < high
    require(section, name, ok, f"it must be a number in [{low:g}, {high:g}{']' if closed else ')'}")


#: what ``trainer.callbacks`` and ``trainer.logger`` entries must look like
CLASS_SPEC_RULE = (
    "a mapping {class_path: a dotted name such as lightning.pytorch.callbacks.LearningRateMonitor, init_args: "
    "{...}} (init_args optional, no other keys)"
)


def _is_class_spec(spec: Any) -> bool:
    if not isinstance(spec, dict) or not set(spec) <= {"class_path", "init_args"}:
        return False
    path, args = spec.get("class_path"), spec.get("init_args", {})
    return (
        isinstance(path, str)
        and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", path) is not None
        and isinstance(args, dict)
    )


@dataclass
class TokenizerModelConfig(Section):
    """Architecture of the multi-scale VQVAE tokenizer (defaults: the released ``vae_ch160v4096z32``)."""

    vocab_size: int = 4096
    """Codebook size V, shared by all scales."""
    z_channels: int = 32
    """Latent channels Cvae."""
    ch: int = 160
    """Base channel count of encoder and decoder."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Channel multiplier per resolution level; the downsampling factor is 2 ** (len(ch_mult) - 1)."""
    num_res_blocks: int = 2
    """Residual blocks per level in the encoder (the decoder has one more)."""
    dropout: float = 0.0
    """Dropout inside residual blocks."""
    beta: float = 0.25
    """Commitment loss weight."""
    quant_resi: float = 0.5
    """Mixing ratio of the phi convolutions: phi(h) = (1 - r) h + r conv(h)."""
    share_quant_resi: int = 4
    """Number of phi convolutions: 0 = one per scale, 1 = one shared, n = n spread over the scales."""
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS_256
    """Side of each scale, smallest first; the last one equals the latent side."""
    using_sa: bool = True
    """Self-attention at the lowest resolution level."""
    using_mid_sa: bool = True
    """Self-attention in the middle block."""

    def check(self) -> None:
        at_least(self, "vocab_size", 2)
        at_least(self, "z_channels", 1)
        at_least(self, "ch", 1)
        require(self, "ch_mult", len(self.ch_mult) >= 1 and min(self.ch_mult) >= 1, "a non-empty list of integers >= 1")
        at_least(self, "num_res_blocks", 1)
        in_range(self, "dropout", 0, 1, closed=False)
        at_least(self, "beta", 0)
        in_range(self, "quant_resi", -1, 1)
        at_least(self, "share_quant_resi", 0)
        p = list(self.patch_nums)
        increasing = len(p) >= 2 and min(p) >= 1 and all(b > a for a, b in zip(p, p[1:]))
        require(self, "patch_nums", increasing, PATCH_NUMS_RULE)


@dataclass
class VARModelConfig(Section):
    """Architecture of the VAR transformer. One size knob: ``depth`` (width 64 * depth, heads = depth)."""

    depth: int = 16
    """Number of transformer blocks; width is 64 * depth and heads = depth."""
    num_classes: Optional[int] = None
    """Number of classes (the table has one more row, "no class", for guidance); None: from the dataset."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP relative to the model width."""
    drop_path_rate: Optional[float] = None
    """Stochastic depth of the last block; None means the release's 0.1 * depth / 24."""
    drop_rate: float = 0.0
    """Dropout after the attention projection and the MLP."""
    attn_drop_rate: float = 0.0
    """Dropout on attention probabilities."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    shared_aln: bool = False
    """Compute the AdaLN modulation once for all blocks (the release's d36 at 512px)."""
    attn_l2_norm: bool = True
    """L2-normalise q and k per head with a learned per-head scale (the released models)."""
    cond_drop_rate: float = 0.1
    """Probability of dropping a label to "no class" in training (classifier-free guidance)."""
    attn_impl: Literal["auto", "flex", "sdpa", "math"] = "auto"
    """Attention kernel: auto (flex on CUDA, sdpa elsewhere), flex, sdpa or math (dense mask, as the release)."""

    def check(self) -> None:
        require(self, "depth", depth_is_valid(self.depth), DEPTH_RULE)
        at_least(self, "num_classes", 1)
        at_least(self, "mlp_ratio", 0, strict=True)
        in_range(self, "drop_path_rate", 0, 1, closed=False)
        in_range(self, "drop_rate", 0, 1, closed=False)
        in_range(self, "attn_drop_rate", 0, 1, closed=False)
        at_least(self, "norm_eps", 0, strict=True)
        in_range(self, "cond_drop_rate", 0, 1)


@dataclass
class DataConfig(Section):
    """Where images or token shards come from and how they are batched."""

    name: Literal["fashion_mnist", "folder", "tokens"] = "fashion_mnist"
    """Dataset: fashion_mnist (the embedded default), folder (ImageNet-style train/val folders) or tokens."""
    root: Optional[str] = None
    """Dataset root: the image folder (with train/ and val/), or the Fashion-MNIST folder (default: Debian's)."""
    token_dir: Optional[str] = None
    """Folder of token shards written by ``var-lab tokenize`` (used when name is tokens)."""
    resolution: int = 32
    """Image side in pixels."""
    batch_size: int = 64
    """Per-device batch size; the global batch is batch_size * devices * num_nodes."""
    num_workers: int = 2
    """DataLoader worker processes per device."""
    limit_train: Optional[int] = None
    """Use a fixed random subset (seed 0) of N training samples (tiny runs and tests)."""
    limit_val: Optional[int] = None
    """Use a fixed random subset (seed 0) of N validation samples."""
    hflip: bool = False
    """Random horizontal flip (off in the release)."""

    def check(self) -> None:
        at_least(self, "resolution", 8)
        at_least(self, "batch_size", 1)
        at_least(self, "num_workers", 0)
        at_least(self, "limit_train", 1)
        at_least(self, "limit_val", 1)


@dataclass
class OptimConfig(Section):
    """The release's optimiser and schedule (docs/var_facts.md)."""

    base_lr: float = 1e-4
    """Learning rate per 256 images of global batch: lr = base_lr * global_batch / 256 (times reference_width / width
    when reference_width is set)."""
    reference_width: Optional[int] = None
    """Width at which base_lr holds; wider models get lr * reference_width / width (Adam's muP rule for hidden
    matrices, applied to every parameter), so one base_lr serves a whole depth sweep. None: no width scaling (the
    release tuned base_lr per depth instead)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.05
    """Initial weight decay."""
    final_weight_decay: float = 0.05
    """Weight decay at the end of training (cosine schedule from weight_decay)."""
    grad_clip: float = 2.0
    """Global gradient-norm clipping threshold (0 disables), applied by the Lightning Trainer (its
    ``gradient_clip_val``, algorithm "norm") so that a sharding strategy (FSDP) clips over all shards."""
    warmup_epochs: Optional[float] = None
    """Warm-up length in epochs; None means epochs / 50 as in the release."""
    warmup_start_ratio: float = 0.005
    """Warm-up starts at this fraction of the peak learning rate."""
    final_lr_ratio: float = 0.1
    """The learning rate decays linearly to this fraction of the peak (the release's wpe)."""
    label_smoothing: float = 0.0
    """Label smoothing of the token cross-entropy."""
    alng: float = 1e-3
    """Initial scale of the AdaLN gamma rows (the release's init_adaln_gamma)."""
    fused: Optional[bool] = None
    """Fused AdamW; None means on for CUDA."""
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of the weights with this decay per optimiser step (e.g. 0.999), through
    Lightning's ``EMAWeightAveraging``. Validation runs on the average, a checkpoint's ``state_dict`` holds it (the
    raw weights in ``current_model_state``), and ``var-lab eval`` / ``sample`` use it unless ``--model-weights raw``.
    None: no average."""

    def check(self) -> None:
        at_least(self, "base_lr", 0, strict=True)
        at_least(self, "reference_width", 1)
        require(self, "betas", all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)")
        at_least(self, "weight_decay", 0)
        at_least(self, "final_weight_decay", 0)
        at_least(self, "grad_clip", 0)
        at_least(self, "warmup_epochs", 0)
        in_range(self, "warmup_start_ratio", 0, 1)
        in_range(self, "final_lr_ratio", 0, 1)
        in_range(self, "label_smoothing", 0, 1, closed=False)
        at_least(self, "alng", 0)
        in_range(self, "ema_decay", 0, 1, closed=False)


#: Lightning's precision names (``lightning.fabric.connector._PRECISION_INPUT_STR``)
Precision = Literal[
    "transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
    "32-true", "64-true", "64", "32", "16", "bf16",
]  # fmt: skip
#: Lightning's registered strategy names that var-lab runs with
Strategy = Literal[
    "auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false", "ddp_spawn", "ddp_fork",
    "ddp_notebook", "fsdp", "fsdp2", "fsdp_cpu_offload", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
    "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload", "single_device",
]  # fmt: skip


@dataclass
class TrainerConfig(Section):
    """Lightning Trainer settings; parallelism lives here, not in the models."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "auto"
    """cpu, gpu or auto."""
    devices: Union[int, list[int], str] = "auto"
    """Devices per node: a count (-1: all), a list of device indices, "auto", or indices as text ("0,1")."""
    num_nodes: int = 1
    """Number of nodes."""
    strategy: Strategy = "auto"
    """Lightning strategy: auto, ddp, ddp_find_unused_parameters_true, fsdp, ... ``fsdp2`` is var-lab's large-model
    path: PyTorch's FSDP2 (``fully_shard``) through Lightning's ModelParallelStrategy, each VAR block one shard unit
    and the rest of the transformer the root unit; checkpoints are gathered into one full file on rank 0 (the usual
    format, which ``var-lab export`` turns into the released one). It also runs on CPUs over gloo."""
    precision: Optional[Precision] = None
    """Lightning precision; None means bf16-mixed on CUDA and 32-true on CPU."""
    max_epochs: int = 1
    """Training epochs (the schedule's length)."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run all epochs); the lr and weight-decay schedule then spans
    min(max_steps, the steps of max_epochs), so a run capped by max_steps still finishes its schedule."""
    val_check_interval: Optional[float] = None
    """Validate every N optimiser steps (a whole number, counted across epochs) or a fraction (< 1) of an epoch;
    None: once per epoch. Every run is also validated at its last step."""
    check_val_every_n_epoch: int = 1
    """Validate every N epochs."""
    log_every_n_steps: int = 10
    """Log training metrics every N steps."""
    limit_val_batches: Optional[float] = None
    """Validate on at most this many batches (int) or this fraction (float)."""
    accumulate_grad_batches: int = 1
    """Gradient accumulation."""
    deterministic: bool = False
    """Deterministic algorithms (for bit-exact resume tests)."""
    enable_progress_bar: bool = True
    """Show Lightning's progress bar (only where stdout is a terminal; elsewhere see text_progress_every_n_steps)."""
    text_progress_every_n_steps: int = 50
    """Where stdout is not a terminal (SLURM and sweep logs), one text line every N optimiser steps in place of the
    bar: step, loss, images/s, ETA; plus the MLflow run's address when training starts and ends. 0: no lines."""
    compile: bool = False
    """torch.compile the transformer blocks."""
    checkpoint_every_n_steps: Optional[int] = None
    """Also write a checkpoint every N optimiser steps (None: only at the end of each epoch)."""
    keep_checkpoints: int = 2
    """Step checkpoints, and epoch checkpoints, kept besides last.ckpt: the newest N of each (older good ones are the
    fallback for a corrupt last.ckpt)."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass (large depths)."""
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    """More Lightning callbacks beside var-lab's own, in jsonargparse's form: each ``{class_path: DOTTED.NAME,
    init_args: {...}}``, e.g. ``lightning.pytorch.callbacks.LearningRateMonitor`` or ``EarlyStopping``."""
    logger: list[dict[str, Any]] = field(default_factory=list)
    """More Lightning loggers beside MLflow (which stays the first, the one var-lab reads), same form, e.g.
    ``{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {save_dir: tb}}``."""

    def check(self) -> None:
        devices = self.devices
        if isinstance(devices, str):
            ok = devices == "auto" or re.fullmatch(r"-1|\d+(,\d+)*,?", devices.strip()) is not None
        elif isinstance(devices, list):
            ok = bool(devices) and all(isinstance(d, int) and d >= 0 for d in devices)
        else:
            ok = devices == -1 or devices >= 1
        require(self, "devices", ok, 'a count >= 1 (-1: all), a list of device indices, "auto" or "0,1"')
        at_least(self, "num_nodes", 1)
        at_least(self, "max_epochs", 1)
        require(self, "max_steps", self.max_steps == -1 or self.max_steps >= 1, "-1 (all epochs) or an integer >= 1")
        at_least(self, "val_check_interval", 0, strict=True)
        at_least(self, "check_val_every_n_epoch", 1)
        at_least(self, "log_every_n_steps", 1)
        at_least(self, "limit_val_batches", 0)
        at_least(self, "accumulate_grad_batches", 1)
        at_least(self, "checkpoint_every_n_steps", 1)
        at_least(self, "keep_checkpoints", 0)
        at_least(self, "text_progress_every_n_steps", 0)
        for name in ("callbacks", "logger"):
            for i, spec in enumerate(getattr(self, name)):
                if not _is_class_spec(spec):
                    raise InvalidValueError(f"{name}[{i}]", spec, CLASS_SPEC_RULE)


@dataclass
class TrackingConfig(Section):
    """MLflow tracking (see the MLflow contract in the README)."""

    tracking_uri: Optional[str] = None
    """MLflow tracking URI; None means $MLFLOW_TRACKING_URI or sqlite:///<output_dir>/../mlflow.db; none: CSV only."""
    experiment: str = "var-lab"
    """MLflow experiment name (one per sweep)."""
    run_name: Optional[str] = None
    """MLflow run name; None derives it from the model size."""
    sweep: Optional[str] = None
    """Sweep name, logged as the var_lab.sweep tag."""
    point: Optional[str] = None
    """Stable key of the sweep point (e.g. depth=16), logged as the var_lab.point tag."""
    sample_grid_every_n_val: int = 1
    """Log a sample grid PNG every N validations (0 disables)."""
    system_metrics_every_n_steps: int = 50
    """Log MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network; GPU with pynvml) every
    N optimiser steps, through the run's logger; 0: off."""

    def check(self) -> None:
        at_least(self, "sample_grid_every_n_val", 0)
        at_least(self, "system_metrics_every_n_steps", 0)


@dataclass
class EvalDuringTrainingConfig(Section):
    """Small-N FID computed during training by a callback."""

    every_n_epochs: int = 0
    """Compute FID every N epochs (0: off)."""
    num_samples: int = 200
    """Generated images per evaluation."""
    cfg: float = 1.5
    """Classifier-free guidance ratio."""
    top_k: int = 900
    """Top-k sampling."""
    top_p: float = 0.96
    """Top-p sampling."""

    def check(self) -> None:
        at_least(self, "every_n_epochs", 0)
        at_least(self, "num_samples", 1)
        at_least(self, "cfg", 0)
        at_least(self, "top_k", 0)
        in_range(self, "top_p", 0, 1)


#: ``resume``: auto (the newest checkpoint in output_dir), never (start afresh), or the path of a checkpoint
Resume = Union[Literal["auto", "never"], str]


@dataclass
class FitConfig(Section):
    """Train a VAR transformer on top of a frozen tokenizer."""

    output_dir: str = "outputs/var"
    """Folder for checkpoints, the MLflow run id and logs of this run."""
    seed: int = 0
    """Global random seed."""
    tokenizer_ckpt: Optional[str] = None
    """Tokenizer checkpoint (ours from fit-tokenizer, or the released vae_ch160v4096z32.pth)."""
    tokenizer: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    """Tokenizer architecture (must match the checkpoint)."""
    model: VARModelConfig = field(default_factory=VARModelConfig)
    """Transformer architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Trainer."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""
    eval: EvalDuringTrainingConfig = field(default_factory=EvalDuringTrainingConfig)
    """FID during training."""
    resume: Resume = "auto"
    """auto: resume from the last checkpoint in output_dir when there is one; never; or a checkpoint path."""


@dataclass
class TokenizerLossConfig(Section):
    """Losses of the tokenizer."""

    l1_weight: float = 1.0
    """Weight of the L1 reconstruction loss."""
    l2_weight: float = 1.0
    """Weight of the L2 reconstruction loss."""
    vq_weight: float = 1.0
    """Weight of the VQ + commitment loss."""
    perceptual_weight: float = 0.0
    """Weight of the LPIPS perceptual loss (needs local LPIPS weights; 0 disables)."""
    lpips_weights: Optional[str] = None
    """Folder with the LPIPS backbone weights (torch hub cache layout); required when perceptual_weight > 0."""
    disc_weight: float = 0.0
    """Weight of the patch-discriminator loss (0 disables; uses manual optimisation)."""
    disc_start_step: int = 0
    """Step at which the discriminator starts."""

    def check(self) -> None:
        for name in ("l1_weight", "l2_weight", "vq_weight", "perceptual_weight", "disc_weight", "disc_start_step"):
            at_least(self, name, 0)


@dataclass
class FitTokenizerConfig(Section):
    """Train the multi-scale VQVAE tokenizer."""

    output_dir: str = "outputs/tokenizer"
    """Folder for checkpoints and logs of this run."""
    seed: int = 0
    """Global random seed."""
    tokenizer: TokenizerModelConfig = field(
        default_factory=lambda: TokenizerModelConfig(
            vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), patch_nums=DEFAULT_PATCH_NUMS_32
        )
    )
    """Tokenizer architecture (the default suits 32x32 images: downsample 4, scales 1..8)."""
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    """Losses."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    lr: float = 2e-4
    """Learning rate (AdamW)."""
    betas: tuple[float, float] = (0.5, 0.9)
    """AdamW betas."""
    weight_decay: float = 0.0
    """Weight decay."""
    final_lr_ratio: float = 1.0
    """The learning rate decays linearly to this fraction of lr by the last step (1: constant)."""
    dead_code_restart_every: int = 10
    """Every N optimiser steps, move each dead code (see dead_code_threshold) onto a residual vector of the current
    batch, the cure for codebook collapse; 0 disables. The lookup is unchanged, so the released format is kept."""
    dead_code_threshold: float = 0.03
    """A code is dead when its hits (EMA, summed over scales) are under this fraction of a uniform share."""

    def check(self) -> None:
        at_least(self, "lr", 0, strict=True)
        require(self, "betas", all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)")
        at_least(self, "weight_decay", 0)
        in_range(self, "final_lr_ratio", 0, 1)
        at_least(self, "dead_code_restart_every", 0)
        at_least(self, "dead_code_threshold", 0)

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Trainer."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="var-lab-tokenizer"))
    """MLflow tracking."""
    resume: Resume = "auto"
    """auto: resume from the last checkpoint in output_dir when there is one; never; or a checkpoint path."""


def to_dict(cfg: Any) -> dict:
    """A config dataclass as a plain nested dict (tuples become lists), ready for YAML."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# The one path: keys (check_keys), types (jsonargparse), values (each section's check)


def section_types(cls: type) -> dict[str, type]:
    """Fields of ``cls`` that are config sections (dataclasses), with their types."""
    return {name: tp for name, tp in _hints(cls).items() if dataclasses.is_dataclass(tp)}


def config_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a config dataclass, dotted (``model.depth``), with its annotation."""
    out: dict[str, Any] = {}
    sections = section_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in sections:
            out.update(config_keys(sections[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = _hints(cls)[f.name]
    return out


def check_keys(cls: type, data: Any, source: Optional[str] = None, path: str = "") -> None:
    """Refuse unknown keys (naming the nearest valid one) and sections that are not mappings.

    A section may be given as the path of another YAML file (jsonargparse reads it): such a string is not checked.

    Raises:
        ConfigError: naming the key path and the keys allowed there.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"'{path or '<root>'}' must be a mapping, got {type(data).__name__}", path or None, source)
    names = [f.name for f in dataclasses.fields(cls)]
    sections = section_types(cls)
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
            allowed = ", ".join(sorted(names))
            raise ConfigError(f"unknown key '{key_path}'; allowed keys here: {allowed}{hint}", key_path, source)
        if key in sections and not (isinstance(value, str) and path == ""):
            check_keys(sections[key], value, source, key_path)


@functools.cache
def config_parser(cls: type, prog: Optional[str] = None, description: Optional[str] = None):
    """The jsonargparse parser of a config dataclass: ``--config FILE`` plus ``--a.b value`` for every field."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # exit_on_error=False: errors become one line (parse_argv) instead of the whole usage
    parser = ArgumentParser(prog=prog or cls.__name__, description=description, default_env=False, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=False)
    return parser


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "NoneType": "null"}


def _type_text(text: str) -> str:
    """jsonargparse's rendering of a type (``<class 'int'>``, ``typing.Literal['a', 'b']``) in words."""
    text = text.strip()
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return "one of " + ", ".join(v.strip().strip("'\"") for v in literal.group(1).split(","))
    name = re.sub(r"<class '(?:[\w.]*\.)?(\w+)'>", r"\1", text)
    return _TYPE_WORDS.get(name, name)


def type_error(error: Exception) -> ConfigError:
    """A jsonargparse type error (several lines) as one ``ConfigError`` line naming key, value and expected type."""
    text = str(error)
    key_match = re.search(r'Parser key "([^"]+)"', text)
    if key_match is None:
        return ConfigError(" ".join(line.strip() for line in text.splitlines() if line.strip()))
    key = key_match.group(1)
    given = re.search(r"(?:Got value|Given value): (.*)", text)
    got = given.group(1).strip() if given else "?"
    subtypes = re.search(r"Subtypes: \[(.*)\]", text)
    if subtypes:
        parts = re.findall(r"<class '[\w.]+'>|typing\.Literal\[[^\]]*\]|[\w.]+\[[^\]]*\]", subtypes.group(1))
        expected = " or ".join(dict.fromkeys(_type_text(p) for p in parts))
    else:
        single = re.search(r"Expected a (.*?)\. Got value", text, re.S)
        expected = _type_text(single.group(1)) if single else "another value"
    return ConfigError(f"{key}={got} is invalid: expected {expected}", key)


def construct(cls: type, values: dict, prefix: str = "") -> Any:
    """Build ``cls`` from already typed values (nested dicts for sections), running each section's checks.

    Raises:
        ConfigError: a section's check failed; the key is the full dotted path.
    """
    sections = section_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if f.name in sections and isinstance(value, dict):
            value = construct(sections[f.name], value, f"{prefix}{f.name}.")
        elif isinstance(value, list) and typing.get_origin(_hints(cls)[f.name]) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except InvalidValueError as err:
        key = prefix + err.name
        raise ConfigError(invalid_message(key, err.value, err.rule), key) from None


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or nested values) as plain dicts."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("config", "__path__")}
    return value


def from_dict(cls: type, data: dict, source: Optional[str] = None) -> Any:
    """Build a config dataclass from a nested dict (parsed YAML, a sweep point, a checkpoint's stored config).

    Args:
        cls: the dataclass type.
        data: nested dict; missing keys take the defaults.
        source: where it came from (a file name), prefixed to key errors.

    Raises:
        ConfigError: an unknown key, a section that is not a mapping, a value of the wrong type or out of range.
    """
    from jsonargparse import ArgumentError

    check_keys(cls, data, source)
    try:
        namespace = config_parser(cls).parse_object(data)
    except ArgumentError as err:
        raise type_error(err) from None
    return construct(cls, _plain(namespace))


def from_namespace(cls: type, namespace: Any, prefix: str = "") -> Any:
    """A section parsed by another jsonargparse parser (``var-lab tokenize``'s ``--data.*``), checked the same way."""
    return construct(cls, _plain(namespace), prefix)


def check_config_file(cls: type, path: str) -> None:
    """Refuse a ``--config`` file that is missing, a folder, empty, not valid YAML, or holds keys the config lacks.

    jsonargparse would report these too, but without the file, the line or the nearest key.

    Raises:
        BadInputError: naming the file and the line (malformed YAML) or the key path and the allowed keys.
    """
    import yaml

    file = Path(path)
    fix = "pass a YAML file of run options (examples: configs/*.yaml)"
    if file.is_dir():
        raise BadInputError(f"config file {path} is a folder, not a YAML file; {fix}")
    if not file.is_file():
        raise BadInputError(f"config file {path} does not exist; {fix}")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"config file {path} cannot be read ({err}); {fix}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        raise BadInputError(f"{path}: malformed YAML{where}: {problem}" + (f" ({context})" if context else "")) from err
    if data is None:
        raise BadInputError(f"config file {path} is empty (no options in it); {fix}, or leave --config out")
    check_keys(cls, data, str(path))


def parse_argv(cls: type, argv: list[str], prog: str, description: str) -> Any:
    """Parse ``--config FILE`` and ``--a.b value`` options into a config dataclass (jsonargparse).

    Bad input (a missing, empty or malformed ``--config`` file, an unknown key or option, a value of the wrong type)
    exits with 2 and one line on stderr naming the file, key or option (and the nearest valid name for a typo).

    Raises:
        ConfigError: a value out of range (``model.depth=0 is invalid: ...``), which ``var_lab.cli`` prints as one
            line with exit code 2, as every command's bad input.
    """
    from jsonargparse import ArgumentError

    from var_lab.inputs import check_option_names, respell_options

    parser = config_parser(cls, prog, description)
    argv = respell_options(argv, parser._option_string_actions)  # --data.batch-size is --data.batch_size
    try:
        check_option_names(parser, argv)
        for index, arg in enumerate(argv):
            path = argv[index + 1] if arg == "--config" and index + 1 < len(argv) else None
            path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
            if path is not None:
                check_config_file(cls, path)
        try:
            namespace = parser.parse_args(argv)
        except ArgumentError as err:
            raise type_error(err) from None
    except BadInputError as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        if isinstance(err, ConfigError) and err.key is not None:
            message += f" ({prog} --help lists every option)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    # A value out of range is a BadInputError that the command reports (var_lab.cli: one line, exit code 2).
    return construct(cls, _plain(namespace))
