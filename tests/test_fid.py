"""FID / KID / precision-recall glue: identical to torch-fidelity, independent Frechet check, reference cache keys.

The Inception network is real (converted offline weights, CPU); image counts stay in the tens (~0.15 s per image).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from var_lab.metrics.fid import (
    FolderImages,
    InceptionFeatures,
    MetricOptions,
    NpzImages,
    ReferenceStats,
    compute_metrics,
    feature_statistics,
    frechet_distance,
    pm1_to_uint8,
    reference_statistics,
    to_uint8,
)


@pytest.fixture(scope="module")
def extractor(converted_weights):
    return InceptionFeatures(converted_weights, device="cpu", batch_size=16)


def write_images(folder, count, low, high, seed, size=32):
    """PNG files of random blocky images whose intensities lie in [low, high)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        blocks = rng.integers(low, high, (size // 4, size // 4, 3), dtype=np.uint8)
        Image.fromarray(blocks.repeat(4, 0).repeat(4, 1)).save(folder / f"{i:06d}.png")
    return folder


def independent_frechet(mu1, sigma1, mu2, sigma2):
    """The TTUR / pytorch-fid formula with scipy's matrix square root (not torch-fidelity's eigenvalue route)."""
    covmean, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def symmetric_frechet(mu1, sigma1, mu2, sigma2):
    """tr((S1 S2)^(1/2)) as the trace of (S1^(1/2) S2 S1^(1/2))^(1/2), with symmetric eigensolvers (fast at 2048)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_frechet_distance_matches_scipy_on_the_same_features():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(48, 48))
    feats1 = rng.normal(size=(500, 48)) @ mixing
    feats2 = rng.normal(loc=0.3, size=(400, 48)) @ (mixing + 0.1 * rng.normal(size=(48, 48)))
    stats1 = feature_statistics(torch.from_numpy(feats1).float())
    stats2 = feature_statistics(torch.from_numpy(feats2).float())
    ours = frechet_distance(stats1["mu"], stats1["sigma"], stats2["mu"], stats2["sigma"])
    mu1, mu2 = feats1.astype(np.float32).mean(0), feats2.astype(np.float32).mean(0)
    sigma1 = np.cov(feats1.astype(np.float32), rowvar=False)
    sigma2 = np.cov(feats2.astype(np.float32), rowvar=False)
    reference = independent_frechet(mu1.astype(np.float64), sigma1, mu2.astype(np.float64), sigma2)
    assert ours > 1.0
    assert ours == pytest.approx(reference, rel=1e-6)
    assert symmetric_frechet(mu1.astype(np.float64), sigma1, mu2.astype(np.float64), sigma2) == pytest.approx(
        reference, rel=1e-6
    )
    # float64 statistics (an ADM .npz) against float32 means: promoted, same value.
    mixed = frechet_distance(stats1["mu"].astype(np.float64), stats1["sigma"], stats2["mu"], stats2["sigma"])
    assert mixed == pytest.approx(ours, rel=1e-6)
    with pytest.raises(ValueError, match="statistics do not match"):
        frechet_distance(stats1["mu"][:10], stats1["sigma"], stats2["mu"], stats2["sigma"])


def test_uint8_conversions_match_saved_pngs(tmp_path):
    from torchvision.utils import save_image

    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    img[0, 0, 0, 0] = 1.0
    img[0, 0, 0, 1] = 0.0
    save_image(img[0], tmp_path / "a.png")
    on_disk = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.png"))).permute(2, 0, 1)
    assert torch.equal(to_uint8(img)[0], on_disk)
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(pm1_to_uint8(values.float() / 127.5 - 1), values)


@pytest.mark.slow
def test_self_fid_is_zero_and_numbers_equal_torch_fidelity(tmp_path, converted_weights, extractor):
    """var-lab's FID, KID, precision and recall equal torch_fidelity.calculate_metrics on the same two folders."""
    import torch_fidelity

    gen_dir = write_images(tmp_path / "gen", 20, 0, 200, seed=1)
    ref_dir = write_images(tmp_path / "ref", 20, 60, 256, seed=2)
    options = MetricOptions(kid_subset_size=10, kid_subsets=50)
    gen = extractor.extract(FolderImages(gen_dir).batches(extractor.batch_size), total=20)
    ref = reference_statistics(FolderImages(ref_dir), extractor, cache_dir=tmp_path / "cache")
    ours = compute_metrics(gen, ref, options=options)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(gen_dir),
        input2=str(ref_dir),
        fid=True,
        kid=True,
        prc=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(converted_weights),
        kid_subset_size=10,
        kid_subsets=50,
        batch_size=extractor.batch_size,
        cuda=False,
        cache=False,
        verbose=False,
    )
    assert ours["fid"] > 1.0
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9, abs=1e-9)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9, abs=1e-12)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6, abs=1e-12)
    assert ours["precision"] == theirs["precision"] and ours["recall"] == theirs["recall"]

    # torchmetrics' FrechetInceptionDistance on the same images and weights (its resize without antialiasing, as
    # torch-fidelity's) agrees to float32 statistics: the in-training callback could use it and log the same FID.
    from torchmetrics.image.fid import FrechetInceptionDistance

    def as_uint8(folder):
        files = sorted(folder.glob("*.png"))
        return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])

    tm_fid = FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=str(converted_weights), antialias=False
    )
    tm_fid.update(as_uint8(ref_dir), real=True)
    tm_fid.update(as_uint8(gen_dir), real=False)
    assert float(tm_fid.compute()) == pytest.approx(ours["fid"], rel=1e-5)

    # The same set against itself: FID ~0, precision = recall = 1.
    self_ref = reference_statistics(FolderImages(gen_dir), extractor, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(self_ref.features, gen["2048"], rtol=0, atol=0)
    self_metrics = compute_metrics(gen, self_ref, kid=False, options=options)
    assert abs(self_metrics["fid"]) < 1e-3
    assert self_metrics["precision"] == 1.0 and self_metrics["recall"] == 1.0
    # An independent formula (symmetric eigensolvers; scipy's sqrtm takes minutes at 2048) on the same features.
    stats_gen = feature_statistics(gen["2048"])
    independent = symmetric_frechet(
        stats_gen["mu"].astype(np.float64), stats_gen["sigma"], ref.mu.astype(np.float64), ref.sigma
    )
    assert ours["fid"] == pytest.approx(independent, rel=1e-4)


def test_kid_subsets_of_a_small_set_differ_so_kid_std_measures_the_spread():
    """With the default subset size (1000) and sets of 40, subsets of 20 are drawn: kid_std > 0 and it shrinks
    relative to KID as the sets grow apart (the demo compares sizes by KID +- kid_std)."""
    from var_lab.metrics.fid import ReferenceStats

    g = torch.Generator().manual_seed(0)
    ref_feats = torch.randn(40, 16, generator=g, dtype=torch.float64).float()
    ref = ReferenceStats(mu=ref_feats.double().mean(0).numpy(), sigma=np.cov(ref_feats.double().numpy().T),
                         features=ref_feats, description="random", num_images=40)  # fmt: skip
    near = {"2048": torch.randn(40, 16, generator=g) + 0.1}
    far = {"2048": torch.randn(40, 16, generator=g) + 1.0}
    m_near = compute_metrics(near, ref, fid=False, prc=False)
    m_far = compute_metrics(far, ref, fid=False, prc=False)
    assert m_near["kid_std"] > 0 and m_far["kid_std"] > 0
    assert m_far["kid"] - m_far["kid_std"] > m_near["kid"] + m_near["kid_std"]


class CountingExtractor:
    """The real extractor, counting how many images it was asked to process (to see cache hits)."""

    def __init__(self, inner):
        self.inner = inner
        self.images = 0
        self.batch_size = inner.batch_size

    @property
    def identity(self):
        return self.inner.identity

    def extract(self, batches, total=None, desc=""):
        out = self.inner.extract(batches, total=total, desc=desc)
        self.images += len(out["2048"])
        return out


@pytest.mark.slow
def test_reference_cache_is_keyed_and_never_stale(tmp_path, converted_weights, extractor):
    cache = tmp_path / "cache"
    folder = write_images(tmp_path / "ref", 6, 0, 256, seed=5, size=48)
    spy = CountingExtractor(extractor)

    first = reference_statistics(FolderImages(folder), spy, cache_dir=cache)
    assert spy.images == 6 and len(list(cache.glob("*.pt"))) == 1
    again = reference_statistics(FolderImages(folder), spy, cache_dir=cache)
    assert spy.images == 6  # cache hit
    np.testing.assert_array_equal(again.sigma, first.sigma)

    # A different resolution, a different image count, changed files: recomputed each time, never reused.
    reference_statistics(FolderImages(folder, resolution=32), spy, cache_dir=cache)
    assert spy.images == 12
    reference_statistics(FolderImages(folder, limit=4), spy, cache_dir=cache)
    assert spy.images == 16
    write_images(folder, 1, 0, 10, seed=9, size=48)  # overwrite 000000.png with other pixels
    changed = reference_statistics(FolderImages(folder), spy, cache_dir=cache)
    assert spy.images == 22
    assert not np.allclose(changed.mu, first.mu)

    # A different extractor (other weights file: other sha256) does not reuse the cache either.
    state = torch.load(converted_weights, map_location="cpu", weights_only=True)
    state["Conv2d_1a_3x3.bn.bias"] = state["Conv2d_1a_3x3.bn.bias"] + 0.01
    other_weights = tmp_path / "other.pth"
    torch.save(state, other_weights)
    other = CountingExtractor(InceptionFeatures(other_weights, device="cpu", batch_size=16))
    assert other.identity != spy.identity
    reference_statistics(FolderImages(folder), other, cache_dir=cache)
    assert other.images == 6

    # A file at the expected name holding another key (a collision or a hand-copied file) is recomputed.
    ref = reference_statistics(FolderImages(folder), spy, cache_dir=cache)
    path = ref.key["cache_file"]
    payload = torch.load(path, weights_only=False)
    payload["key"] = dict(payload["key"], num_images=999)
    torch.save(payload, path)
    reference_statistics(FolderImages(folder), spy, cache_dir=cache)
    assert spy.images == 28


def test_npz_reference_batch_reader(tmp_path):
    rng = np.random.default_rng(0)
    arr_NHW3 = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    plain = tmp_path / "ref.npz"
    np.savez(plain, arr_0=arr_NHW3)
    compressed = tmp_path / "ref_compressed.npz"
    mu, sigma = rng.normal(size=4), np.eye(4)
    np.savez_compressed(compressed, arr_0=arr_NHW3, mu=mu, sigma=sigma)
    for path in (plain, compressed):
        source = NpzImages(path)
        assert len(source) == 7
        batches = list(source.batches(3))
        assert [len(b) for b in batches] == [3, 3, 1]
        assert torch.equal(torch.cat(batches), torch.from_numpy(arr_NHW3).permute(0, 3, 1, 2))
    assert NpzImages(plain).stored_statistics() is None
    stored = NpzImages(compressed).stored_statistics()
    np.testing.assert_array_equal(stored["mu"], mu)
    assert len(list(NpzImages(plain, limit=5).batches(4))[-1]) == 1

    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=arr_NHW3.astype(np.float32))
    with pytest.raises(ValueError, match="'arr_0' must be uint8"):
        NpzImages(bad)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=arr_NHW3)
    with pytest.raises(ValueError, match="expected 'arr_0'"):
        NpzImages(wrong)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NpzImages(tmp_path / "absent.npz")


@pytest.mark.slow
def test_npz_statistics_define_the_fid_reference(tmp_path, extractor):
    """With mu/sigma in the .npz, FID uses them (ADM evaluator); its images still give KID/precision/recall."""
    rng = np.random.default_rng(1)
    arr_NHW3 = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=2048), np.diag(rng.uniform(0.1, 1.0, size=2048))
    path = tmp_path / "adm.npz"
    np.savez(path, arr_0=arr_NHW3, mu=mu, sigma=sigma)
    ref = reference_statistics(NpzImages(path), extractor, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(ref.mu, mu)
    assert ref.features.shape == (5, 2048) and ref.num_images == 5
    only_stats = tmp_path / "stats.npz"
    np.savez(only_stats, mu=mu, sigma=sigma)
    ref2 = reference_statistics(NpzImages(only_stats), extractor, cache_dir=tmp_path / "cache")
    assert ref2.features is None
    gen = {"2048": torch.from_numpy(rng.normal(size=(6, 2048))).float()}
    fid = compute_metrics(gen, ref2, kid=False, prc=False)["fid"]
    stats = feature_statistics(gen["2048"])
    expected = symmetric_frechet(mu, sigma, stats["mu"].astype(np.float64), stats["sigma"])
    assert fid == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="need the reference features"):
        compute_metrics(gen, ref2, kid=True, prc=False)


def test_dataset_reference_uses_training_pixels(fashion_mnist_dir, tmp_path, extractor):
    from var_lab.metrics.fid import DatasetImages

    source = DatasetImages("fashion_mnist", str(fashion_mnist_dir), resolution=32, split="val", limit=3)
    batch = next(source.batches(8))
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 32, 32)
    assert torch.equal(batch[:, 0], batch[:, 1])  # grey images repeated to 3 channels
    identity = source.identity()
    assert identity["resolution"] == 32 and identity["limit"] == 3 and len(identity["content"]) == 64
    other = DatasetImages("fashion_mnist", str(fashion_mnist_dir), resolution=32, split="train", limit=3)
    assert other.identity() != identity


def test_compute_metrics_rejects_too_few_images():
    feats = {"2048": torch.randn(3, 2048)}
    ref = ReferenceStats(np.zeros(2048), np.eye(2048), torch.randn(3, 2048), 3, "tiny")
    with pytest.raises(ValueError, match="precision/recall needs at least 4"):
        compute_metrics(feats, ref, fid=False, kid=False, prc=True)
