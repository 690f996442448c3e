"""Unaligned two-domain image data (DATAROOT/trainA, trainB), as the authors' loader pairs it.

Randomness is derived from (seed, epoch, index) rather than global RNG state, so an epoch's
batches are the same with any number of DataLoader workers and after a resume.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from service.imaging import to_rgb
from training.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff"}


class DataError(ValueError):
    """A dataset problem the user must fix (missing folder, no images)."""


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no images (jpg, jpeg, png, webp, bmp, tif) in {folder}")
    return files[:limit] if limit else files


def load_rgb(path: Path) -> Image.Image:
    """Decode, apply EXIF orientation and convert any mode to RGB exactly as the service does."""
    with Image.open(path) as img:
        return to_rgb(ImageOps.exif_transpose(img))


def augment(img: Image.Image, load_size: int, crop_size: int, flip: bool, rng: random.Random) -> torch.Tensor:
    """Resize to a load_size square (bicubic, aspect not kept), random crop, random flip, [-1, 1].

    Smaller images are resized up by the same step, so every image yields a full crop.
    """
    img = img.resize((load_size, load_size), Image.Resampling.BICUBIC)
    x, y = rng.randint(0, load_size - crop_size), rng.randint(0, load_size - crop_size)
    img = img.crop((x, y, x + crop_size, y + crop_size))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr))


class UnalignedDataset(Dataset):
    """Item i pairs A[i mod |A|] with a B image drawn uniformly with replacement.

    Length is max(|A|, |B|). After ``n_epochs`` (the decay phase) images are resized straight
    to the crop size, as the authors' loader does (spec 10).
    """

    def __init__(self, cfg: DataConfig, phase: str = "train", seed: int = 0, n_epochs: int | None = None) -> None:
        root = Path(cfg.dataroot)
        if not root.is_dir():
            raise DataError(f"dataroot not found: {root}")
        self.cfg, self.seed, self.n_epochs = cfg, seed, n_epochs
        self.files_a = list_images(root / f"{phase}A", cfg.max_dataset_size)
        self.files_b = list_images(root / f"{phase}B", cfg.max_dataset_size)
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.files_a), len(self.files_b))

    def _load(self, files: list[Path], index: int, skipped: list[str]) -> Image.Image:
        # An unreadable file is replaced by the next readable one, never a crash mid-epoch.
        for offset in range(len(files)):
            path = files[(index + offset) % len(files)]
            try:
                return load_rgb(path)
            except Exception as exc:  # noqa: BLE001 - any decoder failure (incl. bombs) skips the file
                log.warning("skipping unreadable image %s: %s", path, exc)
                skipped.append(str(path))
        raise DataError(f"no readable image among {len(files)} files")

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")  # str seeds hash deterministically
        skipped: list[str] = []
        img_a = self._load(self.files_a, index % len(self.files_a), skipped)
        img_b = self._load(self.files_b, rng.randrange(len(self.files_b)), skipped)
        decay = self.n_epochs is not None and self.epoch > self.n_epochs
        load = self.cfg.crop_size if decay else self.cfg.load_size
        flip = not self.cfg.no_flip
        return {
            "A": augment(img_a, load, self.cfg.crop_size, flip, rng),
            "B": augment(img_b, load, self.cfg.crop_size, flip, rng),
            "skipped": len(skipped),
        }


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's shuffled indices for an epoch: one permutation per (seed, epoch), split by rank."""
    order = list(range(n))
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    per_rank = n // world
    return order[rank * per_rank : (rank + 1) * per_rank]
