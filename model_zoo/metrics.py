"""Image and distribution metrics for evaluation: PSNR, SSIM, LPIPS, FID and KID.

* ``psnr`` / ``ssim``: per image, images (N, 3, H, W) in [0, 1].
* LPIPS comes from :mod:`model_zoo.lpips` with a configured weights file; with none,
  :func:`load_lpips` returns None and evaluation reports LPIPS as ``"unavailable"``, never a made-up number.
* FID / KID compare two sets of image *features*; the distances are torchmetrics'
  (:func:`fid_from_features`, :func:`kernel_inception_distance`). Extractors share one interface
  (:class:`FeatureExtractor`: images in [0, 1] -> (N, D)); images are first resized to 128 px,
  the resolution of OmniObject3D's generation protocol.
  - :class:`InceptionFeatures`: Inception-v3 pool features (2048-d), weights from a file in the
    layout of torch-fidelity's ``pt_inception-2015-12-05`` (torch-fidelity itself imports
    torchvision, which does not import against this project's CPU torch).
  - :class:`RandomConvFeatures`: a fixed random conv net (deterministic from a seed). It needs no
    weights, so the pipeline runs anywhere, but its numbers are only comparable with each other,
    never with published FID/KID.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_zoo.lpips import LPIPS, load_state_file

UNAVAILABLE = "unavailable"
FEATURE_RESOLUTION = 128  # OmniObject3D evaluates generation on 128 px renders


# -- per-image metrics ---------------------------------------------------------------------------
def psnr_from_mse(mse: torch.Tensor, max_val: float = 1.0, mse_floor: float = 0.0) -> torch.Tensor:
    """PSNR in dB of mean squared errors: 10 log10(max_val² / mse). With the default ``mse_floor``
    a zero error gives +inf; a floor caps the PSNR (1e-10: 100 dB), for training logs and quick
    experiment means where one perfect image must not make the mean infinite."""
    return 10 * torch.log10(max_val ** 2 / mse.clamp_min(mse_floor))


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, mse_floor: float = 0.0) -> torch.Tensor:
    """PSNR in dB per image (N,) (over every dimension after the first: all of an object's views for
    (N, V, 3, H, W)). Identical images give +inf (no cap by default: a cap would be an invented
    number; a mean over images containing one is inf, which is the honest answer)."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1)
    return psnr_from_mse(mse, max_val, mse_floor)


def hue(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How colourful images (N, 3, H, W) are where ``mask`` (N, H, W) is set: the mean over those
    pixels of |c − mean_RGB(c)| (0 for any shade of grey; NaN for an image with no pixel in the mask).

    Not a perceptual measure; it makes one failure visible that PSNR hides: a model whose renders
    have the right brightness and no hue (README, "The longer CPU run")."""
    return _masked_mean(_off_grey(images).abs().mean(1, keepdim=True), mask)[:, 0]


def block_hue(images: torch.Tensor, mask: torch.Tensor, block: int = 4) -> torch.Tensor:
    """:func:`hue` of images (N, 3, H, W) averaged over ``block`` × ``block`` pixel blocks, on the blocks
    mostly (> half) in ``mask`` (N, H, W): colour noise averages out to grey, coloured regions keep
    their hue. So ``hue`` alone cannot tell colour speckle from colour; the two together can."""
    pooled = F.avg_pool2d(images.float(), block)
    inside = F.avg_pool2d(mask.float().unsqueeze(1), block)[:, 0] > 0.5
    return hue(pooled, inside)


def object_hue(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,): :func:`hue` of each image's mean colour over ``mask``: the colour of the object as a whole.
    Colour speckle of every hue averages out to grey here however colourful its pixels are."""
    return mean_chroma(images, mask).abs().mean(1)


def mean_chroma(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, 3): the mean of c − mean_RGB(c) over the pixels of images (N, 3, H, W) where ``mask`` (N, H, W) is set."""
    return _masked_mean(_off_grey(images), mask)


def _off_grey(images: torch.Tensor) -> torch.Tensor:
    """c − mean_RGB(c) per pixel of images (N, 3, H, W), in float32."""
    images = images.float()
    return images - images.mean(1, keepdim=True)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, C): the mean of values (N, C, H, W) over the pixels where ``mask`` (N, H, W) is set (NaN where none is)."""
    weights = mask.to(values.dtype).unsqueeze(1)
    return (values * weights).flatten(2).sum(2) / weights.flatten(2).sum(2)


def chroma_slope(true: torch.Tensor, made: torch.Tensor) -> float:
    """Least-squares slope, through the origin, of ``made``'s mean chromas on ``true``'s (both (N, 3),
    from :func:`mean_chroma`): 0 when ``made`` ignores the true colours, 1 when it keeps them."""
    return float((true * made).sum() / (true * true).sum())


def foreground(images: torch.Tensor, background: torch.Tensor, tolerance: float = 0.03) -> torch.Tensor:
    """(N, H, W) pixels of images (N, 3, H, W) that differ from their background colour (N, 3) by
    more than ``tolerance`` in some channel."""
    return ((images.float() - background.float().view(-1, 3, 1, 1)).abs() > tolerance).any(1)


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


# -- distribution distances (torchmetrics) -------------------------------------------------------
class _Precomputed(nn.Module):
    """The identity on features already extracted (and gathered from every rank): torchmetrics'
    FID/KID take any module as their feature extractor, and this one hands the features through."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim  # torchmetrics reads this instead of probing with a dummy image

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _feature_pair(f1, f2) -> tuple[torch.Tensor, torch.Tensor]:
    # float64: FID subtracts nearly equal traces, and torchmetrics accumulates in float64 anyway
    f1, f2 = (torch.as_tensor(np.asarray(f, np.float64)) for f in (f1, f2))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    return f1, f2


def fid_from_features(f1, f2) -> float:
    """Fréchet distance ||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½) between the Gaussians fitted to two
    feature sets (N, D), computed by ``torchmetrics.image.FrechetInceptionDistance`` (FID when the
    features are Inception pool3 features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # here: importing torchmetrics takes seconds

    f1, f2 = _feature_pair(f1, f2)
    # sync_on_compute=False: the features are already gathered; a second all-gather would count them twice.
    metric = FrechetInceptionDistance(feature=_Precomputed(f1.shape[1]), sync_on_compute=False)
    metric.update(f1, real=True)
    metric.update(f2, real=False)
    return float(metric.compute())


def kernel_inception_distance(f1, f2, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018) by ``torchmetrics.image.KernelInceptionDistance``: the unbiased MMD²
    with the kernel k(x, y) = (x·y / d + 1)³, over ``subsets`` random subsets of
    ``min(subset_size, n1, n2)`` features of each set. Returns (mean, std) over the subsets, in raw
    units (papers often print KID × 100 or × 1000). Can be slightly negative (unbiased estimator).
    The subsets are drawn from torch's generator seeded with ``seed``, so a seed gives one answer."""
    from torchmetrics.image.kid import KernelInceptionDistance

    f1, f2 = _feature_pair(f1, f2)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError("kernel_inception_distance needs at least 2 features in each set")
    with warnings.catch_warnings():  # it warns on every construction that it keeps all features in memory
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Precomputed(f1.shape[1]), subsets=subsets, subset_size=m,
                                         sync_on_compute=False)
    metric.update(f1, real=True)
    metric.update(f2, real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# -- feature extractors -------------------------------------------------------------------------
class FeatureExtractor(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> features (N, D); inputs are resized to 128 px first. Also usable
    as torchmetrics' ``FrechetInceptionDistance(feature=extractor)`` (it reads ``num_features``)."""

    dim: int
    name: str

    @property
    def num_features(self) -> int:
        return self.dim

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


# Inception-v3 as used for FID: the graph of torch-fidelity's FeatureExtractorInceptionV3 (itself
# pytorch-fid's FIDInceptionV3), with its module names, so the 2015 TF-ported weights file
# (pt_inception-2015-12-05-6726825d.pth, the same file in both projects) loads by name.
# tests/test_metrics.py checks every key and shape against that file's layout, taken from
# torch-fidelity's converter (utils/util_convert_inception_weights.py).
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
    """The network: images (N, 3, H, W) in [0, 255] -> (N, 2048) pool3 features, random-initialised."""

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
        """Images in [0, 255] (any size) -> pool3 features, preprocessed as torch-fidelity does."""
        x = (resize_bilinear_tf1(images, 299, 299) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def resize_bilinear_tf1(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1's ``resize_bilinear(align_corners=False)``, which the FID graph
    used: output pixel i samples the input at i * in / out (no half-pixel offset, unlike
    ``F.interpolate``), between the pixels floor() and floor() + 1 (clamped to the last)."""

    def taps(size_in: int, size_out: int, device):
        src = torch.arange(size_out, dtype=torch.float64, device=device) * (size_in / size_out)
        lo = src.floor().long().clamp_max(size_in - 1)
        return lo, (lo + 1).clamp_max(size_in - 1), (src - lo).to(images.dtype)

    y0, y1, fy = taps(images.shape[-2], height, images.device)
    x0, x1, fx = taps(images.shape[-1], width, images.device)
    rows = images[..., y0, :] + (images[..., y1, :] - images[..., y0, :]) * fy[:, None]
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * fx


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool3 features (2048-d) for FID/KID, weights from ``weights_path``: torch-fidelity's /
    pytorch-fid's ``pt_inception-2015-12-05`` file, or any state dict (safetensors or torch.save) with
    its names; extra keys such as ``fc.*`` are ignored. Never downloaded. The 128 px images are
    quantised to 8 bits (rounded: our images come from 8-bit PNGs, so this restores their exact
    values) and resized to 299 inside, as torch-fidelity does with uint8 images."""

    def __init__(self, weights_path: str | None):
        super().__init__()
        if not weights_path:
            raise ValueError("InceptionFeatures needs weights_path (an Inception-v3 state dict file); weights are "
                             "never downloaded. Use --inception-weights PATH, or --features random for the built-in "
                             "random-conv extractor (numbers not comparable with published FID)")
        self.dim, self.name = 2048, "inception_v3"
        self.net = InceptionV3Pool()
        state = load_state_file(weights_path)
        # The TF-ported file has no BatchNorm step counters (num_batches_tracked); nothing reads them in eval.
        wanted = {key: value for key, value in self.net.state_dict().items() if not key.endswith("num_batches_tracked")}
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ValueError(f"Inception weights at {weights_path} lack {len(missing)} keys, e.g. {missing[:3]} "
                             "(expected the names of torch-fidelity's pt_inception-2015-12-05 file)")
        wrong = [f"{key}: {tuple(state[key].shape)} != {tuple(value.shape)}"
                 for key, value in wanted.items() if tuple(state[key].shape) != tuple(value.shape)]
        if wrong:
            raise ValueError(f"Inception weights at {weights_path} have {len(wrong)} tensors of the wrong shape, "
                             f"e.g. {wrong[:2]}")
        self.net.load_state_dict({key: state[key] for key in wanted}, strict=False)
        self.requires_grad_(False).eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).round())


def build_feature_extractor(kind: str = "random", inception_weights: str | None = None, seed: int = 0) -> FeatureExtractor:
    """``"inception"`` (needs ``inception_weights``) or ``"random"`` (RandomConvFeatures(seed, 64))."""
    if kind == "inception":
        return InceptionFeatures(inception_weights)
    if kind == "random":
        return RandomConvFeatures(seed=seed, dim=64)
    raise ValueError(f"unknown feature extractor {kind!r}: inception or random")
