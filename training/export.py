"""Generators -> ONNX model folders (``models/<name>/``): the only contract with the service.

``dclgan export`` reads one of our checkpoints; ``dclgan import-official`` reads the paper
authors' released ``latest_net_G_A.pth`` / ``latest_net_G_B.pth``. Both check every ONNX file
against PyTorch with onnxruntime before the model card that points at it is written, and all
writes are atomic (the card last, so a card never names a half-written file).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.contract import atomic_write_bytes
from service.repository import (
    MODEL_JSON,
    DirectionSpec,
    InputContract,
    ModelCard,
    ModelRepositoryError,
    OnnxFile,
    Provenance,
    sha256_file,
    version_key,
)
from service.runtime import OnnxRunner, create_session
from training.checkpoint import CheckpointError, load_state_file, read_checkpoint
from training.nets import ResnetGenerator

log = logging.getLogger(__name__)

OPSET = 17
PARITY_SIZES = ((64, 64), (256, 256), (48, 80))  # (H, W): small, native, non-square
PARITY_TOL = 1e-4
INPUT_NAME, OUTPUT_NAME = "image", "translated"


class ExportError(ValueError):
    """A checkpoint that cannot be exported faithfully."""


@dataclass(frozen=True)
class GeneratorArch:
    input_nc: int
    output_nc: int
    ngf: int
    n_blocks: int


def infer_architecture(state: Mapping[str, torch.Tensor]) -> GeneratorArch:
    """Read ngf, block count and channels off a ResnetGenerator state dict's keys and shapes.

    Only the anti-aliased generator (the authors' default) is supported: its blur buffers
    ``model.7.filt`` etc. must be present.
    """
    if "model.1.weight" not in state or "model.7.filt" not in state:
        raise ExportError(
            "not an anti-aliased ResnetGenerator state dict (no model.1.weight / model.7.filt); "
            "checkpoints trained with --no_antialias are not supported"
        )
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.(\d+)\.conv_block\.", k))}
    if blocks != set(range(12, 12 + len(blocks))):
        raise ExportError(f"residual blocks are not contiguous from layer 12: {sorted(blocks)}")
    first = state["model.1.weight"]
    last_key = f"model.{12 + len(blocks) + 9}.weight"
    if last_key not in state:
        raise ExportError(f"expected the output conv at {last_key}")
    return GeneratorArch(
        input_nc=first.shape[1], output_nc=state[last_key].shape[0], ngf=first.shape[0], n_blocks=len(blocks)
    )


def generator_from_state(state: Mapping[str, torch.Tensor], arch: GeneratorArch | None = None) -> ResnetGenerator:
    """Build the generator the state dict describes and load it with ``strict=True``."""
    arch = arch or infer_architecture(state)
    gen = ResnetGenerator(arch.input_nc, arch.output_nc, arch.ngf, arch.n_blocks)
    try:
        gen.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"state dict does not match a generator with {arch}: {exc}") from exc
    return gen.eval()


def onnx_bytes(gen: ResnetGenerator, opset: int = OPSET) -> bytes:
    """Trace to ONNX with dynamic batch, height and width (TorchScript exporter, opset 17)."""
    axes = {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The exporter warns that InstanceNorm's training flag is ignored: harmless without running stats.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            gen,
            (torch.zeros(1, gen.model[1].in_channels, 64, 64),),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
        )
    return buf.getvalue()


def check_onnx(model_bytes: bytes) -> None:
    """onnx.checker's full check (graph, types, opset), raising ExportError on failure."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load_from_string(model_bytes), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc


def to_float16(model_bytes: bytes) -> bytes:
    """Float16 weights and activations with float32 inputs and outputs (for GPUs)."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # It warns for every weight below fp16's smallest normal; those become 1e-7, which is expected.
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(onnx.load_from_string(model_bytes), keep_io_types=True)
    return model.SerializeToString()


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 2.0) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def check_parity(
    gen: ResnetGenerator, onnx_path: Path, sizes: Sequence[tuple[int, int]] = PARITY_SIZES, seed: int = 0
) -> list[tuple[tuple[int, int], float]]:
    """Max |torch - onnxruntime| at each (H, W), batch 2, random inputs in [-1, 1]."""
    runner = OnnxRunner(create_session(onnx_path, device="cpu"), device="cpu")
    rng = np.random.default_rng(seed)
    results = []
    for h, w in sizes:
        x = rng.uniform(-1, 1, (2, gen.model[1].in_channels, h, w)).astype(np.float32)
        with torch.no_grad():
            want = gen(torch.from_numpy(x)).numpy()
        results.append(((h, w), float(np.abs(runner.run(x) - want).max())))
    return results


def export_model(
    generators: Mapping[str, ResnetGenerator],
    *,
    name: str,
    domains: tuple[str, str],
    out_root: Path,
    provenance: Provenance,
    native_size: int,
    working_side: int | None = None,
    version: str = "1",
    description: str = "",
    fp16: bool = False,
    versioned: bool = False,
    parity_sizes: Sequence[tuple[int, int]] = PARITY_SIZES,
) -> ModelCard:
    """Write ``out_root/name/`` (``out_root/name/version/`` when ``versioned``: the layout that serves
    several versions side by side) with one ONNX file per direction (``generators`` maps "G_A"/"G_B" to
    the A->B and B->A generators) and its model.json.

    Raises ExportError if any ONNX file differs from PyTorch by more than 1e-4, or if the export would
    replace another version or mix the repository's two layouts (see :func:`export_folder`).
    """
    model_dir = export_folder(out_root / name, version, versioned=versioned)
    model_dir.mkdir(parents=True, exist_ok=True)
    plan = (("G_A", domains[0], domains[1]), ("G_B", domains[1], domains[0]))
    directions = []
    staged: list[tuple[Path, Path]] = []  # (verified temporary file, final name)
    try:
        for gen_name, src, dst in plan:
            gen = generators[gen_name].eval()
            direction = f"{src}2{dst}"
            files = {"float32": _stage(model_dir, f"{direction}.onnx", onnx_bytes(gen), staged)}
            tmp = staged[-1][0]
            for (h, w), diff in check_parity(gen, tmp, parity_sizes):
                log.info("%s: max |torch - onnxruntime| at %dx%d = %.2e", direction, h, w, diff)
                if diff > PARITY_TOL:
                    raise ExportError(
                        f"{direction}.onnx differs from PyTorch by {diff:.2e} at {h}x{w} (> {PARITY_TOL})"
                    )
            if fp16:
                half = to_float16(tmp.read_bytes())
                files["float16"] = _stage(model_dir, f"{direction}.fp16.onnx", half, staged)
                log.info("%s: float16 PSNR against float32 = %.1f dB", direction, fp16_psnr(tmp, staged[-1][0]))
            directions.append(DirectionSpec(name=direction, source=src, target=dst, generator=gen_name, files=files))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    # Everything verified: only now replace the files a previous export may be serving.
    for tmp, final in staged:
        os.replace(tmp, final)
    card = ModelCard(
        name=name,
        version=version,
        description=description,
        domains=domains,
        directions=directions,
        input=InputContract(
            input_name=INPUT_NAME, output_name=OUTPUT_NAME, native_size=native_size, working_side=working_side
        ),
        provenance=provenance,
    )
    card.write(model_dir)
    log.info("wrote %s", model_dir / "model.json")
    return card


def export_folder(model_root: Path, version: str, *, versioned: bool) -> Path:
    """The folder an export of ``version`` writes. A re-export of the same version replaces it; another
    version is never replaced silently, and the two layouts the service tells apart (one model.json in
    place, or version folders) are never mixed, which it would refuse to start with."""
    if versioned:
        if "/" in version or version in ("", ".", ".."):
            raise ExportError(f"version {version!r} cannot name a folder")
        if (model_root / MODEL_JSON).is_file():
            raise ExportError(
                f"{model_root} holds one version in place (its model.json): move its files to "
                f"{model_root}/<that version>/ first, or export without --versioned"
            )
        key = version_key(version)
        same = [d.name for d in _version_folders(model_root) if d.name != version and version_key(d.name) == key]
        if same:
            raise ExportError(
                f"{model_root}: version {version!r} equals {same[0]!r} in natural order; the service could not "
                "tell which is newer"
            )
        return model_root / version
    if _version_folders(model_root):
        raise ExportError(f"{model_root} holds version folders: export with --versioned to add {version} beside them")
    try:
        held = ModelCard.load(model_root).version if (model_root / MODEL_JSON).is_file() else version
    except ModelRepositoryError:
        held = version  # an unreadable card is replaced, as a failed export's leftovers are
    if held != version:
        raise ExportError(
            f"{model_root} holds version {held}; exporting {version} there would replace it: --versioned keeps "
            f"both ({model_root}/<version>/), or remove the folder first"
        )
    return model_root


def _version_folders(model_root: Path) -> list[Path]:
    """The version folders (each with a card) of a model folder in the versioned layout."""
    if not model_root.is_dir():
        return []
    return [d for d in model_root.iterdir() if d.is_dir() and (d / MODEL_JSON).is_file()]


def _stage(model_dir: Path, name: str, data: bytes, staged: list[tuple[Path, Path]]) -> OnnxFile:
    """Check ``data`` with onnx.checker and write it under a temporary name beside its final one."""
    check_onnx(data)
    tmp = model_dir / f".{name}.staging"
    atomic_write_bytes(tmp, data)
    staged.append((tmp, model_dir / name))
    return OnnxFile(path=name, sha256=sha256_file(tmp))


def fp16_psnr(fp32_path: Path, fp16_path: Path, size: int = 256, seed: int = 0) -> float:
    """PSNR of the float16 model's output against the float32 one on a smooth random image."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (1, 3, size // 8, size // 8)).astype(np.float32)
    x = np.ascontiguousarray(coarse.repeat(8, axis=2).repeat(8, axis=3))
    ref = OnnxRunner(create_session(fp32_path, device="cpu"), device="cpu").run(x)
    half = OnnxRunner(create_session(fp16_path, device="cpu"), device="cpu").run(x)
    return psnr(ref, half)


# -- command line ---------------------------------------------------------------------------
def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", required=True, help="folder name under --out, e.g. horse2zebra")
    p.add_argument("--domains", nargs=2, required=True, metavar=("A", "B"), help="e.g. horse zebra")
    p.add_argument("--out", type=Path, default=Path("models"), help="model repository root")
    p.add_argument("--version", default="1", help="model version recorded in model.json and shown by /models")
    p.add_argument(
        "--versioned",
        action="store_true",
        help="write --out/NAME/VERSION/ (several versions served side by side) instead of --out/NAME/",
    )
    p.add_argument(
        "--working-side",
        type=int,
        default=None,
        help="the longer side the service and translate scale images to by default (measure it with evaluate --size)",
    )
    p.add_argument("--description", default="", help="free text recorded in model.json")
    p.add_argument("--fp16", action="store_true", help="also write float16 variants (for GPUs)")
    p.add_argument("--training-data", default="", help="provenance: what the weights were trained on")
    p.add_argument("--license", default="", help="provenance: licence and terms of the weights")
    p.add_argument("--notes", default="", help="provenance: anything else a user of the weights should know")


def _run_export(args: argparse.Namespace, gens: dict[str, ResnetGenerator], prov: dict, native: int) -> int:
    arch = gens["G_A"]
    provenance = Provenance(
        ngf=arch.ngf,
        n_blocks=arch.n_blocks,
        antialias=True,
        training_data=args.training_data,
        license=args.license,
        notes=args.notes,
        **prov,
    )
    try:
        export_model(
            gens,
            name=args.model_name,
            domains=tuple(args.domains),
            out_root=args.out,
            provenance=provenance,
            native_size=native,
            working_side=args.working_side,
            version=args.version,
            description=args.description,
            fp16=args.fp16,
            versioned=args.versioned,
        )
    except ExportError as exc:
        log.error("%s", exc)
        return 1
    return 0


def main(argv: list[str]) -> int:
    """``dclgan export --checkpoint checkpoints/NAME --model-name M --domains A B --out models/``."""
    p = argparse.ArgumentParser(prog="dclgan export", description="Export a training run's generators to ONNX.")
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder holding latest.pt")
    p.add_argument("--label", default="latest", help="checkpoint label: latest, best (with --eval-every) or epoch_N")
    _common_args(p)
    args = p.parse_args(argv)
    path = args.checkpoint / f"{args.label}.pt"
    if not path.is_file():
        log.error("no checkpoint at %s", path)
        return 2
    try:
        state = read_checkpoint(path)
        gens = {name: generator_from_state(state["networks"][name]) for name in ("G_A", "G_B")}
    except (ExportError, CheckpointError, KeyError, TypeError, RuntimeError, OSError) as exc:
        log.error("%s is not a usable training checkpoint: %s", path, exc)
        return 2
    cfg = state["config"]
    prov = {"model_type": cfg["model"]["model"], "iterations": state["iteration"], "source": "trained"}
    return _run_export(args, gens, prov, native=cfg["data"]["crop_size"])


def import_official_main(argv: list[str]) -> int:
    """``dclgan import-official --checkpoints-dir DIR --model-name M --domains A B --out models/``."""
    p = argparse.ArgumentParser(
        prog="dclgan import-official",
        description="Turn the DCLGAN authors' released generator checkpoints into a model folder.",
    )
    p.add_argument("--checkpoints-dir", type=Path, required=True, help="folder with <epoch>_net_G_A.pth, _G_B.pth")
    p.add_argument("--epoch", default="latest", help="checkpoint label (file prefix)")
    p.add_argument("--model-type", default="dcl", choices=["dcl", "simdcl"], help="provenance: dcl or simdcl weights")
    p.add_argument("--native-size", type=int, default=256, help="training resolution of the weights")
    p.add_argument("--ngf", type=int, help="override the inferred width")
    p.add_argument("--n-blocks", type=int, help="override the inferred number of residual blocks")
    _common_args(p)
    args = p.parse_args(argv)
    gens = {}
    for name in ("G_A", "G_B"):
        path = args.checkpoints_dir / f"{args.epoch}_net_{name}.pth"
        if not path.is_file():
            log.error("missing %s", path)
            return 2
        try:
            state = load_state_file(path)
        except CheckpointError as exc:
            log.error("%s", exc)
            return 2
        try:
            arch = infer_architecture(state)
            if args.ngf or args.n_blocks:
                arch = GeneratorArch(
                    arch.input_nc, arch.output_nc, args.ngf or arch.ngf, args.n_blocks or arch.n_blocks
                )
            gens[name] = generator_from_state(state, arch)
        except ExportError as exc:
            log.error("%s: %s", path, exc)
            return 1
        log.info("%s: ResnetGenerator ngf=%d n_blocks=%d", path.name, arch.ngf, arch.n_blocks)
    prov = {"model_type": args.model_type, "iterations": 0, "source": "official"}
    return _run_export(args, gens, prov, native=args.native_size)
