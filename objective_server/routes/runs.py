"""GET/POST /runs and GET /runs/{run}."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from clients.models import RunInfo, RunList
from objective_server.routes.deps import ServicesDep
from objective_server.runs import RunConfig

router = APIRouter(tags=["runs"])


@router.get("/runs", response_model=RunList)
async def list_runs(services: ServicesDep) -> RunList:
    return RunList(runs=await services.runs.summaries())


@router.post(
    "/runs",
    response_model=RunInfo,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"description": "the run exists with the identical config"},
        409: {"description": "the run exists with a different config"},
        422: {"description": "invalid config (unknown objective or policy, batch above the size limit, ...)"},
    },
)
async def create_run(config: RunConfig, response: Response, services: ServicesDep) -> RunInfo:
    """Create a run from its config (`arms` or a `preset`); idempotent for an identical config."""
    info, created = await services.runs.create(config)
    if not created:
        response.status_code = status.HTTP_200_OK
    return info


@router.get("/runs/{run}", response_model=RunInfo)
async def get_run(run: str, services: ServicesDep) -> RunInfo:
    """Config, objective configurations, vocabulary size, special token ids, evaluation steps."""
    return await services.runs.info(run)
