"""Liveness and readiness: open even when an API token is configured (for orchestrators)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from objective_server.routes.deps import ServicesDep
from objective_server.store import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The state store answers", responses={503: {"description": "store unreachable"}})
async def readyz(services: ServicesDep) -> JSONResponse:
    try:
        await services.store.ping()
    except StoreUnavailable as error:
        return JSONResponse(
            {"status": "unavailable", "detail": str(error)}, status_code=503,
            headers={"Retry-After": str(services.settings.retry_after_s)},
        )
    return JSONResponse({"status": "ready", "store": services.settings.store_description})
