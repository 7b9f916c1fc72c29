"""RunRegistry: a run records the corpus it reads, and a server refuses runs it cannot serve as
created: another corpus, a split shorter than a row, batches above its limit."""

from __future__ import annotations

import pytest

from objective_server.corpus.store import TokenStore
from objective_server.runs import RunConfig
from objective_server.service.errors import InvalidRequest, RunConflict
from objective_server.service.registry import RunRegistry
from objective_server.store import MemoryRunStore
from server.conftest import run_config

pytestmark = pytest.mark.anyio


def registry(store, corpus_path, max_request_tokens: int = 1 << 20) -> RunRegistry:
    return RunRegistry(store, TokenStore.open(corpus_path), max_request_tokens)


async def test_a_created_run_records_its_corpus_and_another_corpus_refuses_it(corpus_path, other_corpus_path):
    store = MemoryRunStore()
    here, there = registry(store, corpus_path), registry(store, other_corpus_path)
    assert here.corpus_fingerprint != there.corpus_fingerprint
    context, created = await here.register(RunConfig(**run_config()))
    assert created and context.config.corpus == here.corpus_fingerprint
    assert (await store.get_config("small"))["corpus"] == here.corpus_fingerprint
    assert (await registry(store, corpus_path).get("small")).config == context.config  # another worker
    with pytest.raises(RunConflict, match=f"reads corpus {here.corpus_fingerprint}.*serves corpus {there.corpus_fingerprint}"):
        await there.get("small")
    with pytest.raises(RunConflict, match="reads corpus"):
        await there.register(RunConfig(**run_config()))
    with pytest.raises(RunConflict, match="reads corpus"):  # a config naming another corpus
        await here.register(RunConfig(**run_config("named", corpus=there.corpus_fingerprint)))


async def test_a_run_stored_before_runs_recorded_their_corpus_is_still_served(corpus_path):
    store = MemoryRunStore()
    old = RunConfig(**run_config()).stored()
    del old["corpus"]
    await store.create_run("small", old, RunConfig(**run_config()).initial_probabilities, b"{}")
    context, created = await registry(store, corpus_path).register(RunConfig(**run_config()))
    assert not created and context.config.name == "small"
    assert (await registry(store, corpus_path).get("small")).config.corpus is None


async def test_a_split_shorter_than_a_row_is_refused_when_the_run_is_created(corpus_path):
    store = MemoryRunStore()
    here = registry(store, corpus_path)
    too_long = here.split_tokens["validation"] + 1
    with pytest.raises(InvalidRequest, match=f"validation split holds {too_long - 1} tokens, fewer than seq_len = {too_long}"):
        await here.register(RunConfig(**run_config("long", preset="ntp", seq_len=too_long, batch_size=1)))
    assert await store.list_runs() == []
    # A run another server stored (or one stored before the check) is refused when loaded, not a 500 later.
    stored = RunConfig(**run_config("elsewhere", preset="ntp", seq_len=too_long, batch_size=1)).stored()
    await store.create_run("elsewhere", stored, [1.0], b"{}")
    with pytest.raises(InvalidRequest, match="fewer than seq_len"):
        await here.get("elsewhere")
    with pytest.raises(InvalidRequest, match="BIRDIE_MAX_REQUEST_TOKENS"):
        await registry(store, corpus_path, max_request_tokens=100).register(RunConfig(**run_config()))
