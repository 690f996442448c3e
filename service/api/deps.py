"""``Annotated`` dependencies over ``app.state.service``: the app state, API-key checks, the direction."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthorized
from service.state import AppState, ServedDirection


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.service
    return state


State = Annotated[AppState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="one of the keys in `DCLGAN_API_KEYS` (when set)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _check_key(state: AppState, credentials: HTTPAuthorizationCredentials | None) -> None:
    keys = state.settings.api_keys
    if not keys:
        return
    if credentials is None:
        raise Unauthorized("this route needs `Authorization: Bearer <key>`")
    given = credentials.credentials.encode()
    # Compare against every key in constant time, so the timing does not reveal a matching prefix.
    if not any(hmac.compare_digest(given, key.get_secret_value().encode()) for key in keys):
        raise Unauthorized("unknown API key")


def require_api_key(state: State, credentials: Credentials) -> None:
    """401 unless no keys are configured or the bearer key is one of them."""
    _check_key(state, credentials)


def require_metrics_key(state: State, credentials: Credentials) -> None:
    """Like :func:`require_api_key`, but only when ``metrics_require_auth`` is set."""
    if state.settings.metrics_require_auth:
        _check_key(state, credentials)


def get_direction(
    request: Request,
    state: State,
    direction: Annotated[str, Path(description="a direction of a served model, e.g. `horse2zebra`")],
) -> ServedDirection:
    """The served direction named in the path (404 listing the others); labels the request's metrics."""
    served = state.direction(direction)
    request.state.direction = served.name
    return served


Direction = Annotated[ServedDirection, Depends(get_direction)]
