"""GET /batch: the batch at an address, as Arrow (default) or JSON."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from clients.models import Split
from clients.wire import ARROW_MEDIA_TYPE, JSON_MEDIA_TYPE
from objective_server.routes.deps import ServicesDep
from objective_server.service.errors import InvalidRequest, NotAcceptable

router = APIRouter(tags=["batches"])

BATCH_RESPONSES = {
    200: {
        "description": "Six (batch_size, seq_len) int32 arrays and the batch header: an Arrow IPC stream "
        "(FixedSizeList<int32> columns, header JSON in the schema metadata key `birdie`) or JSON",
        "content": {ARROW_MEDIA_TYPE: {}, JSON_MEDIA_TYPE: {}},
    },
    406: {"description": "the Accept header admits neither Arrow nor JSON"},
    503: {"description": "the state store is unreachable and the address is newer than the cached timeline"},
}


def quality(accept: str, media_type: str) -> tuple[float, int]:
    """The q-value an Accept header gives `media_type`: that of its most specific matching range
    (type/subtype, then type/*, then */*), 0 when none matches (RFC 9110 §12.5.1); and that range's
    specificity (2, 1, 0; -1 for none)."""
    best, q = -1, 0.0
    kind = media_type.split("/")[0]
    for item in accept.split(","):
        range_, *params = (field.strip() for field in item.split(";"))
        range_ = range_.lower()
        specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}.get(range_)
        if specificity is None or specificity <= best:
            continue
        value = 1.0
        for param in params:
            name, _, text = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    value = min(max(float(text), 0.0), 1.0)
                except ValueError:
                    value = 0.0
        best, q = specificity, value
    return q, best


def negotiate(wire_format: str | None, accept: str, decode: bool) -> Literal["arrow", "json"]:
    """`format=` wins; decoded text implies JSON; then the Accept header by q-value, a tie going to the
    type named more specifically (`application/json, */*` is JSON), then to Arrow; Arrow without a
    header; 406 when the header admits neither."""
    if wire_format == "arrow" and decode:
        raise InvalidRequest("decode=1 adds decoded text to the JSON format: use format=json")
    if wire_format is not None:
        return wire_format  # type: ignore[return-value]
    if decode:
        return "json"
    if not accept.strip():
        return "arrow"
    arrow, json = quality(accept, ARROW_MEDIA_TYPE), quality(accept, JSON_MEDIA_TYPE)
    if arrow[0] == json[0] == 0:
        raise NotAcceptable(f"batches come as {ARROW_MEDIA_TYPE} or {JSON_MEDIA_TYPE}; Accept: {accept!r} admits neither")
    return "json" if json > arrow else "arrow"  # (q, specificity) tuples


@router.get("/batch", response_class=Response, responses=BATCH_RESPONSES)
async def get_batch(
    request: Request,
    services: ServicesDep,
    run: Annotated[str, Query(description="Run name")],
    step: Annotated[int | None, Query(ge=0, description="Training step (required for split=train)")] = None,
    rank: Annotated[int, Query(ge=0)] = 0,
    world_size: Annotated[int, Query(ge=1)] = 1,
    split: Split = "train",
    objective: Annotated[str | None, Query(description="Configuration name (split=validation)")] = None,
    index: Annotated[int, Query(ge=0, description="Validation batch index (split=validation)")] = 0,
    wire_format: Annotated[Literal["arrow", "json"] | None, Query(alias="format")] = None,
    decode: Annotated[bool, Query(description="JSON only: add the decoded text of every example")] = False,
    preview: Annotated[
        bool,
        Query(description="Look without serving: the step is not marked served, so looking ahead does not "
              "delay the run's next mixture (X-Birdie-Provisional: true when the step is beyond the highest served)"),
    ] = False,
) -> Response:
    """The batch at (run, rank, world_size, step): byte-identical every time it is asked for.

    A training batch marks its step served: a mixture published later takes effect after it.
    `split=validation&objective=NAME&index=i` gives configuration NAME's fixed held-out batch i, in
    exactly the training format (the mixture does not apply).
    """
    started = time.perf_counter()
    chosen = negotiate(wire_format, request.headers.get("accept", ""), decode)
    headers = {}
    if split == "train":
        if step is None:
            raise InvalidRequest("split=train needs step=N")
        if preview:
            served, provisional = await services.batches.preview_train(run, rank, world_size, step)
            headers["X-Birdie-Provisional"] = "true" if provisional else "false"
        else:
            served = await services.batches.train(run, rank, world_size, step)
        headers["X-Birdie-Mixture-Version"] = str(served.mixture_version)
    else:
        served = await services.batches.validation(run, objective, index)
    body, media_type = await services.batches.encode(served, chosen, decode)
    metrics = services.metrics
    metrics.batches.labels(run, split, chosen).inc()
    metrics.tokens.labels(run, split).inc(served.positions)
    metrics.batch_latency.labels(chosen).observe(time.perf_counter() - started)
    return Response(body, media_type=media_type, headers=headers)
