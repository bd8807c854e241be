"""Loading trained models from disk: ``var-lab fit`` / ``fit-tokenizer`` checkpoints and the released files.

Plain functions of explicit paths (no command-line namespace); they read a Lightning checkpoint as the dict it is
(``hyper_parameters.config`` and ``state_dict``) and build the plain modules from the stored config sections.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from var_lab.config import FitConfig, FitTokenizerConfig, TokenizerModelConfig, from_dict, to_dict
from var_lab.inputs import (
    RELEASE_FIX,
    VAR_CKPT_FIX,
    BadInputError,
    check_checkpoint_file,
    checkpoint_load_errors,
)
from var_lab.models.release import ReleaseFormatError, check_state_dict, load_release_tokenizer, load_release_var
from var_lab.models.var import VAR
from var_lab.models.vqvae import VQVAE

PathLike = Union[str, os.PathLike]


def load_tokenizer_checkpoint(path: Union[str, Path], map_location: str = "cpu") -> tuple[VQVAE, dict[str, Any]]:
    """Load a ``var-lab fit-tokenizer`` checkpoint: (frozen vqvae in eval mode, info with ``config``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    return _tokenizer_from_checkpoint(torch.load(path, map_location=map_location, weights_only=False), path)


def _tokenizer_from_checkpoint(ckpt: dict, path: Path) -> tuple[VQVAE, dict[str, Any]]:
    """The frozen vqvae and info of an already loaded ``fit-tokenizer`` checkpoint (``path`` names it in errors)."""
    hp = ckpt.get("hyper_parameters", {})
    if "config" not in hp:
        raise ValueError(f"{path}: not a var-lab tokenizer checkpoint (no hyper_parameters.config)")
    cfg = from_dict(FitTokenizerConfig, hp["config"], str(path))
    vqvae = VQVAE.from_config(cfg.tokenizer)
    state = {k[len("vqvae.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("vqvae.")}
    vqvae.load_state_dict(state, strict=True)
    info = {"config": hp["config"], "global_step": int(ckpt.get("global_step", 0)), "tokenizer": cfg.tokenizer}
    return vqvae.eval().requires_grad_(False), info


def load_tokenizer(path: Union[str, Path], cfg: Optional[TokenizerModelConfig] = None) -> VQVAE:
    """A frozen tokenizer from our Lightning checkpoint, or from a plain state dict (the release's format).

    Args:
        path: ``.ckpt`` from ``var-lab fit-tokenizer`` or a ``.pth`` state dict such as ``vae_ch160v4096z32.pth``.
        cfg: architecture for a plain state dict (ignored for our checkpoints, which carry their own).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer checkpoint not found: {path}. Train one with `var-lab fit-tokenizer`, or download the "
            "released vae_ch160v4096z32.pth from https://huggingface.co/FoundationVision/var and pass its path."
        )
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "hyper_parameters" in obj and "state_dict" in obj:
        vqvae, info = _tokenizer_from_checkpoint(obj, path)  # the file is read once
        if cfg is not None and to_dict(info["tokenizer"]) != to_dict(cfg):
            # The checkpoint's architecture wins; a differing config is a user error worth naming.
            raise ValueError(
                f"{path}: the tokenizer config given ({to_dict(cfg)}) differs from the checkpoint's "
                f"({to_dict(info['tokenizer'])}); drop the tokenizer section or make it match"
            )
        return vqvae
    if not isinstance(obj, dict):
        raise ReleaseFormatError(f"{path}: expected a state dict, found {type(obj).__name__}")
    vqvae = VQVAE.from_config(cfg or TokenizerModelConfig())
    check_state_dict(vqvae, obj, path)
    vqvae.load_state_dict(obj, strict=True)
    return vqvae.eval().requires_grad_(False)


#: ``load_var_checkpoint``'s choice of weights: the moving average (when the run kept one) or the trained ones
WEIGHT_CHOICES = ("ema", "raw")


def load_var_checkpoint(
    path: Union[str, Path], map_location: Union[str, torch.device] = "cpu", weights: str = "ema"
) -> tuple[VQVAE, VAR, dict[str, Any]]:
    """Load a training checkpoint of ``VARModule``.

    Args:
        path: a ``.ckpt`` written by ``var-lab fit``.
        map_location: device for the weights.
        weights: ``ema``, the moving average of a run with ``optim.ema_decay`` (Lightning's weight averaging keeps
            it in ``state_dict`` and the trained weights in ``current_model_state``), or ``raw``, the trained
            weights. A checkpoint without an average has only the trained weights, whichever is asked.

    Returns:
        (vqvae, var, info) with the tokenizer attached to the transformer, both in eval mode; ``info`` holds
        ``fit_config`` (dict), ``global_step``, ``mlflow_run_id``, ``tracking_uri``, ``epoch`` and ``weights``
        (``ema`` or ``raw``: the weights loaded).
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "hyper_parameters" not in ckpt or "config" not in ckpt["hyper_parameters"]:
        raise ValueError(f"{path}: not a var-lab VAR checkpoint (no hyper_parameters.config)")
    cfg_dict = ckpt["hyper_parameters"]["config"]
    cfg = from_dict(FitConfig, cfg_dict, str(path))
    has_average = "current_model_state" in ckpt and "averaging_state" in ckpt
    state = ckpt["current_model_state"] if has_average and weights == "raw" else ckpt["state_dict"]
    vqvae = VQVAE.from_config(cfg.tokenizer)
    vqvae.load_state_dict({k[len("vqvae.") :]: v for k, v in state.items() if k.startswith("vqvae.")}, strict=True)
    vqvae.requires_grad_(False)
    var = VAR.from_config(cfg.model, vqvae, init_adaln_gamma=cfg.optim.alng)
    var.load_state_dict({k[len("var.") :]: v for k, v in state.items() if k.startswith("var.")}, strict=True)
    meta = ckpt.get("var_lab", {})
    info = {
        "fit_config": cfg_dict,
        "global_step": int(ckpt.get("global_step", 0)),
        "epoch": int(ckpt.get("epoch", 0)),
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "tracking_uri": meta.get("tracking_uri"),
        "weights": "ema" if has_average and weights == "ema" else "raw",
    }
    return vqvae.eval(), var.eval(), info


def check_model_paths(
    checkpoint: Optional[PathLike] = None,
    release_var: Optional[PathLike] = None,
    release_tokenizer: Optional[PathLike] = None,
) -> None:
    """Refuse missing, unreadable or non-checkpoint model files before anything is loaded (cheap: no torch.load).

    Raises:
        BadInputError: naming the option, the file and what to pass instead.
    """
    if checkpoint:
        check_checkpoint_file(checkpoint, "--checkpoint", VAR_CKPT_FIX)
        return
    if not (release_var and release_tokenizer):
        raise BadInputError("give --checkpoint CKPT, or both --release-var PATH and --release-tokenizer PATH")
    for flag, path in (("--release-var", release_var), ("--release-tokenizer", release_tokenizer)):
        check_checkpoint_file(path, flag, RELEASE_FIX)


def load_var_model(
    checkpoint: Optional[PathLike] = None,
    release_var: Optional[PathLike] = None,
    release_tokenizer: Optional[PathLike] = None,
    depth: Optional[int] = None,
    weights: str = "ema",
) -> tuple[VQVAE, VAR, dict[str, Any]]:
    """(vqvae, var, info) on the CPU from a ``var-lab fit`` checkpoint, or from the released pair of files.

    Args:
        checkpoint: a ``.ckpt`` of ``var-lab fit``.
        release_var: a released ``var_d{16,20,24,30}.pth`` (with ``release_tokenizer``), when no checkpoint is given.
        release_tokenizer: the released ``vae_ch160v4096z32.pth``.
        depth: the expected depth of ``release_var``.
        weights: ``ema`` or ``raw`` for a checkpoint (see ``load_var_checkpoint``).

    Returns:
        ``info`` holds the checkpoint's ``fit_config``, ``global_step``, ``mlflow_run_id`` and ``tracking_uri`` (None
        and 0 for a released checkpoint).

    Raises:
        BadInputError: neither a checkpoint nor both released files were given, or a given file is missing, not a
            checkpoint, or truncated.
    """
    check_model_paths(checkpoint, release_var, release_tokenizer)  # before the heavy loading
    if checkpoint:
        with checkpoint_load_errors(checkpoint, "--checkpoint", VAR_CKPT_FIX):
            return load_var_checkpoint(checkpoint, map_location="cpu", weights=weights)
    vqvae = load_release_tokenizer(release_tokenizer)
    var = load_release_var(release_var, vqvae=vqvae, depth=depth)
    info = {"fit_config": None, "global_step": 0, "mlflow_run_id": None, "tracking_uri": None, "weights": "release"}
    return vqvae, var, info
