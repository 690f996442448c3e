"""Validation during training: FID and KID of both generators on images held out of training.

Users of the authors' code ask when to stop; this answers it with numbers. Every ``--eval-every``
iterations the trainer translates the held-out trainA/trainB images (``--val-size`` per domain,
picked by seed, never the test split) at ``--val-side`` (default: the training crop size), and scores each direction's
output against the held-out images of the target domain with the project's Inception features.

``best.pt`` is chosen on the **sum of the two KIDs**: KID is unbiased, so its value on ~100 images
estimates the same quantity as on the full set, while FID on 100 images is biased upwards by an
amount that depends on the features' spread and would reward the wrong thing when two
checkpoints differ little. FID is still logged for comparison with the final test-split figures.
The real images' features are computed once and cached in the run folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from training.data import load_rgb, resize_square, to_uint8
from training.metrics_fid import fid, kid, load_inception
from training.task import DCLTask

log = logging.getLogger(__name__)

# Rows of the sample grid saved with each validation (first images of each held-out domain).
GRID_ROWS = 4


class Validator:
    """Scores a task's two generators on fixed held-out images; call it with the task."""

    def __init__(
        self,
        files_a: Sequence[Path],
        files_b: Sequence[Path],
        size: int,
        device: torch.device,
        cache_dir: Path,
        batch_size: int = 8,
    ) -> None:
        if len(files_a) < 2 or len(files_b) < 2:
            raise ValueError("validation needs at least 2 held-out images per domain")
        self.device, self.batch_size = device, batch_size
        self.real_a = np.stack([np.asarray(resize_square(load_rgb(p), size)) for p in files_a])
        self.real_b = np.stack([np.asarray(resize_square(load_rgb(p), size)) for p in files_b])
        self.extract = load_inception(str(device))
        self.feats_a = self._cached_features(self.real_a, files_a, size, cache_dir / "real_a.npy")
        self.feats_b = self._cached_features(self.real_b, files_b, size, cache_dir / "real_b.npy")
        # What returning the input unchanged scores: the line a model has to get under.
        # (KID is symmetric, so one number serves both directions.)
        self.baseline = {"kid_identity": kid(self.feats_a, self.feats_b)[0]}

    def _cached_features(self, images: np.ndarray, files: Sequence[Path], size: int, path: Path) -> np.ndarray:
        key = hashlib.sha256("\n".join([str(size), *map(str, files)]).encode()).hexdigest()[:16]
        cached = path.with_name(f"{path.stem}.{key}.npy")
        if cached.is_file():
            return np.load(cached)
        feats = self.extract(list(images))
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + ".tmp.npy")
        np.save(tmp, feats)
        tmp.replace(cached)
        return feats

    @torch.no_grad()
    def _translate(self, gen: torch.nn.Module, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[start : start + self.batch_size]).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out.append(to_uint8(gen(x)))
        return np.concatenate(out)

    def __call__(self, task: DCLTask) -> tuple[dict[str, float], np.ndarray]:
        """(scores, sample grid): fid/kid per direction, their identity baselines, and ``score``.

        Runs in fp32 and eval mode (the generators have no train-only layers; eval keeps it so).
        """
        was_training = task.training
        task.eval()
        try:
            fake_b = self._translate(task.gen_ab, self.real_a)
            fake_a = self._translate(task.gen_ba, self.real_b)
        finally:
            task.train(was_training)
        feats_fake_b, feats_fake_a = self.extract(list(fake_b)), self.extract(list(fake_a))
        kid_ab, kid_ba = kid(feats_fake_b, self.feats_b)[0], kid(feats_fake_a, self.feats_a)[0]
        scores = {
            "fid_ab": fid(feats_fake_b, self.feats_b),
            "fid_ba": fid(feats_fake_a, self.feats_a),
            "kid_ab": kid_ab,
            "kid_ba": kid_ba,
            **self.baseline,
            "score": kid_ab + kid_ba,
        }
        n = min(GRID_ROWS, len(fake_b), len(fake_a))
        rows = [np.concatenate([self.real_a[i], fake_b[i], self.real_b[i], fake_a[i]], axis=1) for i in range(n)]
        return {k: round(float(v), 6) for k, v in scores.items()}, np.concatenate(rows, axis=0)
