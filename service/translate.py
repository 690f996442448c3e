"""``dclgan translate``: translate a folder of images offline with a model folder.

The job the authors' ``test.py`` does, but through the same onnxruntime inference code as the
service (no torch), at each image's own size: every output has exactly its input's width and
height. Unreadable images are logged and skipped. Exit status: 0 all translated, 1 some failed,
2 usage error (bad arguments, missing or invalid model, unknown direction).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from service.contract import atomic_write_bytes
from service.imaging import MEDIA_TYPES, ImageError, decode_image, encode_image
from service.repository import ModelRepositoryError, load_model_dir
from service.runtime import Engine, EngineName, Precision, ProviderUnavailable, file_variant, parse_device

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# Files decoded at a time, in batches: enough for equal-sized images to fill batches, while keeping
# memory bounded on a folder of thousands of photos.
WINDOW_BATCHES = 8


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def device_arg(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N (validated like the runtime does)."""
    try:
        parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and ``--precision``, as the service's DCLGAN_ENGINE and DCLGAN_PRECISION mean them."""
    parser.add_argument(
        "--engine",
        choices=get_args(EngineName),
        default="auto",
        help="auto (default): on a CPU with OpenVINO installed, the faster of it and onnxruntime float32 on a "
        "probe image (precision float32 or auto); else onnxruntime",
    )
    parser.add_argument(
        "--precision",
        "--variant",
        choices=get_args(Precision),
        default="float32",
        help="float32 (default) or float16: the ONNX file; bfloat16: OpenVINO on a CPU with native bf16; auto: "
        "bfloat16 where that holds, else float32",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dclgan translate",
        description="Translate every image in IN_DIR with an exported model into OUT_DIR/<stem>.<format>.",
    )
    parser.add_argument("--model", required=True, type=Path, help="model folder, e.g. models/horse2zebra")
    parser.add_argument("--direction", required=True, help="e.g. horse2zebra (see the model's model.json)")
    parser.add_argument("in_dir", type=Path, metavar="IN_DIR", help="folder of images to translate (not recursive)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="created if missing")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per run (same size only)")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="intra-op threads (default: all CPUs)"
    )
    add_engine_options(parser)
    parser.add_argument(
        "--format", choices=list(MEDIA_TYPES), default="png", dest="fmt", help="output format"
    )
    parser.add_argument(
        "--quality", type=int, choices=range(1, 101), default=95, metavar="1-100", help="JPEG/WebP"
    )
    parser.add_argument(
        "--max-side",
        type=positive_int,
        default=None,
        help="run at most this long side (None: the model card's working_side, else the image's own size); "
        "the output keeps the input size",
    )
    parser.add_argument(
        "--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, help="refuse larger images"
    )
    return parser


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix, any case), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_model_dir(args.model)
        # An unknown direction or variant raises, and the message lists the ones that exist.
        model.path(args.direction, file_variant(args.precision))
    except ModelRepositoryError as exc:
        logger.error("%s", exc)
        return 2
    if not args.in_dir.is_dir():
        logger.error("input folder %s does not exist", args.in_dir)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        engine = Engine.open(
            model,
            directions=[args.direction],
            batch_size=args.batch_size,
            device=args.device,
            engine=args.engine,
            precision=args.precision,
            intra_op_threads=args.threads,
        )
    except (ProviderUnavailable, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    files = list_images(args.in_dir)
    if not files:
        logger.warning("no images (%s) in %s", ", ".join(sorted(IMAGE_SUFFIXES)), args.in_dir)
    with (
        logging_redirect_tqdm(),
        tqdm(total=len(files), unit="img", desc=args.direction, disable=None) as bar,
    ):
        failed = _translate_all(engine, files, args, bar)
    logger.info("translated %d of %d images into %s", len(files) - len(failed), len(files), args.out_dir)
    if failed:
        logger.warning("%d failed: %s", len(failed), ", ".join(p.name for p in failed))
    return 1 if failed else 0


def _translate_all(engine: Engine, files: list[Path], args: argparse.Namespace, bar: tqdm) -> list[Path]:
    """Translate ``files`` window by window; returns the files that failed."""
    failed: list[Path] = []

    def fail(path: Path, reason: object) -> None:
        logger.warning("skipping %s: %s", path, reason)
        failed.append(path)
        bar.update()

    owners: dict[Path, Path] = {}  # output file -> the input that claimed it
    window = args.batch_size * WINDOW_BATCHES
    for start in range(0, len(files), window):
        targets: list[Path] = []
        images = []
        for path in files[start : start + window]:
            target = args.out_dir / f"{path.stem}.{args.fmt}"
            if target in owners:
                fail(path, f"its output {target.name} would overwrite that of {owners[target].name}")
                continue
            owners[target] = path
            try:
                images.append(decode_image(path.read_bytes(), max_pixels=args.max_pixels))
            except (ImageError, OSError) as exc:
                fail(path, exc)
                continue
            targets.append(target)
        for index, out in engine.translate_iter(images, args.direction, max_side=args.max_side):
            try:
                atomic_write_bytes(targets[index], encode_image(out, args.fmt, quality=args.quality))
            except OSError as exc:
                fail(owners[targets[index]], f"cannot write {targets[index]}: {exc}")
                continue
            bar.update()
    return failed
