"""Image and distribution metrics for evaluation: PSNR, SSIM, LPIPS, FID and KID.

* ``psnr`` / ``ssim``: per image, images (N, 3, H, W) in [0, 1].
* LPIPS comes from :mod:`model_zoo.lpips` with a configured weights file; with none,
  :func:`load_lpips` returns None and evaluation reports LPIPS as ``"unavailable"``, never a made-up number.
* FID / KID compare two sets of image *features*. Extractors share one interface
  (:class:`FeatureExtractor`: images in [0, 1] -> (N, D)); images are first resized to 128 px,
  the resolution of OmniObject3D's generation protocol.
  - :class:`InceptionFeatures`: Inception-v3 pool features (2048-d), weights from a file.
  - :class:`RandomConvFeatures`: a fixed random conv net (deterministic from a seed). It needs no
    weights, so the pipeline runs anywhere, but its numbers are only comparable with each other,
    never with published FID/KID.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.lpips import LPIPS, load_state_file

UNAVAILABLE = "unavailable"
FEATURE_RESOLUTION = 128  # OmniObject3D evaluates generation on 128 px renders


# -- per-image metrics ---------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image (N,). Identical images give +inf (no cap: a cap would be an invented
    number; a mean over images containing one is inf, which is the honest answer)."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(max_val ** 2 / mse)  # mse == 0 -> +inf


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image (N,) (Wang et al. 2004): Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03,
    per channel over the 'valid' region (no padding, as the reference implementation), then averaged."""
    if min(a.shape[-2:]) < window:
        raise ValueError(f"ssim needs images of at least {window} px, got {tuple(a.shape[-2:])}")
    channels = a.shape[1]
    g = _gaussian_window(window, sigma)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window)
    # float64: the variances are differences of nearly equal numbers (E[x²] - E[x]²), and float32
    # leaves errors of ~1e-5 in SSIM.
    a, b = a.double(), b.double()

    def blur(x):  # depthwise: each channel on its own
        return F.conv2d(x, kernel.to(x.device), groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def load_lpips(weights_path: str | None, device="cpu") -> LPIPS | None:
    """LPIPS from a configured weights file, or None when none is configured (report UNAVAILABLE)."""
    if not weights_path:
        return None
    return LPIPS(weights_path).to(device)


# -- distribution distances ---------------------------------------------------------------------
def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, use_scipy: bool | None = None) -> float:
    """tr(sqrt(sigma1 @ sigma2)). With scipy (installed here; not a declared dependency) it is
    pytorch-fid's ``scipy.linalg.sqrtm``; without it, tr(sqrt(s1^½ s2 s1^½)), the same value since
    that matrix is similar to s1 s2, and symmetric, so eigh is enough."""
    if use_scipy is None:
        try:
            import scipy.linalg  # noqa: F401
            use_scipy = True
        except ImportError:
            use_scipy = False
    if use_scipy:
        import scipy.linalg

        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():  # singular product: nudge the diagonals, as pytorch-fid does
            offset = np.eye(sigma1.shape[0]) * 1e-6
            root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        return float(np.real(np.trace(root)))
    half = _sqrtm_psd(sigma1)
    return float(np.trace(_sqrtm_psd(half @ sigma2 @ half)))


def frechet_distance(mu1, sigma1, mu2, sigma2, use_scipy: bool | None = None) -> float:
    """||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)) (FID when the inputs are
    Inception pool-feature statistics)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2, use_scipy))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def fid_from_features(f1, f2) -> float:
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


def kernel_inception_distance(f1, f2, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased MMD² with the kernel k(x, y) = (x·y / d + 1)³,
    averaged over ``subsets`` random subsets of ``min(subset_size, n1, n2)`` features of each
    set. Returns (mean, std) over the subsets. Can be slightly negative (unbiased estimator)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    d = f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError("kernel_inception_distance needs at least 2 features in each set")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        # Unbiased: the within-set sums leave out the diagonal (a point compared with itself).
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


# -- feature extractors -------------------------------------------------------------------------
class FeatureExtractor(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> features (N, D); inputs are resized to 128 px first."""

    dim: int
    name: str

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[-2:] != (FEATURE_RESOLUTION, FEATURE_RESOLUTION):
            images = F.interpolate(images, size=(FEATURE_RESOLUTION, FEATURE_RESOLUTION), mode="bilinear",
                                   align_corners=False, antialias=images.shape[-1] > FEATURE_RESOLUTION)
        return self.features(images).flatten(1)


class RandomConvFeatures(FeatureExtractor):
    """A fixed random conv net: 4 stride-2 conv + ReLU layers, global average pool -> ``dim``.
    Weights are drawn from ``seed`` alone, so two processes (or two runs) agree exactly."""

    def __init__(self, seed: int = 0, dim: int = 64):
        super().__init__()
        self.dim, self.name = dim, f"random_conv(seed={seed}, dim={dim})"
        widths = (3, 16, 32, 64, dim)
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            bound = math.sqrt(6 / (c_in * 9))  # He-uniform: activations keep their scale through ReLUs
            conv.weight.data = (torch.rand(conv.weight.shape, generator=generator) * 2 - 1) * bound
            conv.bias.data.zero_()
            self.convs.append(conv)
        self.requires_grad_(False).eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))


# Inception-v3 as used for FID (pytorch-fid's FIDInceptionV3; torchvision's Inception3 names),
# so the 2015 TF-ported weights (pt_inception-2015-12-05-*.pth) load by name. Not checked
# against the real file here (no network); a file lacking any of these keys is refused.
class _Conv(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # the FID graph averages without the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = _Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(c_in, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(c_in, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = _Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(c_in, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, c_in, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _Conv(c_in, c7, 1), _Conv(c7, c7, **row), _Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(c_in, c7, 1), _Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, **row), _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(c_in, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(c_in, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):
    def __init__(self, c_in, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block of the FID graph max-pools its pool branch
        self.branch1x1 = _Conv(c_in, 320, 1)
        self.branch3x3_1 = _Conv(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, (1, 3), padding=(0, 1)), _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(c_in, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class InceptionV3Pool(nn.Module):
    """The network: images (N, 3, H, W) in [0, 1] -> (N, 2048) pool3 features, random-initialised."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = _Conv(3, 32, 3, stride=2), _Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = _Conv(32, 64, 3, padding=1), _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _InceptionA(192, 32), _InceptionA(256, 64), _InceptionA(288, 64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = _InceptionE(1280, max_pool=False), _InceptionE(2048, max_pool=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool3 features (2048-d) for FID/KID, weights from ``weights_path`` (safetensors
    or torch.save state dict with torchvision Inception3 names; extra keys such as ``fc.*`` are
    ignored). Never downloaded. Like pytorch-fid, the 128 px images are resized to 299 inside."""

    def __init__(self, weights_path: str | None):
        super().__init__()
        if not weights_path:
            raise ValueError("InceptionFeatures needs weights_path (an Inception-v3 state dict file); weights are "
                             "never downloaded. Use --inception-weights PATH, or --features random for the built-in "
                             "random-conv extractor (numbers not comparable with published FID)")
        self.dim, self.name = 2048, "inception_v3"
        self.net = InceptionV3Pool()
        state = load_state_file(weights_path)
        own = self.net.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"Inception weights at {weights_path} lack {len(missing)} keys, e.g. {missing[:3]} "
                             "(expected torchvision Inception3 names, as in pytorch-fid's pt_inception file)")
        self.net.load_state_dict({key: state[key] for key in own}, strict=True)
        self.requires_grad_(False).eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def build_feature_extractor(kind: str = "random", inception_weights: str | None = None, seed: int = 0) -> FeatureExtractor:
    """``"inception"`` (needs ``inception_weights``) or ``"random"`` (RandomConvFeatures(seed, 64))."""
    if kind == "inception":
        return InceptionFeatures(inception_weights)
    if kind == "random":
        return RandomConvFeatures(seed=seed, dim=64)
    raise ValueError(f"unknown feature extractor {kind!r}: inception or random")
