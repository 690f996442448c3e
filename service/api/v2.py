"""Open Inference Protocol (KServe v2) health and model metadata routes, beside the image API.

Kubernetes probes and KServe tooling speak this protocol: ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{version}]`` and ``.../ready``. They answer from the same state as ``/healthz``
and ``/readyz``, so the two never disagree. A v2 *model* is a model of the repository (e.g. ``horse2zebra``
with its two directions), its versions those served side by side (without a version: the newest); it is
ready when the service admits work and every one of its directions has a healthy instance, which is
exactly when its translate routes accept requests. Tensor inference
(``POST /v2/models/{name}/infer``) is not offered: the service takes and returns images (README, "Service").
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from service.api.deps import State, require_api_key
from service.api.routes import error_responses
from service.repository import LoadedModel
from service.schemas import ErrorBody
from service.state import AppState, Phase

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

# Every input and output: a float32 NCHW batch of RGB images of any size (the ONNX files' dynamic axes).
_IMAGE_SHAPE = [-1, 3, -1, -1]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class TensorMetadata(BaseModel):
    name: str = Field(examples=["image"])
    datatype: Literal["FP32"] = "FP32"
    shape: list[int] = Field(description="-1: any size", examples=[_IMAGE_SHAPE])


class ModelMetadata(BaseModel):
    name: str = Field(examples=["horse2zebra"])
    versions: list[str] = Field(examples=[["1"]])
    platform: Literal["onnx"] = "onnx"
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


ModelName = Annotated[str, Path(description="a served model's name, as `/models` lists it")]
ModelVersion = Annotated[str, Path(description="one of the model's served versions")]


def _versions(state: AppState, name: str) -> list[LoadedModel]:
    """The served versions of model ``name``, newest first; 404 (with the protocol's ``error`` field) if none."""
    versions = state.generation.versions(name) if state.generation is not None else []
    if not versions:
        served = ", ".join(sorted({s.model.name for s in state.directions.values()})) or "none (none loaded yet)"
        raise HTTPException(404, f"no model {name!r}; available: {served}")
    return versions


def _version(state: AppState, name: str, version: str) -> LoadedModel:
    versions = _versions(state, name)
    for model in versions:
        if model.version == version:
            return model
    available = ", ".join(m.version for m in versions)
    raise HTTPException(404, f"model {name!r} has no version {version!r}; available: {available}")


def _not_ready(state: AppState, response: Response) -> None:
    """503 with ``Retry-After``, as ``/readyz`` answers when not ready."""
    response.status_code = 503
    response.headers["Retry-After"] = str(state.policy.retry_after_s)


_UNKNOWN_MODEL = {
    404: {"model": ErrorBody, "description": "Unknown model or version; the detail lists the available ones"}
}
_NOT_READY = {
    "model": ReadyResponse,
    "description": "Starting, draining, failed, or a direction without a healthy instance",
    "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
}


@router.get(
    "/health/live",
    summary="Liveness (KServe v2): as `/healthz`, 200 until a model instance failed",
    responses={503: {"model": LiveResponse, "description": "A model instance failed to warm up"}},
)
async def server_live(state: State, response: Response) -> LiveResponse:
    live = state.pool is None or state.pool.failure is None
    if not live:
        response.status_code = 503
    return LiveResponse(live=live)


@router.get(
    "/health/ready",
    summary="Readiness (KServe v2): as `/readyz`, 200 once every model is loaded and warmed up",
    responses={503: _NOT_READY},
)
async def server_ready(state: State, response: Response) -> ReadyResponse:
    ready = state.phase is Phase.READY
    if not ready:
        _not_ready(state, response)
    return ReadyResponse(ready=ready)


def _metadata(model: LoadedModel, versions: list[str]) -> ModelMetadata:
    card = model.card
    return ModelMetadata(
        name=card.name,
        versions=versions,
        inputs=[TensorMetadata(name=card.input.input_name, shape=_IMAGE_SHAPE)],
        outputs=[TensorMetadata(name=card.input.output_name, shape=_IMAGE_SHAPE)],
    )


def _model_ready(state: AppState, response: Response, model: LoadedModel) -> ReadyResponse:
    generation = state.generation
    ready = (
        state.phase in (Phase.READY, Phase.DEGRADED)  # what translate requests are admitted in
        and generation is not None
        and all(generation.pool.serves(spec.name, model.version) for spec in model.card.directions)
    )
    if not ready:
        _not_ready(state, response)
    return ReadyResponse(ready=ready)


@router.get(
    "/models/{name}",
    summary="Model metadata (KServe v2): versions (newest first), platform, input and output tensors",
    dependencies=[Depends(require_api_key)],  # like /models
    responses={**error_responses(401), **_UNKNOWN_MODEL},
)
async def model_metadata(state: State, name: ModelName) -> ModelMetadata:
    versions = _versions(state, name)
    return _metadata(versions[0], [m.version for m in versions])


@router.get(
    "/models/{name}/versions/{version}",
    summary="Metadata of one version of a model (KServe v2)",
    dependencies=[Depends(require_api_key)],
    responses={**error_responses(401), **_UNKNOWN_MODEL},
)
async def model_version_metadata(state: State, name: ModelName, version: ModelVersion) -> ModelMetadata:
    return _metadata(_version(state, name, version), [version])


@router.get(
    "/models/{name}/ready",
    summary="Model readiness (KServe v2): 200 when every direction of the model's newest version has a healthy "
    "instance",
    responses={503: _NOT_READY, **_UNKNOWN_MODEL},
)
async def model_ready(state: State, response: Response, name: ModelName) -> ReadyResponse:
    return _model_ready(state, response, _versions(state, name)[0])


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Readiness of one version of a model (KServe v2)",
    responses={503: _NOT_READY, **_UNKNOWN_MODEL},
)
async def model_version_ready(
    state: State, response: Response, name: ModelName, version: ModelVersion
) -> ReadyResponse:
    return _model_ready(state, response, _version(state, name, version))
