"""Preemption safety of training runs: atomic checkpoints, a clean stop on SIGTERM / SIGUSR1, RNG state in checkpoints.

A run killed at any moment (SIGKILL, node failure, the OOM killer) resumes from its newest intact checkpoint and, in
deterministic CPU mode, ends with the same weights as an uninterrupted run of the same seed, because a checkpoint
holds everything the rest of the run depends on:

- weights, optimiser state and loop counters (Lightning);
- the position inside the epoch: ``ResumableDataLoader`` (``var_lab.data.folders``) replays the epoch's order and
  skips the batches already trained on;
- the global random number generators (torch CPU and CUDA, numpy, python): ``rng_states`` is saved by the
  LightningModules and ``restore_rng_states`` applied just before the first batch after a resume;
- the metrics of the step being checkpointed (Lightning sends a step's metrics to the logger only after the checkpoint
  callbacks ran): re-logged on resume, and the MLflow logger skips the steps its run already has, so the metric
  history holds every step exactly once.

``AtomicCheckpointIO`` writes a checkpoint to a temporary file in the checkpoint folder, fsyncs it and renames it over
the target, so that a kill leaves the old or the new file, never a torn one. Lightning's own writer stages the file in
``$TMPDIR`` and moves it, which is a copy (not atomic) whenever ``$TMPDIR`` is another file system, as on most
clusters. A full disk raises ``CheckpointDiskFullError`` naming the folder and the free space; the previous
checkpoint stays intact.

A validation that follows a training step is part of that step: Lightning validates after the step's checkpoint
callbacks ran, and a run resumed from such a checkpoint skips that validation, so a kill during it would lose its
metrics for good (for the last step: the result of the run). ``StepCheckpoint`` therefore writes the checkpoint of
such a step when the validation has ended; a kill before that resumes from the step before, redoes the step (the
logger does not log its metrics twice) and validates.

``PreemptionCallback`` handles SIGTERM and SIGUSR1 outside SLURM (under SLURM, Lightning's requeue handler owns them):
the current step (and a validation that follows it) finishes, ``last.ckpt`` is written, Lightning stops, and
``var-lab fit`` exits with 128 + the signal number without writing FAILED. Re-running the same command resumes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import sys
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from var_lab.config import to_dict
from var_lab.inputs import BadInputError, check_checkpoint_file
from var_lab.ranks import env_rank

#: errno values that mean "no room to write": disk full, quota exceeded, file size limit (RLIMIT_FSIZE)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: Test hook: ``VAR_LAB_FAULT_NAN_AT_STEP=N`` makes the training loss of global step N NaN (see VARModule).
FAULT_NAN_AT_STEP_ENV = "VAR_LAB_FAULT_NAN_AT_STEP"


# ------------------------------------------------------------------------------------------------ atomic checkpoints
class CheckpointDiskFullError(OSError):
    """A checkpoint could not be written for lack of space; the previous checkpoint is intact."""


def _disk_full_cause(exc: Optional[BaseException]) -> Optional[OSError]:
    """The OSError meaning "no space" in ``exc``'s chain (torch wraps it in a RuntimeError), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_message(path: Path, cause: OSError) -> str:
    """The error text for a checkpoint that did not fit: what, where, how much is free, and what to do."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return (
        f"the disk is full (or a quota / file-size limit is reached): cannot write checkpoint {path} "
        f"({os.strerror(cause.errno)}; {free} on the file system of {path.parent}). The previous checkpoints in "
        f"{path.parent} are intact: free some space and re-run the same command to resume."
    )


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path`` (and fsync the folder).

    Raises:
        CheckpointDiskFullError: no space (ENOSPC, EDQUOT or EFBIG); the temporary file is removed and ``path``, if
            it existed, is unchanged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            # A Python file object (not a path) so that a failing write surfaces its errno.
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = _disk_full_cause(exc)
        if cause is not None:
            raise CheckpointDiskFullError(cause.errno, disk_full_message(path, cause)) from exc
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(ckpt_dir: Path) -> int:
    """Delete temporary files that a killed ``save_atomic`` left in ``ckpt_dir``; returns how many."""
    removed = 0
    for tmp in ckpt_dir.glob(".*.tmp*") if ckpt_dir.is_dir() else []:
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with write-then-rename in the target folder for local paths (``save_atomic``).

    Remote paths (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        from fsspec.implementations.local import LocalFileSystem

        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, Path(path))


# ------------------------------------------------------------------------------------------------------- RNG state
def rng_states() -> dict[str, Any]:
    """The state of every global random number generator, as types ``torch.load(weights_only=True)`` accepts.

    Returns:
        ``torch`` (ByteTensor), ``numpy`` (dict), ``python`` (list) and, once CUDA is initialised, ``cuda`` (list of
        ByteTensors, one per device).
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global random number generators back to ``rng_states()``'s output."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------------------------- validation-aware saves
def validation_follows(trainer: Any) -> bool:
    """True in ``on_train_batch_end`` when Lightning will validate right after this training step.

    Asks the epoch loop the question it asks itself next (Lightning 2.x internals; False if they change). Lightning
    has no public hook or property for "a validation follows this step": ``on_validation_start`` comes after the
    checkpoint callbacks, and recomputing the rule from ``val_check_interval`` would have to copy its special cases
    (the last batch, ``max_steps``, iterable datasets, ``limit_val_batches``), a second copy that drifts. Checked by
    ``tests/test_reliability.py::test_validation_follows_predicts_lightnings_own_validation_steps``.
    """
    loop = trainer.fit_loop.epoch_loop
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher)) and not loop._skip_next_val
    except Exception:  # noqa: BLE001 - another Lightning version: save at once, as Lightning does
        return False


#: names of the step checkpoints ``make_trainer`` configures (``filename="step{step:08d}"``)
STEP_CHECKPOINT_NAME = re.compile(r"step(\d+)\.ckpt")


def prune_step_checkpoints(ckpt_dir: Path, keep: int, protect: tuple[Optional[Path], ...] = ()) -> list[Path]:
    """Delete the step checkpoints (``stepNNNNNNNN.ckpt``) of ``ckpt_dir`` beyond the newest ``keep`` (by step).

    Args:
        ckpt_dir: the run's checkpoint folder.
        keep: how many step checkpoints to keep (``trainer.keep_checkpoints``); negative keeps all.
        protect: files never deleted (the checkpoint being resumed from).

    Returns:
        The deleted files.
    """
    if keep < 0 or not ckpt_dir.is_dir():
        return []
    found = sorted(
        (int(match.group(1)), path)
        for path in ckpt_dir.iterdir()
        if (match := STEP_CHECKPOINT_NAME.fullmatch(path.name))
    )
    kept = {Path(p).resolve() for p in protect if p is not None}
    removed = []
    for _, path in found[: max(len(found) - keep, 0)]:
        if path.resolve() in kept:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(every_n_train_steps=N)`` that saves a step followed by a validation when the validation ended,
    and keeps at most ``save_top_k`` step checkpoints on disk.

    See the module docstring. The save waits at most until the end of the epoch or of training, in case Lightning
    skips the validation after all.

    Lightning deletes only the step checkpoints it recorded, and never the one a run resumed from; a run resumed from
    a step checkpoint (``last.ckpt`` not yet written, or corrupt) or killed between a save and the deletion would
    keep one more for good. So the folder itself is pruned to the newest ``save_top_k`` when fitting starts (sparing
    the checkpoint just loaded) and after every save.
    """

    _deferred = False

    def _prune(self, trainer, protect: tuple[Optional[Path], ...]) -> None:
        if trainer.is_global_zero and self.dirpath is not None:
            prune_step_checkpoints(Path(self.dirpath), self.save_top_k, protect)

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        # After the checkpoint was loaded: leftovers of a killed run or of a larger keep_checkpoints go.
        resumed = Path(trainer.ckpt_path) if trainer.ckpt_path else None
        self._prune(trainer, (resumed,))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        # A newer checkpoint is on disk now: the one resumed from is no longer needed as a fallback.
        self._prune(trainer, (Path(filepath),))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._deferred = False  # the validation did not come; the state has moved on (a batch was fetched)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and validation_follows(trainer):
            self._deferred = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_deferred(self, trainer, pl_module) -> None:
        if self._deferred and not trainer.sanity_checking:
            self._deferred = False
            super().on_train_batch_end(trainer, pl_module, None, None, -1)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._save_deferred(trainer, pl_module)
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save_deferred(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_deferred(trainer, pl_module)
        super().on_train_end(trainer, pl_module)


# ------------------------------------------------------------------------------------------------------ preemption
class PreemptedError(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; re-running the same command resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention for "ended by this signal"."""
        return 128 + self.signum


def slurm_owns_signals() -> bool:
    """True inside a SLURM job, where Lightning's SLURM environment handles SIGUSR1 (requeue) and SIGTERM itself."""
    import warnings

    from lightning.fabric.plugins.environments import SLURMEnvironment

    with warnings.catch_warnings():  # detect() warns when srun exists but is not used: irrelevant here
        warnings.simplefilter("ignore")
        return SLURMEnvironment.detect()


class PreemptionCallback(Callback):
    """Outside SLURM, SIGTERM or SIGUSR1 -> finish the step (and its validation), write ``last.ckpt``, stop training.

    ``installed()`` sets the handlers around ``trainer.fit`` (Lightning chains its own SIGTERM handler before ours).
    The handler records the signal and raises Lightning's stop flag; at the end of the step this callback writes the
    checkpoint (all ranks agree first) and Lightning stops after logging the step's metrics by raising
    ``SIGTERMException``. When a validation follows the step, or is running when the signal comes, the flag stays
    down until it ended, and the checkpoint is written then (see ``StepCheckpoint`` for why). ``error()`` turns the
    stop into a ``PreemptedError``.

    With gradient accumulation a stop between two optimiser steps loses the partial accumulation (those micro-batches
    are skipped on resume), so such a resume is not bit-exact.

    Args:
        ckpt_dir: the run's checkpoint folder; the checkpoint goes to ``ckpt_dir/last.ckpt``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = Path(ckpt_dir)
        self.signum: Optional[int] = None
        self.checkpoint: Optional[Path] = None
        self.step: Optional[int] = None
        self._trainer = None
        self._active = False  # handlers installed (not under SLURM)
        self._validating = False  # a validation after a training step is running

    @contextlib.contextmanager
    def installed(self) -> Iterator[PreemptionCallback]:
        """Handle SIGTERM and SIGUSR1 inside the block (main thread, not under SLURM); the old handlers come back."""
        if slurm_owns_signals() or sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)
        self._active = True
        try:
            yield self
        finally:
            self._active = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        # In a validation: let it end (Lightning's own SIGTERM handler, run just before, raised the flag).
        self._set_stop_flag(not self._validating)

    def _set_stop_flag(self, value: bool) -> None:
        # Lightning stops after the current step (or validation batch) when this flag is up; SIGTERM raises it by
        # itself, SIGUSR1 does not outside SLURM. The public ``trainer.should_stop`` is not the same stop: it ends
        # fit as if training were done (no SIGTERMException, so Lightning's teardown marks the run finished) and is
        # ignored until min_steps; only the signal connector's flag gives Lightning's own preemption path.
        connector = getattr(self._trainer, "_signal_connector", None)
        if connector is not None and self.signum is not None:
            connector.received_sigterm = value

    def _requested(self, trainer) -> bool:
        if not self._active:  # same on every rank: the environment decides
            return False
        requested = self.signum is not None and self.checkpoint is None
        if trainer.world_size > 1:  # a signal may reach some ranks only; saving is collective
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        return requested

    def _save_and_stop(self, trainer) -> None:
        if self.signum is None:  # another rank got the signal: stop together
            self.signum = signal.SIGTERM
        path = self.ckpt_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        self.checkpoint, self.step = path, trainer.global_step
        self._set_stop_flag(True)  # also for a signal that came before Lightning installed its handler

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._requested(trainer):
            return
        if validation_follows(trainer):
            self._set_stop_flag(False)  # saved when the validation has ended
            return
        self._save_and_stop(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validating = not trainer.sanity_checking

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._validating:
            return
        self._validating = False
        if self._requested(trainer):
            self._save_and_stop(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._trainer = None

    def error(self, fallback_checkpoint: Optional[Path] = None) -> Optional[PreemptedError]:
        """The ``PreemptedError`` to raise after Lightning stopped on our signal, or None when no signal came.

        Args:
            fallback_checkpoint: the newest checkpoint, named when the stop came without one of this callback's (the
                signal came right after a step checkpoint, or during a validation that a later step redoes).
        """
        if self.signum is None:
            return None
        name = signal.Signals(self.signum).name
        if self.checkpoint is not None:
            what = f"stopped by {name} after step {self.step}; checkpoint {self.checkpoint} written."
        elif fallback_checkpoint is not None:
            try:
                step = torch.load(fallback_checkpoint, map_location="cpu", weights_only=True, mmap=True)["global_step"]
            except Exception:  # noqa: BLE001 - only for the message
                step = "?"
            what = f"stopped by {name}; the newest checkpoint is {fallback_checkpoint} (step {step})."
        else:
            what = f"stopped by {name} before the first checkpoint; nothing to resume from yet."
        return PreemptedError(f"{what} Re-run the same command (resume=auto) to continue.", self.signum)


# ----------------------------------------------------------------------------------------------------------------------
# Which checkpoint a run resumes from


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


RESUME_FIX = "pass --resume auto (the newest checkpoint in output_dir), never (start afresh) or a .ckpt of var-lab"


def resolve_resume(resume: str, output_dir: Path) -> Optional[str]:
    """The checkpoint to resume from (``resume``: auto, never or a path), or None to start from scratch.

    Raises:
        BadInputError: an explicit path that is missing, not a checkpoint, truncated or corrupt.
        ValueError: with ``auto``, every checkpoint of the run is truncated or corrupt.
    """
    ckpt_dir = output_dir / "checkpoints"
    if env_rank() == 0:
        remove_stale_temporaries(ckpt_dir)  # half-written files of a killed save
    if resume == "never":
        if env_rank() == 0:
            (output_dir / "mlflow_run_id").unlink(missing_ok=True)  # a fresh run opens a fresh MLflow run
        return None
    if resume == "auto":
        found = find_resume_checkpoint(ckpt_dir)
        # Lightning's SLURM requeue writes hpc_ckpt_N.ckpt into the run folder: prefer it when it is newer.
        hpc = [p for p in output_dir.glob("hpc_ckpt_*.ckpt") if checkpoint_is_readable(p)]
        newest_hpc = max(hpc, key=lambda p: p.stat().st_mtime, default=None)
        if newest_hpc is not None and (found is None or newest_hpc.stat().st_mtime > found.stat().st_mtime):
            found = newest_hpc
        if found is None and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
            raise ValueError(
                f"every checkpoint in {ckpt_dir} is truncated or corrupt, so this run cannot resume; pass "
                "--resume never to start it again from scratch (a new MLflow run), or --resume PATH"
            )
        return str(found) if found else None
    path = check_checkpoint_file(resume, "resume checkpoint", RESUME_FIX)
    if not checkpoint_is_readable(path):
        raise BadInputError(f"resume checkpoint {path} is truncated or corrupt; {RESUME_FIX}")
    return str(path)


def check_resume_compatible(ckpt_path: str, cfg: Any, keys: dict[str, tuple[str, ...]]) -> None:
    """Refuse to resume from a checkpoint of another architecture (e.g. another depth) with a message naming both.

    Args:
        ckpt_path: the checkpoint about to be resumed.
        cfg: this run's config (``model.num_classes`` resolved).
        keys: section -> keys the weights depend on (``FIT_ARCHITECTURE_KEYS``).

    Raises:
        ValueError: naming each differing key with the checkpoint's and this run's value.
    """
    import torch

    try:  # memory-mapped: only the small pickled part is read, not the weights
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]["config"]
    except Exception:  # noqa: BLE001 - not ours or unreadable: Lightning's own load reports it
        return
    current = to_dict(cfg)
    differences = []
    for section, names in keys.items():
        for name in names:
            old, new = (saved.get(section) or {}).get(name), current[section][name]
            if old is not None and old != new:
                differences.append(f"{section}.{name}={old!r} in the checkpoint but {new!r} in this run")
    if differences:
        raise ValueError(
            f"cannot resume from {ckpt_path}: it holds another architecture ({'; '.join(differences)}). Resume with "
            f"the checkpoint's settings, or train this one into another output_dir (or pass --resume never)."
        )
