"""BirdieClient: typed calls for every route of the objective server.

Every call is one addressed request. Transient failures (connection refused or reset, timeouts,
429/502/503/504) are retried with exponential backoff and full jitter, never sooner than the server's
`Retry-After` (so ranks that hit the same outage spread out instead of retrying in step); a
retry re-sends the very same request (same URL, same query, same body), which is what makes retries
safe: batches are addressed and replay-deterministic, loss posts carry an idempotency key. Any other
error status is raised at once as a `BirdieHTTPError` subclass carrying the status and the server's
detail.

    with BirdieClient("http://localhost:8000") as client:
        batch = client.batch("my-run", step=0)          # a WireBatch: six (B, L) int32 arrays
        client.post_losses(LossPostBody(run="my-run", step=0, losses={...}, tokens={...}))

The server URL and API token default to $BIRDIE_SERVER_URL and $BIRDIE_API_TOKEN.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_base, wait_random_exponential

from clients.models import (
    LossPostBody,
    LossPostResponse,
    MixtureHistoryResponse,
    MixtureResponse,
    ObjectiveInfo,
    RunInfo,
    RunList,
    RunSummary,
)
from clients.wire import ARROW_MEDIA_TYPE, WireBatch, decode_arrow, decode_json

log = logging.getLogger(__name__)

URL_ENV = "BIRDIE_SERVER_URL"
TOKEN_ENV = "BIRDIE_API_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8000"
# Statuses that say "try again later": rate limiting, a proxy without a live upstream, an
# unavailable state store, an upstream timeout.
RETRY_STATUSES = frozenset({429, 502, 503, 504})

BatchFormat = Literal["arrow", "json"]


# --- errors -----------------------------------------------------------------------------------


class BirdieError(Exception):
    """Base of every error the client raises. `status` is the HTTP status (None when no answer came)."""

    def __init__(self, message: str, *, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class BirdieConnectionError(BirdieError):
    """The server could not be reached or did not answer in time, on every attempt."""


class BirdieAborted(BirdieError):
    """Retrying was abandoned because the caller's `abort` event was set (it is shutting down)."""


class BirdieHTTPError(BirdieError):
    """The server answered with an error status."""


class TransientHTTPError(BirdieHTTPError):
    """429/502/503/504, still so after every retry. `retry_after` is the server's hint in seconds."""

    def __init__(self, message: str, *, status: int, detail: Any = None, retry_after: float | None = None) -> None:
        super().__init__(message, status=status, detail=detail)
        self.retry_after = retry_after


class AuthenticationError(BirdieHTTPError):
    """401/403: the API token is missing or wrong."""


class NotFoundError(BirdieHTTPError):
    """404: unknown run (or route)."""


class ConflictError(BirdieHTTPError):
    """409: e.g. a run of that name exists with a different config."""


class RequestRejectedError(BirdieHTTPError):
    """Any other 4xx (400, 413, 422, ...): the request itself is wrong; repeating it cannot help."""


class ServerError(BirdieHTTPError):
    """A 5xx that is not transient (e.g. 500): a server-side failure on this request."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def describe_detail(detail: Any) -> str:
    """A one-line reading of an error body's `detail` (FastAPI validation lists included)."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                location = ".".join(str(p) for p in item.get("loc", ()))
                parts.append(f"{location}: {item['msg']}" if location else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def error_from_response(response: httpx.Response) -> BirdieHTTPError:
    """The error a non-2xx response stands for, with the server's detail in the message."""
    status = response.status_code
    try:
        body = response.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text.strip() or response.reason_phrase
    request = response.request
    message = f"{status} {response.reason_phrase} from {request.method} {request.url}: {describe_detail(detail)}"
    if status in RETRY_STATUSES:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return TransientHTTPError(message, status=status, detail=detail, retry_after=retry_after)
    kind: type[BirdieHTTPError]
    if status in (401, 403):
        kind = AuthenticationError
    elif status == 404:
        kind = NotFoundError
    elif status == 409:
        kind = ConflictError
    elif 400 <= status < 500:
        kind = RequestRejectedError
    else:
        kind = ServerError
    return kind(message, status=status, detail=detail)


# --- retrying ---------------------------------------------------------------------------------


class wait_at_least_retry_after(wait_base):
    """The jittered backoff `jitter`, on top of the server's Retry-After when it sent one, capped.

    Retry-After is a lower bound, not a schedule: every rank of a job that hits the same outage
    gets the same hint, and waiting exactly that long would have them all retry in step, forever at
    the same pace. Adding the growing jittered backoff spreads them out and backs off.
    """

    def __init__(self, jitter: wait_base, cap: float) -> None:
        self.jitter = jitter
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(error, "retry_after", None) or 0.0
        return min(self.cap, retry_after + self.jitter(retry_state))


def _log_retry(retry_state: RetryCallState) -> None:
    error = retry_state.outcome.exception() if retry_state.outcome else None
    wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
    log.warning("%s; retrying in %.2fs (attempt %d)", error, wait, retry_state.attempt_number + 1)


def _with_provisional(batch: WireBatch, response: httpx.Response) -> WireBatch:
    """A previewed batch's header gets `provisional` (from X-Birdie-Provisional)."""
    provisional = response.headers.get("x-birdie-provisional")
    if provisional is not None:
        batch.header["provisional"] = provisional == "true"
    return batch


# --- the client -------------------------------------------------------------------------------


class BirdieClient:
    """Synchronous client for the objective server; thread-safe (one connection pool, many threads).

    url, token: the server and its API token (default: $BIRDIE_SERVER_URL, else http://127.0.0.1:8000,
        and $BIRDIE_API_TOKEN). timeout: seconds per attempt. retries: extra attempts after the first
        on transient failures. backoff: the first backoff window in seconds; attempt n waits a uniform
        random time in [0, backoff * 2**(n-1)] ("full jitter"), added to the server's Retry-After when
        it sent one, at most max_delay.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 8,
        backoff: float = 0.5,
        max_delay: float = 30.0,
    ) -> None:
        url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://, got {url!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_delay < 0:
            raise ValueError("timeout must be > 0; retries, backoff and max_delay must be >= 0")
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_delay = max_delay
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    # lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BirdieClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BirdieClient({self.url!r})"

    # the request loop

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        retries: float | None = None,
        retry_for: float | None = None,
        abort: threading.Event | None = None,
    ) -> httpx.Response:
        """Send one request, retrying transient failures; return the 2xx response or raise. The
        typed calls below are built on it; use it directly for anything they do not cover.

        retries: overrides the client's count (math.inf retries until success, abort or retry_for).
        retry_for: seconds after which no further attempt starts (None: no time limit).
        abort: once set, a pending backoff ends at once and `BirdieAborted` is raised.
        """
        # Built once and sent on every attempt: a retry repeats exactly the same address and body.
        request = self._http.build_request(method, path, params=params, json=json, headers=headers)
        attempts = (self.retries if retries is None else retries) + 1
        stop = stop_after_attempt(attempts)
        if retry_for is not None:
            stop = stop | stop_after_delay(retry_for)

        def sleep(seconds: float) -> None:
            if abort is None:
                time.sleep(seconds)
            elif abort.wait(seconds):
                raise BirdieAborted(f"{method} {request.url}: stopped retrying (aborted)")

        retrying = Retrying(
            stop=stop,
            wait=wait_at_least_retry_after(wait_random_exponential(multiplier=self.backoff), self.max_delay),
            retry=retry_if_exception_type((BirdieConnectionError, TransientHTTPError)),
            sleep=sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(self._send_once, request)

    def _send_once(self, request: httpx.Request) -> httpx.Response:
        try:
            response = self._http.send(request)
        except httpx.TimeoutException as error:
            raise BirdieConnectionError(
                f"{request.method} {request.url}: no answer within {self.timeout}s ({type(error).__name__})"
            ) from error
        except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
            raise BirdieConnectionError(f"{request.method} {request.url}: {error or type(error).__name__}") from error
        if response.is_error:
            raise error_from_response(response)
        return response

    def _get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params).json()

    # batches

    def batch(
        self,
        run: str,
        step: int,
        rank: int = 0,
        world_size: int = 1,
        fmt: BatchFormat = "arrow",
        *,
        preview: bool = False,
        retries: float | None = None,
        retry_for: float | None = None,
        abort: threading.Event | None = None,
    ) -> WireBatch:
        """The training batch at address (run, step, rank, world_size); `retries`, `retry_for` and
        `abort` as in `request`.

        preview: look without serving (for people and tools; trainers never preview). The step is
        not marked served, so looking ahead does not delay the run's next mixture; the header's
        `provisional` says whether the step is beyond the highest served (a mixture published
        before a trainer asks for it would change it).
        """
        address = {**training_address(run, step, rank, world_size), **({"preview": 1} if preview else {})}
        return self._fetch_batch(address, fmt, retries=retries, retry_for=retry_for, abort=abort)

    def validation_batch(
        self, run: str, objective: str, index: int = 0, fmt: BatchFormat = "arrow"
    ) -> WireBatch:
        """Fixed held-out batch `index` of one objective configuration, in the training format."""
        return self._fetch_batch(validation_address(run, objective, index), fmt)

    def decoded_batch(
        self,
        run: str,
        step: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        *,
        objective: str | None = None,
        index: int = 0,
        preview: bool = False,
    ) -> tuple[WireBatch, list[dict[str, Any]]]:
        """Training batch `step` (or, with `objective` instead, validation batch `index` of that
        configuration) with each packed example decoded to text by the server:
        (batch, [{row, offset, objective, input_tokens, label_tokens, input, label}, ...]).
        `preview` as in `batch`."""
        if (step is None) == (objective is None):
            raise ValueError("give a training step or a validation objective, not both or neither")
        if objective is None:
            address = {**training_address(run, step, rank, world_size), **({"preview": 1} if preview else {})}
        else:
            address = validation_address(run, objective, index)
        response = self.request("GET", "/batch", params={**address, "format": "json", "decode": 1})
        body = response.json()
        examples = body.get("examples") or []
        return _with_provisional(decode_json(body), response), examples

    def _fetch_batch(
        self,
        address: Mapping[str, Any],
        fmt: BatchFormat,
        *,
        retries: float | None = None,
        retry_for: float | None = None,
        abort: threading.Event | None = None,
    ) -> WireBatch:
        retrying: dict[str, Any] = {"retries": retries, "retry_for": retry_for, "abort": abort}
        if fmt == "json":
            response = self.request("GET", "/batch", params={**address, "format": "json"}, **retrying)
            return _with_provisional(decode_json(response.json()), response)
        if fmt != "arrow":
            raise ValueError(f"fmt must be 'arrow' or 'json', got {fmt!r}")
        response = self.request("GET", "/batch", params=address, headers={"Accept": ARROW_MEDIA_TYPE}, **retrying)
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        if media_type != ARROW_MEDIA_TYPE:
            raise BirdieError(f"GET {response.request.url}: expected {ARROW_MEDIA_TYPE}, got {media_type!r}")
        return _with_provisional(decode_arrow(response.content), response)

    # losses

    def post_losses(
        self,
        body: LossPostBody | Mapping[str, Any],
        *,
        retries: float | None = None,
        abort: threading.Event | None = None,
    ) -> LossPostResponse:
        """Post one rank's per-configuration losses for a step. Re-sending is safe: (run, step, rank,
        split) is an idempotency key and a repeat comes back with status "duplicate"."""
        body = body if isinstance(body, LossPostBody) else LossPostBody.model_validate(body)
        response = self.request("POST", "/losses", json=body.model_dump(mode="json"), retries=retries, abort=abort)
        return LossPostResponse.model_validate(response.json())

    # inspection

    def mixture(self, run: str) -> MixtureResponse:
        return MixtureResponse.model_validate(self._get_json("/mixture", {"run": run}))

    def mixture_history(self, run: str) -> MixtureHistoryResponse:
        return MixtureHistoryResponse.model_validate(self._get_json("/mixture/history", {"run": run}))

    def runs(self) -> list[RunSummary]:
        return RunList.model_validate(self._get_json("/runs")).runs

    def run(self, name: str) -> RunInfo:
        return RunInfo.model_validate(self._get_json(f"/runs/{quote(name, safe='')}"))

    def create_run(self, config: Mapping[str, Any]) -> RunInfo:
        """Create a run from a RunConfig mapping; creating the identical run again is a no-op, a
        different config under an existing name raises `ConflictError`."""
        return RunInfo.model_validate(self.request("POST", "/runs", json=dict(config)).json())

    def objectives(self, run: str | None = None) -> list[ObjectiveInfo]:
        """Objective configurations of a run, or every configuration the server's presets know."""
        body = self._get_json("/objectives", {"run": run} if run is not None else None)
        items = body.get("objectives", body) if isinstance(body, dict) else body
        return [ObjectiveInfo.model_validate(item) for item in items]

    def tokenizer(self) -> dict[str, Any]:
        """The server's tokenizer.json (load with `tokenizers.Tokenizer.from_str(json.dumps(...))`)."""
        return self._get_json("/tokenizer")

    def healthz(self) -> bool:
        """True when the server process answers (connection errors raise after retries)."""
        return self.request("GET", "/healthz").is_success

    def readyz(self) -> bool:
        """True when the server can reach its state store; False when it answers 503. Not retried:
        the answer is the point."""
        try:
            return self.request("GET", "/readyz", retries=0).is_success
        except TransientHTTPError as error:
            if error.status == 503:
                return False
            raise

    def metrics(self) -> str:
        """Prometheus exposition text."""
        return self.request("GET", "/metrics").text


def training_address(run: str, step: int, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Query parameters of one training batch; checks the address before it goes on the wire."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return {"run": run, "rank": rank, "world_size": world_size, "step": step}


def validation_address(run: str, objective: str, index: int = 0) -> dict[str, Any]:
    """Query parameters of one fixed validation batch."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return {"run": run, "split": "validation", "objective": objective, "index": index}
