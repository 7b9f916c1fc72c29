"""GET /mixture and /mixture/history: the run's current mixture and every mixture it had."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from clients.models import MixtureHistoryResponse, MixtureResponse
from objective_server.routes.deps import ServicesDep

router = APIRouter(tags=["mixture"])


@router.get("/mixture", response_model=MixtureResponse)
async def get_mixture(services: ServicesDep, run: Annotated[str, Query()]) -> MixtureResponse:
    """Latest probabilities per configuration and per family, the policy's view, training totals."""
    return await services.runs.mixture(run)


@router.get("/mixture/history", response_model=MixtureHistoryResponse)
async def get_mixture_history(services: ServicesDep, run: Annotated[str, Query()]) -> MixtureHistoryResponse:
    """Every published mixture and the timeline of (effective step, version)."""
    return await services.runs.history(run)
