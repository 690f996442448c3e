"""``dclgan doctor``: each probe replaced by a simulated machine, and the report's verdicts and fixes checked;
plus the real probes on this machine and a serving-only install (torch unimportable) in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from training import doctor
from training.cli import COMMANDS
from training.doctor import CPU_PROVIDER, CUDA_PROVIDER, OrtInfo, TorchInfo

GPU_ORT = OrtInfo("onnxruntime-gpu", "1.31.1", "13.0", (CUDA_PROVIDER, CPU_PROVIDER))
CUDA_TORCH = TorchInfo("2.13.0", "13.0", ("NVIDIA H200",), mkldnn_bf16=True)
GPU_WHEELS = f"{sys.executable} -m pip install 'onnxruntime-gpu[cuda,cudnn]==1.31.1'"


@pytest.fixture()
def machine(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A healthy GPU machine; a test edits the dict to break one piece."""
    state = {
        "gpu": True,
        "ort": GPU_ORT,
        "torch": CUDA_TORCH,
        "flags": {"avx2", "avx512f", "avx512_bf16"},
        "missing": set(),  # library names find_library does not find
        "fallback": {},  # provider -> (what the session ran on instead, "" if it failed; the reason)
    }

    def provider(name: str) -> tuple[str, str]:
        return state["fallback"].get(name, (name, ""))

    monkeypatch.setattr(doctor, "gpu_device_present", lambda: state["gpu"])
    monkeypatch.setattr(doctor, "probe_onnxruntime", lambda: state["ort"])
    monkeypatch.setattr(doctor, "probe_torch", lambda: state["torch"])
    monkeypatch.setattr(doctor, "cpu_flags", lambda: state["flags"])
    monkeypatch.setattr(doctor, "find_library", lambda name: None if name in state["missing"] else f"/lib/{name}")
    monkeypatch.setattr(doctor, "probe_provider", provider)
    return state


def check(report: dict, name: str) -> dict:
    (found,) = [c for c in report["checks"] if c["name"] == name]
    return found


def test_a_healthy_gpu_machine_passes(machine: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "fix:" not in out
    assert "everything this machine needs is there" in out


def test_missing_cudnn_names_the_library_and_the_pip_command(machine: dict, capsys) -> None:
    machine["missing"] = {"libcudnn.so.9"}
    machine["fallback"] = {CUDA_PROVIDER: (CPU_PROVIDER, "libcudnn.so.9 could not be loaded")}
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "MISSING libcudnn.so.9: missing (cuDNN 9)" in out
    assert f"fix: {GPU_WHEELS}" in out
    report = doctor.run_checks()
    assert check(report, "libcudnn.so.9")["fix"] == GPU_WHEELS
    assert check(report, CUDA_PROVIDER)["fix"] == GPU_WHEELS
    assert "libcudnn.so.9" in check(report, CUDA_PROVIDER)["detail"]


def test_missing_driver_says_pip_cannot_fix_it(machine: dict) -> None:
    machine["missing"] = {"libcuda.so.1"}
    machine["fallback"] = {CUDA_PROVIDER: (CPU_PROVIDER, "libcuda.so.1 could not be loaded")}
    report = doctor.run_checks()
    assert not report["ok"]
    assert check(report, "libcuda.so.1")["fix"] == doctor.DRIVER_HINT
    assert check(report, CUDA_PROVIDER)["fix"] == f"{doctor.DRIVER_HINT}; then {GPU_WHEELS}"


def test_cpu_onnxruntime_package_is_swapped_for_the_gpu_one(machine: dict) -> None:
    machine["ort"] = OrtInfo("onnxruntime", "1.31.1", None, (CPU_PROVIDER,))
    report = doctor.run_checks()
    cuda = check(report, CUDA_PROVIDER)
    assert not cuda["ok"] and cuda["required"]
    py = sys.executable
    assert cuda["fix"] == f"{py} -m pip uninstall -y onnxruntime && {GPU_WHEELS}"


def test_without_a_gpu_missing_cuda_is_reported_but_not_required(machine: dict) -> None:
    machine["gpu"] = False
    machine["missing"] = {"libcudnn.so.9", "libcuda.so.1"}
    machine["fallback"] = {CUDA_PROVIDER: (CPU_PROVIDER, "libcuda.so.1 could not be loaded")}
    report = doctor.run_checks()
    assert report["ok"]
    assert not check(report, "libcudnn.so.9")["ok"]


def test_a_failing_cpu_provider_is_always_required(machine: dict) -> None:
    machine["gpu"] = False
    machine["fallback"] = {CPU_PROVIDER: ("", "broken install")}
    assert not doctor.run_checks()["ok"]


def test_cpu_without_bf16(machine: dict, capsys) -> None:
    machine["flags"] = {"avx2"}
    machine["torch"] = TorchInfo("2.13.0+cpu", None, (), mkldnn_bf16=False)
    machine["gpu"] = False
    assert doctor.main([]) == 0  # bf16 is a speed-up, not a requirement
    out = capsys.readouterr().out
    assert "no      avx512_bf16: absent" in out
    assert "no      bf16 training: torch's oneDNN reports no bf16 kernels" in out
    assert "--amp bf16 is refused on this CPU" in out
    assert "fix: no software fix: needs a CPU with AVX-512 BF16 or AMX" in out


def test_cpu_torch_build_on_a_gpu_machine(machine: dict) -> None:
    machine["torch"] = TorchInfo("2.13.0+cpu", None, (), mkldnn_bf16=False)
    cuda = check(doctor.run_checks(), "torch CUDA")
    assert not cuda["ok"] and cuda["required"]
    assert "--index-url https://pypi.org/simple" in cuda["fix"] and "torch" in cuda["fix"]


def test_json_output(machine: dict, capsys) -> None:
    machine["missing"] = {"libcublas.so.13"}
    assert doctor.main(["--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["gpu_device"] is True
    assert check(report, "libcublas.so.13")["fix"] == GPU_WHEELS


def test_failure_reason_picks_the_library_from_onnxruntimes_log() -> None:
    log = [
        "\x1b[1;31m2026 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] Failed to load library "
        "libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared object file: No such",
        "[W:onnxruntime] Failed to create CUDAExecutionProvider.",
    ]
    assert doctor._failure_reason(log) == "libcublasLt.so.13 could not be loaded"
    assert doctor._failure_reason(["[E:onnxruntime] out of memory"]) == "[E:onnxruntime] out of memory"


def test_real_probes_on_this_machine() -> None:
    """The CPU provider really runs; CUDA either runs or its fallback comes with a reason."""
    assert doctor.probe_provider(CPU_PROVIDER) == (CPU_PROVIDER, "")
    used, reason = doctor.probe_provider(CUDA_PROVIDER)
    assert used in (CUDA_PROVIDER, CPU_PROVIDER)
    assert (used == CUDA_PROVIDER) == (reason == "")
    if not doctor.gpu_device_present():  # no GPU: the session must have fallen back, and onnxruntime's log says why
        assert used == CPU_PROVIDER and reason and reason != "no reason logged"
    assert doctor.find_library("libc.so.6")


def test_doctor_runs_without_torch() -> None:
    """A serving-only install: torch cannot be imported, and the report says how to install it."""
    assert COMMANDS["doctor"][0] == "training.doctor"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from training.cli import main\n"
        "sys.exit(main(['doctor', '--json']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    torch = check(report, "torch")
    assert not torch["ok"]
    assert torch["fix"].startswith(f"{sys.executable} -m pip install torch==")
    assert check(report, CPU_PROVIDER)["ok"]
