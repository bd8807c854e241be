"""Loading the released VAR checkpoints (``vae_ch160v4096z32.pth``, ``var_d{16,20,24,30}.pth``) from disk."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

import torch

from var_lab.models.var import VAR
from var_lab.models.vqvae import VQVAE

RELEASE_URL = "https://huggingface.co/FoundationVision/var"
RELEASE_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

_VAE_KWARGS = {"vocab_size", "z_channels", "ch", "share_quant_resi", "v_patch_nums", "dropout", "beta", "quant_resi"}
_VAE_IGNORED = {"test_mode", "using_znorm", "quant_conv_ks", "default_qresi_counts"}
_VAR_KWARGS = {
    "num_classes",
    "depth",
    "embed_dim",
    "num_heads",
    "shared_aln",
    "attn_l2_norm",
    "cond_drop_rate",
    "patch_nums",
    "mlp_ratio",
    "drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "norm_eps",
}
_VAR_IGNORED = {"flash_if_available", "fused_if_available", "vae_local"}


class ReleaseFormatError(ValueError):
    """A released checkpoint is missing, of another depth, or has keys or shapes that do not match."""


def from_release_kwargs(vae_kwargs: dict, var_kwargs: dict, attn_impl: str = "auto") -> tuple[VQVAE, VAR]:
    """Build the (vqvae, var) pair from the original constructor keyword arguments.

    Args:
        vae_kwargs: keywords of the original ``VQVAE`` (vocab_size, z_channels, ch, share_quant_resi, v_patch_nums).
        var_kwargs: keywords of the original ``VAR`` (num_classes, depth, embed_dim, num_heads, shared_aln,
            attn_l2_norm, cond_drop_rate, patch_nums).
        attn_impl: attention kernel of the transformer.

    Returns:
        The tokenizer (in eval mode, frozen) and the transformer, with the tokenizer attached.
    """
    unknown = set(vae_kwargs) - _VAE_KWARGS - _VAE_IGNORED
    if unknown:
        raise ReleaseFormatError(f"unknown VQVAE keyword(s) {sorted(unknown)}; known: {sorted(_VAE_KWARGS)}")
    if vae_kwargs.get("using_znorm"):
        raise ReleaseFormatError("using_znorm=True (cosine codebook) is not supported; the released tokenizer uses L2")
    vae_args = {k: v for k, v in vae_kwargs.items() if k in _VAE_KWARGS}
    vae_args["patch_nums"] = tuple(vae_args.pop("v_patch_nums", RELEASE_PATCH_NUMS))
    vqvae = VQVAE(**vae_args)
    vqvae.eval().requires_grad_(False)
    unknown = set(var_kwargs) - _VAR_KWARGS - _VAR_IGNORED
    if unknown:
        raise ReleaseFormatError(f"unknown VAR keyword(s) {sorted(unknown)}; known: {sorted(_VAR_KWARGS)}")
    var_args = {k: v for k, v in var_kwargs.items() if k in _VAR_KWARGS}
    if "patch_nums" in var_args:
        var_args["patch_nums"] = tuple(var_args["patch_nums"])
    var = VAR(vqvae=vqvae, attn_impl=attn_impl, **var_args)
    return vqvae, var


def _read_state_dict(path: Union[str, Path], what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} checkpoint not found: {path}. Download it from {RELEASE_URL} "
            f"(files vae_ch160v4096z32.pth, var_d16.pth, var_d20.pth, var_d24.pth, var_d30.pth) and pass its path."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise ReleaseFormatError(f"{path}: cannot be read as a PyTorch state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ReleaseFormatError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def check_state_dict(model: torch.nn.Module, state: dict, path: Union[str, Path]) -> None:
    """Raise ``ReleaseFormatError`` naming ``path`` and the missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_abbreviate(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_abbreviate(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatches ({len(mis_shaped)}): {_abbreviate(mis_shaped)}")
        raise ReleaseFormatError(f"{path}: state dict does not match the model; " + "; ".join(parts))


def _abbreviate(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def depth_of_state_dict(state: dict) -> int:
    """Number of transformer blocks in a VAR state dict."""
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def load_release_tokenizer(path: Union[str, Path], map_location: str = "cpu") -> VQVAE:
    """Load the released tokenizer ``vae_ch160v4096z32.pth`` (frozen, eval mode)."""
    state = _read_state_dict(path, "tokenizer")
    vqvae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, patch_nums=RELEASE_PATCH_NUMS)
    check_state_dict(vqvae, state, path)
    vqvae.load_state_dict(state, strict=True)
    return vqvae.to(map_location).eval().requires_grad_(False)


def load_release_var(
    path: Union[str, Path],
    vqvae: Optional[VQVAE] = None,
    depth: Optional[int] = None,
    attn_impl: str = "auto",
    map_location: str = "cpu",
) -> VAR:
    """Load a released ``var_d{depth}.pth``; builds the depth found in the file.

    Args:
        path: the checkpoint file.
        vqvae: the released tokenizer (attached for sampling); None builds the transformer alone.
        depth: the expected depth; a file of another depth raises ``ReleaseFormatError``.
        attn_impl: attention kernel.
        map_location: device for the weights.
    """
    state = _read_state_dict(path, f"VAR d{depth}" if depth else "VAR")
    found = depth_of_state_dict(state)
    if found == 0:
        raise ReleaseFormatError(f"{path}: no 'blocks.N.' keys; this is not a VAR transformer checkpoint")
    if depth is not None and found != depth:
        raise ReleaseFormatError(f"{path}: holds a depth-{found} model, but depth {depth} was requested")
    shared_aln = any(k.startswith("shared_ada_lin") for k in state)
    num_classes = state["class_emb.weight"].shape[0] - 1 if "class_emb.weight" in state else 1000
    embed_dim = state["class_emb.weight"].shape[1] if "class_emb.weight" in state else 64 * found
    num_heads = state["blocks.0.attn.scale_mul_1H11"].shape[1] if "blocks.0.attn.scale_mul_1H11" in state else found
    kwargs = dict(
        depth=found,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_classes=num_classes,
        shared_aln=shared_aln,
        attn_l2_norm="blocks.0.attn.scale_mul_1H11" in state,
        attn_impl=attn_impl,
    )
    if vqvae is None:
        var = VAR(vqvae=None, vocab_size=4096, z_channels=32, patch_nums=RELEASE_PATCH_NUMS, **kwargs)
    else:
        var = VAR(vqvae=vqvae, **kwargs)
    check_state_dict(var, state, path)
    var.load_state_dict(state, strict=True)
    return var.to(map_location)
