"""``var-lab fit`` and ``var-lab fit-tokenizer``: YAML config + command-line overrides -> Lightning Trainer.

Every run writes into ``output_dir``: ``config.yaml`` (the resolved config), ``checkpoints/`` (``last.ckpt`` and
step checkpoints), ``mlflow_run_id`` (so a resumed or requeued run continues the same MLflow run), ``samples/``, and
at the end ``DONE`` (JSON with the final step and metrics) or ``FAILED`` (the error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from var_lab.atomic import write_atomic
from var_lab.config import FitConfig, FitTokenizerConfig, TrainerConfig, parse_argv, to_dict
from var_lab.contract import TAG_DEPTH, TAG_KIND
from var_lab.gpu import out_of_memory_message, require_cuda
from var_lab.inputs import (
    TOKENIZER_CKPT_FIX,
    BadInputError,
    check_checkpoint_file,
    check_output_dir,
    checkpoint_load_errors,
)
from var_lab.ranks import env_rank
from var_lab.resilience import (
    RESUME_FIX,
    check_resume_compatible,
    find_resume_checkpoint,
    resolve_resume,
)
from var_lab.run_lock import hold_run_folder

# ---------------------------------------------------------------------------------------------------------------- CLI
#: ``parse_config(cls, argv, prog, description)``: the run config from ``--config`` files and ``--a.b`` overrides
parse_config = parse_argv


# -------------------------------------------------------------------------------------------------------- utilities
global_rank = env_rank  # kept under its old name


def resolve_precision(trainer_cfg: TrainerConfig) -> str:
    import torch

    if trainer_cfg.precision:
        return trainer_cfg.precision
    wants_gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (
        trainer_cfg.accelerator == "auto" and torch.cuda.is_available()
    )
    return "bf16-mixed" if wants_gpu else "32-true"


def _parse_class_specs(specs: list[dict[str, Any]], base: type, key: str) -> list[Any]:
    """Each ``{class_path, init_args}`` entry checked by jsonargparse (its own class_path mechanism, as in
    LightningCLI): the class imports, is a ``base`` subclass, and its constructor accepts init_args with their types.
    Returns jsonargparse's parsed entries, one per spec; nothing is instantiated.

    Raises:
        BadInputError: one line naming the entry, what jsonargparse found wrong, and the fix.
    """
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--items", type=list[base])
    parsed = []
    for i, spec in enumerate(specs):
        try:
            parsed.append((parser, parser.parse_object({"items": [spec]})))
        except ArgumentError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            why = "; ".join(line for line in lines if not line.startswith('Parser key "items"')).replace(":;", ":")
            raise BadInputError(
                f"{key}[{i}].class_path={spec.get('class_path')!r}: {why} (give the dotted name of an installed "
                f"{base.__module__}.{base.__name__} subclass and its constructor's arguments as init_args)"
            ) from None
    return parsed


def check_class_specs(trainer_cfg: TrainerConfig) -> None:
    """Pre-flight of ``trainer.callbacks`` / ``trainer.logger``: a bad entry is refused before any folder or MLflow run
    is made (:func:`_parse_class_specs`)."""
    if not (trainer_cfg.callbacks or trainer_cfg.logger):
        return
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    _parse_class_specs(trainer_cfg.callbacks, Callback, "trainer.callbacks")
    _parse_class_specs(trainer_cfg.logger, Logger, "trainer.logger")


def instantiate_classes(specs: list[dict[str, Any]], base: type, key: str) -> list[Any]:
    """``trainer.callbacks`` / ``trainer.logger`` entries ``{class_path, init_args}`` -> instances of ``base``, made
    by jsonargparse.

    Raises:
        BadInputError: naming the entry, when jsonargparse refuses it or its constructor fails.
    """
    made = []
    for i, (parser, namespace) in enumerate(_parse_class_specs(specs, base, key)):
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
        try:
            made.extend(instantiate(namespace)["items"])
        except (TypeError, ValueError, ImportError, OSError) as err:
            raise BadInputError(
                f"{key}[{i}]: {specs[i]['class_path']}(**init_args) failed: {err}; fix {key}[{i}].init_args"
            ) from None
    return made


def _world_size(trainer_cfg: TrainerConfig) -> int:
    """Processes of a run: devices per node x nodes, with the devices resolved by Lightning's own accelerator
    (a count, a list, "0,1", -1 or "auto"). ModelParallelStrategy needs it as its data-parallel size ("auto" there
    means the number of nodes)."""
    import torch
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    on_gpu = trainer_cfg.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    accelerator = CUDAAccelerator if on_gpu else CPUAccelerator
    devices = trainer_cfg.devices
    if devices == "auto":
        per_node = accelerator.auto_device_count()
    else:
        per_node = len(accelerator.get_parallel_devices(accelerator.parse_devices(devices)))
    return per_node * trainer_cfg.num_nodes


def make_trainer(
    trainer_cfg: TrainerConfig,
    output_dir: Path,
    logger,
    callbacks: list,
    command: str = "var-lab fit",
    gradient_clip_val: Optional[float] = None,
):
    """A Lightning Trainer from the config, with checkpoints in ``output_dir/checkpoints``.

    ``gradient_clip_val`` (the global gradient norm, ``optim.grad_clip``) is the Trainer's own clipping, so that a
    strategy that shards the gradients (FSDP) computes the norm over all shards; None or 0 does not clip.

    Where stdout is not a terminal (a SLURM or sweep log), the progress bar gives way to a text line every
    ``trainer.text_progress_every_n_steps`` steps (:class:`var_lab.callbacks.progress.TextProgress`).
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from var_lab.callbacks.final_validation import FinalValidation
    from var_lab.callbacks.progress import TextProgress
    from var_lab.resilience import AtomicCheckpointIO, StepCheckpoint

    ckpt_dir = output_dir / "checkpoints"
    step_checkpoints = bool(trainer_cfg.checkpoint_every_n_steps)
    # One callback owns last.ckpt (the step one when there is one: it also writes it at every epoch end); two
    # owners would version it (last-v1.ckpt). Names are overwritten, never versioned: a resumed run that redoes a
    # step rewrites its checkpoint (atomically, see AtomicCheckpointIO).
    checkpointing = [
        ModelCheckpoint(  # the newest keep_checkpoints epoch checkpoints (a d10 one is ~1.4 GB with its optimiser)
            dirpath=ckpt_dir,
            filename="epoch{epoch:03d}",
            save_last=not step_checkpoints,
            save_top_k=trainer_cfg.keep_checkpoints,
            monitor="epoch",
            mode="max",
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
    ]
    if step_checkpoints:
        checkpointing.append(
            StepCheckpoint(  # a step followed by a validation is saved when the validation has ended
                dirpath=ckpt_dir,
                filename="step{step:08d}",
                every_n_train_steps=trainer_cfg.checkpoint_every_n_steps,
                save_top_k=trainer_cfg.keep_checkpoints,
                monitor="step",
                mode="max",
                save_last=True,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    callbacks = [*callbacks, *instantiate_classes(trainer_cfg.callbacks, Callback, "trainer.callbacks")]
    loggers = [logger] if logger is not None else []
    loggers += instantiate_classes(trainer_cfg.logger, Logger, "trainer.logger")
    terminal = sys.stdout.isatty()
    if not terminal and trainer_cfg.text_progress_every_n_steps:
        callbacks = [*callbacks, TextProgress(trainer_cfg.text_progress_every_n_steps, prefix=command)]
    strategy: Any = trainer_cfg.strategy
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # FSDP2 over every process (no tensor parallelism); the module shards itself in configure_model. One full
        # checkpoint file gathered on rank 0 keeps resume, eval and export on the usual path.
        strategy = ModelParallelStrategy(
            data_parallel_size=_world_size(trainer_cfg), tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    kwargs: dict[str, Any] = dict(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=strategy,
        precision=resolve_precision(trainer_cfg),
        max_epochs=trainer_cfg.max_epochs,
        max_steps=trainer_cfg.max_steps,
        check_val_every_n_epoch=trainer_cfg.check_val_every_n_epoch,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val or None,
        gradient_clip_algorithm="norm",
        deterministic=trainer_cfg.deterministic,
        enable_progress_bar=trainer_cfg.enable_progress_bar and terminal,
        logger=loggers or False,  # MLflow first: self.logger is the one var-lab reads
        callbacks=checkpointing + [FinalValidation(), *callbacks],
        default_root_dir=str(output_dir),
        enable_model_summary=global_rank() == 0,
    )
    if not any(name in str(trainer_cfg.strategy) for name in ("fsdp", "deepspeed")):  # these write their own shards
        kwargs["plugins"] = [AtomicCheckpointIO()]
    interval = trainer_cfg.val_check_interval
    if interval is not None:
        if isinstance(interval, int) or (float(interval) > 1 and float(interval).is_integer()):
            # A step count: count optimiser steps across epochs, so an interval longer than one (short) epoch works.
            kwargs["val_check_interval"] = int(interval)
            kwargs["check_val_every_n_epoch"] = None
        else:
            kwargs["val_check_interval"] = interval
    if trainer_cfg.limit_val_batches is not None:
        kwargs["limit_val_batches"] = trainer_cfg.limit_val_batches
    return L.Trainer(**kwargs)


def make_logger(tracking_cfg, output_dir: Path, tags: dict[str, str]):
    """The run's MLflow logger, or a CSV logger in ``output_dir/csv`` when ``tracking_uri`` is ``none``."""
    if (tracking_cfg.tracking_uri or "").lower() in ("none", "off"):
        from lightning.pytorch.loggers import CSVLogger

        warnings.warn("tracking_uri=none: MLflow is off, metrics go to CSV files in the run folder", stacklevel=2)
        return CSVLogger(str(output_dir), name="csv")
    from var_lab.contract import TAG_GIT_COMMIT
    from var_lab.provenance import git_commit
    from var_lab.tracking import make_mlflow_logger

    commit = git_commit()
    if commit != "unknown":  # MLflow's own tag: the UI shows the commit with the run
        tags = {**tags, TAG_GIT_COMMIT: commit}
    return make_mlflow_logger(tracking_cfg, output_dir, tags=tags)


def tracking_callbacks(tracking_cfg, logger) -> list:
    """Callbacks that log to the run's MLflow logger: system metrics (``tracking.system_metrics_every_n_steps``)."""
    from var_lab.tracking import ResilientMLFlowLogger

    if not isinstance(logger, ResilientMLFlowLogger) or not tracking_cfg.system_metrics_every_n_steps:
        return []
    from var_lab.callbacks.system_metrics import SystemMetrics

    return [SystemMetrics(tracking_cfg.system_metrics_every_n_steps)]


#: config keys a checkpoint's weights depend on: resuming with another value cannot load it
FIT_ARCHITECTURE_KEYS = {
    "model": ("depth", "num_classes", "mlp_ratio", "shared_aln", "attn_l2_norm"),
    "tokenizer": (
        "vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "quant_resi", "share_quant_resi",
        "patch_nums", "using_sa", "using_mid_sa",
    ),
}  # fmt: skip
FIT_TOKENIZER_ARCHITECTURE_KEYS = {"tokenizer": FIT_ARCHITECTURE_KEYS["tokenizer"]}


def check_patch_schedule(tokenizer_cfg, data_cfg) -> None:
    """Refuse a scale schedule the tokenizer cannot produce for the data (the schedule itself is checked by
    ``TokenizerModelConfig``; this is the rule between two sections).

    Raises:
        BadInputError: (for image data) the last side of ``tokenizer.patch_nums`` differs from the latent side
            ``data.resolution / 2 ** (len(ch_mult) - 1)``.
    """
    if data_cfg.name == "tokens":
        return  # the token cache records its patch_nums; TokenDataModule checks them against the tokenizer
    patch_nums = list(tokenizer_cfg.patch_nums)
    down = 2 ** (len(tokenizer_cfg.ch_mult) - 1)
    resolution = data_cfg.resolution
    if resolution % down or resolution // down != patch_nums[-1]:
        raise BadInputError(
            f"tokenizer.patch_nums ends at {patch_nums[-1]}, but {resolution}px images (data.resolution) give a "
            f"{resolution / down:g} x {resolution / down:g} latent with tokenizer.ch_mult "
            f"{list(tokenizer_cfg.ch_mult)} (downsampling {down}): the last scale must equal the latent side. Use "
            f"patch_nums ending at "
            f"{resolution // down} or data.resolution {patch_nums[-1] * down}."
        )


def check_run_paths(cfg: Any) -> None:
    """Refuse an unusable ``resume`` path or ``output_dir`` of a training run, before anything is written.

    Raises:
        BadInputError: naming the option, the path and what to pass instead.
    """
    if cfg.resume not in ("auto", "never"):
        check_checkpoint_file(cfg.resume, "resume checkpoint", RESUME_FIX)
    check_output_dir(Path(cfg.output_dir).resolve(), "output_dir")


def check_fit_inputs(cfg: FitConfig) -> None:
    """Every check of ``var-lab fit`` that needs no model or data: scales, checkpoint paths, output folder (the
    config's own values were checked when it was built)."""
    check_patch_schedule(cfg.tokenizer, cfg.data)
    if cfg.tokenizer_ckpt:
        check_checkpoint_file(cfg.tokenizer_ckpt, "tokenizer_ckpt", TOKENIZER_CKPT_FIX)
    check_class_specs(cfg.trainer)
    if cfg.trainer.strategy == "fsdp2":
        for key, on in (("eval.every_n_epochs", cfg.eval.every_n_epochs > 0), ("optim.ema_decay", cfg.optim.ema_decay)):
            if on:
                raise BadInputError(
                    f"{key} is not supported with trainer.strategy=fsdp2 (a sharded transformer); drop it and "
                    "evaluate the checkpoints with `var-lab eval`, or train with trainer.strategy=ddp"
                )
    check_run_paths(cfg)


def check_fit_tokenizer_inputs(cfg: FitTokenizerConfig) -> None:
    """Every check of ``var-lab fit-tokenizer`` that needs no data: data kind, scales, resume path, output folder."""
    if cfg.data.name == "tokens":
        raise BadInputError("fit-tokenizer trains on images: data.name must be fashion_mnist or folder, not tokens")
    check_patch_schedule(cfg.tokenizer, cfg.data)
    check_class_specs(cfg.trainer)
    check_run_paths(cfg)


def _fit_until_done_or_preempted(trainer, module, datamodule, ckpt_path, preemption, logger, ckpt_dir: Path) -> None:
    """``trainer.fit`` with SIGTERM / SIGUSR1 handled (``PreemptionCallback``); a stop on one raises PreemptedError."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with preemption.installed():
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            error = preemption.error(find_resume_checkpoint(ckpt_dir))
            if error is None:  # SIGTERM under SLURM: Lightning's own handling
                raise
            if trainer.global_rank == 0 and logger is not None:
                logger.finalize("killed")  # Lightning marked the run failed; it was preempted
            raise error from None


def _final_metrics(trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _write_rank_hash(module, output_dir: Path, rank: int) -> None:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    write_atomic(output_dir / f"weights_rank{rank}.sha256", digest.hexdigest() + "\n")


def _run(cfg, output_dir: Path, kind: str, body) -> int:
    """Run ``body`` with DONE / FAILED bookkeeping (rank 0 writes them, holding the folder's trainer lock).

    Raises:
        RunFolderBusyError: another live trainer holds ``output_dir``.
    """
    rank = global_rank()
    # Rank 0 owns the folder while it trains (var_lab.run_lock): a second trainer refuses before writing anything.
    with hold_run_folder(output_dir, f"var-lab {kind}") if rank == 0 else contextlib.nullcontext():
        return _run_owned(cfg, output_dir, kind, body, rank)


def _run_owned(cfg, output_dir: Path, kind: str, body, rank: int) -> int:
    if rank == 0:
        write_atomic(output_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (output_dir / "FAILED").unlink(missing_ok=True)
    from var_lab.resilience import PreemptedError

    try:
        summary = body()
    except PreemptedError as exc:  # a checkpoint was written: resumable, so neither DONE nor FAILED
        print(f"var-lab {kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseException as exc:
        if rank == 0:
            text = f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
            write_atomic(output_dir / "FAILED", text)
        if isinstance(exc, KeyboardInterrupt):
            raise
        message = out_of_memory_message(kind, exc) or f"var-lab {kind}: failed: {type(exc).__name__}: {exc}"
        print(message, file=sys.stderr)
        return 1
    if rank == 0 and summary is not None:
        write_atomic(output_dir / "DONE", json.dumps(summary, indent=2, sort_keys=True))
    return 0


# -------------------------------------------------------------------------------------------------------- fit (VAR)
def fit(cfg: FitConfig) -> dict[str, Any]:
    """Train a VAR transformer; returns a summary (final step, metrics, MLflow run id)."""
    import lightning as L
    import torch

    from var_lab.data import build_datamodule
    from var_lab.models.checkpoints import load_tokenizer
    from var_lab.models.vqvae import VQVAE
    from var_lab.modules.var import VARModule
    from var_lab.resilience import PreemptionCallback

    output_dir = Path(cfg.output_dir).resolve()
    check_fit_inputs(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.tokenizer_ckpt:
        with checkpoint_load_errors(cfg.tokenizer_ckpt, "tokenizer_ckpt", TOKENIZER_CKPT_FIX):
            vqvae = load_tokenizer(cfg.tokenizer_ckpt, cfg.tokenizer)
    else:
        vqvae = VQVAE.from_config(cfg.tokenizer)
        warnings.warn("no tokenizer_ckpt given: training on an untrained (random) tokenizer", stacklevel=2)
    datamodule = build_datamodule(cfg.data, tokenizer=vqvae)
    if cfg.model.num_classes is None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=datamodule.num_classes))
    elif cfg.model.num_classes < datamodule.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset has {datamodule.num_classes}")
    # Before the logger: resume=never forgets the MLflow run id that the logger would otherwise continue.
    ckpt_path = resolve_resume(cfg.resume, output_dir)
    if ckpt_path:
        check_resume_compatible(ckpt_path, cfg, FIT_ARCHITECTURE_KEYS)
    module = VARModule(cfg, vqvae=vqvae)
    tags = {TAG_KIND: "var", TAG_DEPTH: str(cfg.model.depth)}  # the logger adds sweep and point
    if cfg.tracking.run_name is None:
        cfg.tracking.run_name = f"var-d{cfg.model.depth}"
    logger = make_logger(cfg.tracking, output_dir, tags)
    callbacks = tracking_callbacks(cfg.tracking, logger)
    if cfg.eval.every_n_epochs > 0:
        from var_lab.callbacks.fid import FIDCallback

        callbacks.append(FIDCallback.from_config(cfg.eval, cfg.data))
    if cfg.optim.ema_decay is not None:
        try:
            from lightning.pytorch.callbacks import EMAWeightAveraging
        except ImportError:  # Lightning < 2.6
            import lightning

            raise BadInputError(
                f"optim.ema_decay={cfg.optim.ema_decay} needs Lightning >= 2.6 (EMAWeightAveraging); this is "
                f"{lightning.__version__}: pip install 'lightning>=2.6', or drop optim.ema_decay"
            ) from None
        # First: it updates the average after each step before anything saves that step (exact resume).
        callbacks.insert(0, EMAWeightAveraging(decay=cfg.optim.ema_decay))
    preemption = PreemptionCallback(output_dir / "checkpoints")
    trainer = make_trainer(
        cfg.trainer, output_dir, logger, [*callbacks, preemption], gradient_clip_val=cfg.optim.grad_clip
    )
    if ckpt_path and trainer.global_rank == 0:
        print(f"var-lab fit: resuming from {ckpt_path}")
    _fit_until_done_or_preempted(trainer, module, datamodule, ckpt_path, preemption, logger, output_dir / "checkpoints")
    if os.environ.get("VAR_LAB_WRITE_RANK_HASH") == "1":
        _write_rank_hash(module.var, output_dir, trainer.global_rank)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted before the end (a checkpoint was kept for resuming)")
    metrics = _final_metrics(trainer)
    summary = {
        "kind": "var",
        "global_step": int(trainer.global_step),
        "epoch": int(trainer.current_epoch),
        "metrics": metrics,
        "mlflow_run_id": getattr(logger, "run_id", None) if trainer.global_rank == 0 else None,
        "images_per_s": metrics.get("perf/images_per_s"),
        "last_checkpoint": str(output_dir / "checkpoints" / "last.ckpt"),
        "skipped_images": int(getattr(datamodule, "num_skipped", 0)),  # unreadable files stepped over
    }
    if trainer.global_rank == 0 and logger is not None:
        logger.finalize("success")
    return summary


def fit_main(argv: list[str]) -> int:
    """``var-lab fit``: train a VAR transformer of a given depth."""
    cfg = parse_config(FitConfig, argv, "var-lab fit", "Train a VAR transformer (size knob: --model.depth).")
    check_fit_inputs(cfg)  # a BadInputError here leaves everything as it was (var_lab.cli reports it)
    require_cuda(cfg.trainer.accelerator, "--trainer.accelerator")
    return _run(cfg, Path(cfg.output_dir).resolve(), "fit", lambda: fit(cfg))


# ----------------------------------------------------------------------------------------------------- fit-tokenizer
def fit_tokenizer(cfg: FitTokenizerConfig) -> dict[str, Any]:
    """Train the multi-scale VQVAE; returns a summary."""
    import lightning as L

    from var_lab.data import build_datamodule
    from var_lab.modules.tokenizer import TokenizerModule
    from var_lab.resilience import PreemptionCallback

    output_dir = Path(cfg.output_dir).resolve()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_fit_tokenizer_inputs(cfg)
    datamodule = build_datamodule(cfg.data)
    ckpt_path = resolve_resume(cfg.resume, output_dir)  # before the logger (see fit)
    if ckpt_path:
        check_resume_compatible(ckpt_path, cfg, FIT_TOKENIZER_ARCHITECTURE_KEYS)
    module = TokenizerModule(cfg)
    tags = {TAG_KIND: "tokenizer"}  # the logger adds sweep and point
    if cfg.tracking.run_name is None:
        cfg.tracking.run_name = f"tokenizer-v{cfg.tokenizer.vocab_size}"
    logger = make_logger(cfg.tracking, output_dir, tags)
    preemption = PreemptionCallback(output_dir / "checkpoints")
    callbacks = [*tracking_callbacks(cfg.tracking, logger), preemption]
    trainer = make_trainer(cfg.trainer, output_dir, logger, callbacks, command="var-lab fit-tokenizer")
    _fit_until_done_or_preempted(trainer, module, datamodule, ckpt_path, preemption, logger, output_dir / "checkpoints")
    if trainer.interrupted:
        raise RuntimeError("training was interrupted before the end (a checkpoint was kept for resuming)")
    summary = {
        "kind": "tokenizer",
        "global_step": int(trainer.global_step),
        "metrics": _final_metrics(trainer),
        "last_checkpoint": str(output_dir / "checkpoints" / "last.ckpt"),
    }
    if trainer.global_rank == 0 and logger is not None:
        logger.finalize("success")
    return summary


def fit_tokenizer_main(argv: list[str]) -> int:
    """``var-lab fit-tokenizer``: train the multi-scale VQVAE tokenizer."""
    cfg = parse_config(FitTokenizerConfig, argv, "var-lab fit-tokenizer", "Train the multi-scale VQVAE tokenizer.")
    check_fit_tokenizer_inputs(cfg)
    require_cuda(cfg.trainer.accelerator, "--trainer.accelerator")
    return _run(cfg, Path(cfg.output_dir).resolve(), "fit-tokenizer", lambda: fit_tokenizer(cfg))
