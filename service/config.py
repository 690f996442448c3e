"""Service configuration: every knob of ``dclgan serve``, read from ``DCLGAN_*`` environment variables.

This is the only module of the service that reads the environment, and it does so only when
:func:`get_settings` (or ``Settings()``) is called, never at import time, so tests can build apps with
explicit settings. List-valued variables take comma-separated values (``DCLGAN_DEVICES=cuda:0,cuda:1``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.openvino_runner import choose
from service.runtime import default_threads

_DEVICE = re.compile(r"^(cpu|cuda:\d+)$")
MiB = 1024 * 1024
# Measured best per device kind (docs/benchmarks.md): on CPUs a batch costs ~9% more per image than
# single images; on GPUs batches of 8 pay.
CPU_MAX_BATCH_SIZE, GPU_MAX_BATCH_SIZE = 1, 8
# Instances of each direction per device. On a CPU of at most 2 usable cores, two: under load two one-thread
# runs side by side beat one run on both cores (1.28x the throughput at 64 px, 1.06x at 256 px with the
# bundled model on 2 cores), while a lone request still runs on all of them (width-adaptive sessions), for
# ~170 MB more memory. On more cores, one: the shared-out sessions are sized for every direction's instances
# running at once, so two instances of one busy direction would leave half the cores idle.
SMALL_CPU_INSTANCES, CPU_INSTANCES, GPU_INSTANCES = 2, 1, 1
LogFormat = Literal["text", "json"]
"""``DCLGAN_LOG_FORMAT``: text lines for a terminal, or one JSON object per line (:mod:`service.logs`)."""


def _split_commas(value: object) -> object:
    """``"a, b"`` -> ``["a", "b"]``; ``""`` -> ``[]``; lists (from code or JSON) pass through unchanged.

    A blank item (``" , "``, ``"a,,b"``, a trailing comma) is an error, not skipped: skipping it turned
    ``DCLGAN_API_KEYS=' , '`` into "no keys", which silently switched authentication off.
    """
    if isinstance(value, str):
        if not value.strip():
            return []
        parts = [part.strip() for part in value.split(",")]
        if not all(parts):
            raise ValueError("has an empty item (a blank value or a stray comma)")
        return parts
    return value


def _devices_are_cpu(devices: object) -> bool:
    """Whether every listed device is the CPU; a malformed list is left to the ``devices`` validator, which
    names the setting in its error."""
    try:
        listed = _split_commas(devices) if isinstance(devices, str) else devices
    except ValueError:
        return False
    return isinstance(listed, list | tuple) and all(str(d).strip() == "cpu" for d in listed)


def _cpu_instances() -> int:
    return SMALL_CPU_INSTANCES if default_threads() <= 2 else CPU_INSTANCES


class Settings(BaseSettings):
    """All service settings; the field descriptions are the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="DCLGAN_", frozen=True, extra="ignore")

    models_dir: Path = Field(Path("models"), description="model repository: one folder per model")
    host: str = Field("127.0.0.1", description="address uvicorn binds to")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    devices: Annotated[list[str], NoDecode] = Field(
        ["cpu"], min_length=1, description="comma-separated devices: `cpu` or `cuda:N`"
    )
    require_gpu: bool = Field(
        True,
        description="a `cuda:N` device that onnxruntime cannot use is a startup error (false: CPU fallback)",
    )
    cudnn_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = Field(
        "HEURISTIC",
        description="cuDNN algorithm choice on GPUs: EXHAUSTIVE benchmarks every new input shape on the request "
        "path (any working size up to max_side can arrive), HEURISTIC picks at once",
    )
    instances_per_device: int = Field(
        CPU_INSTANCES,
        ge=1,
        description="model instances (session + thread) of each direction per device (default 2 when every "
        "device is a CPU with at most 2 usable cores, else 1)",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime threads per CPU session (0: one per core)"
    )
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto",
        description="inference engine: `auto` (on CPU devices with OpenVINO installed and precision float32 or "
        "auto, whichever of OpenVINO and onnxruntime float32 is the faster on a probe image at start; onnxruntime "
        "elsewhere), `onnxruntime` or `openvino` (CPUs only; the `cpu-fast` extra)",
    )
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "float32",
        description="`float32` or `float16` (which ONNX file), `bfloat16` (OpenVINO on a CPU with native bf16) or "
        "`auto` (bfloat16 where that holds, else float32)",
    )
    psnr_floor_db: float = Field(
        40.0,
        ge=0,
        description="a reduced precision whose output on a probe image is below this PSNR (dB) against float32 at "
        "start falls back to float32",
    )
    max_batch_size: int = Field(
        CPU_MAX_BATCH_SIZE,
        ge=1,
        description="most images one inference call takes (default 1 when every device is a CPU, else 8)",
    )
    max_batch_pixels: int = Field(
        8 * 256 * 256, ge=1, description="most pixels (N x H x W) per batch; a larger image runs alone"
    )
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="how long a partial batch waits for company (0: batch what is queued)"
    )
    max_queue_size: int = Field(64, ge=1, description="queued images per direction before rejecting")
    max_inflight_requests: int = Field(
        64, ge=1, description="translate requests admitted at once (reading, decoding, queued, encoding); more: 503"
    )
    max_request_memory_bytes: int = Field(
        512 * MiB,
        ge=MiB,
        description="memory that request bodies and decoded images may hold at once; a request that would "
        "exceed it gets 503 (413 if it alone would)",
    )
    io_threads: int = Field(0, ge=0, description="threads decoding and encoding images (0: one per core)")
    batch_timeout_s: float = Field(
        120.0, gt=0, description="a batch running longer fails its requests (504) and marks its instance unhealthy"
    )
    header_timeout_s: float = Field(10.0, gt=0, description="time a client has to send its request headers")
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="time a client has to send its whole request body; also the longest a response waits for "
        "the client to read",
    )
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections are closed after this")
    max_connections: int = Field(
        512, ge=1, description="open connections at once; more are closed at once (file descriptors are finite)"
    )
    queue_full_status: int = Field(503, description="status when the queue is full: 503 or 429")
    retry_after_s: int = Field(1, ge=0, description="`Retry-After` seconds sent with 429/503")
    request_timeout_s: float = Field(
        60.0, gt=0, description="deadline of a queued image; `X-Request-Timeout-Ms` may shorten it"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long queued and running work may take"
    )
    reload_poll_s: float = Field(
        0.0,
        ge=0,
        description="check the model repository for changed files this often (seconds) and reload them; "
        "0: only on SIGHUP or `POST /admin/reload`",
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest request body (bytes)")
    max_pixels: int = Field(25_000_000, ge=1, description="largest decoded image (width x height)")
    max_side: int = Field(1024, ge=8, description="working resolution: longer side is scaled down to this")
    max_batch_items: int = Field(16, ge=1, description="most images in one `/batch` request")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [], description="comma-separated bearer keys; empty: no authentication"
    )
    metrics_require_auth: bool = Field(False, description="whether `/metrics` needs an API key too")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="comma-separated allowed CORS origins"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level"
    )
    log_format: LogFormat = Field(
        "text", description="`text` lines for a terminal, or `json`: one JSON object per line for log shippers"
    )

    _split = field_validator("devices", "api_keys", "cors_origins", mode="before")(_split_commas)

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_the_devices(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        cpu = _devices_are_cpu(data.get("devices", "cpu"))
        defaults = {
            "max_batch_size": CPU_MAX_BATCH_SIZE if cpu else GPU_MAX_BATCH_SIZE,
            "instances_per_device": _cpu_instances() if cpu else GPU_INSTANCES,
        }
        unset = {name for name in defaults if data.get(name) in (None, "")}
        return {**{k: v for k, v in data.items() if k not in unset}, **{name: defaults[name] for name in unset}}

    @model_validator(mode="after")
    def _possible_limits(self) -> Settings:
        """Limits that contradict each other are refused at start, not discovered by a client."""
        largest = self.max_pixels * 12 + min(self.max_pixels, self.max_side**2) * 48
        if largest > self.max_request_memory_bytes:
            raise ValueError(
                f"max_request_memory_bytes ({self.max_request_memory_bytes}) cannot hold one image of max_pixels "
                f"({self.max_pixels}), which needs about {largest} bytes: raise it or lower max_pixels"
            )
        if 2 * self.max_upload_bytes > self.max_request_memory_bytes:
            raise ValueError(
                f"max_request_memory_bytes ({self.max_request_memory_bytes}) must hold twice max_upload_bytes "
                f"({self.max_upload_bytes}), a body while it is joined"
            )
        return self

    @model_validator(mode="after")
    def _engine_runs_here(self) -> Settings:
        """An engine or precision the devices cannot run is refused at start, in one line."""
        for device in self.devices:
            try:
                choose(self.engine, self.precision, device)
            except ValueError as exc:
                raise ValueError(f"DCLGAN_ENGINE={self.engine}, DCLGAN_PRECISION={self.precision}: {exc}") from None
        return self

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, value: list[str]) -> list[str]:
        bad = [d for d in value if not _DEVICE.match(d)]
        if bad:
            raise ValueError(f"devices must be `cpu` or `cuda:N`, got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"devices must be distinct, got {value}")
        return value

    @field_validator("queue_full_status")
    @classmethod
    def _overload_status(cls, value: int) -> int:
        if value not in (429, 503):
            raise ValueError(f"must be 429 or 503, got {value}")
        return value

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


def describe_invalid(exc: ValidationError) -> str:
    """A configuration error as one line naming the variables: ``DCLGAN_API_KEYS: has an empty item``."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error.get("loc", ()) if not isinstance(p, int))
        name = f"DCLGAN_{loc.upper()}: " if loc else ""
        parts.append(f"{name}{error.get('msg', 'invalid').removeprefix('Value error, ')}")
    return "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first call (``cache_clear()`` to re-read)."""
    return Settings()
