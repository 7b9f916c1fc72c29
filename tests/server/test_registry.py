"""RunRegistry: a run records the corpus it reads, and a server refuses runs it cannot serve as
created: another corpus, a split shorter than a row, batches above its limit."""

from __future__ import annotations

import pytest

from objective_server.batching import GENERATOR_REVISION
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


async def test_a_run_of_another_batch_generator_revision_is_refused_not_served_differently(corpus_path):
    store = MemoryRunStore()
    here = registry(store, corpus_path)
    current = RunConfig(**run_config()).stored()
    older = {k: v for k, v in current.items() if k not in ("corpus", "generator")}  # stored by revision 1
    await store.create_run("small", older, RunConfig(**run_config()).initial_probabilities, b"{}")
    for attempt in (here.get("small"), here.register(RunConfig(**run_config()))):
        with pytest.raises(RunConflict, match=rf"revision 1, and this server generates revision {GENERATOR_REVISION}"):
            await attempt
    newer = {**current, "name": "newer", "corpus": here.corpus_fingerprint, "generator": GENERATOR_REVISION + 1}
    await store.create_run("newer", newer, [1.0 / len(newer["arms"])] * len(newer["arms"]), b"{}")
    with pytest.raises(RunConflict, match=f"revision {GENERATOR_REVISION + 1}"):
        await here.get("newer")
    context, created = await here.register(RunConfig(**run_config("fresh")))
    assert created and context.config.generator == GENERATOR_REVISION


async def test_a_split_shorter_than_a_row_is_refused_when_the_run_is_created(corpus_path):
    store = MemoryRunStore()
    here = registry(store, corpus_path)
    too_long = here.split_tokens["validation"] + 1
    with pytest.raises(InvalidRequest, match=f"validation split holds {too_long - 1} tokens, fewer than seq_len = {too_long}"):
        await here.register(RunConfig(**run_config("long", preset="ntp", seq_len=too_long, batch_size=1)))
    assert await store.list_runs() == []
    # A run another server stored (or one stored before the check) is refused when loaded, not a 500 later.
    stored = RunConfig(**run_config("elsewhere", preset="ntp", seq_len=too_long, batch_size=1)).stored()
    stored.update(corpus=here.corpus_fingerprint, generator=GENERATOR_REVISION)
    await store.create_run("elsewhere", stored, [1.0], b"{}")
    with pytest.raises(InvalidRequest, match="fewer than seq_len"):
        await here.get("elsewhere")
    with pytest.raises(InvalidRequest, match="BIRDIE_MAX_REQUEST_TOKENS"):
        await registry(store, corpus_path, max_request_tokens=100).register(RunConfig(**run_config()))
