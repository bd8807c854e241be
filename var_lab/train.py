"""``var-lab fit`` and ``var-lab fit-tokenizer``: YAML config + command-line overrides -> Lightning Trainer.

Every run writes into ``output_dir``: ``config.yaml`` (the resolved config), ``checkpoints/`` (``last.ckpt`` and
step checkpoints), ``mlflow_run_id`` (so a resumed or requeued run continues the same MLflow run), ``samples/``, and
at the end ``DONE`` (JSON with the final step and metrics) or ``FAILED`` (the error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import traceback
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import yaml

from var_lab.config import FitConfig, FitTokenizerConfig, TrainerConfig, to_dict


# ---------------------------------------------------------------------------------------------------------------- CLI
def build_parser(cls: type, prog: str, description: str):
    """A jsonargparse parser for a config dataclass: ``--config FILE`` plus ``--a.b value`` overrides."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, description=description, default_env=False, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=False)
    return parser


def parse_config(cls: type, argv: list[str], prog: str, description: str):
    """Parse argv into a config dataclass instance."""
    parser = build_parser(cls, prog, description)
    ns = parser.instantiate_classes(parser.parse_args(argv))
    return cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)})


# -------------------------------------------------------------------------------------------------------- utilities
def global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoint_is_readable(path: Path) -> bool:
    """A cheap integrity check (zip CRCs of torch.save's format) that catches truncated or corrupt files."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def find_resume_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest readable checkpoint in ``ckpt_dir`` (``last.ckpt`` first); corrupt ones are skipped with a warning."""
    if not ckpt_dir.is_dir():
        return None
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    for path in candidates:
        if checkpoint_is_readable(path):
            return path
        warnings.warn(f"checkpoint {path} is truncated or corrupt; falling back to an older one", stacklevel=2)
    return None


def resolve_resume(resume: str, output_dir: Path) -> Optional[str]:
    if resume == "never":
        if global_rank() == 0:
            (output_dir / "mlflow_run_id").unlink(missing_ok=True)  # a fresh run opens a fresh MLflow run
        return None
    if resume == "auto":
        found = find_resume_checkpoint(output_dir / "checkpoints")
        return str(found) if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    if not checkpoint_is_readable(path):
        raise ValueError(f"resume checkpoint {path} is truncated or corrupt")
    return str(path)


def resolve_precision(trainer_cfg: TrainerConfig) -> str:
    import torch

    if trainer_cfg.precision:
        return trainer_cfg.precision
    wants_gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (
        trainer_cfg.accelerator == "auto" and torch.cuda.is_available()
    )
    return "bf16-mixed" if wants_gpu else "32-true"


def make_trainer(trainer_cfg: TrainerConfig, output_dir: Path, logger, callbacks: list, monitor_every: bool = True):
    """A Lightning Trainer from the config, with checkpoints in ``output_dir/checkpoints``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = output_dir / "checkpoints"
    checkpointing = [
        ModelCheckpoint(
            dirpath=ckpt_dir, filename="epoch{epoch:03d}", save_last=True, save_top_k=-1, auto_insert_metric_name=False
        )
    ]
    if trainer_cfg.checkpoint_every_n_steps:
        checkpointing.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step{step:08d}",
                every_n_train_steps=trainer_cfg.checkpoint_every_n_steps,
                save_top_k=trainer_cfg.keep_checkpoints,
                monitor="step",
                mode="max",
                save_last=True,
                auto_insert_metric_name=False,
            )
        )
    kwargs: dict[str, Any] = dict(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy,
        precision=resolve_precision(trainer_cfg),
        max_epochs=trainer_cfg.max_epochs,
        max_steps=trainer_cfg.max_steps,
        check_val_every_n_epoch=trainer_cfg.check_val_every_n_epoch,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        deterministic=trainer_cfg.deterministic,
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        logger=logger if logger is not None else False,
        callbacks=checkpointing + callbacks,
        default_root_dir=str(output_dir),
        enable_model_summary=global_rank() == 0,
    )
    if trainer_cfg.val_check_interval is not None:
        kwargs["val_check_interval"] = trainer_cfg.val_check_interval
    if trainer_cfg.limit_val_batches is not None:
        kwargs["limit_val_batches"] = trainer_cfg.limit_val_batches
    return L.Trainer(**kwargs)


def make_logger(tracking_cfg, output_dir: Path, tags: dict[str, str]):
    """The run's MLflow logger, or a CSV logger in ``output_dir/csv`` when ``tracking_uri`` is ``none``."""
    if (tracking_cfg.tracking_uri or "").lower() in ("none", "off"):
        from lightning.pytorch.loggers import CSVLogger

        warnings.warn("tracking_uri=none: MLflow is off, metrics go to CSV files in the run folder", stacklevel=2)
        return CSVLogger(str(output_dir), name="csv")
    from var_lab.tracking import make_mlflow_logger

    return make_mlflow_logger(tracking_cfg, output_dir, tags=tags)


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
    """Run ``body`` with DONE / FAILED bookkeeping (rank 0 writes them)."""
    rank = global_rank()
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (output_dir / "FAILED").unlink(missing_ok=True)
    try:
        summary = body()
    except BaseException as exc:
        if rank == 0:
            text = f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
            write_atomic(output_dir / "FAILED", text)
        if isinstance(exc, KeyboardInterrupt):
            raise
        print(f"var-lab {kind}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
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
    from var_lab.modules.tokenizer import build_vqvae, load_tokenizer
    from var_lab.modules.var import VARModule

    output_dir = Path(cfg.output_dir).resolve()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    vqvae = load_tokenizer(cfg.tokenizer_ckpt, cfg.tokenizer) if cfg.tokenizer_ckpt else build_vqvae(cfg.tokenizer)
    if not cfg.tokenizer_ckpt:
        warnings.warn("no tokenizer_ckpt given: training on an untrained (random) tokenizer", stacklevel=2)
    datamodule = build_datamodule(cfg.data, tokenizer=vqvae)
    if cfg.model.num_classes is None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=datamodule.num_classes))
    elif cfg.model.num_classes < datamodule.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset has {datamodule.num_classes}")
    module = VARModule(cfg, vqvae=vqvae)
    tags = {"var_lab.kind": "var", "var_lab.depth": str(cfg.model.depth)}
    if cfg.tracking.sweep:
        tags["var_lab.sweep"] = cfg.tracking.sweep
    if cfg.tracking.point:
        tags["var_lab.point"] = cfg.tracking.point
    if cfg.tracking.run_name is None:
        cfg.tracking.run_name = f"var-d{cfg.model.depth}"
    logger = make_logger(cfg.tracking, output_dir, tags)
    callbacks = []
    if cfg.eval.every_n_epochs > 0:
        from var_lab.callbacks.fid import FIDCallback

        callbacks.append(FIDCallback.from_config(cfg.eval, cfg.data))
    trainer = make_trainer(cfg.trainer, output_dir, logger, callbacks)
    ckpt_path = resolve_resume(cfg.resume, output_dir)
    if ckpt_path and trainer.global_rank == 0:
        print(f"var-lab fit: resuming from {ckpt_path}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if os.environ.get("VAR_LAB_WRITE_RANK_HASH") == "1":
        _write_rank_hash(module.var, output_dir, trainer.global_rank)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted before the end (a checkpoint was kept for resuming)")
    summary = {
        "kind": "var",
        "global_step": int(trainer.global_step),
        "epoch": int(trainer.current_epoch),
        "metrics": _final_metrics(trainer),
        "mlflow_run_id": getattr(logger, "run_id", None) if trainer.global_rank == 0 else None,
        "images_per_s": _final_metrics(trainer).get("perf/images_per_s"),
        "last_checkpoint": str(output_dir / "checkpoints" / "last.ckpt"),
    }
    if trainer.global_rank == 0 and logger is not None:
        logger.finalize("success")
    return summary


def fit_main(argv: list[str]) -> int:
    """``var-lab fit``: train a VAR transformer of a given depth."""
    cfg = parse_config(FitConfig, argv, "var-lab fit", "Train a VAR transformer (size knob: --model.depth).")
    return _run(cfg, Path(cfg.output_dir).resolve(), "fit", lambda: fit(cfg))


# ----------------------------------------------------------------------------------------------------- fit-tokenizer
def fit_tokenizer(cfg: FitTokenizerConfig) -> dict[str, Any]:
    """Train the multi-scale VQVAE; returns a summary."""
    import lightning as L

    from var_lab.data import build_datamodule
    from var_lab.modules.tokenizer import TokenizerModule

    output_dir = Path(cfg.output_dir).resolve()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    expected = cfg.tokenizer.patch_nums[-1] * 2 ** (len(cfg.tokenizer.ch_mult) - 1)
    if expected != cfg.data.resolution:
        raise ValueError(
            f"tokenizer.patch_nums ends at {cfg.tokenizer.patch_nums[-1]} with downsampling "
            f"{2 ** (len(cfg.tokenizer.ch_mult) - 1)} (ch_mult {tuple(cfg.tokenizer.ch_mult)}), which needs "
            f"{expected}px images, but data.resolution is {cfg.data.resolution}"
        )
    datamodule = build_datamodule(cfg.data)
    module = TokenizerModule(cfg)
    tags = {"var_lab.kind": "tokenizer"}
    if cfg.tracking.sweep:
        tags["var_lab.sweep"] = cfg.tracking.sweep
    if cfg.tracking.point:
        tags["var_lab.point"] = cfg.tracking.point
    if cfg.tracking.run_name is None:
        cfg.tracking.run_name = f"tokenizer-v{cfg.tokenizer.vocab_size}"
    logger = make_logger(cfg.tracking, output_dir, tags)
    trainer = make_trainer(cfg.trainer, output_dir, logger, [])
    ckpt_path = resolve_resume(cfg.resume, output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
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
    return _run(cfg, Path(cfg.output_dir).resolve(), "fit-tokenizer", lambda: fit_tokenizer(cfg))
