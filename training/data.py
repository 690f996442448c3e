"""Unaligned two-domain image data (DATAROOT/trainA, trainB), as the authors' loader pairs it.

Randomness is derived from (seed, epoch, index) rather than global RNG state, so an epoch's
batches are the same with any number of DataLoader workers and after a resume.

Each image is decoded and resized to the load size once and kept in RAM (up to ``cache_mb``):
at horse2zebra's load size 286 the whole set is about 0.6 GB, and an iteration then only crops,
flips and converts. ``val_size`` images per domain are held out for validation, picked by seed.
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

from service.contract import to_rgb
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


def split_validation(files: list[Path], val_size: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(training files, validation files): ``val_size`` files drawn by ``seed``, both lists sorted."""
    if val_size == 0:
        return files, []
    if val_size > len(files) // 2:
        folder = files[0].parent
        raise DataError(f"--val-size {val_size} would hold out over half of the {len(files)} images in {folder}")
    held = set(random.Random(f"{seed}:validation").sample(range(len(files)), val_size))
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


def load_rgb(path: Path) -> Image.Image:
    """Decode, apply EXIF orientation and convert any mode to RGB exactly as the service does."""
    with Image.open(path) as img:
        return to_rgb(ImageOps.exif_transpose(img))


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """The authors' resize: to a size x size square, bicubic, aspect not kept (smaller images go up)."""
    return img.resize((size, size), Image.Resampling.BICUBIC)


def augment(img: Image.Image, crop_size: int, flip: bool, rng: random.Random) -> torch.Tensor:
    """Random crop of an already resized square, random flip, [-1, 1]."""
    load_size = img.size[0]
    x, y = rng.randint(0, load_size - crop_size), rng.randint(0, load_size - crop_size)
    img = img.crop((x, y, x + crop_size, y + crop_size))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """The inverse of :func:`augment`'s scaling: (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


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
        all_a = list_images(root / f"{phase}A", cfg.max_dataset_size)
        all_b = list_images(root / f"{phase}B", cfg.max_dataset_size)
        self.files_a, self.val_a = split_validation(all_a, cfg.val_size, seed)
        self.files_b, self.val_b = split_validation(all_b, cfg.val_size, seed)
        self.epoch = 1
        self._cache: dict[tuple[Path, int], Image.Image] = {}
        self._cache_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.files_a), len(self.files_b))

    def _load(self, files: list[Path], index: int, size: int, skipped: list[str]) -> Image.Image:
        # An unreadable file is replaced by the next readable one, never a crash mid-epoch.
        for offset in range(len(files)):
            path = files[(index + offset) % len(files)]
            if (path, size) in self._cache:
                return self._cache[path, size]
            try:
                img = resize_square(load_rgb(path), size)
            except Exception as exc:  # noqa: BLE001 - any decoder failure (incl. bombs) skips the file
                log.warning("skipping unreadable image %s: %s", path, exc)
                skipped.append(str(path))
                continue
            if self._cache_bytes + size * size * 3 <= self.cfg.cache_mb * 2**20:
                self._cache[path, size] = img
                self._cache_bytes += size * size * 3
            return img
        raise DataError(f"no readable image among {len(files)} files")

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")  # str seeds hash deterministically
        skipped: list[str] = []
        decay = self.n_epochs is not None and self.epoch > self.n_epochs
        load = self.cfg.crop_size if decay else self.cfg.load_size
        img_a = self._load(self.files_a, index % len(self.files_a), load, skipped)
        img_b = self._load(self.files_b, rng.randrange(len(self.files_b)), load, skipped)
        flip = not self.cfg.no_flip
        return {
            "A": augment(img_a, self.cfg.crop_size, flip, rng),
            "B": augment(img_b, self.cfg.crop_size, flip, rng),
            "skipped": len(skipped),
        }


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's shuffled indices for an epoch: one permutation per (seed, epoch), split by rank."""
    order = list(range(n))
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    per_rank = n // world
    return order[rank * per_rank : (rank + 1) * per_rank]
