"""Provider choice and verification, OnnxRunner and Engine batching, on the tiny exported model."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from service_fakes import RecordingRunner

from service import runtime
from service.repository import LoadedModel, ModelRepositoryError, load_model_dir
from service.runtime import (
    CPU,
    CPU_RUNS,
    CUDA,
    CpuRuns,
    Engine,
    OnnxRunner,
    ProviderUnavailable,
    RunnerConfig,
    WidthAdaptiveRunner,
    choose_providers,
    create_session,
    default_threads,
    open_runner,
    parse_device,
    session_options,
    threads_per_session,
)
from tests.requires import require_module


@pytest.fixture(scope="module")
def tiny_model(tiny_repo: Path) -> LoadedModel:
    return load_model_dir(tiny_repo / "tiny")


@pytest.fixture(scope="module")
def cuda_usable(tiny_model: LoadedModel) -> bool:
    """Whether this machine really gives a session the CUDA provider (false on the CPU-only CI)."""
    return create_session(tiny_model.path("a2b"), device="cuda").get_providers()[0] == CUDA


# --- providers and sessions ---------------------------------------------------------------------


@pytest.mark.parametrize(("device", "expected"), [("cpu", None), ("cuda", 0), ("cuda:0", 0), ("cuda:3", 3)])
def test_parse_device(device: str, expected: int | None) -> None:
    assert parse_device(device) == expected


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "cpu:0", ""])
def test_parse_device_rejects_unknown(device: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        parse_device(device)


def test_choose_providers() -> None:
    assert choose_providers("cpu") == [CPU]
    assert choose_providers("cuda:2", conv_algo_search="HEURISTIC") == [
        (CUDA, {"device_id": 2, "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}),
        CPU,
    ]
    assert choose_providers("cuda")[0][1]["cudnn_conv_algo_search"] == "HEURISTIC"  # type: ignore[index]


def test_session_options_are_explicit() -> None:
    options = session_options(3)
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options(None).intra_op_num_threads == default_threads() >= 1


def test_cpu_sessions_share_the_usable_cores_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two directions on 2 cores get one thread each, not two each (docs/reliability.md, "CPU threads")."""
    monkeypatch.setattr(runtime, "default_threads", lambda: 8)
    assert [threads_per_session(n) for n in (0, 1, 2, 3, 8, 16)] == [8, 8, 4, 2, 1, 1]


def test_cpu_session(tiny_model: LoadedModel) -> None:
    session = create_session(tiny_model.path("a2b"), device="cpu", intra_op_threads=1)
    assert session.get_providers() == [CPU]


def test_require_gpu_without_cuda_raises_a_clear_error(tiny_model: LoadedModel, cuda_usable: bool) -> None:
    if cuda_usable:
        pytest.skip("CUDA works on this machine")
    with pytest.raises(ProviderUnavailable) as info:
        create_session(tiny_model.path("a2b"), device="cuda", require_gpu=True)
    message = str(info.value)
    assert "cuda was requested for a2b.onnx" in message
    assert "['CPUExecutionProvider']" in message
    assert f"available providers: {ort.get_available_providers()}" in message
    assert ort.__version__ in message
    assert "dclgan doctor" in message  # where the fix is spelled out


def test_gpu_not_required_falls_back_to_cpu_with_a_warning(
    tiny_model: LoadedModel, cuda_usable: bool, caplog: pytest.LogCaptureFixture
) -> None:
    if cuda_usable:
        pytest.skip("CUDA works on this machine")
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        runner = OnnxRunner.open(tiny_model.path("a2b"), device="cuda:0")
    assert (runner.provider, runner.device) == (CPU, "cuda:0")
    assert "falling back to the CPU" in caplog.text


def test_gpu_session_runs_on_cuda_and_matches_cpu(tiny_model: LoadedModel, cuda_usable: bool) -> None:
    if not cuda_usable:
        pytest.skip("no usable CUDA on this machine")
    gpu = OnnxRunner.open(tiny_model.path("a2b"), device="cuda", require_gpu=True)
    cpu = OnnxRunner.open(tiny_model.path("a2b"), device="cpu")
    assert gpu.provider == CUDA
    batch = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 20)).astype(np.float32)
    np.testing.assert_allclose(gpu.run(batch), cpu.run(batch), atol=1e-3)


# --- OnnxRunner ---------------------------------------------------------------------------------


def test_runner_attributes_and_shapes(tiny_model: LoadedModel) -> None:
    runner = OnnxRunner.open(tiny_model.path("a2b"), intra_op_threads=1)
    assert (runner.provider, runner.device) == (CPU, "cpu")
    assert (runner.input_name, runner.output_name) == ("image", "translated")
    batch = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 12))  # float64 is accepted and converted
    out = runner.run(batch)
    assert out.shape == (2, 3, 8, 12) and out.dtype == np.float32
    assert np.abs(out).max() < 1.0  # tanh output


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 4, 8, 8), (1, 1, 8, 8)])
def test_runner_rejects_bad_batches(tiny_model: LoadedModel, shape: tuple[int, ...]) -> None:
    runner = OnnxRunner.open(tiny_model.path("a2b"), intra_op_threads=1)
    with pytest.raises(ValueError, match=r"expected a \(N, 3, H, W\) batch"):
        runner.run(np.zeros(shape, np.float32))


def test_runner_checks_tensor_names(tiny_model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="expected 'input' -> 'translated'"):
        OnnxRunner.open(tiny_model.path("a2b"), input_name="input", output_name="translated")


class _WrongShapeSession:
    """Stands in for an InferenceSession whose model drops one image of the batch."""

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name="image")]

    def get_outputs(self) -> list[Any]:
        return [SimpleNamespace(name="translated")]

    def get_providers(self) -> list[str]:
        return [CPU]

    def run(
        self, names: list[str], feeds: dict[str, np.ndarray], options: ort.RunOptions | None = None
    ) -> list[np.ndarray]:
        return [feeds["image"][1:]]


def test_runner_checks_the_output_count() -> None:
    runner = OnnxRunner(_WrongShapeSession())  # type: ignore[arg-type]
    with pytest.raises(
        RuntimeError, match=r"returned shape \(1, 3, 8, 8\) for a batch of shape \(2, 3, 8, 8\)"
    ):
        runner.run(np.zeros((2, 3, 8, 8), np.float32))


class _RecordingSession(_WrongShapeSession):
    def __init__(self) -> None:
        self.options: list[ort.RunOptions | None] = []

    def run(
        self, names: list[str], feeds: dict[str, np.ndarray], options: ort.RunOptions | None = None
    ) -> list[np.ndarray]:
        self.options.append(options)
        return [feeds["image"]]


@pytest.mark.parametrize(("device", "arenas"), [("cpu", "cpu:0"), ("cuda:1", "cpu:0;gpu:1")])
def test_only_an_outsized_batch_gives_its_arena_memory_back(device: str, arenas: str) -> None:
    """onnxruntime's arena keeps the largest run's memory for good: a batch over SHRINK_ABOVE_PIXELS runs with
    arena shrinkage, so one 1024x1024 image does not pin 600 MB; ordinary batches keep the arena's speed."""
    session = _RecordingSession()
    runner = OnnxRunner(session, device=device)  # type: ignore[arg-type]
    runner.run(np.zeros((8, 3, 256, 256), np.float32))  # the default batch cap: no shrinkage
    runner.run(np.zeros((1, 3, 1024, 1024), np.float32))
    assert session.options[0] is None
    assert session.options[1].get_run_config_entry("memory.enable_memory_arena_shrinkage") == arenas  # type: ignore[union-attr]


def test_batched_run_equals_single_runs(tiny_model: LoadedModel) -> None:
    runner = OnnxRunner.open(tiny_model.path("b2a"), intra_op_threads=1)
    batch = np.random.default_rng(1).uniform(-1, 1, (3, 3, 16, 12)).astype(np.float32)
    together = runner.run(batch)
    for i in range(3):
        np.testing.assert_allclose(together[i : i + 1], runner.run(batch[i : i + 1]), atol=1e-5)


# --- Engine -------------------------------------------------------------------------------------


def _images(image_factory: Any, sizes: list[tuple[int, int]]) -> list[Image.Image]:
    return [image_factory.image(size, seed=i) for i, size in enumerate(sizes)]


MIXED = [(250, 250), (31, 47), (250, 250), (257, 263), (31, 47), (250, 250), (5, 7)]


def test_engine_batches_by_shape_and_keeps_order(tiny_model: LoadedModel, image_factory: Any) -> None:
    runner = RecordingRunner()
    engine = Engine(tiny_model, {"a2b": runner}, batch_size=2)
    images = _images(image_factory, MIXED)
    outputs = engine.translate(images, "a2b")
    # Identity runner: every output is its own input again, in input order.
    for img, out in zip(images, outputs, strict=True):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    assert runner.shapes == [
        (2, 3, 252, 252),
        (1, 3, 252, 252),
        (2, 3, 48, 32),
        (1, 3, 264, 260),
        (1, 3, 8, 8),
    ]


def test_engine_max_side_runs_smaller(tiny_model: LoadedModel, image_factory: Any) -> None:
    runner = RecordingRunner()
    (out,) = Engine(tiny_model, {"a2b": runner}).translate(
        [image_factory.image((64, 30))], "a2b", max_side=16
    )
    assert runner.shapes == [(1, 3, 8, 16)]
    assert out.size == (64, 30)


def test_batched_engine_equals_one_at_a_time(tiny_model: LoadedModel, image_factory: Any) -> None:
    images = _images(image_factory, MIXED)
    batched = Engine.open(tiny_model, directions=["a2b"], intra_op_threads=1, batch_size=4)
    single = Engine(tiny_model, batched.runners, batch_size=1)
    for img, a, b in zip(
        images, batched.translate(images, "a2b"), single.translate(images, "a2b"), strict=True
    ):
        assert a.size == b.size == img.size
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        # Float noise across batch sizes (~1e-6) can only flip a value that sits on a rounding boundary.
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_engine_directions_are_different_generators(tiny_model: LoadedModel, image_factory: Any) -> None:
    engine = Engine.open(tiny_model, intra_op_threads=1)
    assert sorted(engine.runners) == ["a2b", "b2a"]
    img = image_factory.image((16, 16))
    (a2b,), (b2a,) = engine.translate([img], "a2b"), engine.translate([img], "b2a")
    assert not np.array_equal(np.asarray(a2b), np.asarray(b2a))


def test_engine_direction_errors(tiny_model: LoadedModel, image_factory: Any) -> None:
    engine = Engine(tiny_model, {"a2b": RecordingRunner()})
    images = [image_factory.image((8, 8))]
    with pytest.raises(ModelRepositoryError, match="available: a2b, b2a"):
        engine.translate(images, "c2d")
    with pytest.raises(ValueError, match="'b2a' was not opened; opened: a2b"):
        engine.translate(images, "b2a")
    with pytest.raises(ValueError, match="batch_size"):
        Engine(tiny_model, {}, batch_size=0)
    assert engine.translate([], "a2b") == []


def test_onnxruntime_accepts_the_shrinkage_run_option(tiny_model: LoadedModel) -> None:
    runner = OnnxRunner.open(tiny_model.path("a2b"), intra_op_threads=1)
    big = np.zeros((1, 3, 768, 768), np.float32)  # 589,824 pixels: over SHRINK_ABOVE_PIXELS
    assert runner.run(big).shape == big.shape


# --- CPU sessions sharing the cores: width-adaptive runners ------------------------------------------


class _Recording:
    """A runner that records which of the pair ran, and the process's other runs in progress at that moment."""

    engine, provider, device, precision, psnr_db, probe_ms = "fake", "CPU", "cpu", "float32", None, None

    def __init__(self, name: str, calls: list[tuple[str, int]], runs: CpuRuns) -> None:
        self.name, self.calls, self.runs = name, calls, runs

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append((self.name, self.runs.count))
        return batch


def test_a_run_that_starts_alone_gets_all_cores_and_one_next_to_another_gets_its_share() -> None:
    runs, calls = CpuRuns(), []
    wide, narrow = _Recording("wide", calls, runs), _Recording("narrow", calls, runs)
    adaptive = WidthAdaptiveRunner(wide, narrow, runs)  # type: ignore[arg-type]
    x = np.zeros((1, 3, 8, 8), np.float32)
    adaptive.run(x)
    with runs.running():  # another direction's run in progress
        adaptive.run(x)
    adaptive.run(x)
    assert calls == [("wide", 1), ("narrow", 2), ("wide", 1)]  # each run counts itself while it runs
    assert runs.count == 0
    assert (adaptive.engine, adaptive.provider, adaptive.precision) == ("fake", "CPU", "float32")


def test_a_failed_run_is_not_counted_as_running_forever() -> None:
    runs = CpuRuns()
    with pytest.raises(RuntimeError), runs.running():
        raise RuntimeError("the model failed")
    assert runs.count == 0


def test_every_adaptive_runner_counts_in_the_one_process_wide_count(tiny_model: LoadedModel) -> None:
    if default_threads() < 2:
        pytest.skip("one usable core: there is no wider session to open")
    config = RunnerConfig(engine="onnxruntime", intra_op_threads=1, all_cores_when_alone=True)
    runners = [open_runner(tiny_model, d, config) for d in ("a2b", "b2a")]
    assert all(isinstance(r, WidthAdaptiveRunner) and r.runs is CPU_RUNS for r in runners)


def _threads(runner: Any) -> int:
    if isinstance(runner, OnnxRunner):
        return int(runner.session.get_session_options().intra_op_num_threads)
    return int(runner.compiled.get_property("INFERENCE_NUM_THREADS"))


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_all_cores_when_alone_opens_a_second_session_on_every_core(tiny_model: LoadedModel, engine: str) -> None:
    if engine == "openvino":
        require_module("openvino", "pip install -e '.[cpu-fast]' (make test installs it)")
    if default_threads() < 2:
        pytest.skip("one usable core: there is no wider session to open")
    runner = open_runner(tiny_model, "a2b", RunnerConfig(engine=engine, intra_op_threads=1, all_cores_when_alone=True))  # type: ignore[arg-type]
    assert isinstance(runner, WidthAdaptiveRunner)
    assert (_threads(runner.wide), _threads(runner.narrow)) == (default_threads(), 1)
    assert (runner.engine, runner.provider) == (engine, runner.narrow.provider)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(runner.run(x), runner.narrow.run(x), atol=1e-5)
    # Nothing to adapt: asked not to, or the threads already cover every core.
    plain = [
        RunnerConfig(engine=engine, intra_op_threads=1),  # type: ignore[arg-type]
        RunnerConfig(engine=engine, intra_op_threads=default_threads(), all_cores_when_alone=True),  # type: ignore[arg-type]
        RunnerConfig(engine=engine, all_cores_when_alone=True),  # type: ignore[arg-type]
    ]
    assert not any(isinstance(open_runner(tiny_model, "a2b", c), WidthAdaptiveRunner) for c in plain)


@pytest.mark.parametrize("fell_back", ["wide", "narrow"])
def test_when_one_session_of_a_pair_falls_back_to_float32_both_run_float32(
    monkeypatch: pytest.MonkeyPatch, fell_back: str
) -> None:
    """bf16 verified in one session and refused in the other (its PSNR under the floor): the pair is reopened
    in float32, so the precision /models reports is the one every run computes."""
    opened: list[tuple[str, int | None]] = []

    def open_one(model: Any, direction: str, config: RunnerConfig, threads: int | None) -> Any:
        width = "wide" if threads == 2 else "narrow"
        precision = "float32" if config.precision == "float32" or width == fell_back else "bfloat16"
        opened.append((config.precision, threads))
        return SimpleNamespace(
            provider="CPU", precision=precision, engine="openvino", device="cpu", psnr_db=None, probe_ms=None
        )

    monkeypatch.setattr(runtime, "_open_one", open_one)
    monkeypatch.setattr(runtime, "default_threads", lambda: 2)
    config = RunnerConfig(precision="bfloat16", intra_op_threads=1, all_cores_when_alone=True)
    runner = open_runner(None, "a2b", config)  # type: ignore[arg-type]
    assert isinstance(runner, WidthAdaptiveRunner)
    assert (runner.wide.precision, runner.narrow.precision, runner.precision) == ("float32",) * 3
    kept_bf16_threads = 1 if fell_back == "wide" else 2  # the other session is reopened, once
    assert opened == [("bfloat16", 1), ("bfloat16", 2), ("float32", kept_bf16_threads)]
