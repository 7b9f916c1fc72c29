"""A stand-in objective server for the client tests: real HTTP on 127.0.0.1, failures on demand.

It speaks the real contract (`clients.models` bodies, `clients.wire` batches) with a tiny in-memory
state: one run, deterministic batches (a pure function of the address), loss posts deduplicated by
their idempotency key (run, step, rank, split). Tests inject faults per route: an error status with
Retry-After, a slow answer, a dropped connection, or "process the request, then answer with an
error" (the client never learns it went through, so it re-sends: a duplicate). `stop()`/`start()`
take the listener down and up on the same port while the state survives, like a server restart
with a persistent store; the port stays reserved for the server until `close()`, so no other
process can take it while the server is down. Every request is recorded, so tests can check what was re-sent.

Plain HTTP/1.0 (one connection per request) keeps "down" truly down: no kept-alive connection
outlives `stop()`.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from pydantic import ValidationError

from clients.models import LossPostBody
from clients.wire import ARROW_MEDIA_TYPE, encode_arrow, encode_json

RUN = "demo"
OBJECTIVES = ("next_token", "copying.len64", "infilling.r15.s3")
FAMILIES = {"next_token": "next_token", "copying.len64": "copying", "infilling.r15.s3": "infilling"}


def reserve_port() -> socket.socket:
    """A free loopback port, held: a socket bound to it (SO_REUSEADDR) that never listens.

    While it is open no other process can bind the port or take it as a connection's local port,
    yet connecting to it is refused (nothing listens), and a server of ours that binds it with
    SO_REUSEADDR (http.server and uvicorn both do) can listen on it. Choosing a port, closing it
    and binding it later leaves a window in which another process can take it; a port that must
    survive a server's restart (its clients keep the URL) cannot be swapped for another either.
    The port is `reservation.getsockname()[1]`; close the socket to give it up.
    """
    reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.bind(("127.0.0.1", 0))
    return reservation


def batch_arrays(step: int, rank: int, world_size: int, split: str, key: int, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Deterministic packed-looking arrays for an address: one example per row, padding after it."""
    rows, length = shape
    rng = np.random.default_rng([step, rank, world_size, 1 if split == "validation" else 0, key])
    used = rng.integers(length // 2, length + 1, size=rows)
    prefix = used // 2
    pos = np.arange(length)[None, :]
    inside = pos < used[:, None]
    in_prefix = pos < prefix[:, None]
    objective = rng.integers(0, len(OBJECTIVES), size=rows)[:, None]
    input_ids = np.where(inside, rng.integers(10, 1000, size=shape), 0)
    return {
        "input_ids": input_ids,
        "label_ids": np.where(inside & ~in_prefix, rng.integers(10, 1000, size=shape), -100),
        "attention_mask": np.where(inside, np.where(in_prefix, 1, 3), 0),
        "segment_ids": inside.astype(np.int32),
        "position_ids": np.where(inside, pos, 0),
        "objective_ids": np.where(inside, objective, -1),
    }


@dataclass
class Fault:
    status: int | None = None  # answer with this status
    retry_after: str | None = None
    delay: float = 0.0  # seconds to wait before answering
    process: bool = False  # handle the request for real first, then answer `status` instead
    drop: bool = False  # close the connection without answering


@dataclass
class Seen:
    method: str
    path: str
    query: str
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


class FakeBirdieServer:
    def __init__(self, *, port: int | None = None, token: str | None = None, shape: tuple[int, int] = (2, 16)) -> None:
        self._reservation = reserve_port() if port is None else None
        self.port = port or self._reservation.getsockname()[1]
        self.token = token
        self.shape = shape
        self.ready = True
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.always: dict[str, Fault] = {}
        self.accepted: dict[tuple, dict] = {}  # idempotency key -> body
        self.duplicate_posts = 0
        self.max_served = -1
        self.runs: dict[str, dict] = {RUN: {"name": RUN, "seq_len": shape[1], "batch_size": shape[0]}}
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # lifecycle

    def start(self) -> FakeBirdieServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Listener(("127.0.0.1", self.port), handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Take the listener down (connections are refused); the port stays ours for start()."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def close(self) -> None:
        """Stop for good and give the port up."""
        self.stop()
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    def start_after(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.start)
        timer.start()
        return timer

    def __enter__(self) -> FakeBirdieServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # fault injection and records

    def inject(self, path: str, fault: Fault, times: int = 1) -> None:
        with self.lock:
            self.faults[path].extend([fault] * times)

    def fail_always(self, path: str, fault: Fault | None) -> None:
        with self.lock:
            if fault is None:
                self.always.pop(path, None)
            else:
                self.always[path] = fault

    def requests(self, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if path is None or s.path == path]

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            if self.faults[path]:
                return self.faults[path].popleft()
            return self.always.get(path)

    # route logic: each returns (status, content type, body bytes)

    def handle(self, method: str, path: str, params: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        route = (method, path)
        if route == ("GET", "/batch"):
            return self.batch(params)
        if route == ("POST", "/losses"):
            return self.losses(body)
        if route == ("GET", "/mixture"):
            return self.known(params.get("run")) or json_response(200, self.mixture(params["run"]))
        if route == ("GET", "/mixture/history"):
            return self.known(params.get("run")) or json_response(200, self.history(params["run"]))
        if route == ("GET", "/runs"):
            return json_response(200, {"runs": [self.summary(name) for name in self.runs]})
        if route == ("POST", "/runs"):
            return self.create_run(body)
        if method == "GET" and path.startswith("/runs/"):
            name = path.removeprefix("/runs/")
            return self.known(name) or json_response(200, self.run_info(name))
        if route == ("GET", "/objectives"):
            if "run" in params:
                missing = self.known(params["run"])
                if missing:
                    return missing
            return json_response(200, [self.objective(n) for n in OBJECTIVES])
        if route == ("GET", "/tokenizer"):
            return json_response(200, {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}})
        if route == ("GET", "/healthz"):
            return json_response(200, {"status": "ok"})
        if route == ("GET", "/readyz"):
            return json_response(200, {"status": "ready"}) if self.ready else json_response(503, {"detail": "store unreachable"})
        if route == ("GET", "/metrics"):
            return 200, "text/plain; version=0.0.4", b"birdie_batches_served_total 3.0\n"
        return json_response(404, {"detail": f"no route {method} {path}"})

    def known(self, run: str | None) -> tuple[int, str, bytes] | None:
        if run not in self.runs:
            return json_response(404, {"detail": f"unknown run {run!r}"})
        return None

    def batch(self, params: dict[str, str]) -> tuple[int, str, bytes]:
        missing = self.known(params.get("run"))
        if missing:
            return missing
        try:
            if params.get("split") == "validation":
                if params.get("objective") not in OBJECTIVES:
                    return json_response(422, {"detail": f"unknown objective {params.get('objective')!r}"})
                step, rank, world_size = 0, 0, 1
                key = OBJECTIVES.index(params["objective"]) * 1000 + int(params.get("index", 0))
                split = "validation"
            else:
                step, rank, world_size = int(params["step"]), int(params.get("rank", 0)), int(params.get("world_size", 1))
                key, split = 0, "train"
        except (KeyError, ValueError) as error:
            return json_response(422, {"detail": [{"loc": ["query", str(error)], "msg": "bad or missing parameter"}]})
        if split == "train":
            with self.lock:
                self.max_served = max(self.max_served, step)
        arrays = batch_arrays(step, rank, world_size, split, key, self.shape)
        header = {
            "run": params["run"], "split": split, "step": step, "rank": rank, "world_size": world_size,
            "mixture_version": 0, "objectives": list(OBJECTIVES), "fill_rate": float(np.mean(arrays["segment_ids"])),
        }
        if params.get("format") == "json":
            examples = None
            if params.get("decode") == "1":
                examples = [
                    {"row": r, "offset": 0, "objective": OBJECTIVES[int(arrays["objective_ids"][r, 0])],
                     "input_tokens": 1, "label_tokens": 1, "input": f"[COPY] input text of row {r}", "label": f"label text of row {r} [DONE]"}
                    for r in range(self.shape[0])
                ]
            return json_response(200, encode_json(arrays, header, examples))
        return 200, ARROW_MEDIA_TYPE, encode_arrow(arrays, header)

    def losses(self, body: bytes) -> tuple[int, str, bytes]:
        try:
            post = LossPostBody.model_validate_json(body)
        except ValidationError as error:
            return json_response(422, {"detail": json.loads(error.json())})
        if post.run not in self.runs:
            return json_response(404, {"detail": f"unknown run {post.run!r}"})
        unknown = sorted(set(post.losses) - set(OBJECTIVES))
        if unknown:
            return json_response(422, {"detail": f"unknown configurations {unknown}"})
        key = (post.run, post.step, post.rank, post.split)
        with self.lock:
            duplicate = key in self.accepted
            if duplicate:
                self.duplicate_posts += 1
            else:
                self.accepted[key] = post.model_dump()
            ranks = sum(1 for k in self.accepted if k[0] == post.run and k[1] == post.step and k[3] == post.split)
        return json_response(200, {
            "status": "duplicate" if duplicate else "accepted", "ranks_posted": ranks,
            "world_size": post.world_size, "completed": ranks == post.world_size,
        })

    def create_run(self, body: bytes) -> tuple[int, str, bytes]:
        try:
            config = json.loads(body)
            name = config["name"]
        except (ValueError, KeyError, TypeError):
            return json_response(422, {"detail": "a run config needs a name"})
        with self.lock:
            if name in self.runs:
                if self.runs[name] != config:
                    return json_response(409, {"detail": f"run {name!r} exists with a different config"})
                status = 200
            else:
                self.runs[name] = config
                status = 201
        return json_response(status, self.run_info(name))

    def summary(self, name: str) -> dict[str, Any]:
        config = self.runs[name]
        return {
            "name": name, "policy": "fixed", "objectives": len(OBJECTIVES), "seq_len": config.get("seq_len", 16),
            "batch_size": config.get("batch_size", 2), "mixture_version": 0, "max_served": self.max_served,
        }

    def run_info(self, name: str) -> dict[str, Any]:
        return {
            "name": name, "config": self.runs[name], "objectives": [self.objective(n) for n in OBJECTIVES],
            "vocab_size": 1024, "special_tokens": {"pad": 0, "start_generating": 3}, "eval_steps": [10, 50],
            "mixture_version": 0, "max_served": self.max_served,
        }

    @staticmethod
    def objective(name: str) -> dict[str, Any]:
        return {"name": name, "family": FAMILIES[name], "params": {"name": name}}

    def mixture(self, run: str) -> dict[str, Any]:
        p = 1 / len(OBJECTIVES)
        return {
            "run": run, "policy": "fixed", "version": 0, "effective_step": 0, "max_served": self.max_served,
            "probabilities": {n: p for n in OBJECTIVES}, "families": {FAMILIES[n]: p for n in OBJECTIVES},
            "last_losses": {"next_token": 3.25}, "rewards": {"next_token": 0.5},
        }

    def history(self, run: str) -> dict[str, Any]:
        mixture = self.mixture(run)
        return {
            "run": run, "timeline": [[0, 0]],
            "mixtures": [{"version": 0, "effective_step": 0, "probabilities": mixture["probabilities"]}],
        }


def json_response(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # binds the port its reservation holds (and again after a restart)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout) before a slow answer was written is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeBirdieServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.serve("GET")

    def do_POST(self) -> None:
        self.serve("POST")

    def serve(self, method: str) -> None:
        fake = self.fake
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with fake.lock:
            fake.seen.append(Seen(method, parts.path, parts.query, params, dict(self.headers), body))
        fault = fake.take_fault(parts.path)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.drop:
            self.close_connection = True
            return
        if fake.token is not None and parts.path not in ("/healthz", "/readyz"):
            if self.headers.get("Authorization") != f"Bearer {fake.token}":
                return self.reply(*json_response(401, {"detail": "missing or wrong API token"}))
        if fault is not None and fault.status is not None:
            if fault.process:
                fake.handle(method, parts.path, params, body)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return self.reply(*json_response(fault.status, {"detail": f"injected {fault.status}"}), headers=headers)
        self.reply(*fake.handle(method, parts.path, params, body))

    def reply(self, status: int, content_type: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


__all__ = ["FakeBirdieServer", "Fault", "RUN", "OBJECTIVES", "batch_arrays", "reserve_port", "wait_until"]
