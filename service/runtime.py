"""onnxruntime sessions: provider choice and verification, a Runner over one session, and an Engine
that translates PIL images with a model folder's sessions.

onnxruntime-gpu silently runs on the CPU when CUDA cannot be loaded (it logs and carries on), so
:func:`create_session` checks the providers the session really got and, when a GPU is required,
refuses to continue. The service's worker pool gives each worker its own runner; what the CPU runners
share is :data:`CPU_RUNS`, the count a :class:`WidthAdaptiveRunner` picks its session by. Must not import
torch, fastapi or ``training``.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import onnxruntime as ort
from PIL import Image

from service.imaging import from_output, to_input
from service.repository import InputContract, LoadedModel, Variant

if TYPE_CHECKING:
    from service.openvino_runner import OpenVinoRunner

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
ConvAlgoSearch = Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]
ProviderSpec = str | tuple[str, dict[str, Any]]
EngineName = Literal["auto", "onnxruntime", "openvino"]
# float32/float16 name an ONNX file; bfloat16 is OpenVINO computing the float32 file in bf16 (CPUs with native
# bf16 only); auto picks per device (see service.openvino_runner.choose).
Precision = Literal["auto", "float32", "float16", "bfloat16"]
ProbeTimes = dict[str, dict[str, float]]
"""What engine ``auto`` measured: threads per session -> ``engine:precision`` -> median ms on the probe image."""


class ProviderUnavailable(RuntimeError):
    """A GPU was required but the session did not get the CUDA execution provider."""


class Runner(Protocol):
    """What the batching workers call: (N, 3, H, W) float32 in [-1, 1] -> the same shape."""

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def checked_batch(batch: np.ndarray) -> np.ndarray:
    """The Runner contract's input: (N, 3, H, W), as contiguous float32.

    Raises:
        ValueError: a batch that is not (N, 3, H, W).
    """
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a (N, 3, H, W) batch, got shape {batch.shape}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def checked_output(out: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """``out`` if it has ``batch``'s shape: one result per input is what lets the caller hand each result to
    its request.

    Raises:
        RuntimeError: the model returned a different shape.
    """
    if out.shape != batch.shape:
        raise RuntimeError(f"model returned shape {out.shape} for a batch of shape {batch.shape}")
    return out


def file_variant(precision: Precision) -> Variant:
    """The ONNX file a precision reads: bfloat16 (and auto) compute from the float32 file."""
    return "float16" if precision == "float16" else "float32"


def native_side(contract: InputContract) -> int:
    """The square side that warm-up and PSNR probe images use: the training resolution, rounded up to what
    the network accepts."""
    return _accepted_side(contract.native_size, contract)


def served_side(contract: InputContract) -> int:
    """The square side engine ``auto`` times the engines at: the working side where the card names one (what
    requests compute at by default; the bundled model trains at 128 and serves at 256), else the native side."""
    return _accepted_side(contract.working_side or contract.native_size, contract)


def _accepted_side(side: int, contract: InputContract) -> int:
    """``side``, at least the network's minimum, rounded up to its multiple."""
    side = max(side, contract.min_size)
    return -(-side // contract.multiple_of) * contract.multiple_of


def parse_device(device: str) -> int | None:
    """``"cpu"`` -> None; ``"cuda"`` -> 0; ``"cuda:N"`` -> N. Anything else is a ValueError."""
    if device == "cpu":
        return None
    match = re.fullmatch(r"cuda(?::([0-9]+))?", device)
    if match:
        return int(match.group(1) or 0)
    raise ValueError(f"unknown device {device!r}; expected cpu, cuda or cuda:N")


def choose_providers(device: str, *, conv_algo_search: ConvAlgoSearch = "HEURISTIC") -> list[ProviderSpec]:
    """The provider list for ``device``; the CPU provider is always last, as the fallback.

    ``conv_algo_search``: EXHAUSTIVE benchmarks cuDNN algorithms once per input shape (fastest
    steady state, slow first call per shape); HEURISTIC starts faster.
    """
    device_id = parse_device(device)
    if device_id is None:
        return [CPU]
    cuda_options = {
        "device_id": device_id,
        "cudnn_conv_algo_search": conv_algo_search,
        # False lets copies race with compute on another stream; the docs warn against it.
        "do_copy_in_default_stream": True,
    }
    return [(CUDA, cuda_options), CPU]


def default_threads() -> int:
    """CPUs this process may use (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_session(cpu_sessions: int) -> int:
    """The intra-op threads of each of ``cpu_sessions`` CPU sessions that may run at once: the usable cores
    shared out, at least one each (what :class:`WidthAdaptiveRunner` runs while other CPU runs are in
    progress)."""
    return max(1, default_threads() // max(1, cpu_sessions))


class CpuRuns:
    """How many CPU inference runs of this process are in progress, counted by :class:`WidthAdaptiveRunner`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @contextmanager
    def running(self) -> Iterator[int]:
        """Count one run for the ``with`` block; yields how many others were in progress when it started."""
        with self._lock:
            others = self._count
            self._count += 1
        try:
            yield others
        finally:
            with self._lock:
                self._count -= 1


CPU_RUNS = CpuRuns()
"""The process's one count: every direction's adaptive runner must see the others' runs."""


def session_options(intra_op_threads: int | None) -> ort.SessionOptions:
    """Explicit threading: ``intra_op_threads`` (None: all usable CPUs), one inter-op thread (the
    generator is a single chain of ops) and no spin-waiting, which on a small machine burns the
    cores the other worker threads need and roughly halves throughput."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = default_threads() if intra_op_threads is None else intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _cuda_build() -> str:
    from onnxruntime.capi import build_and_package_info as info

    cuda = getattr(info, "cuda_version", None)
    built_for = f", built for CUDA {cuda}" if cuda else ""
    return f"{getattr(info, 'package_name', 'onnxruntime')} {ort.__version__}{built_for}"


def _telemetry_off() -> None:
    """onnxruntime sends usage events (ETW on Windows) unless told not to; a server has no business doing so."""
    ort.disable_telemetry_events()


def create_session(
    onnx_path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    intra_op_threads: int | None = None,
    require_gpu: bool = False,
    conv_algo_search: ConvAlgoSearch = "HEURISTIC",
) -> ort.InferenceSession:
    """An InferenceSession on ``device``, verified to run where it was asked to.

    Raises:
        ProviderUnavailable: ``device`` is a GPU, ``require_gpu`` is true and the session did not get
            CUDA as its first provider. Without ``require_gpu`` a warning is logged and the CPU is used.
    """
    _telemetry_off()
    providers = choose_providers(device, conv_algo_search=conv_algo_search)
    wants_gpu = providers[0] != CPU
    if wants_gpu and hasattr(ort, "preload_dlls"):
        # Loads CUDA/cuDNN from the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]): no LD_LIBRARY_PATH needed.
        ort.preload_dlls()
    session = ort.InferenceSession(str(onnx_path), session_options(intra_op_threads), providers=providers)
    got = session.get_providers()
    if wants_gpu and got[0] != CUDA:
        message = (
            f"{device} was requested for {Path(onnx_path).name} but the session got {got}: CUDA is not "
            f"usable ({_cuda_build()}; available providers: {ort.get_available_providers()}; see the "
            "onnxruntime log above for the library that failed to load). Run `dclgan doctor` for what is "
            "missing and the command that installs it"
        )
        if require_gpu:
            raise ProviderUnavailable(message)
        logger.warning("%s; falling back to the CPU", message)
    logger.info("session for %s on %s (providers %s)", Path(onnx_path).name, device, got)
    return session


# A batch over this many pixels (N x H x W; more than the default batch cap, so only a large image alone)
# gives its activation memory back after the run: onnxruntime's arena otherwise keeps the largest run's
# memory for good (about 620 MB after one 1024x1024 image of the bundled model, 134 MB with the shrinkage,
# at no measurable cost to that run; docs/reliability.md).
SHRINK_ABOVE_PIXELS = 512 * 1024


class OnnxRunner:
    """Runs batches through one onnxruntime session.

    Attributes:
        engine: ``onnxruntime``.
        provider: the execution provider the session really uses (e.g. CPUExecutionProvider).
        device: the device that was asked for.
        precision: the ONNX file it runs (float32 or float16).
        psnr_db: None: the file runs as exported, nothing is verified at start.
        probe_ms: where engine ``auto`` chose between engines, their times on the probe (:func:`open_runner`).
        input_name, output_name: the graph's tensor names.
    """

    engine = "onnxruntime"
    psnr_db: float | None = None
    probe_ms: ProbeTimes | None = None

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        device: str = "cpu",
        input_name: str | None = None,
        output_name: str | None = None,
        precision: Variant = "float32",
    ) -> None:
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        self.input_name = input_name or inputs[0]
        self.output_name = output_name or outputs[0]
        if self.input_name not in inputs or self.output_name not in outputs:
            raise ValueError(
                f"model has inputs {inputs} and outputs {outputs}; "
                f"expected {self.input_name!r} -> {self.output_name!r}"
            )
        self.session = session
        self.device = device
        self.precision = precision
        self.provider = session.get_providers()[0]
        device_id = parse_device(device)
        self.shrink_options = ort.RunOptions()
        self.shrink_options.add_run_config_entry(
            "memory.enable_memory_arena_shrinkage", "cpu:0" if device_id is None else f"cpu:0;gpu:{device_id}"
        )

    @classmethod
    def open(
        cls,
        onnx_path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        intra_op_threads: int | None = None,
        require_gpu: bool = False,
        conv_algo_search: ConvAlgoSearch = "HEURISTIC",
        input_name: str | None = None,
        output_name: str | None = None,
        precision: Variant = "float32",
    ) -> OnnxRunner:
        """Create the session (see :func:`create_session`) and wrap it; ``precision`` names the file's variant."""
        session = create_session(
            onnx_path,
            device=device,
            intra_op_threads=intra_op_threads,
            require_gpu=require_gpu,
            conv_algo_search=conv_algo_search,
        )
        return cls(session, device=device, input_name=input_name, output_name=output_name, precision=precision)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 in [-1, 1] -> (N, 3, H, W) float32 in (-1, 1).

        Raises:
            ValueError: a batch that is not (N, 3, H, W) (:func:`checked_batch`).
            RuntimeError: the model returned a different shape (:func:`checked_output`).
        """
        batch = checked_batch(batch)
        n, _, height, width = batch.shape
        options = self.shrink_options if n * height * width > SHRINK_ABOVE_PIXELS else None
        out: np.ndarray = self.session.run([self.output_name], {self.input_name: batch}, options)[0]
        return checked_output(out, batch)


@dataclass(frozen=True)
class RunnerConfig:
    """How every caller opens runners (the service, ``dclgan translate``, ``dclgan evaluate``, ``bench/``):
    one device grammar (:func:`parse_device`) and one set of defaults.

    Attributes:
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        engine: ``onnxruntime``, ``openvino`` (CPUs) or ``auto`` (see :func:`service.openvino_runner.choose`).
        precision: float32 or float16 (which ONNX file), bfloat16 (OpenVINO on a CPU with native bf16) or auto.
        psnr_floor_db: a reduced precision below this PSNR against float32 on a probe image falls back to float32.
        intra_op_threads: CPU threads per session; ``None`` for all usable cores.
        all_cores_when_alone: on a CPU where ``intra_op_threads`` is fewer than the usable cores, also open a
            session on all of them for the runs that start while no other CPU run of the process is in
            progress (:class:`WidthAdaptiveRunner`). The service sets it unless the threads were configured.
        require_gpu: a GPU device that onnxruntime cannot use is an error (``ProviderUnavailable``), not a
            silent CPU run; ``False`` allows the fallback, with a warning.
        conv_algo_search: cuDNN's algorithm choice. HEURISTIC picks at once; EXHAUSTIVE benchmarks every
            new input shape on first use, which for images of any size means on the request path.
    """

    device: str = "cpu"
    engine: EngineName = "auto"
    precision: Precision = "float32"
    psnr_floor_db: float = 40.0
    intra_op_threads: int | None = None
    all_cores_when_alone: bool = False
    require_gpu: bool = True
    conv_algo_search: ConvAlgoSearch = "HEURISTIC"

    def __post_init__(self) -> None:
        parse_device(self.device)  # ValueError now, not at the first session


def open_runner(
    model: LoadedModel, direction: str, config: RunnerConfig
) -> OnnxRunner | OpenVinoRunner | WidthAdaptiveRunner:
    """The one runner factory: a verified session for ``direction`` of ``model``, as ``config`` says (two
    of them behind a :class:`WidthAdaptiveRunner` for ``all_cores_when_alone`` on a CPU). Engine ``auto``
    is measured first (:func:`_open_measured`).

    Raises:
        ValueError: an engine and precision that cannot run on the device (see ``choose``).
    """
    cores = default_threads()
    widths = [config.intra_op_threads]
    if config.all_cores_when_alone and (config.intra_op_threads or cores) < cores:
        widths.append(cores)
    measured, config = _open_measured(model, direction, config, widths)
    if measured is not None:  # one engine and precision at every width (bf16 only where each passed)
        return measured[0] if len(measured) == 1 else WidthAdaptiveRunner(measured[1], measured[0])
    narrow = _open_one(model, direction, config, config.intra_op_threads)
    on_cpu = narrow.provider in (CPU, "CPU")  # onnxruntime's and OpenVINO's names (a GPU fallback included)
    if len(widths) == 1 or not on_cpu:
        return narrow
    wide = _open_one(model, direction, config, cores)
    if wide.precision != narrow.precision:
        # A reduced precision passed its PSNR check in one session and fell back in the other: both run
        # float32, so that what /models and the metrics report is what every run computes.
        exact = replace(config, precision="float32")
        if wide.precision != "float32":
            wide = _open_one(model, direction, exact, cores)
        if narrow.precision != "float32":
            narrow = _open_one(model, direction, exact, config.intra_op_threads)
    return WidthAdaptiveRunner(wide, narrow)


# (model, version, file size, probe side, threads per session, precision asked for) -> what was measured.
# Speed depends on the network, not on its weights, and the directions of one version are one generator
# configuration exported twice (same graph, same file size): they, their instances and reloads of the version
# share one measurement, which at the served side costs seconds. Whether bf16 may serve depends on the weights,
# so that is decided for each direction (:func:`_open_measured`).
_TIMINGS: dict[tuple[str, str, int, int, tuple[int, ...], str], ProbeTimes] = {}
_TIMINGS_LOCK = threading.Lock()


def time_on_probe(
    runners: Mapping[str, Runner],
    probe: np.ndarray,
    *,
    min_rounds: int = 2,
    max_rounds: int = 15,
    min_total_ms: float = 200.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Each runner's median time (ms) on ``probe``, over runs taken in turn. The runners must have run once
    already (a first run pays for lazy set-up). Taking turns makes a noisy machine slow each runner alike.

    Rounds go on until every runner has run ``min_rounds`` times and for ``min_total_ms`` in all, or
    ``max_rounds``: short runs are the noisier, so they get more of them.
    """
    times: dict[str, list[float]] = {name: [] for name in runners}
    for done in range(1, max_rounds + 1):
        for name, runner in runners.items():
            start = clock()
            runner.run(probe)
            times[name].append((clock() - start) * 1000)
        if done >= min_rounds and min(sum(ms) for ms in times.values()) >= min_total_ms:
            break
    return {name: statistics.median(ms) for name, ms in times.items()}


def least_slowdown(probe_ms: ProbeTimes) -> str:
    """The candidate whose worst ratio to the fastest, over the thread counts measured, is the smallest.

    One engine serves both sessions of a width-adaptive pair, so where the engines' order differs between
    the shared-out and the all-core session, neither is the faster at both: this keeps the loss at either
    as small as it can be. Where one is the faster at every width, it is the one. Ties go to the first.
    """
    candidates = list(next(iter(probe_ms.values())))
    return min(candidates, key=lambda c: max(ms[c] / max(min(ms.values()), 1e-9) for ms in probe_ms.values()))


def _open_measured(
    model: LoadedModel, direction: str, config: RunnerConfig, widths: Sequence[int | None]
) -> tuple[list[OnnxRunner | OpenVinoRunner] | None, RunnerConfig]:
    """For engine ``auto`` on a CPU with OpenVINO installed (see ``choose``): one runner per thread count in
    ``widths``, of the engine and precision measured to be the faster, and ``config`` naming them. Else
    (nothing to choose from) None and ``config`` as it was.

    A measurement, not an assumption: OpenVINO (in bf16 where ``auto`` precision chose it, and then in
    float32 too) and onnxruntime float32 are each opened at every width and timed on the probe image, and
    :func:`least_slowdown` picks; an engine that cannot open or run the model here (OpenVINO's kernels on
    some CPUs) is left out, with a warning. bf16 serves only where every session of this direction passes
    its PSNR check; where one does not, the next pick serves. Why measure: OpenVINO was the faster on every
    CPU measured (docs/benchmarks.md), but not every CPU this may run on was measured (AVX2-only x86, ARM),
    its lead over onnxruntime shrinks with fewer threads, and with its kernels capped below AVX2 it could
    not run the generator at all. A named engine or precision (``bfloat16``: only OpenVINO computes it) is
    served as it is.
    """
    from service.openvino_runner import choose

    if config.engine != "auto" or config.precision not in ("auto", "float32"):
        return None, config
    if choose(config.engine, config.precision, config.device)[0] != "openvino":
        return None, config
    side = served_side(model.card.input)
    threads = tuple(w or default_threads() for w in widths)
    size = model.path(direction, "float32").stat().st_size
    key = (model.name, model.version, size, side, threads, config.precision)
    opened: dict[str, list[OnnxRunner | OpenVinoRunner]] = {}
    with _TIMINGS_LOCK:
        probe_ms = _TIMINGS.get(key)
        if probe_ms is None:
            measured = _measure(model, direction, config, widths, side)
            if measured is None:
                return None, config
            probe_ms, opened = measured
            _TIMINGS[key] = probe_ms
    candidates = {w: dict(ms) for w, ms in probe_ms.items()}
    while next(iter(candidates.values())):
        served = least_slowdown(candidates)
        engine, _, precision = served.partition(":")
        resolved = replace(config, engine=engine, precision=precision)  # type: ignore[arg-type]
        runners = opened.get(served) or [_open_one(model, direction, resolved, w) for w in widths]
        if precision != "bfloat16" or all(_bf16_passed(r, config) for r in runners):
            break
        worst = min(r.psnr_db or 0.0 for r in runners)
        logger.info("%s %s: engine auto: bfloat16 at %.1f dB PSNR on the probe image, below the %.1f dB floor: "
                    "not served", model.name, direction, worst, config.psnr_floor_db)  # fmt: skip
        for times in candidates.values():
            del times[served]
    else:
        return None, config  # only bf16 could run, and its PSNR is too low: opened as asked, it falls back
    logger.info(
        "%s %s: engine auto serves %s, measured on the probe image (%s)",
        model.name,
        direction,
        served,
        "; ".join(
            f"{w} thread{'s' * (w != '1')}: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in times.items())
            for w, times in probe_ms.items()
        ),
    )
    for runner in runners:
        runner.probe_ms = probe_ms
    return runners, resolved


def _bf16_passed(runner: OnnxRunner | OpenVinoRunner, config: RunnerConfig) -> bool:
    """The runner computes in bf16 at or above ``config``'s PSNR floor (the measurement opens bf16 with no
    floor, so that what it times is bf16; a session opened with the floor has fallen back when below it)."""
    return runner.precision == "bfloat16" and runner.psnr_db is not None and runner.psnr_db >= config.psnr_floor_db


def _measure(
    model: LoadedModel, direction: str, config: RunnerConfig, widths: Sequence[int | None], side: int
) -> tuple[ProbeTimes, dict[str, list[OnnxRunner | OpenVinoRunner]]] | None:
    """Open every candidate at every width, time them on the probe image; the times and the runners.

    A candidate that fails to open or to run the probe is left out, with one warning. If none is left, or
    the timing itself fails, None: the caller opens the model as before, and a model that cannot run at its
    own size on any engine fails at warm-up as it always did (a measurement must not change how it fails).
    """
    from service.openvino_runner import choose, probe_input

    probe = probe_input(side)
    # No PSNR floor here: what is timed as bf16 must be bf16 (the floor is applied per direction after).
    tried = [replace(config, engine="openvino", psnr_floor_db=0.0)]
    if choose("openvino", config.precision, config.device)[1] == "bfloat16":
        tried.append(replace(config, engine="openvino", precision="float32"))
    tried.append(replace(config, engine="onnxruntime", precision="float32"))
    opened: dict[str, list[OnnxRunner | OpenVinoRunner]] = {}
    failures: dict[str, str] = {}
    for candidate in tried:
        name = ":".join(choose(candidate.engine, candidate.precision, candidate.device))
        try:
            runners = [_open_one(model, direction, candidate, w) for w in widths]
            for runner in runners:
                runner.run(probe)  # it runs here, and the run that sets it up is not timed
        except Exception as e:  # OpenVINO's kernels may not run this model on this CPU (docs/benchmarks.md)
            failures[name] = _last_line(e)
            continue
        opened[name] = runners
    probe_ms: ProbeTimes = {}
    if opened:
        try:
            probe_ms = {
                str(w or default_threads()): time_on_probe({n: r[i] for n, r in opened.items()}, probe)
                for i, w in enumerate(widths)
            }
        except Exception as e:
            failures["timing"] = _last_line(e)
    outcome = "left out" if probe_ms else "serving what was asked, unmeasured"
    for name, reason in failures.items():
        logger.warning("%s %s: engine auto: %s failed on the probe image (%s): %s", model.name, direction, name,
                       reason, outcome)  # fmt: skip
    return (probe_ms, opened) if probe_ms else None


def _last_line(error: Exception) -> str:
    """An engine error's last line, which says what failed (OpenVINO's first lines name its source files)."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def _open_one(
    model: LoadedModel, direction: str, config: RunnerConfig, threads: int | None
) -> OnnxRunner | OpenVinoRunner:
    from service.openvino_runner import OpenVinoRunner, choose, probe_input

    engine, precision = choose(config.engine, config.precision, config.device)
    contract = model.card.input
    if engine == "openvino":
        return OpenVinoRunner.open(
            model.path(direction, "float32"),
            precision=precision,
            threads=threads or default_threads(),
            input_name=contract.input_name,
            output_name=contract.output_name,
            probe=probe_input(native_side(contract)),
            psnr_floor_db=config.psnr_floor_db,
        )
    return OnnxRunner.open(
        model.path(direction, precision),
        precision=precision,
        device=config.device,
        intra_op_threads=threads,
        require_gpu=config.require_gpu,
        conv_algo_search=config.conv_algo_search,
        input_name=contract.input_name,
        output_name=contract.output_name,
    )


class WidthAdaptiveRunner:
    """Two CPU runners over one file: ``wide`` (all the cores) for a run that starts while no other CPU run of
    the process is in progress, ``narrow`` (the cores shared out) for one that starts next to others.

    Why: a CPU session's threads are fixed when it is opened. Measured with the bundled model at 256 x 256 on 2
    cores (docs/benchmarks.md, "CPU sessions sharing the cores"): one direction alone on the shared-out single
    thread ran at 0.67x (onnxruntime) and 0.56x (OpenVINO) of the speed of all cores; two directions together
    ran at 0.84x and 0.99x of the shared-out throughput when all-core sessions took turns through a lock, and
    0.91x and 0.96x when they oversubscribed the cores. Choosing per run gets both: 1.00x and 1.05x of all
    cores alone, 1.04x and 0.98x of shared out together. The price: a second session's weights and memory,
    and a brief oversubscription when a run starts next to a wide one.

    Attributes:
        wide, narrow: the two runners; the attributes below are ``wide``'s (both run the same file and
            precision; a reduced precision is verified for each).
        runs: the process-wide count of CPU runs in progress (:data:`CPU_RUNS`).
    """

    def __init__(
        self, wide: OnnxRunner | OpenVinoRunner, narrow: OnnxRunner | OpenVinoRunner, runs: CpuRuns = CPU_RUNS
    ) -> None:
        self.wide, self.narrow, self.runs = wide, narrow, runs
        self.engine = wide.engine
        self.provider = wide.provider
        self.device = wide.device
        self.precision: str = wide.precision
        self.psnr_db = wide.psnr_db
        self.probe_ms = narrow.probe_ms

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The wide runner's result when no other CPU run is in progress, else the narrow one's."""
        with self.runs.running() as others:
            return (self.narrow if others else self.wide).run(batch)


class Engine:
    """One model folder, one runner per direction: translate lists of PIL images.

    ``translate`` is what ``dclgan translate`` uses; the service reuses :mod:`service.imaging` and
    :class:`OnnxRunner` with its own batcher instead.
    """

    def __init__(self, model: LoadedModel, runners: Mapping[str, Runner], *, batch_size: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.runners = dict(runners)
        self.batch_size = batch_size

    @classmethod
    def open(
        cls, model: LoadedModel, *, directions: Sequence[str] | None = None, batch_size: int = 4, **runner: Any
    ) -> Engine:
        """Open a runner (:func:`open_runner`) for each of ``directions`` (default: all) of a loaded model
        (see :func:`service.repository.load_model_dir`); ``runner`` holds :class:`RunnerConfig`'s fields."""
        config = RunnerConfig(**runner)
        names = directions if directions is not None else model.card.direction_names
        return cls(model, {name: open_runner(model, name, config) for name in names}, batch_size=batch_size)

    def translate(
        self, images: Sequence[Image.Image], direction: str, *, max_side: int | None = None
    ) -> list[Image.Image]:
        """Translate RGB images; each output has its input's size and the order is kept."""
        results = dict(self.translate_iter(images, direction, max_side=max_side))
        return [results[i] for i in range(len(images))]

    def translate_iter(
        self, images: Sequence[Image.Image], direction: str, *, max_side: int | None = None
    ) -> Iterator[tuple[int, Image.Image]]:
        """Like :meth:`translate`, but yields ``(index, output)`` as each batch finishes (for progress).

        Images whose padded shapes are equal run together, in batches of at most ``batch_size``;
        results therefore come grouped by shape, not in input order.
        """
        self.model.card.direction(direction)  # a clear error for an unknown direction
        if direction not in self.runners:
            raise ValueError(f"direction {direction!r} was not opened; opened: {', '.join(self.runners)}")
        runner = self.runners[direction]
        contract = self.model.card.input
        if max_side is None:
            max_side = contract.working_side
        prepared = [
            to_input(img, max_side=max_side, multiple_of=contract.multiple_of, min_size=contract.min_size)
            for img in images
        ]
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, item in enumerate(prepared):
            by_shape[item.array.shape].append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                out = runner.run(np.stack([prepared[i].array for i in chunk]))
                for i, array in zip(chunk, out, strict=True):
                    yield i, from_output(array, prepared[i])
