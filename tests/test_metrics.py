"""Evaluation metrics against their definitions: PSNR, SSIM, LPIPS availability, FID, KID, extractors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_zoo.metrics import (UNAVAILABLE, InceptionFeatures, InceptionV3Pool, RandomConvFeatures,
                               build_feature_extractor, feature_statistics, fid_from_features, frechet_distance,
                               kernel_inception_distance, load_lpips, psnr, ssim)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smooth_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Image-like inputs: low-frequency random colour fields in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def noisy(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)


def test_psnr_identical_is_infinite_and_noise_matches_the_formula():
    a = torch.rand(3, 3, 64, 64)
    assert torch.isinf(psnr(a, a)).all() and (psnr(a, a) > 0).all()
    for sigma in (0.01, 0.05, 0.1):
        # No clamping here: the MSE is exactly the noise's power, sigma² in expectation.
        b = a + sigma * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
        expected = 10 * math.log10(1 / sigma ** 2)
        assert psnr(a, b).shape == (3,)
        assert torch.allclose(psnr(a, b), torch.full((3,), expected), atol=0.05)
    assert torch.allclose(psnr(a * 255, (a + 0.1) * 255, max_val=255.0), torch.full((3,), 20.0), atol=1e-3)


def test_ssim_identical_is_one_and_falls_with_noise():
    a = smooth_images(4)
    assert torch.allclose(ssim(a, a), torch.ones(4), atol=1e-5)
    values = [ssim(a, noisy(a, sigma)).mean().item() for sigma in (0.02, 0.1, 0.3)]
    assert 1 > values[0] > values[1] > values[2]
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_ssim_matches_a_direct_computation_at_one_pixel():
    # Constant images: the windowed means are the constants and the variances vanish, so
    # SSIM = (2 μa μb + C1) / (μa² + μb² + C1) exactly.
    a, b = torch.full((1, 3, 16, 16), 0.3), torch.full((1, 3, 16, 16), 0.6)
    c1 = 0.01 ** 2
    expected = (2 * 0.3 * 0.6 + c1) / (0.3 ** 2 + 0.6 ** 2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-5)


def test_lpips_is_unavailable_without_weights():
    assert load_lpips(None) is None and load_lpips("") is None
    assert UNAVAILABLE == "unavailable"


def test_frechet_distance_scipy_and_eigen_agree_and_zero_for_the_same_statistics():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(300, 16)), rng.normal(0.3, 1.5, size=(300, 16))
    (mu1, s1), (mu2, s2) = feature_statistics(f1), feature_statistics(f2)
    with_scipy = frechet_distance(mu1, s1, mu2, s2, use_scipy=True)
    with_eigh = frechet_distance(mu1, s1, mu2, s2, use_scipy=False)
    assert with_scipy == pytest.approx(with_eigh, rel=1e-6)
    # Two Gaussians with diagonal covariances: FID = |Δμ|² + Σ (σ1 - σ2)².
    assert frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 9.0])) == pytest.approx(2 + 1 + 1)
    for use_scipy in (True, False):
        assert abs(frechet_distance(mu1, s1, mu1, s1, use_scipy=use_scipy)) < 1e-6 * np.trace(s1)


def test_fid_and_kid_are_zero_against_themselves_and_grow_with_noise():
    extractor = RandomConvFeatures(seed=0, dim=64)
    images = smooth_images(160, seed=2)
    real = extractor(images).numpy()
    assert real.shape == (160, 64)
    scale = np.trace(np.cov(real, rowvar=False))
    assert abs(fid_from_features(real, real)) < 1e-3 * scale
    kid_self, _ = kernel_inception_distance(real, real, subsets=20, subset_size=80)
    fids, kids = [], []
    for sigma in (0.2, 0.35, 0.5):
        fake = extractor(noisy(images, sigma, seed=3)).numpy()
        fids.append(fid_from_features(real, fake))
        kids.append(kernel_inception_distance(real, fake, subsets=20, subset_size=80)[0])
    assert fids[0] > 1e-3 * scale and fids == sorted(fids) and fids[0] < fids[1] < fids[2]
    # The same set on both sides is not quite 0 for the unbiased estimator (each point meets
    # itself in the cross term): a small negative number, well below the first noise level.
    assert abs(kid_self) < 0.3 * kids[0] and kids[0] < kids[1] < kids[2]


def test_kid_is_unbiased_for_samples_of_one_distribution():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), rng.normal(0.5, 1.0, size=(400, 8))
    same, same_std = kernel_inception_distance(a, b, subsets=50, subset_size=100)
    different, _ = kernel_inception_distance(a, c, subsets=50, subset_size=100)
    assert abs(same) < 3 * same_std + 1e-3 and different > 10 * abs(same)


def test_random_features_are_deterministic_from_the_seed_and_resize_to_128():
    images = smooth_images(3, size=40)
    first, again, other = RandomConvFeatures(seed=5), RandomConvFeatures(seed=5), RandomConvFeatures(seed=6)
    assert torch.equal(first(images), again(images)) and not torch.equal(first(images), other(images))
    # Features are of the 128 px image whatever the input size.
    up = F.interpolate(images, size=(128, 128), mode="bilinear", align_corners=False)
    assert torch.allclose(first(images), first(up), atol=1e-6)
    assert build_feature_extractor("random", seed=5)(images).shape == (3, 64)


def test_inception_refuses_without_weights_and_loads_a_state_dict_file(tmp_path):
    with pytest.raises(ValueError, match="weights_path"):
        InceptionFeatures(None)
    with pytest.raises(ValueError, match="weights_path"):
        build_feature_extractor("inception")
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="lack"):
        InceptionFeatures(str(bad))
    # Random weights in the torchvision layout, plus a classifier head that is ignored.
    torch.manual_seed(0)
    state = InceptionV3Pool().state_dict()
    state["fc.weight"] = torch.zeros(1008, 2048)
    path = tmp_path / "inception.pt"
    torch.save(state, path)
    extractor = InceptionFeatures(str(path))
    assert torch.equal(extractor.net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    out = extractor(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()
