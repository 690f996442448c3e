"""``dclgan evaluate``: FID and KID of a model folder's translations against reference images.

    dclgan evaluate --model models/horse2zebra --direction horse2zebra \\
        --inputs ../shared/data/horse2zebra/testA --reference ../shared/data/horse2zebra/testB [--json]

Three feature sets are compared: (a) the translations of ``--inputs``, (b) the untranslated inputs,
the "do nothing" baseline a model has to beat, and (c) the ``--reference`` images of the target
domain. Reported: FID and KID (mean, std over random subsets) of (a) vs (c) and of (b) vs (c).

Resolution and protocol, identical for every set (FID moves with resampling, so both are printed):

1. Every image (inputs and references alike) is decoded to RGB. By default it keeps its own size, as
   pytorch-fid reads the image files. ``--size N`` first squashes each to NxN with PIL bicubic, ignoring
   the aspect ratio, as the authors' test script does at 256 (a no-op for horse2zebra's 256x256 photos).
2. The inputs are translated with the inference core (onnxruntime or OpenVINO through
   :class:`service.runtime.Engine`, not PyTorch, so the numbers describe what is served): scaled to
   the model's working side (``input.working_side`` in model.json, or ``--max-side``) as the service
   does, and the outputs brought back to their input's size. The baseline is the inputs themselves.
3. The feature extractor brings every image to 299x299 under ``--protocol`` (see
   :mod:`training.metrics_fid`): ``pytorch-fid``, the paper's tool's preprocessing (default), or
   ``tf-legacy``, the original TF graph's.

Exit status: 0 done; 1 an image could not be read; 2 usage error (bad arguments, invalid model or
direction, fewer than two images in a folder, Inception weights not installed). With ``--json``
stdout holds exactly one JSON object; the log goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.imaging import ImageError, decode_image
from service.repository import ModelRepositoryError, load_model_dir
from service.runtime import Engine, ProviderUnavailable, default_threads
from service.translate import DEFAULT_MAX_PIXELS, add_engine_options, device_arg, list_images, positive_int
from training.metrics_fid import (
    INCEPTION_FEATURES,
    INCEPTION_SIZE,
    PROTOCOLS,
    FeatureExtractor,
    InceptionWeightsError,
    fid,
    kid,
    load_inception,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scores:
    """Distances of one image set to the reference set (lower is closer)."""

    fid: float
    kid_mean: float
    kid_std: float


@dataclass(frozen=True)
class Evaluation:
    """Everything ``--json`` prints: the model's scores, the baseline's and how they were made."""

    model: str
    version: str
    direction: str
    n_inputs: int
    n_reference: int
    resolution: int | None  # None: every image at its own size
    max_side: int | None  # the longer side translated at; None: the model's working side (or the image's size)
    feature_resolution: int
    features: str
    protocol: str
    kid_subsets: int
    kid_subset_size: int
    fid: float
    kid_mean: float
    kid_std: float
    baseline: Scores


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dclgan evaluate",
        description="FID/KID of a model's translations of INPUTS against REFERENCE images, next to the "
        "do-nothing baseline (the untranslated inputs against the same references).",
    )
    parser.add_argument("--model", required=True, type=Path, help="model folder, e.g. models/horse2zebra")
    parser.add_argument("--direction", required=True, help="e.g. horse2zebra (see the model's model.json)")
    parser.add_argument("--inputs", required=True, type=Path, help="source-domain images, e.g. testA")
    parser.add_argument("--reference", required=True, type=Path, help="target-domain images, e.g. testB")
    parser.add_argument(
        "--size", type=positive_int, default=None,
        help="squash every image to SIZExSIZE (bicubic) before translation and features, as the authors' "
        "test script does at 256 (default: every image at its own size)",
    )
    parser.add_argument(
        "--max-side", type=positive_int, default=None,
        help="translate at this longer side, as a request's max_side does (default: the model's working side); "
        "outputs keep their input's size. Compare a few to choose a model's --working-side",
    )
    parser.add_argument(
        "--protocol", choices=list(PROTOCOLS), default="pytorch-fid",
        help="Inception preprocessing: pytorch-fid's (the paper's FID tool) or the TF graph's (tf-legacy)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per network run")
    parser.add_argument("--kid-subsets", type=positive_int, default=100, help="random subsets for KID")
    parser.add_argument(
        "--kid-subset-size", type=positive_int, default=100, help="rows per KID subset (clamped to the sets)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    add_engine_options(parser)
    return parser


def load_images(paths: Sequence[Path], size: int | None) -> list[Image.Image]:
    """Decode ``paths`` to RGB; with ``size``, squash each to ``size`` x ``size`` (bicubic, aspect ratio ignored).

    Raises:
        ImageError: naming the file; a score over a silently smaller set would not be comparable.
    """
    images = []
    for path in paths:
        try:
            img = decode_image(path.read_bytes(), max_pixels=DEFAULT_MAX_PIXELS)
        except ImageError as exc:
            raise ImageError(f"{path}: {exc}") from exc
        images.append(img if size is None else img.resize((size, size), Image.Resampling.BICUBIC))
    return images


def evaluate(
    engine: Engine,
    direction: str,
    inputs: Sequence[Image.Image],
    reference: Sequence[Image.Image],
    extract: FeatureExtractor,
    *,
    resolution: int | None,
    protocol: str,
    max_side: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 100,
    seed: int = 0,
) -> Evaluation:
    """Translate ``inputs`` and score them and the baseline.

    Args:
        engine: the model folder opened with ``direction``.
        inputs, reference: RGB images as :func:`load_images` made them.
        extract: RGB uint8 arrays -> ``(n, D)`` features; :func:`training.metrics_fid.load_inception`
            for reported numbers, a cheap stand-in in tests.
        resolution, protocol: how the images were sized and how the extractor preprocesses them, recorded.
        max_side: the longer side to translate at (None: the model's working side).

    Both KID computations draw the same subsets (same seed), so their difference is not sampling noise.
    """
    started = time.perf_counter()
    translated = engine.translate(inputs, direction, max_side=max_side)
    logger.info("translated %d images in %.1f s", len(inputs), time.perf_counter() - started)
    features: dict[str, np.ndarray] = {}
    for name, images in (("translated", translated), ("baseline", inputs), ("reference", reference)):
        started = time.perf_counter()
        features[name] = extract([np.asarray(img, dtype=np.uint8) for img in images])
        logger.info("%s: %s features in %.1f s", name, features[name].shape, time.perf_counter() - started)
    ref = features["reference"]
    kid_args = {"n_subsets": kid_subsets, "subset_size": kid_subset_size, "seed": seed}
    kid_mean, kid_std, subset_size = kid(features["translated"], ref, **kid_args)
    base_mean, base_std, _ = kid(features["baseline"], ref, **kid_args)
    baseline = Scores(fid=fid(features["baseline"], ref), kid_mean=base_mean, kid_std=base_std)
    card = engine.model.card
    return Evaluation(
        model=card.name,
        version=card.version,
        direction=direction,
        n_inputs=len(inputs),
        n_reference=len(reference),
        resolution=resolution,
        max_side=max_side if max_side is not None else engine.model.card.input.working_side,
        feature_resolution=INCEPTION_SIZE,
        features=INCEPTION_FEATURES,
        protocol=protocol,
        kid_subsets=kid_subsets,
        kid_subset_size=subset_size,
        fid=fid(features["translated"], ref),
        kid_mean=kid_mean,
        kid_std=kid_std,
        baseline=baseline,
    )


def format_table(result: Evaluation) -> str:
    """The human-readable report: what was compared, at which resolution, and the two rows."""
    size = "each image at its own size" if result.resolution is None else (
        f"every image squashed to {result.resolution}x{result.resolution} (bicubic)"
    )
    rows = [
        f"model {result.model} v{result.version}, direction {result.direction}: "
        f"{result.n_inputs} inputs vs {result.n_reference} reference images",
        f"resolution: {size}, then {result.feature_resolution}x{result.feature_resolution} for the features "
        f"by the {result.protocol} protocol ({PROTOCOLS[result.protocol]}); {result.features}",
        "translated at " + (f"longer side {result.max_side}" if result.max_side else "each image's own size")
        + ", outputs at their input's size",
        f"KID: {result.kid_subsets} subsets of {result.kid_subset_size}",
        "",
        f"{'':<22}{'FID':>10}{'KID mean':>12}{'KID std':>12}",
    ]
    for label, s in (("translated (model)", result), ("do nothing (inputs)", result.baseline)):
        rows.append(f"{label:<22}{s.fid:>10.2f}{s.kid_mean:>12.4f}{s.kid_std:>12.4f}")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_model_dir(args.model)
        model.path(args.direction)  # an unknown direction raises, listing the ones that exist
    except ModelRepositoryError as exc:
        logger.error("%s", exc)
        return 2
    files: dict[str, list[Path]] = {}
    for flag, folder in (("--inputs", args.inputs), ("--reference", args.reference)):
        files[flag] = list_images(folder) if folder.is_dir() else []
        if len(files[flag]) < 2:
            logger.error(
                "%s %s: need a folder with at least two images, found %d", flag, folder, len(files[flag])
            )
            return 2
    threads = args.threads or default_threads()
    # Explicit: torch's default may count every core of the host, not those this process may use.
    torch.set_num_threads(threads)
    try:
        extract = load_inception(args.device, args.batch_size, args.protocol)  # before the slow part: fail fast
    except InceptionWeightsError as exc:
        logger.error("%s", exc)
        return 2
    logger.info(
        "resolution: %s, then %d for the features (%s protocol)",
        "own size" if args.size is None else f"{args.size}x{args.size} bicubic squash", INCEPTION_SIZE, args.protocol,
    )
    try:
        inputs = load_images(files["--inputs"], args.size)
        reference = load_images(files["--reference"], args.size)
    except (ImageError, OSError) as exc:
        logger.error("cannot read an image: %s", exc)
        return 1
    try:
        engine = Engine.open(
            model, directions=[args.direction], batch_size=args.batch_size, device=args.device,
            intra_op_threads=threads, engine=args.engine, precision=args.precision,
        )
    except (ProviderUnavailable, ValueError) as exc:  # asked for a GPU or bf16: measuring something else would mislead
        logger.error("%s", exc)
        return 2
    result = evaluate(
        engine, args.direction, inputs, reference, extract, resolution=args.size, protocol=args.protocol,
        max_side=args.max_side,
        kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, seed=args.seed,
    )
    sys.stdout.write(json.dumps(asdict(result)) + "\n" if args.json else format_table(result))
    return 0
