"""POST /losses: one rank's per-configuration losses for one step, counted exactly once."""

from __future__ import annotations

from fastapi import APIRouter

from clients.models import LossPostBody, LossPostResponse
from objective_server.routes.deps import ServicesDep

router = APIRouter(tags=["losses"])


@router.post(
    "/losses",
    response_model=LossPostResponse,
    responses={
        404: {"description": "unknown run"},
        409: {"description": "another world_size was posted for this (split, step)"},
        422: {"description": "unknown configuration, non-finite loss, negative tokens, rank >= world_size, ..."},
        503: {"description": "state store unreachable: retry after Retry-After seconds (nothing was applied)"},
    },
)
async def post_losses(body: LossPostBody, services: ServicesDep) -> LossPostResponse:
    """Count the post once per (run, split, step, rank): a repeat is acknowledged as a duplicate.

    The post that completes a (split, step) over all `world_size` ranks runs the policy update
    (exactly once across workers and replicas) before it is answered.
    """
    return await services.losses.post(body)
