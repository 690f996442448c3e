"""Pydantic models of the HTTP API's JSON bodies (what ``/openapi.json`` documents)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error response: a stable code and a human-readable detail (a list for validation errors)."""

    error: str = Field(description="machine-readable code, e.g. `queue_full`", examples=["unknown_direction"])
    detail: str | list[Any] = Field(description="what went wrong and, where useful, what to do")


class InstanceInfo(BaseModel):
    device: str = Field(description="the configured device, e.g. `cpu` or `cuda:0`")
    provider: str = Field(description="where the engine really runs: the onnxruntime execution provider, or `CPU`")
    engine: str = Field(description="`onnxruntime` or `openvino`")
    precision: str = Field(description="what the instance computes in: `float32`, `float16` or `bfloat16`")
    psnr_db: float | None = Field(
        description="PSNR (dB) of the reduced precision against float32 on a probe image at start (kept when it fell "
        "below the floor and float32 is served); null when nothing was reduced"
    )
    probe_ms: dict[str, dict[str, float]] | None = Field(
        description="engine `auto` on a CPU with OpenVINO: what was measured at start to choose the engine, as "
        "threads per session -> `engine:precision` -> median time (ms) on a probe image; an engine that failed "
        "there is absent. null when nothing was measured: a named engine or precision, a GPU, no OpenVINO",
        examples=[{"1": {"openvino:float32": 66.8, "onnxruntime:float32": 72.1}}],
    )
    warm: bool = Field(description="the instance has run its warm-up batch")


class DirectionInfo(BaseModel):
    name: str = Field(examples=["horse2zebra"])
    source: str
    target: str
    route: str = Field(description="where to POST images", examples=["/translate/horse2zebra"])
    queue_depth: int
    instances: list[InstanceInfo]


class ModelInfo(BaseModel):
    """One version of a model."""

    name: str
    version: str
    default: bool = Field(description="this version serves requests that name no version (the newest)")
    description: str
    domains: tuple[str, str]
    precision: str = Field(
        description="which ONNX file is served: float32 or float16 (bfloat16 computes from the float32 file; "
        "each instance says what it computes in)"
    )
    native_size: int = Field(description="training resolution (pixels)")
    working_side: int | None = Field(
        description="the longer side images are scaled to by default for this model (a request's max_side overrides)"
    )
    multiple_of: int = Field(description="inputs are padded so H and W are multiples of this")
    directions: list[DirectionInfo]
    provenance: dict[str, Any]


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    max_side: int = Field(description="working resolution: longer side at most this many pixels")
    max_batch_size: int


class ReloadResponse(BaseModel):
    result: Literal["loaded", "unchanged"] = Field(
        description="`loaded`: new versions serve now and the previous ones are drained; `unchanged`: nothing to do"
    )
    models: dict[str, list[str]] = Field(
        description="each served model's versions, newest (the default) first", examples=[{"horse2zebra": ["2", "1"]}]
    )
    seconds: float = Field(description="how long the reload took, the drain included")


class HealthResponse(BaseModel):
    status: str = Field(description="`alive`, or `failed` when a model instance could not warm up")
    detail: str | None = None


class ReadyResponse(BaseModel):
    status: str = Field(description="`ready`, `starting`, `draining` or `failed`")
    ready: bool
    warm_instances: int
    instances: int


class BatchItem(BaseModel):
    """One image of a batch request: its own status, and either the image or the error."""

    index: int = Field(description="position in the request")
    filename: str | None = None
    status: int = Field(description="what a single request would have returned", examples=[200, 415])
    media_type: str | None = Field(None, examples=["image/png"])
    width: int | None = None
    height: int | None = None
    image: str | None = Field(None, description="base64 of the encoded output image")
    error: str | None = None
    detail: str | list[Any] | None = None


class BatchResponse(BaseModel):
    model: str
    version: str
    direction: str
    succeeded: int
    failed: int
    results: list[BatchItem]
