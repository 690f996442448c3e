"""Fixtures for training tests: deterministic single-threaded torch, reference loading."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.requires import require_module

torch = require_module("torch", "pip install -e '.[train]'", allow_module_level=True)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def load_ref(reference_dir: Path) -> Callable[[str], dict[str, Any]]:
    cache: dict[str, dict[str, Any]] = {}

    def load(name: str) -> dict[str, Any]:
        if name not in cache:
            cache[name] = torch.load(reference_dir / f"{name}.pt", weights_only=True)
        return cache[name]

    return load


def write_domain(folder: Path, count: int, size: tuple[int, int] = (40, 36), seed: int = 0) -> None:
    """``count`` small random images in mixed formats and modes (RGB JPEG, grayscale PNG, RGBA PNG)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        if i % 3 == 0:
            img.save(folder / f"{i:03d}.jpg", quality=90)
        elif i % 3 == 1:
            img.convert("L").save(folder / f"{i:03d}.png")
        else:
            img.convert("RGBA").save(folder / f"{i:03d}.png")


@pytest.fixture(scope="session")
def tiny_dataroot(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_domain(root / "trainA", 6, seed=1)
    write_domain(root / "trainB", 8, seed=2)
    return root


def tiny_config(dataroot: Path, checkpoints: Path, name: str = "tiny", **overrides: Any):
    from training.config import DataConfig, ModelConfig, TrainConfig

    model = ModelConfig(ngf=4, ndf=4, n_blocks=1, netf_nc=16, num_patches=16)
    data = DataConfig(dataroot=str(dataroot), load_size=36, crop_size=32, num_workers=0)
    base = dict(
        name=name,
        checkpoints_dir=str(checkpoints),
        n_epochs=1,
        n_epochs_decay=1,
        threads=1,
        amp="none",
        print_freq=1,
        sample_freq=2,
        save_latest_freq=100,
        model=model,
        data=data,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def tiny_run(tiny_dataroot, tmp_path_factory):
    """A finished 3-iteration training run of a tiny DCL model (shared; do not modify)."""
    from training.trainer import Trainer

    trainer = Trainer(tiny_config(tiny_dataroot, tmp_path_factory.mktemp("ckpt"), max_iters=3))
    trainer.fit()
    return trainer
