"""Evaluation metrics against their definitions: PSNR, SSIM, LPIPS availability, FID, KID, extractors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_zoo.metrics import (UNAVAILABLE, InceptionFeatures, block_hue, chroma_slope, object_hue, foreground, hue, mean_chroma, InceptionV3Pool, RandomConvFeatures,
                               build_feature_extractor, fid_from_features, kernel_inception_distance, load_lpips, psnr,
                               psnr_from_mse, resize_bilinear_tf1, ssim)


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


def test_psnr_from_mse_is_the_one_formula_and_its_floor_caps_it():
    a = torch.rand(4, 2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    b = (a + 0.05).clamp(0, 1)
    mse = (a - b).square().flatten(1).mean(1)
    assert torch.equal(psnr(a, b), psnr_from_mse(mse))  # per object, over all its views
    assert torch.allclose(psnr_from_mse(mse), -10 * torch.log10(mse))
    assert torch.isinf(psnr_from_mse(torch.zeros(2))).all()
    assert torch.allclose(psnr_from_mse(torch.zeros(2), mse_floor=1e-10), torch.full((2,), 100.0))
    assert torch.allclose(psnr(a, a, mse_floor=1e-10), torch.full((4,), 100.0))


def test_hue_is_zero_for_grey_and_the_mean_chroma_on_the_mask():
    grey = torch.rand(2, 1, 4, 4).expand(-1, 3, -1, -1)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    torch.testing.assert_close(hue(grey, mask), torch.zeros(2), atol=1e-7, rtol=0)
    image = torch.ones(1, 3, 4, 4)  # white, with one pure-red pixel: |c - mean| = (2/3, 1/3, 1/3) -> 4/9
    image[0, 1:, 0, 0] = 0
    only_red = torch.zeros(1, 4, 4, dtype=torch.bool)
    only_red[0, 0, 0] = True
    torch.testing.assert_close(hue(image, only_red), torch.tensor([4 / 9]))
    torch.testing.assert_close(hue(image, foreground(image, torch.ones(1, 3))), torch.tensor([4 / 9]))
    assert foreground(image, torch.ones(1, 3)).sum() == 1


def test_block_and_object_hue_keep_a_coloured_region_and_drop_colour_speckle():
    # A checkerboard of red (1, 0, 0) and cyan (0, 1, 1) pixels: every pixel has hue 4/9, every 2 × 2
    # block mean is grey (0.5). A flat red image: 4/9 both ways. Blocks mostly outside the mask are left out.
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    red = ((rows + cols) % 2 == 0).float()
    speckle = torch.stack([red, 1 - red, 1 - red])[None]
    flat = torch.zeros(1, 3, 8, 8)
    flat[:, 0] = 1
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    torch.testing.assert_close(hue(speckle, mask), torch.tensor([4 / 9]))
    torch.testing.assert_close(block_hue(speckle, mask, block=2), torch.zeros(1), atol=1e-7, rtol=0)
    torch.testing.assert_close(block_hue(flat, mask, block=4), torch.tensor([4 / 9]))
    corner = torch.zeros(1, 8, 8, dtype=torch.bool)
    corner[0, :4, :4] = True
    image = torch.cat([flat[:, :, :, :4], speckle[:, :, :, 4:]], -1)
    torch.testing.assert_close(block_hue(image, corner, block=4), torch.tensor([4 / 9]))
    # The object's mean colour: grey for the checkerboard, red for the red image.
    torch.testing.assert_close(object_hue(speckle, mask), torch.zeros(1), atol=1e-7, rtol=0)
    torch.testing.assert_close(object_hue(flat, mask), torch.tensor([4 / 9]))


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


# -- FID / KID: torchmetrics against the formulas, written out here in numpy --------------------
def reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """|Δμ|² + tr(S1 + S2 - 2 (S1 S2)^½), with tr (S1 S2)^½ = tr (S1^½ S2 S1^½)^½ (similar matrices),
    a symmetric PSD matrix whose root eigh gives: not the eigvals-of-a-product route torchmetrics takes."""
    def sqrt_psd(m):
        values, vectors = np.linalg.eigh((m + m.T) / 2)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    half = sqrt_psd(s1)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(half @ s2 @ half)))


def reference_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (a·b / d + 1)³ over the whole sets (Bińkowski et al. 2018, eq. 2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    k_xx, k_yy = k(x, x), k(y, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k(x, y).mean())


def test_fid_and_kid_from_torchmetrics_agree_with_the_formulas_on_random_features():
    extractor = RandomConvFeatures(seed=0, dim=64)
    real = extractor(smooth_images(120, seed=2)).numpy()
    fake = extractor(noisy(smooth_images(120, seed=4), 0.2, seed=3)).numpy()
    rng = np.random.default_rng(0)
    pairs = [(real, fake), (rng.normal(size=(300, 16)), rng.normal(0.3, 1.5, size=(300, 16)))]
    for f1, f2 in pairs:
        assert fid_from_features(f1, f2) == pytest.approx(reference_fid(f1, f2), rel=1e-6)
        # One subset of the whole set: the subset draw only permutes, so KID is the full-set MMD² exactly.
        mean, std = kernel_inception_distance(f1, f2, subsets=3, subset_size=len(f1))
        assert mean == pytest.approx(reference_kid(f1, f2), rel=1e-9, abs=1e-12) and std < 1e-9 * max(1.0, abs(mean))
    # Two Gaussians with diagonal covariances: FID = |Δμ|² + Σ (σ1 - σ2)² (sample statistics made exact).
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], float) * np.sqrt(3 / 4)  # mean 0, covariance I
    f1, f2 = signs * [1.0, 2.0], signs * [2.0, 3.0] + 1.0
    assert fid_from_features(f1, f2) == pytest.approx(2 + 1 + 1, rel=1e-9)
    # Subsets smaller than the sets: the same seed gives the same draw, another seed another one.
    first = kernel_inception_distance(real, fake, subsets=10, subset_size=50, seed=1)
    assert first == kernel_inception_distance(real, fake, subsets=10, subset_size=50, seed=1)
    assert first != kernel_inception_distance(real, fake, subsets=10, subset_size=50, seed=2) and first[1] > 0
    with pytest.raises(ValueError, match="same D"):
        fid_from_features(real, fake[:, :10])


def test_extractors_plug_into_torchmetrics_directly():
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = RandomConvFeatures(seed=0, dim=64)
    real, fake = smooth_images(40, seed=2), noisy(smooth_images(40, seed=5), 0.3)
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = fid_from_features(extractor(real).numpy(), extractor(fake).numpy())
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-4)


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


# -- Inception-v3: the layout of torch-fidelity's pt_inception-2015-12-05 file ---------------------
# Written from torch-fidelity's FeatureExtractorInceptionV3 and its weight converter
# (utils/util_convert_inception_weights.py): every BasicConv2d is `conv.weight` (out, in, kh, kw,
# no bias) plus `bn.{weight,bias,running_mean,running_var}` (out,), the file has no
# `num_batches_tracked`, and the 1008-way `fc` head is included.
def _block_a(c_in, pool):
    return [("branch1x1", c_in, 64, 1, 1), ("branch5x5_1", c_in, 48, 1, 1), ("branch5x5_2", 48, 64, 5, 5),
            ("branch3x3dbl_1", c_in, 64, 1, 1), ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3),
            ("branch_pool", c_in, pool, 1, 1)]


def _block_c(c7):
    return [("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c7, 1, 1), ("branch7x7_2", c7, c7, 1, 7),
            ("branch7x7_3", c7, 192, 7, 1), ("branch7x7dbl_1", 768, c7, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
            ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1), ("branch7x7dbl_5", c7, 192, 1, 7),
            ("branch_pool", 768, 192, 1, 1)]


def _block_e(c_in):
    return [("branch1x1", c_in, 320, 1, 1), ("branch3x3_1", c_in, 384, 1, 1), ("branch3x3_2a", 384, 384, 1, 3),
            ("branch3x3_2b", 384, 384, 3, 1), ("branch3x3dbl_1", c_in, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
            ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1), ("branch_pool", c_in, 192, 1, 1)]


def pt_inception_2015_12_05_layout() -> dict[str, tuple[int, ...]]:
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
             ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    blocks = {"Mixed_5b": _block_a(192, 32), "Mixed_5c": _block_a(256, 64), "Mixed_5d": _block_a(288, 64),
              "Mixed_6a": [("branch3x3", 288, 384, 3, 3), ("branch3x3dbl_1", 288, 64, 1, 1),
                           ("branch3x3dbl_2", 64, 96, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3)],
              "Mixed_6b": _block_c(128), "Mixed_6c": _block_c(160), "Mixed_6d": _block_c(160), "Mixed_6e": _block_c(192),
              "Mixed_7a": [("branch3x3_1", 768, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
                           ("branch7x7x3_1", 768, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
                           ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)],
              "Mixed_7b": _block_e(1280), "Mixed_7c": _block_e(2048)}
    convs += [(f"{block}.{name}", *shape) for block, rows in blocks.items() for name, *shape in rows]
    layout = {}
    for name, c_in, c_out, kh, kw in convs:
        layout[f"{name}.conv.weight"] = (c_out, c_in, kh, kw)
        for part in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{part}"] = (c_out,)
    layout["fc.weight"], layout["fc.bias"] = (1008, 2048), (1008,)
    return layout


def test_inception_state_dict_matches_the_pt_inception_2015_12_05_layout():
    layout = pt_inception_2015_12_05_layout()
    assert len(layout) == 94 * 5 + 2  # 94 conv + batch-norm layers and the classifier head
    ours = {key: tuple(value.shape) for key, value in InceptionV3Pool().state_dict().items()
            if not key.endswith("num_batches_tracked")}
    head = {key: shape for key, shape in layout.items() if key.startswith("fc.")}
    assert ours == {key: shape for key, shape in layout.items() if key not in head}


def test_inception_loads_a_file_in_that_layout_and_uses_every_tensor(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) * 0.1 for key, shape in pt_inception_2015_12_05_layout().items()}
    for key in state:  # a usable net: positive variances, unit-ish scales
        if key.endswith("running_var") or key.endswith("bn.weight"):
            state[key] = state[key].abs() + 0.5
    path = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(state, path)  # as torch-fidelity's converter does: a plain dict of tensors
    extractor = InceptionFeatures(str(path))
    loaded = extractor.net.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    # 8-bit images (as decoded from PNG) reach the net as their exact byte values.
    pixels = torch.randint(0, 256, (1, 3, 128, 128), generator=generator).float()
    out = extractor(pixels / 255)
    assert out.shape == (1, 2048) and torch.isfinite(out).all()
    assert torch.allclose(out, extractor.net(pixels), rtol=1e-5, atol=1e-6)
    wrong = dict(state, **{"Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong shape.*Mixed_7c.branch_pool.conv.weight"):
        InceptionFeatures(str(tmp_path / "wrong.pth"))


def test_tf1_bilinear_resize_matches_its_definition():
    def reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
        # TensorFlow 1 resize_bilinear, align_corners=False: in = out * (in_size / out_size)
        h, w = image.shape
        out = np.empty((height, width))
        for i in range(height):
            for j in range(width):
                y, x = i * h / height, j * w / width
                y0, x0 = int(math.floor(y)), int(math.floor(x))
                y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                dy, dx = y - y0, x - x0
                top = image[y0, x0] * (1 - dx) + image[y0, x1] * dx
                bottom = image[y1, x0] * (1 - dx) + image[y1, x1] * dx
                out[i, j] = top * (1 - dy) + bottom * dy
        return out

    image = torch.rand(1, 1, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for size in ((12, 9), (3, 4), (5, 7)):
        expected = reference(image[0, 0].numpy(), *size)
        assert np.allclose(resize_bilinear_tf1(image, *size)[0, 0].numpy(), expected, atol=1e-12), size
    # Not F.interpolate's half-pixel grid: halving picks every second pixel, starting at the first.
    big = torch.rand(2, 3, 8, 8)
    assert torch.equal(resize_bilinear_tf1(big, 4, 4), big[..., ::2, ::2])


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


def test_mean_chroma_is_the_masked_mean_off_grey_and_its_slope_the_fraction_kept():
    images = torch.rand(4, 3, 8, 8)
    mask = torch.rand(4, 8, 8) > 0.3
    chroma = mean_chroma(images, mask)
    by_hand = torch.stack([(images[n] - images[n].mean(0))[:, mask[n]].mean(1) for n in range(4)])
    assert torch.allclose(chroma, by_hand, atol=1e-6)
    assert torch.allclose(mean_chroma(images.mean(1, keepdim=True).expand(-1, 3, -1, -1), mask), torch.zeros(4, 3), atol=1e-7)
    assert chroma_slope(chroma, chroma) == pytest.approx(1.0)
    assert chroma_slope(chroma, 0.4 * chroma) == pytest.approx(0.4)
