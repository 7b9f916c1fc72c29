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


@router.get(
    "/readyz", summary="The state store answers and the configured runs are registered",
    responses={503: {"description": "store unreachable, or the runs not registered yet"}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    retry = {"Retry-After": str(services.settings.retry_after_s)}
    try:
        await services.store.ping()
    except StoreUnavailable as error:
        return JSONResponse({"status": "unavailable", "detail": str(error)}, status_code=503, headers=retry)
    if not services.ready:
        detail = services.registration_error or (
            "the configured runs are not registered yet (the state store was unreachable at start)"
        )
        return JSONResponse({"status": "starting", "detail": detail}, status_code=503, headers=retry)
    return JSONResponse({"status": "ready", "store": services.settings.store_description})
