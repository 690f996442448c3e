"""What training and serving share besides ``model.json``: how files are written and how pixels are read.

``training/`` imports from ``service/`` only this module and :mod:`service.repository` (the model card):
the conventions both sides must agree on, with no web, runtime or decoding machinery attached.

* Files (checkpoints, exported models, ``model.json``) are written atomically: readers see the old file
  or the complete new one, never half of one.
* Any image mode becomes 8-bit RGB the same way for training data and for requests: transparency on
  white, 16-bit scaled (not clipped), no float64 copies.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

_WHITE = (255, 255, 255, 255)
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (alpha channels, palette or colour-key transparency) is composited on white, as a
    viewer would show it. 16-bit and 32-bit integer data are scaled from 0..65535, not clipped; ``I``
    and ``F`` images whose values fit 0..255 (Pillow's convention for images converted from 8-bit)
    are kept as they are.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), rgba).convert("RGB")
    return img.convert("RGB")  # ValueError for a mode Pillow cannot convert


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit grey to 8-bit RGB in integer arithmetic (or float32 for ``F``), in place: no float64
    copies, whose 8 bytes a pixel turned a 48 KB 5000x5000 PNG into 600 MB of temporaries."""
    if img.mode == "F":
        values = np.array(img, dtype=np.float32)
        if float(values.max(initial=0.0)) > 255.0:
            values /= np.float32(257.0)
        np.clip(values, 0.0, 255.0, out=values)
        gray = np.rint(values, out=values).astype(np.uint8)
    else:
        values = np.array(img, dtype=np.int32 if img.mode == "I" else np.uint32)
        if img.mode.startswith("I;16") or int(values.max(initial=0)) > 255:
            np.clip(values, 0, 65535, out=values)
            values += 128  # round to nearest: 65535 -> 255, 1000 -> 4
            values //= 257
        gray = np.clip(values, 0, 255, out=values).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing so that readers see either the old file or the complete new one.

    Writes a temporary file in the same folder (``os.replace`` is only atomic within a file system),
    fsyncs it, renames it over ``path`` and fsyncs the folder so the rename itself survives a crash.
    If the block raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file 0600; models are read by other users (a container's server).
            os.fchmod(f.fileno(), 0o644)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
