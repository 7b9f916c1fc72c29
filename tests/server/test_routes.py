"""Every route through the real app in-process (httpx ASGI transport), once on the in-process store
and once on Redis: formats, content negotiation, validation batches, run creation, mixtures and their
timeline, auth, and malformed or hostile requests that must get a 4xx and leave the state untouched."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import json
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from clients.wire import ARROW_MEDIA_TYPE, FIELDS, decode_arrow, decode_json
from objective_server.objectives.presets import list_presets, preset
from objective_server.packing import IGNORE_INDEX, PADDING, PREFIX, SUFFIX
from objective_server.runs import RunConfig
from objective_server.service.registry import RunRegistry
from objective_server.store import LossPost, MemoryRunStore
from server.conftest import BATCH_SIZE, SEQ_LEN, run_config
from server.policies_for_tests import new_gate

pytestmark = pytest.mark.anyio


async def batch(client, **params):
    params = {"run": "small", "step": 0, **params}
    response = await client.get("/batch", params=params)
    assert response.status_code == 200, response.text
    return response


def store_of(client):
    return client._transport.app.state.services.store


async def stored(client):
    """The store's raw contents, which also hold what no route shows (the ranks and sums of an
    incomplete aggregate, the pending queue): a half-applied write shows here."""
    store = store_of(client)
    if isinstance(store, MemoryRunStore):
        with store._mutex:
            return copy.deepcopy(store._runs)
    r, contents = store._redis, {}
    async for key in r.scan_iter(match=f"{store._namespace}:*"):
        kind = (await r.type(key)).decode()
        read = {"string": r.get, "hash": r.hgetall, "set": r.smembers,
                "list": lambda k: r.lrange(k, 0, -1), "zset": lambda k: r.zrange(k, 0, -1, withscores=True)}[kind]
        contents[key] = (kind, await read(key))
    return contents


async def state_of(client, run="small", headers=None):
    """Everything a request could change: mixture (with policy state and training totals),
    history, run list and run info, and the store's raw contents."""
    async def get(path, **params):
        response = await client.get(path, params=params, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    return (
        await get("/mixture", run=run),
        await get("/mixture/history", run=run),
        await get("/runs"),
        await get(f"/runs/{run}"),
        await stored(client),
    )


async def eventually(predicate, what: str, timeout_s: float = 30.0) -> None:
    """Wait (polling) until `predicate()` (a coroutine function) is true; fail after `timeout_s`,
    a guard against hanging, not a timing requirement."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


# --- batches ------------------------------------------------------------------------------------


async def test_batch_is_arrow_by_default_and_json_on_request_with_identical_arrays(app_client):
    client = await app_client()
    arrow = await batch(client, step=3, rank=1, world_size=2)
    assert arrow.headers["content-type"] == ARROW_MEDIA_TYPE
    assert arrow.headers["x-birdie-mixture-version"] == "0"
    wire = decode_arrow(arrow.content)
    assert wire.shape == (BATCH_SIZE, SEQ_LEN)
    assert wire.header["run"] == "small" and wire.header["step"] == 3 and wire.header["rank"] == 1
    assert wire.header["world_size"] == 2 and wire.header["mixture_version"] == 0
    assert len(wire.objectives) == 7

    by_param = await batch(client, step=3, rank=1, world_size=2, format="json")
    by_accept = await client.get("/batch", params={"run": "small", "step": 3, "rank": 1, "world_size": 2},
                                 headers={"Accept": "application/json"})
    assert by_param.headers["content-type"] == by_accept.headers["content-type"] == "application/json"
    assert by_param.content == by_accept.content
    as_json = decode_json(by_param.json())
    assert as_json.header == wire.header

    # Accept is read with its q-values: the most specific range that matches a type gives its q.
    for accept, expected in [
        ("application/json, application/vnd.apache.arrow.stream;q=0.1", "application/json"),
        ("application/json;q=0, */*", ARROW_MEDIA_TYPE),
        ("application/*;q=0.5, application/json;q=0.9", "application/json"),
        ("*/*;q=0.2, application/vnd.apache.arrow.stream;q=0.2", ARROW_MEDIA_TYPE),  # a tie: Arrow
        ("text/html, */*;q=0.8", ARROW_MEDIA_TYPE),
        ("application/json, text/plain, */*", "application/json"),  # a browser-style list naming JSON
    ]:
        negotiated = await client.get("/batch", params={"run": "small", "step": 3}, headers={"Accept": accept})
        assert negotiated.status_code == 200 and negotiated.headers["content-type"] == expected, accept
    for accept in ("text/csv", "application/json;q=0, application/vnd.apache.arrow.stream;q=0"):
        refused = await client.get("/batch", params={"run": "small", "step": 3}, headers={"Accept": accept})
        assert refused.status_code == 406 and "admits neither" in refused.json()["detail"], accept
    for name in FIELDS:
        assert as_json[name].dtype == np.int32
        np.testing.assert_array_equal(as_json[name], wire[name])


async def test_decoded_examples_describe_the_packed_arrays(app_client):
    client = await app_client()
    body = (await batch(client, step=1, decode=1)).json()  # decode=1 implies JSON
    examples = body["examples"]
    segments = np.asarray(body["arrays"]["segment_ids"])
    assert len(examples) == int(segments.max(axis=1).sum())
    for ex in examples:
        assert ex["objective"] in body["objectives"]
        assert ex["input_tokens"] > 0 and ex["label_tokens"] > 0
        assert isinstance(ex["input"], str) and ex["input"].startswith("[")  # the paradigm token
    bad = await client.get("/batch", params={"run": "small", "step": 1, "decode": 1, "format": "arrow"})
    assert bad.status_code == 422 and "format=json" in bad.json()["detail"]


async def test_an_address_replays_byte_identical_even_when_regenerated(app_client):
    client = await app_client(cache_size=1, prefetch_depth=0)
    first = (await batch(client, step=5, rank=0, world_size=2)).content
    for step in range(6, 9):  # push step 5 out of the one-entry cache
        await batch(client, step=step, rank=0, world_size=2)
    assert (await batch(client, step=5, rank=0, world_size=2)).content == first
    other_rank = (await batch(client, step=5, rank=1, world_size=2)).content
    assert decode_arrow(other_rank)["input_ids"].tolist() != decode_arrow(first)["input_ids"].tolist()


async def test_validation_batches_are_fixed_held_out_and_in_the_training_format(app_client):
    client = await app_client()
    names = [o["name"] for o in (await client.get("/objectives", params={"run": "small"})).json()]
    for objective_id, name in enumerate(names):
        params = {"run": "small", "split": "validation", "objective": name, "index": 1}
        wire = decode_arrow((await client.get("/batch", params=params)).content)
        assert wire.header["split"] == "validation" and wire.header["objective"] == name
        assert wire.header["mixture_version"] is None
        mask, labels, objective_ids = wire["attention_mask"], wire["label_ids"], wire["objective_ids"]
        assert set(np.unique(mask)) <= {PADDING, PREFIX, SUFFIX} and (mask == SUFFIX).any()
        assert (labels[mask == PREFIX] == IGNORE_INDEX).all()  # suffix-only labels
        assert (labels[mask == SUFFIX] != IGNORE_INDEX).all()
        assert set(np.unique(objective_ids[mask != PADDING])) == {objective_id}
        again = await client.get("/batch", params=params)
        assert decode_arrow(again.content)["input_ids"].tolist() == wire["input_ids"].tolist()

    # Held out: no validation row equals a training row of the first steps.
    val = decode_arrow((await client.get("/batch", params={
        "run": "small", "split": "validation", "objective": names[0], "index": 0})).content)
    train = np.concatenate([decode_arrow((await batch(client, step=s)).content)["input_ids"] for s in range(4)])
    assert not any((row == t).all() for row in val["input_ids"] for t in train)

    for params, message in [
        ({"objective": "infilling.nope"}, "has no objective configuration 'infilling.nope'; it has 7: "
                                          + ", ".join(names)),
        ({"objective": names[0][:-1]}, f"; did you mean {names[0]}"),
        ({}, "objective=NAME"),
        ({"objective": names[0], "index": 2}, "validation batches 0..1"),
    ]:
        response = await client.get("/batch", params={"run": "small", "split": "validation", **params})
        assert response.status_code == 422 and message in response.json()["detail"], response.text
    # A run of many configurations points to their list instead of printing it in one line.
    await client.post("/runs", json=run_config("many", preset="birdie", seq_len=512))
    response = await client.get("/batch", params={"run": "many", "split": "validation", "objective": "copying"})
    assert response.status_code == 422
    assert response.json()["detail"].endswith("(GET /objectives?run=many lists them)"), response.text


async def test_mixture_changes_apply_from_the_step_after_the_highest_served(app_client):
    client = await app_client(run_files=[], drain_interval_s=0.01)
    created = await client.post("/runs", json=run_config("rot", policy={"name": "rotating"}))
    assert created.status_code == 201, created.text
    before = {s: (await batch(client, run="rot", step=s)).content for s in range(4)}  # max_served = 3
    names = [o["name"] for o in created.json()["objectives"]]
    post = {"run": "rot", "step": 4, "split": "validation", "losses": {names[0]: 2.0}, "tokens": {names[0]: 10}}
    answer = (await client.post("/losses", json=post)).json()
    assert answer["completed"] and answer["policy_updated"] and answer["mixture_version"] == 1

    history = (await client.get("/mixture/history", params={"run": "rot"})).json()
    assert history["timeline"] == [[0, 0], [4, 1]]
    assert history["mixtures"][1]["created_at_step"] == 4
    assert history["max_served"] == 3 and history["families"][names[0]] == created.json()["objectives"][0]["family"]
    # The evaluation the policy consumed is in the history, token-weighted as posted.
    assert history["evaluations"] == [{"step": 4, "losses": {names[0]: 2.0}, "tokens": {names[0]: 10}}]
    mixture = (await client.get("/mixture", params={"run": "rot"})).json()
    assert mixture["version"] == 1 and mixture["effective_step"] == 4
    assert mixture["probabilities"][names[1]] == pytest.approx(0.5)
    assert mixture["families"]["infilling"] + mixture["families"]["prefix_lm"] == pytest.approx(1.0)
    assert mixture["meta"]["policy_state"]["observed"] == [["validation", 4]]

    for step, content in before.items():  # served before the publish: unchanged
        assert (await batch(client, run="rot", step=step)).content == content
    assert (await batch(client, run="rot", step=4)).headers["x-birdie-mixture-version"] == "1"


@pytest.mark.parametrize("failure", [{"fail_at": [4]}, {"nan_at": [4]}])  # raises, or proposes NaN
async def test_a_policy_failure_consumes_that_evaluation_and_later_ones_still_apply(app_client, failure):
    client = await app_client(run_files=[], drain_interval_s=0.01)
    config = run_config("rot", policy={"name": "rotating", "options": failure})
    names = [o["name"] for o in (await client.post("/runs", json=config)).json()["objectives"]]
    await batch(client, run="rot", step=7)
    post = {"run": "rot", "split": "validation", "losses": {names[0]: 2.0}, "tokens": {names[0]: 10}}
    failed = (await client.post("/losses", json={**post, "step": 4})).json()
    assert failed["completed"] and not failed["policy_updated"] and "the policy failed on it" in failed["policy_note"]
    applied = (await client.post("/losses", json={**post, "step": 8})).json()
    assert applied["policy_updated"] and applied["policy_note"] is None and applied["mixture_version"] == 1
    mixture = (await client.get("/mixture", params={"run": "rot"})).json()
    assert mixture["meta"]["policy_state"]["observed"] == [["validation", 8]]
    history = (await client.get("/mixture/history", params={"run": "rot"})).json()
    assert [e["step"] for e in history["evaluations"]] == [4, 8]  # both consumed, nothing left pending
    text = (await client.get("/metrics")).text
    assert 'birdie_policy_failures_total{run="rot",split="validation"} 1.0' in text
    assert 'birdie_policy_updates_total{run="rot",split="validation"} 1.0' in text


async def test_a_post_whose_observation_another_drain_took_reports_that_drains_outcome(app_client, monkeypatch):
    # Eval 4's policy update waits at a gate; eval 8 completes meanwhile, and eval 4's drain takes
    # (and fails on) it too once the gate opens. Eval 8's own post drains nothing itself but must
    # still say what happened to its evaluation.
    client = await app_client(run_files=[], drain_interval_s=0.01)
    gate = new_gate("rot")
    config = run_config("rot", policy={"name": "rotating", "options": {"hold_at": [4], "fail_at": [8]}})
    names = [o["name"] for o in (await client.post("/runs", json=config)).json()["objectives"]]
    await batch(client, run="rot", step=7)
    post = {"run": "rot", "split": "validation", "losses": {names[0]: 2.0}, "tokens": {names[0]: 10}}

    # Which request's drain commits which aggregates (the request's context reaches its drain).
    poster: contextvars.ContextVar[int] = contextvars.ContextVar("poster")
    store = store_of(client)
    commit_policy, commits = store.commit_policy, []

    async def recording_commit(run, expected_version, state, consumed, *args, **kwargs):
        commits.append((poster.get(None), list(consumed)))
        return await commit_policy(run, expected_version, state, consumed, *args, **kwargs)

    monkeypatch.setattr(store, "commit_policy", recording_commit)

    async def evaluation(step: int) -> dict:
        poster.set(step)
        response = await client.post("/losses", json={**post, "step": step})
        assert response.status_code == 200, response.text
        return response.json()

    async def gate_entered() -> bool:
        return gate.entered.is_set()

    async def eight_pending() -> bool:
        return ("validation", 8) in [a.key for a in await store.pending("rot")]

    four = asyncio.create_task(evaluation(4))
    try:
        await eventually(gate_entered, "eval 4's policy update started")
        eight = asyncio.create_task(evaluation(8))
        await eventually(eight_pending, "eval 8 completed and pending")
        assert not eight.done()  # its drain waits for eval 4's
    finally:
        gate.release.set()
    four, eight = await four, await eight
    assert four["policy_updated"] and four["policy_note"] is None and four["mixture_version"] == 1
    assert commits == [(4, [("validation", 4)]), (4, [("validation", 8)])]  # eval 4's post drained both
    assert eight["completed"] and not eight["policy_updated"]
    assert "the policy failed on it: RuntimeError" in eight["policy_note"] and eight["mixture_version"] == 1
    mixture = (await client.get("/mixture", params={"run": "rot"})).json()
    assert mixture["version"] == 1 and mixture["meta"]["policy_state"]["observed"] == [["validation", 4]]


async def test_the_retry_of_a_completing_post_whose_answer_was_lost_still_updates_the_policy(app_client):
    client = await app_client(run_files=[], drain_interval_s=3600)  # no housekeeping drains
    names = [o["name"] for o in (await client.post("/runs", json=run_config("rot", policy={"name": "rotating"}))).json()["objectives"]]
    await batch(client, run="rot", step=3)
    post = {"run": "rot", "step": 4, "world_size": 2, "split": "validation",
            "losses": {names[0]: 2.0}, "tokens": {names[0]: 10}}
    assert (await client.post("/losses", json={**post, "rank": 0})).json()["completed"] is False
    # Rank 1's first attempt reached the store and completed the evaluation, but its answer was lost.
    store = client._transport.app.state.services.store
    await store.post_losses("rot", LossPost(4, 1, 2, "validation", {names[0]: 2.0}, {names[0]: 10}))
    retried = (await client.post("/losses", json={**post, "rank": 1})).json()
    assert retried["status"] == "duplicate"
    mixture = (await client.get("/mixture", params={"run": "rot"})).json()
    assert mixture["version"] == 1 and mixture["meta"]["policy_state"]["observed"] == [["validation", 4]]


async def test_a_post_the_policy_does_not_observe_says_nothing_about_the_policy(app_client):
    client = await app_client(drain_interval_s=0.001)  # a housekeeping drain on every post
    name = (await client.get("/objectives", params={"run": "small"})).json()[0]["name"]
    await batch(client, step=0)
    answer = (await client.post("/losses", json={"run": "small", "step": 0, "losses": {name: 1.0},
                                                 "tokens": {name: 3}})).json()
    assert answer["completed"] and not answer["policy_updated"] and answer["policy_note"] is None


async def test_training_posts_drive_a_step_wise_policy_one_update_per_step(app_client):
    # A policy that observes training losses: every step's post (one rank) completes an observation,
    # and the update publishes a mixture effective from the step after the highest served.
    client = await app_client(run_files=[], drain_interval_s=3600)  # no housekeeping drains
    created = await client.post("/runs", json=run_config("rot", policy={"name": "rotating-train"}))
    assert created.status_code == 201, created.text
    names = [o["name"] for o in created.json()["objectives"]]
    for step in range(4):
        served = await batch(client, run="rot", step=step)
        assert served.headers["x-birdie-mixture-version"] == str(step)  # published by the previous post
        post = {"run": "rot", "step": step, "split": "train",
                "losses": {names[step]: 2.0 + step / 4}, "tokens": {names[step]: 10 + step}}
        answer = (await client.post("/losses", json=post)).json()
        assert answer["status"] == "accepted" and answer["completed"], answer
        assert answer["policy_updated"] and answer["policy_note"] is None and answer["mixture_version"] == step + 1
        history = (await client.get("/mixture/history", params={"run": "rot"})).json()
        assert history["timeline"] == [[s, s] for s in range(step + 2)]  # version v from step v on
        assert [m["created_at_step"] for m in history["mixtures"]] == [None, *range(step + 1)]
        assert history["max_served"] == step and history["evaluations"] == []  # training is no evaluation
        mixture = (await client.get("/mixture", params={"run": "rot"})).json()
        assert mixture["meta"]["policy_state"]["observed"] == [["train", s] for s in range(step + 1)]
        assert mixture["probabilities"][names[(step + 1) % len(names)]] == pytest.approx(0.5)
        assert mixture["meta"]["train_totals"][names[step]] == {"tokens": 10 + step, "posts": 1, "mean_loss": 2.0 + step / 4}

    # A repeated post is a duplicate: no second update.
    before = await state_of(client, "rot")
    again = (await client.post("/losses", json=post)).json()
    assert again["status"] == "duplicate" and not again["policy_updated"]
    assert await state_of(client, "rot") == before
    text = (await client.get("/metrics")).text
    assert 'birdie_policy_updates_total{run="rot",split="train"} 4.0' in text
    assert 'birdie_loss_posts_total{run="rot",split="train",status="duplicate"} 1.0' in text


async def test_losses_are_taken_only_for_steps_the_run_has_trained(app_client):
    client = await app_client(run_files=[], drain_interval_s=0.01)
    names = [o["name"] for o in (await client.post("/runs", json=run_config("rot", policy={"name": "rotating"}))).json()["objectives"]]
    post = {"run": "rot", "losses": {names[0]: 2.0}, "tokens": {names[0]: 10}}
    nothing_served = await client.post("/losses", json={**post, "step": 0})
    assert nothing_served.status_code == 422 and "served training batches up to step -1" in nothing_served.text
    await batch(client, run="rot", step=3)
    before = await state_of(client, "rot")
    for split, step in (("train", 4), ("validation", 5), ("validation", 400000)):
        rejected = await client.post("/losses", json={**post, "split": split, "step": step})
        assert rejected.status_code == 422 and f"got {step}" in rejected.text, rejected.text
    assert await state_of(client, "rot") == before
    # The highest trained step, and the evaluation after it, are taken.
    assert (await client.post("/losses", json={**post, "split": "train", "step": 3})).json()["status"] == "accepted"
    evaluation = (await client.post("/losses", json={**post, "split": "validation", "step": 4})).json()
    assert evaluation["policy_updated"] and evaluation["mixture_version"] == 1


async def test_a_preview_looks_without_serving_and_says_when_it_is_provisional(app_client):
    client = await app_client(run_files=[], drain_interval_s=0.01)
    names = [o["name"] for o in (await client.post("/runs", json=run_config("rot", policy={"name": "rotating"}))).json()["objectives"]]
    served = {s: (await batch(client, run="rot", step=s)).content for s in range(4)}  # max_served = 3
    ahead = await batch(client, run="rot", step=9000, preview=1)
    assert ahead.headers["x-birdie-provisional"] == "true" and ahead.headers["x-birdie-mixture-version"] == "0"
    looked = await batch(client, run="rot", step=2, preview=1, format="json")
    assert looked.headers["x-birdie-provisional"] == "false"
    assert decode_json(looked.json())["input_ids"].tolist() == decode_arrow(served[2])["input_ids"].tolist()
    assert (await client.get("/runs/rot")).json()["max_served"] == 3  # neither look moved the timeline
    post = {"run": "rot", "step": 4, "split": "validation", "losses": {names[0]: 2.0}, "tokens": {names[0]: 10}}
    assert (await client.post("/losses", json=post)).json()["mixture_version"] == 1
    mixture = (await client.get("/mixture", params={"run": "rot"})).json()
    assert mixture["effective_step"] == 4  # not 9001
    taken = await batch(client, run="rot", step=9000)
    assert taken.headers["x-birdie-mixture-version"] == "1" and taken.content != ahead.content
    assert "x-birdie-provisional" not in taken.headers
    rejected = await client.get("/batch", params={"run": "rot", "step": 1, "rank": 2, "world_size": 2, "preview": 1})
    assert rejected.status_code == 422


# --- runs, objectives, tokenizer, metrics -------------------------------------------------------


async def test_post_runs_creates_accepts_identical_and_refuses_a_changed_config(app_client):
    client = await app_client()
    config = run_config("second", preset="decoder-ul2")
    created = await client.post("/runs", json=config)
    assert created.status_code == 201
    info = created.json()
    assert info["name"] == "second" and len(info["objectives"]) == 4
    assert info["vocab_size"] == 1024 and info["special_tokens"]["[PAD]"] == 0
    assert info["eval_steps"] == [4, 8, 12] and info["max_served"] == -1

    again = await client.post("/runs", json=config)
    assert again.status_code == 200 and again.json() == info
    changed = await client.post("/runs", json={**config, "seed": 8})
    assert changed.status_code == 409 and "different config" in changed.json()["detail"]
    assert (await client.get("/runs/second")).json()["config"]["seed"] == 7

    runs = (await client.get("/runs")).json()["runs"]
    assert [r["name"] for r in runs] == ["second", "small"]
    assert runs[0]["objectives"] == 4 and runs[0]["seq_len"] == SEQ_LEN


async def test_objectives_lists_every_preset_configuration_or_one_runs(app_client):
    client = await app_client()
    listed = (await client.get("/objectives", params={"seq_len": 512})).json()
    expected = {o.name for name in list_presets() for o, _ in preset(name, 512)}
    assert {o["name"] for o in listed} == expected and len(listed) == len(expected)
    one = (await client.get("/objectives", params={"run": "small"})).json()
    assert [o["family"] for o in one] == ["infilling"] * 6 + ["prefix_lm"]
    assert one[0]["params"]["mean_span"] == 3
    assert (await client.get("/objectives", params={"seq_len": 64})).status_code == 422


async def test_tokenizer_is_the_corpus_tokenizer(app_client, corpus_path):
    client = await app_client()
    response = await client.get("/tokenizer")
    assert response.status_code == 200
    assert response.content == (corpus_path / "tokenizer.json").read_bytes()
    assert Tokenizer.from_str(response.text).get_vocab_size() == 1024


async def test_metrics_count_batches_and_loss_posts(app_client):
    client = await app_client()
    await batch(client, step=0)
    await batch(client, step=0, format="json")
    name = (await client.get("/objectives", params={"run": "small"})).json()[0]["name"]
    await client.post("/losses", json={"run": "small", "step": 0, "losses": {name: 1.0}, "tokens": {name: 3}})
    text = (await client.get("/metrics")).text
    assert 'birdie_batches_served_total{format="arrow",run="small",split="train"} 1.0' in text
    assert 'birdie_batches_served_total{format="json",run="small",split="train"} 1.0' in text
    assert f'birdie_tokens_served_total{{run="small",split="train"}} {2.0 * BATCH_SIZE * SEQ_LEN}' in text
    assert 'birdie_loss_posts_total{run="small",split="train",status="accepted"} 1.0' in text


async def test_health_readiness_and_openapi(app_client):
    client = await app_client()
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert ready["status"] == "ready" and ("in-process" if app_client.store == "memory" else "redis") in ready["store"]
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ("/batch", "/losses", "/mixture", "/mixture/history", "/runs", "/runs/{run}", "/objectives",
                 "/tokenizer", "/healthz", "/readyz", "/metrics"):
        assert path in paths
    assert "swagger" in (await client.get("/docs")).text.lower()


async def test_a_batch_above_the_token_cap_is_413_and_serves_nothing(app_client):
    client = await app_client(max_request_tokens=1024)
    services = client._transport.app.state.services
    name = (await client.get("/objectives", params={"run": "small"})).json()[0]["name"]
    # A replica with a higher limit created the run in the store (this server refuses to create it).
    assert (await client.post("/runs", json=run_config("big", batch_size=16))).status_code == 422
    replica = RunRegistry(services.store, services.corpus, max_request_tokens=1 << 20)
    await replica.register(RunConfig.model_validate(run_config("big", batch_size=16)))
    before = await state_of(client, "big")
    assert before[3]["max_served"] == -1
    for params in ({"step": 0}, {"step": 3, "rank": 1, "world_size": 2}, {"step": 0, "format": "json", "decode": 1},
                   {"step": 5, "preview": 1}, {"split": "validation", "objective": name, "index": 0}):
        response = await client.get("/batch", params={"run": "big", **params})
        assert response.status_code == 413, (params, response.text)
        detail = response.json()["detail"]
        assert "2048 tokens" in detail and "limit of 1024 (BIRDIE_MAX_REQUEST_TOKENS)" in detail, detail
    assert await state_of(client, "big") == before  # max_served still -1: no step was marked served
    # Its losses are still refused as untrained, and the run within the limit is served as before.
    post = {"run": "big", "step": 0, "losses": {name: 1.0}, "tokens": {name: 1}}
    assert (await client.post("/losses", json=post)).status_code == 422
    assert (await batch(client, step=0)).headers["x-birdie-mixture-version"] == "0"


# --- auth ----------------------------------------------------------------------------------------


async def test_a_configured_token_guards_every_route_but_liveness_and_readiness(app_client):
    client = await app_client(api_token="s3cret")
    good = {"Authorization": "Bearer s3cret"}
    assert (await client.get("/batch", params={"run": "small", "step": 0}, headers=good)).status_code == 200
    name = (await client.get("/objectives", params={"run": "small"}, headers=good)).json()[0]["name"]
    loss = {"run": "small", "step": 0, "losses": {name: 1.0}, "tokens": {name: 3}}
    before = await state_of(client, headers=good)
    guarded = ["/batch?run=small&step=0", "/mixture?run=small", "/mixture/history?run=small", "/runs",
               "/runs/small", "/objectives", "/tokenizer", "/metrics", "/openapi.json", "/docs"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                    {"Authorization": "Bearer s3cret-and-more"}, {"Authorization": "s3cret"}):
        for path in guarded:
            response = await client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
        denied = await client.post("/losses", headers=headers, json={})
        assert denied.status_code == 401
        for path, body in (("/losses", loss), ("/runs", run_config("sneaky"))):  # valid bodies, no token
            denied = await client.post(path, headers=headers, json=body)
            assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer", (path, headers)
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    for path in guarded:
        assert (await client.get(path, headers=good)).status_code == 200, path
    # Nothing the refused posts carried was created or counted.
    assert await state_of(client, headers=good) == before
    assert [r["name"] for r in (await client.get("/runs", headers=good)).json()["runs"]] == ["small"]
    assert (await client.get("/runs/sneaky", headers=good)).status_code == 404
    assert (await client.post("/losses", headers=good, json=loss)).json()["status"] == "accepted"


# --- malformed and hostile requests --------------------------------------------------------------


async def test_malformed_and_hostile_requests_get_4xx_and_change_nothing(app_client):
    client = await app_client(max_body_bytes=4096, max_request_tokens=4096)
    name = (await client.get("/objectives", params={"run": "small"})).json()[0]["name"]
    # Some real state first, so "unchanged" means something.
    await batch(client, step=2)
    post = {"run": "small", "step": 1, "rank": 0, "world_size": 2, "split": "train",
            "losses": {name: 2.5}, "tokens": {name: 40}}
    assert (await client.post("/losses", json=post)).json()["status"] == "accepted"
    before = await state_of(client)
    assert before[-1], "the raw snapshot sees the store's contents"

    bad_batches = [
        ({"run": "nope", "step": 0}, 404),
        ({"run": "../../etc", "step": 0}, 404),
        ({"run": "small", "step": -1}, 422),
        ({"run": "small", "step": 2**31}, 422),
        ({"run": "small", "step": 10**30}, 422),
        ({"run": "small", "step": "abc"}, 422),
        ({"run": "small"}, 422),  # training needs a step
        ({"run": "small", "step": 0, "rank": 2, "world_size": 2}, 422),
        ({"run": "small", "step": 0, "rank": -1}, 422),
        ({"run": "small", "step": 0, "world_size": 0}, 422),
        ({"run": "small", "step": 0, "world_size": 10**6}, 422),
        ({"run": "small", "step": 0, "format": "xml"}, 422),
        ({"run": "small", "step": 0, "split": "test"}, 422),
        ({"run": "small", "step": 0, "index": -3, "split": "validation", "objective": name}, 422),
        ({"run": "small", "step": 9, "format": "arrow", "decode": 1}, 422),  # would mark step 9 served
    ]
    for params, status in bad_batches:
        response = await client.get("/batch", params=params)
        assert response.status_code == status, (params, response.text)
        assert "detail" in response.json()

    bad_posts = [
        ({**post, "run": "nope"}, 404),
        ({**post, "losses": {"copying.len64": 1.0}, "tokens": {"copying.len64": 1}}, 422),
        ({**post, "losses": {name: 1.0}, "tokens": {}}, 422),
        ({**post, "losses": {}, "tokens": {}}, 422),
        ({**post, "losses": {name: -1.0}}, 422),
        ({**post, "losses": {name: 1e300}}, 422),
        ({**post, "tokens": {name: -5}}, 422),
        ({**post, "tokens": {name: 2**62}}, 422),
        ({**post, "tokens": {name: 1.5}}, 422),
        ({**post, "rank": 2}, 422),
        ({**post, "world_size": 0}, 422),
        ({**post, "step": -1}, 422),
        ({**post, "step": 2**40}, 422),
        ({**post, "step": "one"}, 422),
        ({**post, "split": "test"}, 422),
        ({**post, "extra": 1}, 422),
        ({**post, "losses": "2.5"}, 422),
        ({**post, "losses": {name: True}}, 422),  # not a loss of 1.0
        ({**post, "losses": {name: "2.5"}}, 422),
        ({**post, "tokens": {name: True}}, 422),
        ({**post, "step": True}, 422),
        ({**post, "rank": 1, "world_size": 3}, 409),  # train step 1 already has world_size 2
    ]
    for body, status in bad_posts:
        response = await client.post("/losses", json=body)
        assert response.status_code == status, (body, response.text)
    for raw in (b'{"run": "small", "step": 1, "losses": {"%s": NaN}, "tokens": {"%s": 1}}',
                b'{"run": "small", "step": 1, "losses": {"%s": Infinity}, "tokens": {"%s": 1}}',
                b'{"run": "small", "step": 1, "losses": {"%s": -Infinity}, "tokens": {"%s": 1}}'):
        response = await client.post("/losses", content=raw.replace(b"%s", name.encode()),
                                     headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and "finite" in response.text
    for raw in (b"{not json", b"", b"[]", b"null", json.dumps({"run": "small"}).encode()):
        response = await client.post("/losses", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, raw
    huge = {**post, "losses": {f"x{i}": 1.0 for i in range(1000)}}
    response = await client.post("/losses", json=huge)
    assert response.status_code == 413 and "4096 bytes" in response.json()["detail"]

    bad_runs = [
        (run_config("bad", policy={"name": "no-such-policy"}), 422, "unknown policy"),
        (run_config("bad", policy={"name": "fixed", "options": {"speed": 3}}), 422, "speed"),
        (run_config("bad", batch_size=64), 422, "above this server's limit"),
        (run_config("bad", preset="no-such-preset"), 422, "unknown preset"),
        (run_config("bad/../x"), 422, "pattern"),
        ({**run_config("bad"), "preset": None, "arms": [{"objective": "infilling.nope", "probability": 1}]}, 422, ""),
        ({**run_config("bad"), "unknown_field": 1}, 422, ""),
        (run_config("bad", seq_len=10**9), 422, ""),
    ]
    for config, status, message in bad_runs:
        response = await client.post("/runs", json=config)
        assert response.status_code == status and message in response.text, (config, response.text)

    assert await state_of(client) == before



async def test_a_killed_generation_worker_is_replaced_and_the_address_still_served(app_client):
    import os
    import signal

    client = await app_client(generation_executor="process", generation_workers=1, prefetch_depth=0, cache_size=1)
    first = (await batch(client, step=0)).content
    pool = client._transport.app.state.services.pool
    (pid,) = pool.worker_pids()
    os.kill(pid, signal.SIGKILL)
    assert (await batch(client, step=1)).status_code == 200
    assert pool.worker_pids() != [pid]
    assert (await batch(client, step=0)).content == first
