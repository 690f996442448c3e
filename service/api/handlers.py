"""Exception handlers: every error, including FastAPI's own 404/405/422, becomes the JSON body of
:mod:`service.errors` (``RequestContextMiddleware`` does the same for exceptions no handler takes)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.errors import ErrorInfo, ErrorPolicy, ServiceError, describe
from service.imaging import ImageError


def json_response(info: ErrorInfo) -> JSONResponse:
    return JSONResponse(jsonable_encoder(info.body()), status_code=info.status, headers=info.headers)


def _validation_detail(errors: Any) -> list[dict[str, Any]]:
    """Where and what, without echoing the client's input or pydantic's documentation links."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def install_error_handlers(app: FastAPI, policy: ErrorPolicy) -> None:
    def request_id(request: Request) -> str:
        return str(getattr(request.state, "request_id", ""))

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        return json_response(describe(exc, policy, request_id(request)))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return json_response(ErrorInfo(exc.status_code, error, exc.detail, dict(exc.headers or {})))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return json_response(ErrorInfo(422, "validation_error", _validation_detail(exc.errors()), {}))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(ImageError, service_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
