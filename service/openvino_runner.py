"""The OpenVINO engine: the model repository's ONNX files compiled by OpenVINO's CPU plugin, in float32 or,
where the CPU computes it natively, bfloat16; and the choice of engine and precision for a device.

Why a second engine: on CPUs OpenVINO's kernels beat onnxruntime's on these generators, and on a CPU with
native bf16 (AVX-512 BF16 or AMX) bf16 roughly doubles the speed (docs/benchmarks.md). It reads the same
ONNX files, so the repository's contract does not change.

``openvino`` is an optional extra (``cpu-fast``): it is imported only when a runner is opened or bf16
support is queried, so the service runs without it. Three facts of its CPU plugin shape this module:

* On CPUs with native bf16 it computes in bf16 *by default*; float32 must be asked for explicitly.
* On CPUs without native bf16 it may still accept bf16 and emulate it, slower than float32: bf16 is chosen
  only where the CPU flags say the hardware has it (and OpenVINO agrees).
* Left alone it takes every core and pins its threads to them; the service opens several compiled models
  in one process on cores shared with other work, so each gets an explicit thread count, one stream and
  no pinning (pinned threads of two models would pile onto the same first cores).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from service.runtime import (
    SHRINK_ABOVE_PIXELS,
    EngineName,
    Precision,
    ProbeTimes,
    checked_batch,
    checked_output,
)

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

Computed = Literal["float32", "bfloat16"]
_OV_TYPES = {"float32": "f32", "bfloat16": "bf16"}
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
PSNR_DATA_RANGE = 2.0  # the generator's output range [-1, 1]


def installed() -> bool:
    """Whether the ``openvino`` package can be imported (the ``cpu-fast`` extra)."""
    return importlib.util.find_spec("openvino") is not None


@lru_cache(maxsize=1)
def _core() -> ov.Core:
    """One OpenVINO Core per process: it loads the plugins once and is safe to share between threads.

    It also initialises OpenVINO's numpy bridge on the thread that opens the runners. pybind11 does that
    lazily under a call-once lock, and when the first ``infer`` calls of two worker threads race for it, one
    can wait on the lock while holding the GIL: the whole process hangs (4 of 8 fresh processes did here).
    """
    import openvino as ov

    core = ov.Core()
    ov.Type.f32.to_dtype()
    return core


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; empty where there is no ``/proc/cpuinfo``."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """The CPU computes bf16 in hardware (AVX-512 BF16 or AMX) and OpenVINO's CPU plugin can use it.

    Checked at run time, never assumed: the machines this project runs on range from AVX2-only to AMX.
    Elsewhere (no flags to read, e.g. not Linux) the answer is False, which costs speed, never accuracy.
    """
    if not installed() or not cpu_flags() & NATIVE_BF16_FLAGS:
        return False
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def choose(engine: EngineName, precision: Precision, device: str) -> tuple[str, str]:
    """The (engine, precision) that ``engine`` and ``precision`` (either may be ``auto``) mean on ``device``.

    ``auto`` engine: OpenVINO on a CPU when it is installed, onnxruntime otherwise (and for GPUs and the
    float16 files, which are made for GPUs); where this says OpenVINO and the precision is float32 or
    ``auto``, :func:`service.runtime.open_runner` times it against onnxruntime float32 and serves the
    faster. ``auto`` precision: bfloat16 where OpenVINO runs on a CPU with native bf16, else float32.

    Raises:
        ValueError: a combination that cannot run as asked, in one line that says what to change.
    """
    cpu = device == "cpu"
    if engine == "openvino":
        if not cpu:
            raise ValueError(f"engine openvino runs on CPUs only, not {device}: use onnxruntime or auto there")
        if not installed():
            raise ValueError("engine openvino is not installed: pip install 'dclgan-serve[cpu-fast]', or use auto")
        if precision == "float16":
            raise ValueError("engine openvino computes float32 or bfloat16; the float16 files are for GPUs")
    chosen = engine
    if engine == "auto":
        chosen = "openvino" if cpu and installed() and precision != "float16" else "onnxruntime"
    if precision == "auto":
        precision = "bfloat16" if chosen == "openvino" and native_bf16() else "float32"
    if precision == "bfloat16":
        if chosen != "openvino":
            raise ValueError(f"precision bfloat16 needs engine openvino on a CPU (here: {chosen} on {device})")
        if not native_bf16():
            raise ValueError(
                "precision bfloat16: this CPU has no native bf16 (AVX-512 BF16 or AMX) and emulated bf16 is slower "
                "than float32; use float32 or auto"
            )
    return chosen, precision


def psnr_db(test: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of ``test`` against ``reference``, both generator outputs in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((test.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(PSNR_DATA_RANGE**2 / mse)


def probe_input(side: int) -> np.ndarray:
    """A (1, 3, side, side) probe in [-1, 1] that looks like a photo to the network: smooth colour gradients
    and fine texture. Uniform noise would exercise the network outside anything it was trained on."""
    yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    rgb = np.stack([np.sin(3 * xx + yy), xx * yy * 2 - 1, np.cos(4 * yy) * 0.8])
    texture = np.random.default_rng(0).normal(0, 0.1, rgb.shape)
    return np.clip(rgb + texture, -1, 1)[None].astype(np.float32)


def _compile(model: ov.Model, precision: Computed, threads: int) -> ov.CompiledModel:
    """Compile for the CPU with the precision always explicit (the plugin's own default is bf16 where it can)."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {
        hints.inference_precision: getattr(ov.Type, _OV_TYPES[precision]),
        props.inference_num_threads: threads,
        props.num_streams: 1,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.enable_cpu_pinning: False,
    }
    return _core().compile_model(model, "CPU", config)


class OpenVinoRunner:
    """Runs batches through one OpenVINO compiled model and its own infer request (one per worker thread).

    Attributes:
        engine: ``openvino``.
        provider: the OpenVINO device the model really runs on (``CPU``).
        device: the configured device (``cpu``).
        precision: what it computes in: ``float32`` or ``bfloat16``.
        psnr_db: bf16's PSNR against float32 on the probe at start (kept after a fallback); None for float32.
        probe_ms: set where engine ``auto`` chose this runner (see :func:`service.runtime.open_runner`).
    """

    engine = "openvino"
    probe_ms: ProbeTimes | None = None

    def __init__(self, compiled: ov.CompiledModel, *, precision: Computed, psnr_db: float | None = None) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.provider = ",".join(compiled.get_property("EXECUTION_DEVICES"))
        self.device = "cpu"
        self.precision = precision
        self.psnr_db = psnr_db

    @classmethod
    def open(
        cls,
        onnx_path: str | os.PathLike[str],
        *,
        precision: Computed,
        threads: int,
        input_name: str,
        output_name: str,
        probe: np.ndarray,
        psnr_floor_db: float,
    ) -> OpenVinoRunner:
        """Compile ``onnx_path``; a bfloat16 model is verified first against float32 on ``probe``.

        Below ``psnr_floor_db`` the float32 model is served instead, with one warning line: a precision that
        visibly changes this model's images is never served silently.
        """
        model = _core().read_model(str(onnx_path))
        inputs = [name for port in model.inputs for name in port.names]
        outputs = [name for port in model.outputs for name in port.names]
        if input_name not in inputs or output_name not in outputs:
            raise ValueError(
                f"model has inputs {inputs} and outputs {outputs}; expected {input_name!r} -> {output_name!r}"
            )
        compiled = _compile(model, precision, threads)
        if precision == "float32":
            return cls(compiled, precision="float32")
        reduced = cls(compiled, precision=precision)
        reference = cls(_compile(model, "float32", threads), precision="float32")
        psnr = psnr_db(reduced.run(probe), reference.run(probe))
        if psnr < psnr_floor_db:
            logger.warning(
                "%s: %s measured %.1f dB PSNR against float32 on the probe image, below the %.1f dB floor: "
                "serving float32",
                Path(onnx_path).name,
                precision,
                psnr,
                psnr_floor_db,
            )
            reference.psnr_db = psnr
            return reference
        reduced.psnr_db = psnr
        logger.info("%s: %s at %.1f dB PSNR against float32 on the probe image", Path(onnx_path).name, precision, psnr)
        return reduced

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 in [-1, 1] -> the same shape (see :func:`service.runtime.checked_batch`)."""
        batch = checked_batch(batch)
        # share_inputs: the caller's array is read in place; outputs are copied (the request reuses its buffer).
        out = self.request.infer({0: batch}, share_inputs=True)[0]
        n, _, height, width = batch.shape
        if n * height * width > SHRINK_ABOVE_PIXELS:
            # As onnxruntime's arena shrinkage: without it one large image keeps its activations for good
            # (about 300 MB more after one 1024 x 1024 image of the bundled model; freed by this call).
            self.compiled.release_memory()
        return checked_output(out, batch)
