"""Property-based fuzzing of the request surface: whatever a client sends to /batch, /losses and
/runs, the answer is never a 5xx; a loss post one field away from a valid one is taken exactly when
it is valid, a rejected one changes no state, and a taken one is counted exactly once.

Requests are drawn from strategies that mix valid values with hostile ones (wrong types, huge and
negative numbers, NaN/inf, unknown names, missing and extra fields, non-JSON bodies), so that
hypothesis explores the boundary of the OpenAPI schema rather than only the happy path.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from objective_server.app import create_app
from objective_server.objectives.presets import preset
from objective_server.service.losses import MAX_LOSS
from objective_server.settings import Settings
from objective_server.store import MAX_TOKENS
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
MAX_WORLD_SIZE = Settings.model_fields["max_world_size"].default


@pytest.fixture(scope="module")
def client(corpus_path, tmp_path_factory):
    runs = write_runs(tmp_path_factory.mktemp("fuzz") / "runs.yaml", run_config())
    app = create_app(Settings(corpus=corpus_path, run_files=[runs], presets=[], generation_executor="thread",
                              generation_workers=1, prefetch_depth=0, max_request_tokens=4096, max_body_bytes=8192))
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c


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


# --- loss posts one mutation away from a valid one -------------------------------------------------

RUN_IDS = itertools.count()
# Rank 0 of a two-rank evaluation after 2 training steps (0-2 served): the post every example mutates.
VALID_POST = {"step": 2, "rank": 0, "world_size": 2, "split": "validation",
              "losses": {NAMES[0]: 2.5, NAMES[1]: 1.25}, "tokens": {NAMES[0]: 40, NAMES[1]: 8}}
FIELDS = ("run", "step", "rank", "world_size", "split", "losses", "tokens")


def fresh_run(client) -> str:
    """A new run that has served steps 0-2 and has rank 0's post of VALID_POST (so a mutation can
    conflict with it, duplicate it or complete its evaluation)."""
    run = f"fuzz-{next(RUN_IDS)}"
    assert client.post("/runs", json=run_config(run)).status_code == 201
    for step in range(3):
        assert client.get("/batch", params={"run": run, "step": step}).status_code == 200
    answer = client.post("/losses", json={"run": run, **VALID_POST}).json()
    assert answer["status"] == "accepted" and answer["ranks_posted"] == 1 and not answer["completed"]
    return run


def state(client, run: str) -> tuple:
    """All a loss post could change: the mixture (policy state, training totals), the history (with
    its evaluations), every run's max_served, and the run's raw state in the store (the ranks and
    sums of incomplete aggregates, which no route shows)."""
    store = client.app.state.services.store
    with store._mutex:
        raw = copy.deepcopy(store._runs[run])
    return (client.get("/mixture", params={"run": run}).json(),
            client.get("/mixture/history", params={"run": run}).json(),
            client.get("/runs").json(), raw)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_valid(body, run: str) -> bool:
    """What the spec takes, for a run that served steps 0-2 and has validation step 2 at world_size 2."""
    if not isinstance(body, dict) or not set(body) <= set(FIELDS) or not {"run", "step", "losses", "tokens"} <= set(body):
        return False
    step, rank, world_size = body["step"], body.get("rank", 0), body.get("world_size", 1)
    split, losses, tokens = body.get("split", "train"), body["losses"], body["tokens"]
    if body["run"] != run or split not in ("train", "validation") or not all(map(is_int, (step, rank, world_size))):
        return False
    if not (0 <= step <= (3 if split == "validation" else 2) and 1 <= world_size <= MAX_WORLD_SIZE and 0 <= rank < world_size):
        return False
    if (split, step) == ("validation", 2) and world_size != 2:
        return False  # 409: the evaluation's world_size is recorded
    if not (isinstance(losses, dict) and isinstance(tokens, dict) and losses and set(losses) == set(tokens) <= set(NAMES)):
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= MAX_LOSS
               for v in losses.values()) and all(is_int(v) and 0 <= v <= MAX_TOKENS for v in tokens.values())


def not_a_run(value) -> bool:  # a mutated run name must not name a run that exists
    return not (isinstance(value, str) and (value == "small" or value.startswith("fuzz-")))


def valid_dicts(values):
    return st.dictionaries(st.sampled_from(NAMES), values, min_size=1, max_size=3)


# Near misses and near hits: other steps, ranks, world sizes and splits (new aggregates, conflicts,
# untrained steps, a completing rank), and other losses or tokens for the same configurations.
NEAR_VALUES = {
    "step": st.sampled_from([0, 1, 3, 4]),
    "rank": st.sampled_from([1, 2]),
    "world_size": st.sampled_from([1, 3]),
    "split": st.sampled_from(["train", "Train"]),
    "losses": st.fixed_dictionaries({n: st.floats(0, 10) | st.integers(0, 10) | LOSS_VALUES for n in VALID_POST["losses"]}),
    "tokens": st.fixed_dictionaries({n: st.integers(0, 1000) | TOKEN_VALUES for n in VALID_POST["tokens"]}),
}
HOSTILE_VALUES = {
    "run": st.one_of(HOSTILE_NAMES.filter(not_a_run), HOSTILE_NUMBERS),
    "step": HOSTILE_NUMBERS, "rank": HOSTILE_NUMBERS, "world_size": HOSTILE_NUMBERS,
    "split": st.one_of(st.text(max_size=8), HOSTILE_NUMBERS),
    "losses": st.one_of(valid_dicts(LOSS_VALUES), st.dictionaries(HOSTILE_NAMES, LOSS_VALUES, max_size=3), HOSTILE_NUMBERS),
    "tokens": st.one_of(valid_dicts(TOKEN_VALUES), st.dictionaries(HOSTILE_NAMES, TOKEN_VALUES, max_size=3), HOSTILE_NUMBERS),
}
MUTATION_KINDS = {
    "near": st.sampled_from(sorted(NEAR_VALUES)).flatmap(lambda f: NEAR_VALUES[f].map(lambda v: ("set", f, v))),
    "hostile": st.sampled_from(FIELDS).flatmap(lambda f: HOSTILE_VALUES[f].map(lambda v: ("set", f, v))),
    "drop": st.sampled_from(FIELDS).map(lambda f: ("drop", f, None)),
    "extra": st.tuples(st.just("extra"), HOSTILE_NAMES.filter(lambda k: k not in FIELDS), HOSTILE_NUMBERS),
    "replace": st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=8),
                            lambda c: st.lists(c, max_size=3), max_leaves=5).map(lambda junk: ("replace", None, junk)),
}
# Near misses half the time, so that a modest number of examples also reaches the posts that are taken.
MUTATIONS = st.sampled_from(["near"] * 6 + sorted(MUTATION_KINDS)).flatmap(MUTATION_KINDS.__getitem__)


def mutated(run: str, mutation) -> object:
    kind, field, value = mutation
    body = {"run": run, **copy.deepcopy(VALID_POST)}
    if kind == "set" or kind == "extra":
        body[field] = value
    elif kind == "drop":
        del body[field]
    else:
        body = value
    return body


@settings(SETTINGS, max_examples=60)
@given(mutation=MUTATIONS)
def test_a_loss_post_one_field_off_is_taken_exactly_when_valid_and_counted_once(client, mutation):
    run = fresh_run(client)
    body = mutated(run, mutation)
    before = state(client, run)
    response = client.post("/losses", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    assert (response.status_code == 200) == is_valid(body, run), (body, response.text)
    event(f"{response.status_code} {response.json().get('status', '')}".strip())  # --hypothesis-show-statistics
    if response.status_code != 200 or response.json()["status"] == "duplicate":
        assert response.status_code in (200, 404, 409, 422), (body, response.text)
        assert state(client, run) == before, body  # rejected or a repeat: nothing changed
        return
    # Taken: counted exactly once. A repeat is a duplicate that changes nothing ...
    answer, after = response.json(), state(client, run)
    event(f"taken: {body.get('split', 'train')}{', completing' if answer['completed'] else ''}")
    again = client.post("/losses", json=body)
    assert again.json()["status"] == "duplicate" and state(client, run) == after
    split, step, rank, world_size = body.get("split", "train"), body["step"], body.get("rank", 0), body.get("world_size", 1)
    losses, tokens = body["losses"], body["tokens"]
    if split == "train":  # ... the training totals gained exactly this post ...
        old, new = before[0]["meta"]["train_totals"], after[0]["meta"]["train_totals"]
        gained = {n: (new[n]["tokens"] - old.get(n, {}).get("tokens", 0), new[n]["posts"] - old.get(n, {}).get("posts", 0))
                  for n in new}
        assert gained == {n: (tokens[n], 1) for n in tokens}, (body, old, new)
        return
    # ... and the evaluation, once every rank has posted, holds it exactly once, token-weighted.
    posted = [(losses, tokens)]
    if (step, rank) == (2, 1):
        posted.append((VALID_POST["losses"], VALID_POST["tokens"]))
        assert answer["completed"]
    for other in range(world_size):
        if other != rank and (step, other) != (2, 0):
            filler = {"run": run, "step": step, "rank": other, "world_size": world_size, "split": "validation",
                      "losses": {NAMES[2]: 1.5}, "tokens": {NAMES[2]: 4}}
            assert client.post("/losses", json=filler).json()["status"] == "accepted"
            posted.append((filler["losses"], filler["tokens"]))
    evaluations = client.get("/mixture/history", params={"run": run}).json()["evaluations"]
    assert [e["step"] for e in evaluations] == [step], (body, evaluations)
    expected_tokens: dict[str, int] = {}
    weighted: dict[str, float] = {}
    for post_losses, post_tokens in posted:
        for n, t in post_tokens.items():
            expected_tokens[n] = expected_tokens.get(n, 0) + t
            weighted[n] = weighted.get(n, 0.0) + post_losses[n] * t
    assert evaluations[0]["tokens"] == expected_tokens, (body, evaluations)
    assert evaluations[0]["losses"] == pytest.approx({n: weighted[n] / t for n, t in expected_tokens.items() if t > 0})
    policy = client.get("/mixture", params={"run": run}).json()["meta"]["policy_state"]
    assert policy["evaluations"] == 1 and policy["last_step"] == step


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
