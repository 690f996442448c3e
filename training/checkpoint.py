"""Checkpoints: atomic writes, full training state, and the authors' generator-only files.

Layout of ``checkpoints/NAME/``:
    latest.pt                full state (networks, optimisers, epoch/iteration, RNG, config)
    epoch_<E>.pt             per-epoch snapshots of the same
    latest_net_G_A.pth ...   plain state dicts under the authors' names, readable by their tools
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.contract import atomic_writer


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temp file, fsync and rename: a reader never sees half a checkpoint."""
    with atomic_writer(path) as f:
        torch.save(obj, f)


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile) from keys."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that holds something other than what its reader needs."""


def read_checkpoint(path: Path) -> Any:
    """``torch.load`` of a checkpoint, safely (weights only: no pickle execution). A damaged file is one
    ``CheckpointError`` naming it: torch raises a different exception for empty, truncated and foreign bytes."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = type(exc).__name__
        raise CheckpointError(f"{path} cannot be read ({kind}); it is damaged or not a checkpoint") from exc


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Load one of the authors' ``*_net_*.pth`` state dicts."""
    state = read_checkpoint(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict")
    return strip_module_prefix(state)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Tensors and plain numbers only, so the file loads with weights_only=True.
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
