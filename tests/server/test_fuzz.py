"""Property-based fuzzing of the request surface: whatever a client sends to /batch, /losses and
/runs, the answer is never a 5xx, and a rejected loss post changes no state.

Requests are drawn from strategies that mix valid values with hostile ones (wrong types, huge and
negative numbers, NaN/inf, unknown names, missing and extra fields, non-JSON bodies), so that
hypothesis explores the boundary of the OpenAPI schema rather than only the happy path.
"""

from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objective_server.app import create_app
from objective_server.objectives.presets import preset
from objective_server.settings import Settings
from server.conftest import SEQ_LEN, run_config, write_runs

NAMES = [o.name for o, _ in preset("ul2", seq_len=SEQ_LEN)]
HOSTILE_NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=3),
)
HOSTILE_NAMES = st.one_of(st.sampled_from(NAMES + ["small", "nope", "", "../etc", "small\x00"]), st.text(max_size=40))
LOSS_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.integers(-5, 10**20))
TOKEN_VALUES = st.one_of(st.integers(-10, 10**20), st.floats(allow_nan=True), st.text(max_size=5))
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def client(corpus_path, tmp_path_factory):
    runs = write_runs(tmp_path_factory.mktemp("fuzz") / "runs.yaml", run_config())
    app = create_app(Settings(corpus=corpus_path, run_files=[runs], presets=[], generation_executor="thread",
                              generation_workers=1, max_request_tokens=4096, max_body_bytes=8192))
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c


def totals(client) -> dict:
    return client.get("/mixture", params={"run": "small"}).json()["meta"].get("train_totals", {})


@SETTINGS
@given(params=st.dictionaries(
    st.sampled_from(["run", "rank", "world_size", "step", "split", "objective", "index", "format", "decode", "extra"]),
    st.one_of(HOSTILE_NUMBERS.map(str), HOSTILE_NAMES, st.sampled_from(["train", "validation", "json", "arrow", "1"])),
    max_size=9,
))
def test_batch_never_fails_on_the_server_side(client, params):
    response = client.get("/batch", params=params)
    assert response.status_code < 500, (params, response.text)
    if response.status_code >= 400:
        assert "detail" in response.json()


@SETTINGS
@given(body=st.one_of(
    st.fixed_dictionaries(
        {"run": HOSTILE_NAMES, "step": HOSTILE_NUMBERS, "losses": st.dictionaries(HOSTILE_NAMES, LOSS_VALUES, max_size=4),
         "tokens": st.dictionaries(HOSTILE_NAMES, TOKEN_VALUES, max_size=4)},
        optional={"rank": HOSTILE_NUMBERS, "world_size": HOSTILE_NUMBERS,
                  "split": st.one_of(st.sampled_from(["train", "validation"]), st.text(max_size=8)),
                  "unexpected": st.integers()},
    ),
    st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=8), lambda c: st.lists(c, max_size=3), max_leaves=5),
))
def test_a_rejected_loss_post_changes_nothing(client, body):
    before = totals(client)
    try:
        payload = json.dumps(body, allow_nan=True)
    except (TypeError, ValueError):
        return
    response = client.post("/losses", content=payload, headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert totals(client) == before, body
    else:  # only a fully valid post is taken: a known run, its configurations, finite losses
        assert body["run"] == "small" and set(body["losses"]) <= set(NAMES)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in body["losses"].values())


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_bodies_that_are_not_json_are_4xx(client, raw):
    for path in ("/losses", "/runs"):
        response = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (path, raw, response.text)


@SETTINGS
@given(config=st.dictionaries(
    st.sampled_from(["name", "preset", "arms", "seq_len", "batch_size", "seed", "policy", "total_steps", "eval_steps",
                     "validation_batches", "bogus"]),
    st.one_of(HOSTILE_NUMBERS, HOSTILE_NAMES, st.sampled_from(["ul2", "birdie", "nope"]),
              st.fixed_dictionaries({"name": st.sampled_from(["fixed", "birdie", "exp3", "nope"])}),
              st.lists(st.fixed_dictionaries({"objective": HOSTILE_NAMES, "probability": HOSTILE_NUMBERS}), max_size=3)),
    max_size=8,
))
def test_run_creation_never_fails_on_the_server_side(client, config):
    payload = json.dumps(config, allow_nan=True)  # NaN/Infinity literals too: Python's parser takes them
    response = client.post("/runs", content=payload, headers={"content-type": "application/json"})
    assert response.status_code < 500, (config, response.text)
