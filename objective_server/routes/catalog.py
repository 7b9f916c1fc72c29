"""GET /objectives and GET /tokenizer: what batches are made of."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from clients.models import ObjectiveInfo
from objective_server.routes.deps import ServicesDep

router = APIRouter(tags=["catalog"])


@router.get("/objectives", response_model=list[ObjectiveInfo])
async def list_objectives(
    services: ServicesDep,
    run: Annotated[str | None, Query(description="Only this run's configurations")] = None,
    seq_len: Annotated[int, Query(ge=128, le=131_072, description="Row length the presets are sized for")] = 2048,
) -> list[ObjectiveInfo]:
    """The run's objective configurations, or every configuration of the shipped presets."""
    return await services.runs.objectives(run, seq_len)


@router.get("/tokenizer", response_class=FileResponse)
async def get_tokenizer(services: ServicesDep) -> FileResponse:
    """The corpus tokenizer (Hugging Face tokenizers' tokenizer.json)."""
    return FileResponse(services.corpus.path / "tokenizer.json", media_type="application/json",
                        filename="tokenizer.json")
