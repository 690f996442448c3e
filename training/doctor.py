"""``dclgan doctor``: what this machine can run, and the command that fixes each missing piece.

GPU users otherwise learn about a missing library from a refusal to start (``DCLGAN_REQUIRE_GPU``) or, worse,
from onnxruntime silently running on the CPU. Each probe below is a small module-level function, so tests can
replace one and check what is reported and which fix is printed. onnxruntime and torch are imported inside the
probes only: the command must work on a serving-only install (no torch) and even without onnxruntime, which is
then the first thing it tells the user to install.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"
# What the driver must provide for the CUDA 13 wheels (R580 is the first branch supporting CUDA 13.0).
DRIVER_HINT = "install the NVIDIA driver, R580 or newer for CUDA 13 (pip cannot provide libcuda.so.1)"
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class Check:
    """One line of the report. ``required`` checks make the exit status 1 when they fail."""

    section: str
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = False


@dataclass(frozen=True)
class OrtInfo:
    package: str  # onnxruntime or onnxruntime-gpu
    version: str
    cuda_version: str | None  # the CUDA the package was built for, None for CPU builds
    providers: tuple[str, ...]  # what the build offers; a provider's libraries may still be missing


@dataclass(frozen=True)
class TorchInfo:
    version: str
    cuda_version: str | None  # torch.version.cuda: None for the CPU build
    cuda_devices: tuple[str, ...]  # names of the GPUs torch can use
    mkldnn_bf16: bool  # oneDNN has bf16 kernels for this CPU (what --amp bf16 needs on a CPU)


# -- probes: each asks the machine one question ----------------------------------------------------
def probe_onnxruntime() -> OrtInfo | None:
    try:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_validation
    except ImportError:
        return None
    package, version, cuda = onnxruntime_validation.get_package_name_and_version_info()
    return OrtInfo(package, version, cuda or None, tuple(ort.get_available_providers()))


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Collects what native code writes to fds 1 and 2 (onnxruntime logs there, not through Python), so
    the reason a provider failed can be reported and ``--json`` output stays one clean document."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def _failure_reason(lines: list[str]) -> str:
    """The most telling line of onnxruntime's log: the library that did not load, else the first error."""
    text = "\n".join(lines)
    missing = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file", text)
    if missing:
        return f"{missing.group(1)} could not be loaded"
    errors = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in lines if "[E:" in line or "Error" in line]
    return errors[0][-300:] if errors else "no reason logged"


def probe_provider(provider: str) -> tuple[str, str]:
    """Runs a one-convolution session with ``[provider, CPU]``; (the provider it really ran on, the reason
    it fell back, if it did). onnxruntime does not raise when a GPU provider cannot load: it logs and falls
    back, so the session's own provider list is the only reliable answer."""
    import numpy as np
    import onnxruntime as ort

    from training.probe_model import INPUT_NAME, INPUT_SHAPE, conv_model

    with _captured_output() as lines:
        try:
            if provider == CUDA_PROVIDER and hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # as the service does: CUDA/cuDNN from the nvidia-* wheels
            fallback = [CPU_PROVIDER] if provider != CPU_PROVIDER else []
            session = ort.InferenceSession(conv_model(), providers=[provider, *fallback])
            session.run(None, {INPUT_NAME: np.ones(INPUT_SHAPE, np.float32)})
            used = session.get_providers()[0]
        except Exception as exc:  # noqa: BLE001 - any failure is the answer being reported
            return "", str(exc).strip().splitlines()[0][:300]
    return used, "" if used == provider else _failure_reason(lines)


def cuda_libraries(cuda_version: str | None) -> dict[str, str]:
    """The shared libraries onnxruntime's CUDA provider loads, by name -> what provides them."""
    major = (cuda_version or "13").split(".")[0]
    cufft = {"12": "11", "13": "12"}.get(major, "12")
    runtime = f"CUDA {major} runtime"
    return {
        "libcuda.so.1": "NVIDIA driver",
        f"libcudart.so.{major}": runtime,
        f"libcublas.so.{major}": runtime,
        f"libcublasLt.so.{major}": runtime,
        "libcurand.so.10": runtime,
        f"libcufft.so.{cufft}": runtime,
        "libcudnn.so.9": "cuDNN 9",
    }


def _ldconfig_paths() -> dict[str, str]:
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = (re.match(r"\s*(\S+) \(.*\) => (\S+)", line) for line in listing.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def find_library(name: str) -> str | None:
    """Where ``name`` is: in ``LD_LIBRARY_PATH``, the linker cache, or an nvidia-* pip wheel's folder
    (which ``onnxruntime.preload_dlls()`` and torch load from). None when nowhere."""
    folders = [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    for folder in folders:
        if (folder / name).exists():
            return str(folder / name)
    cached = _ldconfig_paths().get(name)
    if cached:
        return cached
    for entry in sys.path:
        hits = sorted(Path(entry).glob(f"nvidia/*/lib/{name}")) if Path(entry).is_dir() else []
        if hits:
            return str(hits[0])
    return None


def gpu_device_present() -> bool:
    """An NVIDIA device node exists: the kernel driver sees a GPU, whatever the user space has."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def probe_torch() -> TorchInfo | None:
    try:
        import torch
    except ImportError:
        return None
    devices = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return TorchInfo(torch.__version__, torch.version.cuda, devices if torch.cuda.is_available() else (), bf16)


# -- checks: probes -> report lines with fixes ------------------------------------------------------
def _pip(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "pip", *args])


def _torch_requirement() -> str:
    """The torch pin of the ``train`` extra (one source: pyproject.toml, via the installed metadata)."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for req in importlib.metadata.requires("dclgan-serve") or []:
            if req.startswith("torch") and 'extra == "train"' in req:
                return req.split(";")[0].strip()
    return "torch"


def _gpu_wheels(version: str | None) -> str:
    """The onnxruntime-gpu install with its CUDA/cuDNN wheels, at the installed version when there is one."""
    return "onnxruntime-gpu[cuda,cudnn]" + (f"=={version}" if version else "")


def onnxruntime_checks(gpu: bool) -> list[Check]:
    ort = probe_onnxruntime()
    section = "onnxruntime"
    if ort is None:
        return [Check(section, "onnxruntime", False, "not installed", _pip("install", "onnxruntime-gpu"), True)]
    built = f", built for CUDA {ort.cuda_version}" if ort.cuda_version else " (CPU build)"
    checks = [Check(section, "onnxruntime", True, f"{ort.package} {ort.version}{built}")]
    gpu_wheel = _gpu_wheels(ort.version)
    if CUDA_PROVIDER not in ort.providers:
        fix = f"{_pip('uninstall', '-y', ort.package)} && {_pip('install', gpu_wheel)}"
        checks.append(Check(section, CUDA_PROVIDER, False, f"{ort.package} has no CUDA provider", fix, gpu))
    for provider in ort.providers:
        used, reason = probe_provider(provider)
        if used == provider:
            checks.append(Check(section, provider, True, "a session runs on it"))
            continue
        detail = f"not usable, the session ran on {used}: {reason}" if used else f"not usable: {reason}"
        if provider == CUDA_PROVIDER:
            fix = _pip("install", gpu_wheel)
            if find_library("libcuda.so.1") is None:
                fix = f"{DRIVER_HINT}; then {fix}"
        elif provider == CPU_PROVIDER:
            fix = _pip("install", "--force-reinstall", f"{ort.package}=={ort.version}")
        else:
            fix = "not used by dclgan-serve: nothing to do"
        checks.append(Check(section, provider, False, detail, fix, provider == CPU_PROVIDER or gpu))
    return checks


def library_checks(gpu: bool) -> list[Check]:
    ort = probe_onnxruntime()
    fix_wheels = _pip("install", _gpu_wheels(ort.version if ort else None))
    checks = []
    for name, provides in cuda_libraries(ort.cuda_version if ort else None).items():
        where = find_library(name)
        fix = None if where else (DRIVER_HINT if provides == "NVIDIA driver" else fix_wheels)
        checks.append(Check("CUDA libraries", name, bool(where), where or f"missing ({provides})", fix, gpu))
    return checks


def torch_checks(gpu: bool) -> list[Check]:
    section = "torch (training)"
    info = probe_torch()
    req = _torch_requirement()
    if info is None:
        return [Check(section, "torch", False, "not installed (serving does not need it)", _pip("install", req))]
    checks = [Check(section, "torch", True, info.version)]
    if info.cuda_devices:
        checks.append(Check(section, "torch CUDA", True, f"CUDA {info.cuda_version}: {', '.join(info.cuda_devices)}"))
    elif info.cuda_version is None:
        # PyPI's Linux x86_64 torch wheels are CUDA builds; a CPU build came from PyTorch's CPU index or a local folder.
        fix = f"{_pip('uninstall', '-y', 'torch')} && {_pip('install', '--index-url', 'https://pypi.org/simple', req)}"
        checks.append(Check(section, "torch CUDA", False, "CPU build of torch", fix if gpu else None, gpu))
    else:
        detail = f"built for CUDA {info.cuda_version} but sees no GPU"
        checks.append(Check(section, "torch CUDA", False, detail, DRIVER_HINT if gpu else None, gpu))
    return checks


def cpu_checks() -> list[Check]:
    flags = cpu_flags()
    section = "CPU"
    checks = [Check(section, flag, flag in flags, "present" if flag in flags else "absent") for flag in CPU_FEATURES]
    hardware_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    info = probe_torch()
    no_fix = "no software fix: needs a CPU with AVX-512 BF16 or AMX (or train on a GPU)"
    if info is None:
        detail = "bf16 units present (torch not installed to confirm)" if hardware_bf16 else "no bf16 units"
        checks.append(Check(section, "bf16 training", hardware_bf16, detail, None if hardware_bf16 else no_fix))
    else:
        detail = "torch's oneDNN has bf16 kernels: --amp bf16 works on this CPU"
        if not info.mkldnn_bf16:
            has = "the CPU has bf16 units but " if hardware_bf16 else ""
            detail = f"{has}torch's oneDNN reports no bf16 kernels: --amp bf16 is refused on this CPU"
        checks.append(Check(section, "bf16 training", info.mkldnn_bf16, detail, None if info.mkldnn_bf16 else no_fix))
    return checks


def run_checks() -> dict[str, Any]:
    gpu = gpu_device_present()
    checks = onnxruntime_checks(gpu) + library_checks(gpu) + torch_checks(gpu) + cpu_checks()
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.system()} {platform.machine()}",
        "gpu_device": gpu,
        "ok": all(c.ok for c in checks if c.required),
        "checks": [asdict(c) for c in checks],
    }


def format_report(report: dict[str, Any]) -> str:
    gpu = "an NVIDIA GPU is present" if report["gpu_device"] else "no NVIDIA GPU device"
    lines = [f"dclgan doctor: Python {report['python']}, {report['platform']}, {gpu}"]
    section = None
    for check in report["checks"]:
        if check["section"] != section:
            section = check["section"]
            lines.append(f"\n{section}")
        mark = "ok" if check["ok"] else ("MISSING" if check["required"] else "no")
        lines.append(f"  {mark:<8}{check['name']}: {check['detail']}")
        if check["fix"]:
            lines.append(f"  {'':<8}fix: {check['fix']}")
    verdict = "everything this machine needs is there" if report["ok"] else "required pieces are missing (see fix:)"
    lines.append(f"\n{verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dclgan doctor",
        description="Check what this machine can run (onnxruntime providers, CUDA/cuDNN libraries, torch, CPU "
        "features) and print the command that fixes each missing piece. Exit status 1 when something required "
        "is missing: the CPU provider always, the GPU pieces when an NVIDIA GPU is present.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(argv)
    report = run_checks()
    print(json.dumps(report, indent=2) if args.json else format_report(report))  # noqa: T201 - the command's output
    return 0 if report["ok"] else 1
