"""Operator routes: ``POST /admin/reload`` reloads the model repository without a restart.

Like Triton's ``POST /v2/repository/models/{name}/load`` and TorchServe's management API, but for the
whole repository: every model's versions are scanned, loaded and warmed beside the served ones, and
switched to at once (:mod:`service.lifecycle`). Guarded by :func:`~service.api.deps.require_admin`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from service.api.deps import Lifecycle, require_admin
from service.schemas import ErrorBody, ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


@router.post(
    "/reload",
    summary="Reload the model repository: load and warm new versions beside the served ones, switch, drain the old",
    responses={
        401: _error("Keys are configured and the bearer key is missing or wrong"),
        403: _error("No keys are configured and the server listens beyond this machine (`DCLGAN_HOST`)"),
        409: _error(
            "`reload_failed`: the new state cannot be served (the detail says why) and the previous versions keep "
            "serving; `reload_in_progress`: another reload is running, and one more runs after it"
        ),
        503: _error("The service is starting or shutting down"),
    },
)
async def reload_models(lifecycle: Lifecycle) -> ReloadResponse:
    report = await lifecycle.reload()
    return ReloadResponse(result=report.result, models=report.models, seconds=round(report.seconds, 3))
