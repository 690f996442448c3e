"""Shared fixtures for the service tests: a tiny exported model repository, a fake one, fake runners and
generated images.

``tiny_repo`` exports two real (tiny, randomly initialised) generators with torch, once per test run.
Tests may import torch; the code under test (``service/``) may not.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from service_fakes import Fakes, write_fake_repo

from service import runtime
from service.repository import DirectionSpec, InputContract, ModelCard, OnnxFile, Provenance, sha256_file

TINY_MODEL = "tiny"
TINY_DIRECTIONS = {
    "a2b": ("a", "b", "G_A", 0),
    "b2a": ("b", "a", "G_B", 1),
}  # name: source, target, generator, seed
TINY_NGF, TINY_BLOCKS = 4, 1


def _export_generator(path: Path, seed: int) -> None:
    torch = pytest.importorskip("torch")
    from training.nets.generator import ResnetGenerator

    torch.manual_seed(seed)
    net = ResnetGenerator(input_nc=3, output_nc=3, ngf=TINY_NGF, n_blocks=TINY_BLOCKS).eval()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) warns that it is deprecated and emits TracerWarnings from
        # inside C++ (which, turned into errors by -W error, surface as SystemError): silence it all here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, 16, 16),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["translated"],
            dynamic_axes={"image": axes, "translated": axes},
        )


def tiny_card(files: dict[str, OnnxFile]) -> ModelCard:
    """The card of the ``tiny`` model with the given float32 file per direction."""
    return ModelCard(
        name=TINY_MODEL,
        version="1",
        description="tiny random generators for tests",
        domains=("a", "b"),
        directions=[
            DirectionSpec(name=name, source=src, target=dst, generator=gen, files={"float32": files[name]})
            for name, (src, dst, gen, _) in TINY_DIRECTIONS.items()
        ],
        input=InputContract(native_size=16),
        provenance=Provenance(
            model_type="dcl", ngf=TINY_NGF, n_blocks=TINY_BLOCKS, antialias=True, source="test", license="n/a"
        ),
    )


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding one model, ``tiny`` (domains a/b, directions a2b/b2a).

    Session-scoped and shared: tests must not modify it (copy it first, see ``tiny_model_copy``).
    """
    root = tmp_path_factory.mktemp("models")
    model_dir = root / TINY_MODEL
    model_dir.mkdir()
    files = {}
    for name, (_, _, _, seed) in TINY_DIRECTIONS.items():
        path = model_dir / f"{name}.onnx"
        _export_generator(path, seed)
        files[name] = OnnxFile(path=path.name, sha256=sha256_file(path))
    tiny_card(files).write(model_dir)
    return root


@pytest.fixture
def tiny_model_copy(tiny_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the ``tiny`` model folder that a test may tamper with."""
    dest = tmp_path / "models" / TINY_MODEL
    dest.mkdir(parents=True)
    for src in (tiny_repo / TINY_MODEL).iterdir():
        (dest / src.name).write_bytes(src.read_bytes())
    return dest


@pytest.fixture(autouse=True)
def fresh_engine_timings(monkeypatch: pytest.MonkeyPatch) -> dict[Any, Any]:
    """Engine auto's measurements are kept per process (``service.runtime._TIMINGS``): each test starts
    with none, so that what one test measured never decides another's engine."""
    timings: dict[Any, Any] = {}
    monkeypatch.setattr(runtime, "_TIMINGS", timings)
    return timings


@pytest.fixture(autouse=True)
def one_instance_per_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Most service tests build queues on purpose (a gated fake runner holds the one instance of a
    direction), so they run with one instance per direction (``live_server.spawn_server`` sets the same for
    its subprocesses, whose environment it rebuilds). The 2-core CPU default of two is tested in
    ``test_config.py`` and ``test_hardening.py``."""
    monkeypatch.setenv("DCLGAN_INSTANCES_PER_DEVICE", "1")


@pytest.fixture
def anyio_backend() -> str:
    """The async tests run on asyncio, the event loop the service runs on."""
    return "asyncio"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fake repository: ``tiny`` version 7 in the flat layout (``tiny/model.json``), directions a2b and b2a."""
    return write_fake_repo(tmp_path / "models")


@pytest.fixture
def fakes() -> Fakes:
    return Fakes()


def make_image(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic test image of ``size`` (width, height) in any Pillow ``mode``.

    The content is a gradient plus noise, so it has structure (for JPEG) and distinct pixels.
    Alpha channels are random; 16-bit and float modes use their full range.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(w + h - 2, 1)], -1
    )
    rgb = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    gray16 = (rgb[..., 0].astype(np.uint32) * 257).astype(np.uint16)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)]))
    if mode == "LA":
        return make_image(size, "RGBA", seed).convert("LA")
    if mode == "I;16":
        return Image.fromarray(gray16)
    if mode == "I":
        return Image.fromarray(gray16.astype(np.int32))
    if mode == "F":
        return Image.fromarray(rgb[..., 0].astype(np.float32))
    return Image.fromarray(rgb).convert(mode)


class ImageFactory:
    """Generated test images: in memory, encoded to bytes, or written to a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @staticmethod
    def image(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
        return make_image(size, mode, seed)

    @staticmethod
    def encode(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
        """``img`` saved to bytes in Pillow format ``fmt``."""
        buf = io.BytesIO()
        img.save(buf, format=fmt, **save)
        return buf.getvalue()

    def bytes(
        self, size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG", seed: int = 0, **save: Any
    ) -> bytes:
        return self.encode(make_image(size, mode, seed), fmt, **save)

    def write(
        self,
        name: str,
        size: tuple[int, int],
        mode: str = "RGB",
        fmt: str | None = None,
        seed: int = 0,
        **save: Any,
    ) -> Path:
        """Write a generated image to ``folder/name``; the format comes from the extension unless ``fmt``."""
        path = self.folder / name
        make_image(size, mode, seed).save(path, format=fmt, **save)
        return path


@pytest.fixture
def image_factory(tmp_path: Path) -> ImageFactory:
    """An ``ImageFactory`` writing into a fresh ``tmp_path/images`` folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    return ImageFactory(folder)
