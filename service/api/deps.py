"""``Annotated`` dependencies over ``app.state``: the app state, API-key checks, the routed direction."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Forbidden, Unauthorized
from service.generation import ServedDirection
from service.lifecycle import ModelLifecycle
from service.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.service
    return state


def get_lifecycle(request: Request) -> ModelLifecycle:
    lifecycle: ModelLifecycle = request.app.state.lifecycle
    return lifecycle


State = Annotated[AppState, Depends(get_state)]
Lifecycle = Annotated[ModelLifecycle, Depends(get_lifecycle)]

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


def require_admin(state: State, credentials: Credentials) -> None:
    """A key when keys are configured; without keys, only when the server listens on a loopback address
    (403 otherwise).

    Translating without keys harms nobody but the sender; a reload loads every model a second time, so an
    open one would let anyone on the network make the server spend memory and CPU at will. The client's
    address proves nothing: behind a proxy on the same host (a sidecar, nginx, an ssh tunnel) every client
    is loopback, and with uvicorn's proxy headers an ``X-Forwarded-For`` can claim to be. Where the server
    listens is set by its operator alone.
    """
    if state.settings.api_keys:
        _check_key(state, credentials)
        return
    if not is_loopback(state.settings.host):
        raise Forbidden(
            f"the server listens on {state.settings.host}, beyond this machine: reloading needs an API key "
            "(DCLGAN_API_KEYS), or send the process SIGHUP"
        )


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only (``localhost``, ``127.0.0.0/8``, ``::1``, or IPv4
    loopback written IPv6-mapped, which ``is_loopback`` alone misses on Python 3.11)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


async def get_direction(
    request: Request,
    state: State,
    direction: Annotated[str, Path(description="a direction of a served model, e.g. `horse2zebra`")],
    version: Annotated[str | None, Query(description="the model version to use (default: the newest)")] = None,
) -> AsyncIterator[ServedDirection]:
    """The served (direction, version) the request names (404s list the others), held until it is answered
    (a reload meanwhile lets it finish on this version); labels the request's metrics."""
    with state.lease(direction, version or None) as served:  # `?version=` (empty) asks for the default
        request.state.direction = served.name
        yield served


Direction = Annotated[ServedDirection, Depends(get_direction)]
