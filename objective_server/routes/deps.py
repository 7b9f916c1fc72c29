"""Dependencies the routes declare: the app's services and settings, and bearer-token auth.

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in a thread pool,
a thread hop per dependency per request.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from objective_server.service.services import Services
from objective_server.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_services(request: Request) -> Services:
    return request.app.state.services


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServicesDep = Annotated[Services, Depends(get_services)]


async def require_token(request: Request, settings: SettingsDep) -> None:
    """With an API token configured, `Authorization: Bearer <token>` must carry it (401 otherwise)."""
    if settings.api_token is None:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    expected = settings.api_token.get_secret_value().encode()
    # compare_digest on bytes: its time does not depend on where the strings differ.
    if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong API token: send `Authorization: Bearer <token>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
