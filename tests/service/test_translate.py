"""``dclgan translate`` on folders of generated images, through the tiny exported model."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.imaging import decode_image
from service.repository import load_model_dir
from service.runtime import Engine
from service.translate import main

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny(tiny_repo: Path) -> str:
    return str(tiny_repo / "tiny")


def _truncated_jpeg(image_factory: Any, name: str) -> Path:
    path = image_factory.write(name, (64, 48))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _odd_folder(image_factory: Any) -> dict[str, tuple[int, int]]:
    """The acceptance folder; returns the expected output size for every good input, by stem."""
    image_factory.write("square_250.png", (250, 250))
    image_factory.write("odd_257x263.jpg", (257, 263), seed=1)
    image_factory.write("tiny_31x47.png", (31, 47), seed=2)
    image_factory.write("gray.png", (40, 30), "L", seed=3)
    image_factory.write("alpha.png", (33, 17), "RGBA", seed=4)
    image_factory.write("palette.bmp", (12, 9), "P", seed=5)
    image_factory.write("deep.tif", (10, 14), "I;16", seed=6)
    image_factory.write("UPPER.PNG", (9, 8), seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x20, displayed rotated by 90 degrees
    image_factory.write("rotated.jpg", (40, 20), seed=8, exif=exif.tobytes())
    (image_factory.folder / "notes.txt").write_text("not an image")
    return {
        "square_250": (250, 250),
        "odd_257x263": (257, 263),
        "tiny_31x47": (31, 47),
        "gray": (40, 30),
        "alpha": (33, 17),
        "palette": (12, 9),
        "deep": (10, 14),
        "UPPER": (9, 8),
        "rotated": (20, 40),
    }


def test_odd_folder_keeps_every_size_and_reports_the_broken_file(
    tiny: str, image_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = _odd_folder(image_factory)
    broken = _truncated_jpeg(image_factory, "broken.jpg")
    out_dir = tmp_path / "out" / "nested"
    argv = ["--model", tiny, "--direction", "a2b", str(image_factory.folder), str(out_dir)]
    with caplog.at_level(logging.INFO):
        assert main([*argv, "--batch-size", "2", "--threads", "1"]) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{stem}.png" for stem in expected)
    for stem, size in expected.items():
        with Image.open(out_dir / f"{stem}.png") as out:
            assert (out.size, out.mode) == (size, "RGB"), stem
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(broken) in m and "cannot decode" in m for m in warnings), warnings
    assert any("1 failed: broken.jpg" in m for m in warnings), warnings
    assert "translated 9 of 10 images" in caplog.text


def test_outputs_are_the_engine_translation(tiny: str, image_factory: Any, tmp_path: Path) -> None:
    source = image_factory.write("photo.png", (37, 29))
    assert (
        main(["--model", tiny, "--direction", "b2a", str(image_factory.folder), str(tmp_path / "out")]) == 0
    )
    engine = Engine.open(load_model_dir(tiny), directions=["b2a"], intra_op_threads=1)
    (expected,) = engine.translate([decode_image(source.read_bytes(), max_pixels=10**6)], "b2a")
    with Image.open(tmp_path / "out" / "photo.png") as written:
        np.testing.assert_array_equal(np.asarray(written), np.asarray(expected))
        assert not np.array_equal(np.asarray(written), np.asarray(Image.open(source)))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_format_and_max_side(tiny: str, image_factory: Any, tmp_path: Path, fmt: str) -> None:
    image_factory.write("wide.png", (120, 50))
    argv = ["--model", tiny, "--direction", "a2b", str(image_factory.folder), str(tmp_path / "out")]
    assert main([*argv, "--format", fmt, "--quality", "80", "--max-side", "32"]) == 0
    with Image.open(tmp_path / "out" / f"wide.{fmt}") as out:
        assert (out.format, out.size) == (fmt.upper(), (120, 50))


def test_outputs_that_would_collide_are_reported(
    tiny: str, image_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image_factory.write("same.jpg", (16, 16))
    image_factory.write("same.png", (16, 16))
    assert (
        main(["--model", tiny, "--direction", "a2b", str(image_factory.folder), str(tmp_path / "out")]) == 1
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["same.png"]
    assert "would overwrite that of same.jpg" in caplog.text


def test_empty_folder_succeeds_with_a_warning(
    tiny: str, image_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert (
        main(["--model", tiny, "--direction", "a2b", str(image_factory.folder), str(tmp_path / "out")]) == 0
    )
    assert "no images" in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--direction": "x2y"}, "no direction 'x2y'; available: a2b, b2a"),
        ({"--variant": "float16"}, "no float16 file; available: float32"),
        ({"--model": "missing"}, r"cannot read .*missing/model\.json"),
        ({"in_dir": "no_such_input"}, r"input folder .*no_such_input does not exist"),
    ],
)
def test_usage_errors_exit_2(
    tiny: str,
    image_factory: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, str],
    message: str,
) -> None:
    args = {
        "--model": tiny,
        "--direction": "a2b",
        "--variant": "float32",
        "in_dir": str(image_factory.folder),
    }
    # Paths in ``change`` are relative to tmp_path, where nothing exists.
    args |= {k: str(tmp_path / v) if k in ("--model", "in_dir") else v for k, v in change.items()}
    in_dir = args.pop("in_dir")
    argv = [x for option in args.items() for x in option] + [in_dir, str(tmp_path / "out")]
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and re.search(message, errors[0]), errors


def test_tampered_model_exits_2(
    tiny_model_copy: Path, image_factory: Any, tmp_path: Path, caplog: Any
) -> None:
    (tiny_model_copy / "a2b.onnx").write_bytes(b"not the exported model")
    argv = [
        "--model",
        str(tiny_model_copy),
        "--direction",
        "a2b",
        str(image_factory.folder),
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "SHA-256 mismatch" in caplog.text and "a2b.onnx" in caplog.text


@pytest.mark.parametrize(
    "bad", [["--batch-size", "0"], ["--format", "gif"], ["--quality", "0"], ["--device", "gpu"]]
)
def test_argument_errors_exit_2(tiny: str, tmp_path: Path, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--model", tiny, "--direction", "a2b", str(tmp_path), str(tmp_path / "out"), *bad])
    assert info.value.code == 2


def test_runs_without_torch_or_training(tiny: str, image_factory: Any, tmp_path: Path) -> None:
    image_factory.write("x.png", (20, 12))
    script = (
        "import sys\n"
        "from service.translate import main\n"
        f"rc = main(['--model', {tiny!r}, '--direction', 'a2b', {str(image_factory.folder)!r}, "
        f"{str(tmp_path / 'out')!r}, '--threads', '1'])\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training'))\n"
        "assert not leaked, leaked\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "x.png").is_file()


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="a GPU is present: CUDA would really be used")
def test_gpu_requested_but_unavailable_exits_2(
    tiny: str, image_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image_factory.write("x.png", (16, 16))
    out = tmp_path / "out"
    args = ["--model", tiny, "--direction", "a2b", "--device", "cuda", str(image_factory.folder), str(out)]
    assert main(args) == 2
    assert "CUDA" in caplog.text and not list(out.glob("*"))
