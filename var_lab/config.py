"""Run configuration: dataclasses with a docstring under each field.

Loaded from YAML and overridable on the command line through jsonargparse (``var-lab fit --config run.yaml
--model.depth 20``). Derived values (width, heads, drop path, learning rate from the global batch) are computed
properties, never fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DEFAULT_PATCH_NUMS_32 = (1, 2, 3, 4, 6, 8)


@dataclass
class TokenizerModelConfig:
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


@dataclass
class VARModelConfig:
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
    attn_impl: str = "auto"
    """Attention kernel: auto (flex on CUDA, sdpa elsewhere), flex, sdpa or math (dense mask, as the release)."""


@dataclass
class DataConfig:
    """Where images or token shards come from and how they are batched."""

    name: str = "fashion_mnist"
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


@dataclass
class OptimConfig:
    """The release's optimiser and schedule (VAR_FACTS.md)."""

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
    """Gradient-norm clipping threshold (0 disables)."""
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


@dataclass
class TrainerConfig:
    """Lightning Trainer settings; parallelism lives here, not in the models."""

    accelerator: str = "auto"
    """cpu, gpu or auto."""
    devices: Any = "auto"
    """Devices per node (an int, a list, or auto)."""
    num_nodes: int = 1
    """Number of nodes."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, ddp_find_unused_parameters_true, fsdp, ..."""
    precision: Optional[str] = None
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
    """Show Lightning's progress bar."""
    compile: bool = False
    """torch.compile the transformer blocks."""
    checkpoint_every_n_steps: Optional[int] = None
    """Also write a checkpoint every N optimiser steps (None: only at the end of each epoch)."""
    keep_checkpoints: int = 2
    """Step checkpoints kept besides last.ckpt (older good ones are the fallback for a corrupt last.ckpt)."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass (large depths)."""


@dataclass
class TrackingConfig:
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


@dataclass
class EvalDuringTrainingConfig:
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


@dataclass
class FitConfig:
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
    resume: str = "auto"
    """auto: resume from the last checkpoint in output_dir when there is one; never; or a checkpoint path."""


@dataclass
class TokenizerLossConfig:
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


@dataclass
class FitTokenizerConfig:
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
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Trainer."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="var-lab-tokenizer"))
    """MLflow tracking."""
    resume: str = "auto"
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


def from_dict(cls: type, data: dict, source: str = "<config>") -> Any:
    """Build a config dataclass from a nested dict, rejecting unknown keys with the key path.

    Args:
        cls: the dataclass type.
        data: nested dict (e.g. parsed YAML).
        source: file name used in error messages.

    Raises:
        ValueError: naming the source, the offending key path and the allowed keys.
    """

    def build(kind: type, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"{source}: '{path or '<root>'}' must be a mapping, got {type(value).__name__}")
        fields = {f.name: f for f in dataclasses.fields(kind)}
        kwargs = {}
        for key, item in value.items():
            key_path = f"{path}.{key}" if path else key
            if key not in fields:
                allowed = ", ".join(sorted(fields))
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
                hint = f"; did you mean '{path + '.' if path else ''}{close[0]}'?" if close else ""
                raise ValueError(f"{source}: unknown key '{key_path}'; allowed keys here: {allowed}{hint}")
            default = getattr(kind(), key) if _has_default(fields[key]) else None
            if dataclasses.is_dataclass(default):
                kwargs[key] = build(type(default), item, key_path)
            elif isinstance(default, tuple) and isinstance(item, list):
                kwargs[key] = tuple(item)
            else:
                kwargs[key] = item
        return kind(**kwargs)

    return build(cls, data, "")


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
