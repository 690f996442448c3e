"""The OpenVINO engine: parity with onnxruntime, bf16 where the CPU has it, the PSNR fallback, the engine and
precision choice, thread settings, and the service, ``dclgan translate`` and config refusals that use them.

The bf16 cases need a CPU with native bf16 (AVX-512 BF16 or AMX) and skip elsewhere with the reason; a
missing ``openvino`` package fails under CI (``make test`` installs the ``cpu-fast`` extra) and skips
elsewhere.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from service_fakes import running_app, sample

from service import openvino_runner, runtime
from service.config import Settings
from service.imaging import decode_image
from service.openvino_runner import OpenVinoRunner, choose, cpu_flags, native_bf16, probe_input, psnr_db
from service.repository import LoadedModel, load_model_dir
from service.runtime import (
    SHRINK_ABOVE_PIXELS,
    OnnxRunner,
    RunnerConfig,
    WidthAdaptiveRunner,
    default_threads,
    least_slowdown,
    native_side,
    open_runner,
    served_side,
    threads_per_session,
    time_on_probe,
)
from service.translate import main as translate_main
from tests.requires import require_module

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.anyio
SHAPES = [(1, 16, 16), (3, 16, 16), (1, 24, 40), (2, 8, 12)]  # (N, H, W): dynamic batch, height and width


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ov_installed() -> Any:
    """The ``openvino`` module."""
    return require_module("openvino", "pip install -e '.[cpu-fast]' (make test installs it)")


@pytest.fixture
def bf16_cpu(ov_installed: Any) -> Any:
    """The ``openvino`` module, on a CPU with native bf16 (else the test skips, saying why)."""
    if not native_bf16():
        pytest.skip(f"this CPU has no native bf16 (flags: none of {sorted(openvino_runner.NATIVE_BF16_FLAGS)})")
    return ov_installed


@pytest.fixture(scope="module")
def tiny_model(tiny_repo: Path) -> LoadedModel:
    return load_model_dir(tiny_repo / "tiny")


def _batch(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    n, h, w = shape
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, h, w)).astype(np.float32)


def _open(model: LoadedModel, **config: Any) -> Any:
    return open_runner(model, "a2b", RunnerConfig(intra_op_threads=1, **config))


# --- the runner --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_onnxruntime(tiny_model: LoadedModel, ov_installed: Any, shape: tuple[int, int, int]) -> None:
    ov = _open(tiny_model, engine="openvino", precision="float32")
    ort = _open(tiny_model, engine="onnxruntime", precision="float32")
    assert (ov.engine, ov.precision, ov.provider, ov.psnr_db) == ("openvino", "float32", "CPU", None)
    x = _batch(shape)
    np.testing.assert_allclose(ov.run(x), ort.run(x), atol=1e-4, rtol=0)


def test_float32_is_asked_for_explicitly(tiny_model: LoadedModel, ov_installed: Any) -> None:
    """OpenVINO computes bf16 by default where the CPU has it: float32 must be in the compiled model."""
    runner = _open(tiny_model, engine="openvino", precision="float32")
    assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov_installed.Type.f32


def test_runner_rejects_bad_batches(tiny_model: LoadedModel, ov_installed: Any) -> None:
    runner = _open(tiny_model, engine="openvino")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        runner.run(np.zeros((3, 16, 16), np.float32))


def test_runner_checks_tensor_names(tiny_model: LoadedModel, ov_installed: Any) -> None:
    with pytest.raises(ValueError, match="expected 'nope'"):
        OpenVinoRunner.open(
            tiny_model.path("a2b"),
            precision="float32",
            threads=1,
            input_name="nope",
            output_name="translated",
            probe=probe_input(16),
            psnr_floor_db=40,
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_are_explicit_and_unpinned(tiny_model: LoadedModel, ov_installed: Any, threads: int) -> None:
    """The same budget as onnxruntime's sessions: an explicit count, one stream, no pinning."""
    compiled = open_runner(tiny_model, "a2b", RunnerConfig(engine="openvino", intra_op_threads=threads)).compiled
    assert compiled.get_property("INFERENCE_NUM_THREADS") == threads
    assert compiled.get_property("NUM_STREAMS") == 1
    assert compiled.get_property("ENABLE_CPU_PINNING") is False
    assert str(compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"


def test_threads_default_to_the_usable_cores(tiny_model: LoadedModel, ov_installed: Any) -> None:
    compiled = open_runner(tiny_model, "a2b", RunnerConfig(engine="openvino")).compiled
    assert compiled.get_property("INFERENCE_NUM_THREADS") == default_threads()


# --- bf16 and the PSNR probe -------------------------------------------------------------------------


def test_bfloat16_computes_in_bf16_within_the_floor(tiny_model: LoadedModel, bf16_cpu: Any) -> None:
    bf16 = _open(tiny_model, engine="openvino", precision="bfloat16")
    f32 = _open(tiny_model, engine="openvino", precision="float32")
    assert (bf16.engine, bf16.precision) == ("openvino", "bfloat16")
    assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT") == bf16_cpu.Type.bf16
    assert bf16.psnr_db is not None and 40 <= bf16.psnr_db < float("inf")
    x = _batch((2, 16, 24), seed=3)
    diff = np.abs(bf16.run(x) - f32.run(x)).max()
    assert 1e-4 < diff < 0.1  # really computed in bf16 (not float32), and still close


def test_a_precision_below_the_floor_falls_back_to_float32_with_one_line(
    tiny_model: LoadedModel, bf16_cpu: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.openvino_runner"):
        runner = _open(tiny_model, engine="openvino", precision="bfloat16", psnr_floor_db=500)
    assert (runner.engine, runner.precision) == ("openvino", "float32")
    assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == bf16_cpu.Type.f32
    assert runner.psnr_db is not None and runner.psnr_db < 500  # what bf16 measured, kept for /models
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "below the 500.0 dB floor: serving float32" in warnings[0], warnings
    x = _batch((1, 16, 16))
    np.testing.assert_allclose(runner.run(x), _open(tiny_model, engine="onnxruntime").run(x), atol=1e-4, rtol=0)


def test_psnr() -> None:
    ref = np.zeros((1, 3, 4, 4), np.float32)
    assert psnr_db(ref, ref) == float("inf")
    assert psnr_db(ref + 0.02, ref) == pytest.approx(10 * np.log10(4 / 0.02**2))


def test_the_probe_is_a_structured_image_in_range() -> None:
    probe = probe_input(32)
    assert probe.shape == (1, 3, 32, 32) and probe.dtype == np.float32
    assert probe.min() >= -1 and probe.max() <= 1 and probe.std() > 0.2
    np.testing.assert_array_equal(probe, probe_input(32))  # deterministic: the same verdict on every start


# --- choosing the engine and precision ---------------------------------------------------------------


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Pretend OpenVINO is (not) installed and the CPU has (no) native bf16."""

    def set_machine(*, installed: bool, bf16: bool) -> None:
        monkeypatch.setattr(openvino_runner, "installed", lambda: installed)
        monkeypatch.setattr(openvino_runner, "native_bf16", lambda: bf16)

    return set_machine


@pytest.mark.parametrize(
    ("engine", "precision", "device", "installed", "bf16", "expected"),
    [
        ("auto", "float32", "cpu", True, True, ("openvino", "float32")),
        ("auto", "float32", "cpu", False, False, ("onnxruntime", "float32")),
        ("auto", "auto", "cpu", True, True, ("openvino", "bfloat16")),
        ("auto", "auto", "cpu", True, False, ("openvino", "float32")),  # an AVX2-only CPU
        ("auto", "auto", "cpu", False, True, ("onnxruntime", "float32")),
        ("auto", "auto", "cuda:0", True, True, ("onnxruntime", "float32")),
        ("auto", "float16", "cpu", True, True, ("onnxruntime", "float16")),  # the GPU files stay on onnxruntime
        ("onnxruntime", "auto", "cpu", True, True, ("onnxruntime", "float32")),
        ("openvino", "auto", "cpu", True, True, ("openvino", "bfloat16")),
        ("openvino", "bfloat16", "cpu", True, True, ("openvino", "bfloat16")),
    ],
)
def test_choice(
    machine: Any, engine: str, precision: str, device: str, installed: bool, bf16: bool, expected: Any
) -> None:
    machine(installed=installed, bf16=bf16)
    assert choose(engine, precision, device) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("engine", "precision", "device", "installed", "bf16", "message"),
    [
        ("openvino", "float32", "cuda:0", True, True, "runs on CPUs only"),
        ("openvino", "float32", "cpu", False, True, "not installed"),
        ("openvino", "float16", "cpu", True, True, "float16 files are for GPUs"),
        ("onnxruntime", "bfloat16", "cpu", True, True, "needs engine openvino"),
        ("auto", "bfloat16", "cuda:0", True, True, "needs engine openvino"),
        ("auto", "bfloat16", "cpu", True, False, "no native bf16"),
    ],
)
def test_impossible_choices_are_refused(
    machine: Any, engine: str, precision: str, device: str, installed: bool, bf16: bool, message: str
) -> None:
    machine(installed=installed, bf16=bf16)
    with pytest.raises(ValueError, match=message):
        choose(engine, precision, device)  # type: ignore[arg-type]


def test_native_bf16_follows_the_cpu_flags(ov_installed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert native_bf16() == bool(cpu_flags() & openvino_runner.NATIVE_BF16_FLAGS)
    monkeypatch.setattr(openvino_runner, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    openvino_runner.native_bf16.cache_clear()
    try:
        assert not native_bf16()  # AVX-512 without BF16: OpenVINO would emulate bf16, slower than float32
    finally:
        monkeypatch.undo()
        openvino_runner.native_bf16.cache_clear()


def test_cpu_flags_parse_linux_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


# --- engine auto: measured at start --------------------------------------------------------------------


class _Timed:
    """A runner whose runs cost ``costs_ms`` in turn on a fake clock; it records the order of runs."""

    def __init__(self, name: str, costs_ms: list[float], clock: list[float], order: list[str]) -> None:
        self.name, self.costs_ms, self.clock, self.order = name, iter(costs_ms), clock, order

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.clock[0] += next(self.costs_ms) / 1000
        self.order.append(self.name)
        return batch


def test_time_on_probe_takes_turns_and_reports_medians() -> None:
    clock, order = [0.0], []  # type: ignore[var-annotated]
    runners = {"a": _Timed("a", [10, 30, 9], clock, order), "b": _Timed("b", [4, 5, 40], clock, order)}
    ms = time_on_probe(runners, probe_input(8), max_rounds=3, clock=lambda: clock[0])
    assert ms == pytest.approx({"a": 10.0, "b": 5.0}) and order == ["a", "b"] * 3


def test_time_on_probe_gives_short_runs_more_rounds() -> None:
    clock, order = [0.0], []  # type: ignore[var-annotated]
    runners = {"slow": _Timed("slow", [50] * 20, clock, order), "fast": _Timed("fast", [10] * 20, clock, order)}
    time_on_probe(runners, probe_input(8), min_rounds=3, max_rounds=15, min_total_ms=45, clock=lambda: clock[0])
    assert order.count("fast") == 5  # until the fastest has run 45 ms in all: 5 rounds of 10 ms
    order.clear()
    time_on_probe(runners, probe_input(8), min_rounds=3, max_rounds=4, min_total_ms=1000, clock=lambda: clock[0])
    assert order.count("fast") == 4  # at most max_rounds


def test_engines_are_timed_at_the_side_requests_compute_at(tiny_model: LoadedModel) -> None:
    """The bundled model trains at 128 and serves at 256, where the engines' order can differ."""
    contract = tiny_model.card.input.model_copy(update={"native_size": 126, "multiple_of": 4, "min_size": 8})
    assert (native_side(contract), served_side(contract.model_copy(update={"working_side": None}))) == (128, 128)
    assert served_side(contract.model_copy(update={"working_side": 254})) == 256
    assert served_side(contract.model_copy(update={"native_size": 2, "working_side": None})) == 8  # the minimum


def test_least_slowdown_is_the_faster_where_one_wins_everywhere_else_the_smaller_worst_loss() -> None:
    assert least_slowdown({"1": {"a": 10, "b": 12}, "2": {"a": 6, "b": 9}}) == "a"
    assert least_slowdown({"1": {"a": 10, "b": 11}, "2": {"a": 30, "b": 20}}) == "b"  # a loses 1.5x, b 1.1x
    assert least_slowdown({"1": {"a": 10, "b": 10}}) == "a"  # a tie goes to the first candidate
    assert least_slowdown({"1": {"b": 5}}) == "b"


def _slow_down(monkeypatch: pytest.MonkeyPatch, runner_class: type, seconds: float = 0.03) -> None:
    original = runner_class.run

    def run_slowly(self: Any, batch: np.ndarray) -> np.ndarray:
        time.sleep(seconds)  # ~30x the tiny model's own time
        return original(self, batch)

    monkeypatch.setattr(runner_class, "run", run_slowly)


@pytest.mark.parametrize("slow", ["openvino", "onnxruntime"])
def test_auto_serves_the_engine_that_was_faster_on_the_probe(
    tiny_model: LoadedModel, ov_installed: Any, fresh_engine_timings: Any, monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    """Whichever engine is slower on this CPU is not served, in either session of a width-adaptive pair; it
    was timed at both widths, and once per file: a second instance reuses the measurement."""
    _slow_down(monkeypatch, OpenVinoRunner if slow == "openvino" else OnnxRunner)
    timings: list[str] = []

    def counted(runners: Any, probe: np.ndarray, **kwargs: Any) -> dict[str, float]:
        timings.append("timed")
        assert probe.shape[2:] == (served_side(tiny_model.card.input),) * 2
        return time_on_probe(runners, probe, **kwargs)

    monkeypatch.setattr(runtime, "time_on_probe", counted)
    monkeypatch.setattr(runtime, "default_threads", lambda: 2)
    config = RunnerConfig(engine="auto", precision="float32", intra_op_threads=1, all_cores_when_alone=True)
    first, second = (open_runner(tiny_model, "a2b", config) for _ in range(2))
    fast = "onnxruntime" if slow == "openvino" else "openvino"
    for runner in (first, second):
        assert isinstance(runner, WidthAdaptiveRunner)
        assert (runner.engine, runner.wide.engine, runner.narrow.engine) == (fast, fast, fast)
        assert runner.wide.compiled if fast == "openvino" else runner.wide.session  # a runner, not a copy
        probe_ms = runner.probe_ms
        assert probe_ms is not None and set(probe_ms) == {"1", "2"}  # the shared-out width and all the cores
        for ms in probe_ms.values():
            assert ms[f"{slow}:float32"] > ms[f"{fast}:float32"] + 20
    assert first.probe_ms == second.probe_ms and len(fresh_engine_timings) == 1
    assert timings == ["timed", "timed"]  # one per width, for the first instance only


@pytest.mark.parametrize(
    ("broken", "attribute", "survivor"),
    [("openvino", "_compile", "onnxruntime"), ("openvino", "run", "onnxruntime"), ("onnxruntime", "run", "openvino")],
)
def test_auto_serves_the_engine_that_runs_where_the_other_fails(
    tiny_model: LoadedModel,
    ov_installed: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    broken: str,
    attribute: str,
    survivor: str,
) -> None:
    """As OpenVINO does with its kernels capped below AVX2 (ONEDNN_MAX_CPU_ISA=SSE41, docs/benchmarks.md):
    the model does not compile, or does not run. auto serves the other engine and says why in one warning."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Exception from src/plugins/intel_cpu/src/node.cpp:823:\n[CPU] MVN node bad combination\n")

    owner = openvino_runner if attribute == "_compile" else OpenVinoRunner if broken == "openvino" else OnnxRunner
    monkeypatch.setattr(owner, attribute, fail)
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        runner = open_runner(tiny_model, "a2b", RunnerConfig(engine="auto", intra_op_threads=1))
    assert runner.engine == survivor and runner.probe_ms is not None
    assert list(runner.probe_ms["1"]) == [f"{survivor}:float32"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    reason = "[CPU] MVN node bad combination"
    assert f"{broken}:float32 failed on the probe image ({reason}): left out" in warning


def test_a_failed_timing_serves_what_was_asked_unmeasured(
    tiny_model: LoadedModel, ov_installed: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the machine ran out of memory")

    monkeypatch.setattr(runtime, "time_on_probe", fail)
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        runner = open_runner(tiny_model, "a2b", RunnerConfig(engine="auto", intra_op_threads=1))
    assert (runner.engine, runner.probe_ms) == ("openvino", None)  # as auto chose before it measured
    assert "timing failed on the probe image (the machine ran out of memory): serving what was asked, unmeasured" in (
        caplog.text
    )


def test_a_named_engine_or_bfloat16_is_not_measured(
    tiny_model: LoadedModel, ov_installed: Any, fresh_engine_timings: Any
) -> None:
    for engine in ("openvino", "onnxruntime"):
        runner = open_runner(tiny_model, "a2b", RunnerConfig(engine=engine, intra_op_threads=1))  # type: ignore[arg-type]
        assert (runner.engine, runner.probe_ms) == (engine, None)
    if native_bf16():
        runner = open_runner(tiny_model, "a2b", RunnerConfig(engine="auto", precision="bfloat16", intra_op_threads=1))
        assert (runner.engine, runner.probe_ms) == ("openvino", None)
    assert fresh_engine_timings == {}


def test_the_choice_is_measured_once_per_file_and_setting(
    tiny_model: LoadedModel, ov_installed: Any, fresh_engine_timings: Any
) -> None:
    """Whatever changes what is timed is in the cache key: the network (model, version and file size), the
    thread counts and the precision asked for. The other direction of the same version is the same network:
    it shares the measurement. The PSNR floor is not timing: it is applied to each direction after."""
    base = RunnerConfig(engine="auto", intra_op_threads=1)
    settings = [
        ("a2b", base),
        ("a2b", base),  # the same: no new measurement
        ("b2a", base),  # the same network, other weights
        ("a2b", replace(base, intra_op_threads=2)),
        ("a2b", replace(base, precision="auto")),
        ("a2b", replace(base, psnr_floor_db=30.0)),
    ]
    sizes = []
    for direction, config in settings:
        open_runner(tiny_model, direction, config)
        sizes.append(len(fresh_engine_timings))
    assert sizes == [1, 1, 1, 2, 3, 3]


def test_auto_precision_also_times_openvino_float32(
    tiny_model: LoadedModel, bf16_cpu: Any, fresh_engine_timings: Any
) -> None:
    """bf16 does not pay for every model and size (docs/benchmarks.md: a narrow model at 128 px), so with
    precision auto OpenVINO float32 is a candidate too."""
    runner = open_runner(tiny_model, "a2b", RunnerConfig(engine="auto", precision="auto", intra_op_threads=1))
    assert runner.probe_ms is not None
    timed = runner.probe_ms["1"]
    assert set(timed) == {"openvino:bfloat16", "openvino:float32", "onnxruntime:float32"}
    assert f"{runner.engine}:{runner.precision}" == min(timed, key=timed.__getitem__)


class _FakeEngines:
    """``_open_one`` for fakes: each ``engine:precision`` has a cost per run (ms), and bf16 a PSNR per direction
    and width; a session opened with a floor its bf16 does not reach falls back to float32, as OpenVINO's does."""

    def __init__(self, cost_ms: dict[str, float], psnr_db: dict[tuple[str, int], float]) -> None:
        self.cost_ms, self.psnr_db = cost_ms, psnr_db
        self.opened: list[tuple[str, str, str, int | None]] = []

    def __call__(self, model: Any, direction: str, config: RunnerConfig, threads: int | None) -> Any:
        engine, precision = choose(config.engine, config.precision, config.device)
        psnr = self.psnr_db[(direction, threads or 1)] if precision == "bfloat16" else None
        if psnr is not None and psnr < config.psnr_floor_db:
            precision = "float32"
        self.opened.append((direction, engine, precision, threads))
        cost = self.cost_ms[f"{engine}:{precision}"] / 1000
        return SimpleNamespace(
            engine=engine, precision=precision, provider="CPU", device="cpu", psnr_db=psnr, probe_ms=None,
            run=lambda batch: time.sleep(cost) or batch,
        )  # fmt: skip


@pytest.fixture
def fake_engines(machine: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A bf16 CPU with OpenVINO, 2 cores, and the engines of :class:`_FakeEngines`."""
    machine(installed=True, bf16=True)
    monkeypatch.setattr(runtime, "default_threads", lambda: 2)

    def install(cost_ms: dict[str, float], psnr_db: dict[tuple[str, int], float]) -> _FakeEngines:
        fakes = _FakeEngines(cost_ms, psnr_db)
        monkeypatch.setattr(runtime, "_open_one", fakes)
        return fakes

    return install


COSTS = {"openvino:bfloat16": 2.0, "onnxruntime:float32": 6.0, "openvino:float32": 12.0}  # ORT beats OV f32


@pytest.mark.parametrize("order", [("a2b", "b2a"), ("b2a", "a2b")])
def test_bf16_is_decided_for_each_direction_and_the_next_pick_is_measured(
    tiny_model: LoadedModel, fake_engines: Any, order: tuple[str, str]
) -> None:
    """One measurement per network, but bf16's PSNR is a property of each direction's weights: b2a's is too
    low, so b2a serves the next fastest measured (onnxruntime, not OpenVINO float32), whichever direction
    opens first; a2b keeps bf16."""
    fake_engines(COSTS, {("a2b", 1): 60.0, ("b2a", 1): 30.0})
    config = RunnerConfig(engine="auto", precision="auto", intra_op_threads=1)
    served = {d: open_runner(tiny_model, d, config) for d in order}
    assert (served["a2b"].engine, served["a2b"].precision) == ("openvino", "bfloat16")
    assert (served["b2a"].engine, served["b2a"].precision) == ("onnxruntime", "float32")
    assert served["a2b"].probe_ms == served["b2a"].probe_ms  # one measurement
    assert set(served["a2b"].probe_ms["1"]) == set(COSTS)


def test_bf16_refused_at_one_width_serves_the_next_pick_at_both(tiny_model: LoadedModel, fake_engines: Any) -> None:
    """bf16 passes its PSNR check in the shared-out session and not in the all-core one: the pair does not
    serve bf16, and what it serves instead was measured (onnxruntime, faster here than OpenVINO float32)."""
    fakes = fake_engines(COSTS, {("a2b", 1): 60.0, ("a2b", 2): 30.0})
    config = RunnerConfig(engine="auto", precision="auto", intra_op_threads=1, all_cores_when_alone=True)
    runner = open_runner(tiny_model, "a2b", config)
    assert isinstance(runner, WidthAdaptiveRunner)
    assert [(r.engine, r.precision) for r in (runner.narrow, runner.wide)] == [("onnxruntime", "float32")] * 2
    assert runner.probe_ms is not None and set(runner.probe_ms) == {"1", "2"}
    assert ("a2b", "openvino", "bfloat16", 2) in fakes.opened  # measured as bf16: no floor while timing


def test_only_bf16_running_and_refused_is_opened_as_asked(
    tiny_model: LoadedModel, fake_engines: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fakes = fake_engines(COSTS, {("a2b", 1): 30.0})
    original = fakes.__call__

    def only_bf16(model: Any, direction: str, config: RunnerConfig, threads: int | None) -> Any:
        if choose(config.engine, config.precision, config.device) != ("openvino", "bfloat16"):
            raise RuntimeError("no kernel")
        return original(model, direction, config, threads)

    monkeypatch.setattr(runtime, "_open_one", only_bf16)
    runner = open_runner(tiny_model, "a2b", RunnerConfig(engine="auto", precision="auto", intra_op_threads=1))
    assert (runner.engine, runner.precision, runner.probe_ms) == ("openvino", "float32", None)


# --- configuration, the service and the command line -------------------------------------------------


def test_a_device_the_engine_cannot_serve_stops_the_server_with_one_line_and_status_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCLGAN_")}
    env.update(DCLGAN_ENGINE="openvino", DCLGAN_DEVICES="cuda:0", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "DCLGAN_ENGINE=openvino" in lines[0] and "runs on CPUs only, not cuda:0" in lines[0]


def test_settings_default_to_auto_engine_and_float32() -> None:
    settings = Settings()
    assert (settings.engine, settings.precision, settings.psnr_floor_db) == ("auto", "float32", 40.0)


async def test_the_service_reports_engine_precision_and_psnr(tiny_repo: Path, bf16_cpu: Any) -> None:
    """bf16 on one direction's probe at a floor it cannot reach: every instance falls back, and says so."""
    settings = Settings(models_dir=tiny_repo, engine="openvino", precision="auto", psnr_floor_db=500)
    async with running_app(settings) as (app, client):
        (model,) = (await client.get("/models")).json()["models"]
        metrics = (await client.get("/metrics")).text
        runners = [inst.runner for inst in app.state.service.pool.instances]
    assert model["precision"] == "float32"  # the file served
    for direction in model["directions"]:
        (inst,) = direction["instances"]
        assert (inst["engine"], inst["provider"], inst["precision"]) == ("openvino", "CPU", "float32")
        assert inst["psnr_db"] < 500
        labels = {"version": "1", "provider": "CPU", "engine": "openvino", "precision": "float32"}
        psnr = f"{inst['psnr_db']:.1f}"
        assert sample(metrics, "dclgan_model_info", model="tiny", direction=direction["name"], device="cpu",
                      psnr_db=psnr, **labels) == 1  # fmt: skip
    # Each direction runs on all the usable cores while it runs alone, on its share of them beside another run.
    assert all(isinstance(r, WidthAdaptiveRunner) for r in runners), runners
    wide = {r.wide.compiled.get_property("INFERENCE_NUM_THREADS") for r in runners}
    narrow = {r.narrow.compiled.get_property("INFERENCE_NUM_THREADS") for r in runners}
    assert (wide, narrow) == ({default_threads()}, {threads_per_session(len(runners))})


async def test_the_service_reports_what_engine_auto_measured(
    tiny_repo: Path, ov_installed: Any
) -> None:
    """Engine auto: each instance says both engines' probe times, and serves the faster one."""
    settings = Settings(models_dir=tiny_repo, engine="auto", intra_op_threads=1)
    async with running_app(settings) as (_, client):
        (model,) = (await client.get("/models")).json()["models"]
        metrics = (await client.get("/metrics")).text
    for direction in model["directions"]:
        for inst in direction["instances"]:
            (timed,) = inst["probe_ms"].values()  # one width: the threads are configured
            assert set(timed) == {"openvino:float32", "onnxruntime:float32"}
            assert all(ms > 0 for ms in timed.values())
            assert inst["engine"] == min(timed, key=timed.__getitem__).partition(":")[0]
            labels = {"provider": inst["provider"], "engine": inst["engine"], "precision": "float32", "psnr_db": ""}
            assert sample(metrics, "dclgan_model_info", model="tiny", version="1", direction=direction["name"],
                          device="cpu", **labels) == 1  # fmt: skip


async def test_the_service_serves_bf16_and_translates(tiny_repo: Path, bf16_cpu: Any) -> None:
    settings = Settings(models_dir=tiny_repo, engine="openvino", precision="auto", intra_op_threads=1)
    async with running_app(settings) as (_, client):
        (model,) = (await client.get("/models")).json()["models"]
        response = await client.post("/translate/a2b", content=_png(), headers={"content-type": "image/png"})
    assert response.status_code == 200
    inst = model["directions"][0]["instances"][0]
    assert (inst["engine"], inst["precision"]) == ("openvino", "bfloat16") and inst["psnr_db"] >= 40


def _png() -> bytes:
    from live_server import png

    return png((24, 20))


def test_translate_engines_agree_and_bad_choices_exit_2(
    tiny_repo: Path, ov_installed: Any, image_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = image_factory.write("photo.png", (37, 29))
    tiny = str(tiny_repo / "tiny")
    outputs = {}
    for engine in ("onnxruntime", "openvino"):
        out = tmp_path / engine
        argv = ["--model", tiny, "--direction", "a2b", "--engine", engine, "--threads", "1"]
        assert translate_main([*argv, str(image_factory.folder), str(out)]) == 0
        outputs[engine] = np.asarray(decode_image((out / "photo.png").read_bytes(), max_pixels=10**6), np.int16)
    assert np.abs(outputs["onnxruntime"] - outputs["openvino"]).max() <= 1
    assert not np.array_equal(outputs["openvino"], np.asarray(decode_image(source.read_bytes(), max_pixels=10**6)))
    with caplog.at_level(logging.ERROR):
        argv = ["--model", tiny, "--direction", "a2b", "--engine", "onnxruntime", "--precision", "bfloat16"]
        assert translate_main([*argv, str(image_factory.folder), str(tmp_path / "bad")]) == 2
    assert "precision bfloat16 needs engine openvino" in caplog.text


def test_onnx_runner_says_what_it_runs(tiny_model: LoadedModel) -> None:
    runner = _open(tiny_model, engine="onnxruntime")
    assert isinstance(runner, OnnxRunner)
    assert (runner.engine, runner.precision, runner.psnr_db) == ("onnxruntime", "float32", None)


_RACE = """
import sys, threading
import numpy as np
from service.repository import load_model_dir
from service.runtime import RunnerConfig, open_runner
model = load_model_dir(sys.argv[1])
runners = [open_runner(model, d, RunnerConfig(engine="openvino", intra_op_threads=1)) for d in ("a2b", "b2a")]
x = np.zeros((1, 3, 16, 16), np.float32)
threads = [threading.Thread(target=r.run, args=(x,), daemon=True) for r in runners]
for t in threads:
    t.start()
for t in threads:
    t.join(30)
sys.exit(1 if any(t.is_alive() for t in threads) else 0)
"""


@pytest.mark.parametrize("attempt", range(4))
def test_first_runs_on_two_threads_do_not_deadlock(tiny_repo: Path, ov_installed: Any, attempt: int) -> None:
    """The service's first inferences race on two worker threads in a fresh process; OpenVINO's lazily
    initialised numpy bridge once hung half such processes (see ``_core``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _RACE, str(tiny_repo / "tiny")], cwd=REPO_ROOT, env=env, timeout=60, check=False
    )
    assert done.returncode == 0


_WITHOUT_OPENVINO = """
import sys
sys.modules["openvino"] = None  # as if the cpu-fast extra were not installed
from pydantic import ValidationError
from service.config import Settings
from service.repository import load_model_dir
from service.runtime import RunnerConfig, open_runner
runner = open_runner(load_model_dir(sys.argv[1]), "a2b", RunnerConfig(precision=Settings(precision="auto").precision))
assert (runner.engine, runner.precision) == ("onnxruntime", "float32"), runner
try:
    Settings(engine="openvino")
except ValidationError as exc:
    assert "not installed" in str(exc), exc
else:
    raise AssertionError("engine openvino accepted without openvino")
"""


def test_without_the_extra_auto_serves_onnxruntime_and_openvino_is_refused(tiny_repo: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENVINO, str(tiny_repo / "tiny")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_a_large_batch_gives_its_memory_back(tiny_model: LoadedModel, ov_installed: Any) -> None:
    """Like onnxruntime's arena shrinkage: after a batch over SHRINK_ABOVE_PIXELS the compiled model
    releases its intermediate buffers (the bundled model otherwise keeps ~300 MB after one 1024 x 1024 image)."""
    runner = _open(tiny_model, engine="openvino")
    released = []

    class Spy:
        def release_memory(self) -> None:
            released.append(True)
            compiled.release_memory()

    compiled, runner.compiled = runner.compiled, Spy()
    runner.run(_batch((2, 16, 16)))
    assert released == []
    side = math.isqrt(SHRINK_ABOVE_PIXELS) + 4
    out = runner.run(_batch((1, side, side)))
    assert released == [True] and out.shape == (1, 3, side, side)
