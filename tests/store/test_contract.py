"""The contract every RunStore keeps, run against MemoryRunStore and RedisRunStore (a real redis-server).

For Redis, `open_replica()` opens another client on the same server, i.e. another worker or replica;
concurrency tests spread their calls over several replicas so the interleaving happens at the server.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from objective_server.store import (
    Aggregate,
    ConflictError,
    LockNotAcquired,
    LossPost,
    MemoryRunStore,
    RunExists,
    RunStore,
    UnknownMixtureVersion,
    UnknownRun,
    open_store,
)

pytestmark = pytest.mark.anyio

CONFIG = {"objectives": [{"name": "ntp"}, {"name": "infill"}, {"name": "copy"}], "seq_len": 64, "seed": 7}
INITIAL = [0.5, 0.25, 0.25]
NAMES = ["ntp", "infill", "copy"]


@pytest.fixture(params=["memory", "redis"])
async def open_replica(request):
    """Opens a store on this test's backend (Redis: a new client per call; memory: the one store)."""
    memory = MemoryRunStore() if request.param == "memory" else None
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    opened: list[RunStore] = []

    def open_replica_() -> RunStore:
        store = memory if memory is not None else open_store(url)
        opened.append(store)
        return store

    yield open_replica_
    for store in opened:
        await store.close()


@pytest.fixture
def store(open_replica) -> RunStore:
    return open_replica()


@pytest.fixture
async def run(store) -> str:
    await store.create_run("r1", CONFIG, INITIAL, b"policy-0")
    return "r1"


def post(step, rank, world_size=2, split="validation", losses=None, tokens=None) -> LossPost:
    losses = losses if losses is not None else {"ntp": 2.0, "infill": 3.0}
    tokens = tokens if tokens is not None else {name: 10 for name in losses}
    return LossPost(step, rank, world_size, split, losses, tokens)


async def complete(store, run, step, split="validation", world_size=2) -> Aggregate:
    outcome = None
    for rank in range(world_size):
        outcome = await store.post_losses(run, post(step, rank, world_size, split))
    assert outcome.completed is not None
    return outcome.completed


# --- runs -----------------------------------------------------------------------------------------


async def test_create_list_get(store):
    assert await store.list_runs() == []
    await store.create_run("b-run", {"nested": {"tuple": (1, 2)}}, [1.0], b"")
    await store.create_run("a.run_1", CONFIG, INITIAL, b"\x00\xffblob")
    assert await store.list_runs() == ["a.run_1", "b-run"]
    assert await store.get_config("a.run_1") == CONFIG
    assert await store.get_config("b-run") == {"nested": {"tuple": [1, 2]}}  # stored as JSON
    assert await store.policy_state("a.run_1") == (0, b"\x00\xffblob")
    mixture = await store.mixture("a.run_1")
    assert (mixture.version, mixture.probabilities, mixture.effective_step) == (0, INITIAL, 0)
    assert mixture.created_at_step is None and mixture.meta == {}
    assert await store.mixture("a.run_1", 0) == mixture
    assert await store.mixture_history("a.run_1") == [mixture]
    timeline = await store.timeline("a.run_1")
    assert timeline.entries == ((0, 0),) and timeline.max_served == -1
    assert await store.pending("a.run_1") == []
    assert await store.train_totals("a.run_1") == {}


async def test_returned_config_is_a_copy(store, run):
    config = await store.get_config(run)
    config["seed"] = 999
    assert (await store.get_config(run))["seed"] == 7


async def test_run_exists_even_with_identical_config(store, run):
    with pytest.raises(RunExists):
        await store.create_run(run, CONFIG, INITIAL, b"other")
    assert await store.policy_state(run) == (0, b"policy-0")
    assert await store.list_runs() == [run]


@pytest.mark.parametrize(
    "name, config, initial, message",
    [
        ("bad name", CONFIG, INITIAL, "run name"),
        ("{tag}", CONFIG, INITIAL, "run name"),
        ("ok", CONFIG, [0.5, 0.6], "sum to 1"),
        ("ok", CONFIG, [], "empty"),
        ("ok", CONFIG, [1.5, -0.5], ">= 0"),
        ("ok", {"x": float("nan")}, INITIAL, "JSON"),
        ("ok", {"x": object()}, INITIAL, "JSON"),
        ("ok", ["not", "a", "dict"], INITIAL, "dict"),
    ],
)
async def test_create_run_rejects_bad_input(store, name, config, initial, message):
    with pytest.raises(ValueError, match=message):
        await store.create_run(name, config, initial, b"")
    assert await store.list_runs() == []


MISSING_RUN_CALLS = {
    "get_config": lambda s, r: s.get_config(r),
    "mark_served": lambda s, r: s.mark_served(r, 3),
    "timeline": lambda s, r: s.timeline(r),
    "mixture": lambda s, r: s.mixture(r),
    "mixture_version": lambda s, r: s.mixture(r, 0),
    "mixture_bad_version": lambda s, r: s.mixture(r, -5),
    "mixture_history": lambda s, r: s.mixture_history(r),
    "post_losses": lambda s, r: s.post_losses(r, post(0, 0)),
    "pending": lambda s, r: s.pending(r),
    "evaluations": lambda s, r: s.evaluations(r),
    "policy_state": lambda s, r: s.policy_state(r),
    "commit_policy": lambda s, r: s.commit_policy(r, 0, b"", [], INITIAL),
    "train_totals": lambda s, r: s.train_totals(r),
}


@pytest.mark.parametrize("call", list(MISSING_RUN_CALLS))
@pytest.mark.parametrize("missing", ["nope", "bad name{x}", ""])
async def test_unknown_run_on_every_call(store, run, call, missing):
    with pytest.raises(UnknownRun):
        await MISSING_RUN_CALLS[call](store, missing)


async def test_unknown_run_on_lock(store, run):
    with pytest.raises(UnknownRun):
        async with store.lock("nope"):
            pass


async def test_unknown_mixture_version(store, run):
    for version in (1, -1, 10**6, True, "0"):
        with pytest.raises(UnknownMixtureVersion):
            await store.mixture(run, version)


# --- the timeline ---------------------------------------------------------------------------------


async def test_mark_served_is_monotonic(store, run):
    assert (await store.mark_served(run, 5)).max_served == 5
    assert (await store.mark_served(run, 3)).max_served == 5
    assert (await store.timeline(run)).max_served == 5
    assert (await store.mark_served(run, 0)).max_served == 5
    assert (await store.mark_served(run, 12)).max_served == 12
    with pytest.raises(ValueError, match="step"):
        await store.mark_served(run, -1)
    assert (await store.timeline(run)).max_served == 12


async def test_publish_is_effective_after_the_highest_served_step(store, run):
    await store.mark_served(run, 41)
    first = await store.commit_policy(run, 0, b"s1", [], [0.2, 0.3, 0.5], {"why": "eval"}, created_at_step=41)
    assert (first.ok, first.policy_version, first.mixture_version, first.effective_step) == (True, 1, 1, 42)
    # Nothing served since: the next publish shares effective step 42 and wins it.
    second = await store.commit_policy(run, 1, b"s2", [], [0.1, 0.1, 0.8], {})
    assert (second.mixture_version, second.effective_step) == (2, 42)
    timeline = await store.mark_served(run, 50)
    assert timeline.entries == ((0, 0), (42, 1), (42, 2))
    assert [timeline.version_at(s) for s in (0, 41, 42, 50)] == [0, 0, 2, 2]
    third = await store.commit_policy(run, 2, b"s3", [], INITIAL, None)
    assert third.effective_step == 51
    record = await store.mixture(run, 1)
    assert (record.probabilities, record.effective_step, record.created_at_step, record.meta) == (
        [0.2, 0.3, 0.5], 42, 41, {"why": "eval"},
    )
    assert (await store.mixture(run)).version == 3
    assert [m.version for m in await store.mixture_history(run)] == [0, 1, 2, 3]
    assert [m.effective_step for m in await store.mixture_history(run)] == [0, 42, 42, 51]


async def test_a_known_timeline_is_extended_not_replaced(store, run):
    known = await store.mark_served(run, 3)
    await store.commit_policy(run, 0, b"", [], [0.2, 0.3, 0.5])
    await store.commit_policy(run, 1, b"", [], [0.3, 0.3, 0.4])
    full = await store.mark_served(run, 9)
    assert full.entries == ((0, 0), (4, 1), (4, 2)) and full.max_served == 9
    assert await store.mark_served(run, 9, known=known) == full
    assert await store.timeline(run, known=full) == full
    # A longer timeline than the run has cannot be this run's: the whole timeline comes back.
    await store.create_run("r2", CONFIG, INITIAL, b"")
    assert await store.timeline("r2", known=full) == await store.timeline("r2")


async def test_commit_without_mixture_leaves_the_timeline(store, run):
    outcome = await store.commit_policy(run, 0, b"state-1", [], None, None)
    assert (outcome.ok, outcome.policy_version, outcome.mixture_version) == (True, 1, None)
    assert await store.policy_state(run) == (1, b"state-1")
    assert (await store.timeline(run)).entries == ((0, 0),)


@pytest.mark.parametrize(
    "probabilities, message", [([0.5, 0.5], "3 configurations"), ([0.5, 0.6, 0.1], "sum to 1"), ([1.0, float("nan"), 0.0], "finite")]
)
async def test_commit_rejects_bad_probabilities(store, run, probabilities, message):
    with pytest.raises(ValueError, match=message):
        await store.commit_policy(run, 0, b"x", [], probabilities)
    assert await store.policy_state(run) == (0, b"policy-0")
    assert len(await store.mixture_history(run)) == 1


async def test_served_steps_keep_their_mixture_under_concurrent_publishes(open_replica):
    """The interleaving property: once a step is served, the version it maps to never changes."""
    replicas = [open_replica() for _ in range(3)]
    await replicas[0].create_run("r", CONFIG, INITIAL, b"0")
    served: dict[int, set[int]] = {}
    rng = random.Random(3)

    async def serve(replica, rank):
        timeline = None
        for step in range(60):
            # Odd ranks pass what they know, so the incremental reads race the publishes too.
            timeline = await replica.mark_served("r", step, known=timeline if rank % 2 else None)
            served.setdefault(step, set()).add(timeline.version_at(step))
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async def publish(replica):
        for _ in range(25):
            while True:
                version, _ = await replica.policy_state("r")
                probabilities = [rng.random() + 0.01 for _ in NAMES]
                total = math.fsum(probabilities)
                outcome = await replica.commit_policy(
                    "r", version, b"s", [], [p / total for p in probabilities]
                )
                if outcome.ok:
                    break
            await asyncio.sleep(0)

    await asyncio.gather(
        *(serve(replicas[rank % 3], rank) for rank in range(4)),
        publish(replicas[1]),
        publish(replicas[2]),
    )
    final = await replicas[0].timeline("r")
    assert len(final.entries) == 51
    for step, versions in served.items():
        assert versions == {final.version_at(step)}, f"step {step} was served with {versions}"
    # The publishes did interleave with serving (not all before or after it).
    assert len({final.version_at(step) for step in served}) > 2


# --- loss posts -----------------------------------------------------------------------------------


async def test_aggregation_is_token_weighted(store, run):
    first = await store.post_losses(
        run, post(10, 0, 2, losses={"ntp": 2.0, "infill": 1.0, "copy": 9.0}, tokens={"ntp": 10, "infill": 0, "copy": 0})
    )
    assert (first.duplicate, first.ranks_posted, first.completed) == (False, 1, None)
    second = await store.post_losses(
        run, post(10, 1, 2, losses={"ntp": 4.0, "infill": 3.0}, tokens={"ntp": 30, "infill": 5})
    )
    aggregate = second.completed
    assert (second.duplicate, second.ranks_posted) == (False, 2)
    assert (aggregate.split, aggregate.step, aggregate.world_size) == ("validation", 10, 2)
    assert aggregate.losses == {"ntp": (2.0 * 10 + 4.0 * 30) / 40, "infill": 3.0}  # copy had no tokens
    assert aggregate.tokens == {"ntp": 40, "infill": 5, "copy": 0}
    assert await store.pending(run) == [aggregate]


async def test_duplicates_are_counted_nowhere(store, run):
    await store.post_losses(run, post(4, 0, 2, "train", {"ntp": 2.0}, {"ntp": 10}))
    repeat = await store.post_losses(run, post(4, 0, 2, "train", {"ntp": 100.0}, {"ntp": 1000}))
    assert (repeat.duplicate, repeat.ranks_posted, repeat.completed) == (True, 1, None)
    # The same (step, rank) of the other split is a different key.
    other_split = await store.post_losses(run, post(4, 0, 2, "validation", {"ntp": 5.0}, {"ntp": 10}))
    assert not other_split.duplicate
    done = await store.post_losses(run, post(4, 1, 2, "train", {"ntp": 4.0}, {"ntp": 10}))
    assert done.completed.losses == {"ntp": 3.0}
    # After completion, every rank of the step is a duplicate and nothing changes.
    for rank in range(2):
        late = await store.post_losses(run, post(4, rank, 2, "train", {"ntp": 50.0}, {"ntp": 7}))
        assert (late.duplicate, late.ranks_posted, late.completed) == (True, 2, None)
    assert await store.train_totals(run) == {"ntp": {"tokens": 20, "posts": 2, "mean_loss": 3.0}}
    assert [a.key for a in await store.pending(run)] == [("train", 4)]


async def test_completion_happens_exactly_once_under_concurrent_posts(open_replica):
    replicas = [open_replica() for _ in range(3)]
    await replicas[0].create_run("r", CONFIG, INITIAL, b"")
    world_size = 8
    posts = [
        post(250, rank, world_size, losses={"ntp": 1.0 + rank}, tokens={"ntp": 10 + rank})
        for rank in range(world_size)
        for _ in range(3)  # every rank posts three times: two are retries
    ]
    random.Random(0).shuffle(posts)
    outcomes = await asyncio.gather(
        *(replicas[i % 3].post_losses("r", p) for i, p in enumerate(posts))
    )
    completed = [o.completed for o in outcomes if o.completed is not None]
    assert len(completed) == 1
    assert sum(not o.duplicate for o in outcomes) == world_size
    expected = sum((1.0 + r) * (10 + r) for r in range(world_size)) / sum(10 + r for r in range(world_size))
    assert completed[0].losses["ntp"] == pytest.approx(expected, rel=1e-12)
    assert completed[0].tokens == {"ntp": sum(10 + r for r in range(world_size))}
    assert await replicas[1].pending("r") == completed


async def test_world_size_conflict_changes_nothing(store, run):
    await store.post_losses(run, post(7, 0, 2))
    with pytest.raises(ConflictError, match="world_size"):
        await store.post_losses(run, post(7, 1, 3))
    with pytest.raises(ConflictError):
        await store.post_losses(run, post(7, 0, 4))  # even for a rank already seen
    outcome = await store.post_losses(run, post(7, 1, 2))
    assert outcome.completed is not None and outcome.ranks_posted == 2
    with pytest.raises(ConflictError):
        await store.post_losses(run, post(7, 0, 1))  # after completion too
    assert len(await store.pending(run)) == 1


async def test_single_rank_completes_at_once(store, run):
    outcome = await store.post_losses(run, post(0, 0, 1, "train"))
    assert outcome.completed is not None and outcome.completed.world_size == 1


async def test_train_totals_cover_training_posts_only(store, run):
    await store.post_losses(run, post(1, 0, 2, "train", {"ntp": 2.0, "copy": 1.0}, {"ntp": 10, "copy": 0}))
    await store.post_losses(run, post(1, 1, 2, "train", {"ntp": 1.0}, {"ntp": 30}))
    await store.post_losses(run, post(2, 0, 1, "train", {"ntp": 3.0}, {"ntp": 60}))
    await store.post_losses(run, post(1, 0, 1, "validation", {"ntp": 99.0}, {"ntp": 99}))
    totals = await store.train_totals(run)
    assert totals == {
        "copy": {"tokens": 0, "posts": 1, "mean_loss": None},
        "ntp": {"tokens": 100, "posts": 3, "mean_loss": pytest.approx((20 + 30 + 180) / 100, rel=1e-12)},
    }


# --- pending aggregates and policy commits --------------------------------------------------------


async def test_pending_queue_in_step_order_and_consumed_by_commits(store, run):
    for split, step in [("validation", 10), ("train", 3), ("validation", 5), ("train", 5)]:
        await complete(store, run, step, split)
    await store.post_losses(run, post(1, 0, 2))  # incomplete: not pending
    assert [a.key for a in await store.pending(run)] == [
        ("train", 3), ("train", 5), ("validation", 5), ("validation", 10)
    ]
    outcome = await store.commit_policy(run, 0, b"s1", [("validation", 5), ("train", 3)], None)
    assert outcome.ok
    assert [a.key for a in await store.pending(run)] == [("train", 5), ("validation", 10)]
    # Consumed aggregates stay completed: a late post of theirs is still a duplicate.
    assert (await store.post_losses(run, post(5, 1, 2))).duplicate


async def test_consumed_validation_aggregates_become_the_evaluation_history(store, run):
    assert await store.evaluations(run) == []
    expected = {}
    for split, step in [("validation", 10), ("train", 3), ("validation", 5)]:
        expected[(split, step)] = await complete(store, run, step, split)
    # Pending is not history: only what a policy commit consumed.
    assert await store.evaluations(run) == []
    assert (await store.commit_policy(run, 0, b"s1", [("validation", 10), ("train", 3)], None)).ok
    assert await store.evaluations(run) == [expected[("validation", 10)]]
    # A stale commit consumes nothing.
    assert not (await store.commit_policy(run, 0, b"stale", [("validation", 5)], None)).ok
    assert (await store.commit_policy(run, 1, b"s2", [("validation", 5)], [0.2, 0.3, 0.5])).ok
    history = await store.evaluations(run)
    assert history == [expected[("validation", 10)], expected[("validation", 5)]]  # consumption order
    assert history[1].losses == {"ntp": 2.0, "infill": 3.0} and history[1].tokens == {"ntp": 20, "infill": 20}


async def test_commit_with_an_aggregate_not_pending_changes_nothing(store, run):
    await complete(store, run, 10)
    for consumed in ([("validation", 10), ("validation", 11)], [("train", 10)]):
        with pytest.raises(ConflictError, match="not pending"):
            await store.commit_policy(run, 0, b"new", consumed, [0.1, 0.1, 0.8])
    assert await store.policy_state(run) == (0, b"policy-0")
    assert [a.key for a in await store.pending(run)] == [("validation", 10)]
    assert len(await store.mixture_history(run)) == 1
    with pytest.raises(ValueError, match="twice"):
        await store.commit_policy(run, 0, b"new", [("validation", 10)] * 2, None)


async def test_commit_is_a_compare_and_set(store, run):
    stale = await store.commit_policy(run, 5, b"stale", [], [0.1, 0.1, 0.8])
    assert (stale.ok, stale.policy_version, stale.mixture_version) == (False, 0, None)
    assert await store.policy_state(run) == (0, b"policy-0")
    assert len(await store.mixture_history(run)) == 1


@pytest.mark.parametrize("version", [True, "0", 0.0, None])
async def test_commit_refuses_a_version_that_is_not_an_int(store, run, version):
    with pytest.raises(ValueError, match="expected_version must be an integer"):
        await store.commit_policy(run, version, b"new", [], [0.1, 0.1, 0.8])
    assert await store.policy_state(run) == (0, b"policy-0")
    assert len(await store.mixture_history(run)) == 1


async def test_concurrent_commits_with_one_expected_version_have_one_winner(open_replica):
    replicas = [open_replica() for _ in range(4)]
    await replicas[0].create_run("r", CONFIG, INITIAL, b"0")
    await complete(replicas[0], "r", 10)
    outcomes = await asyncio.gather(
        *(
            replicas[i % 4].commit_policy(
                "r", 0, f"state-{i}".encode(), [("validation", 10)], [0.2, 0.2, 0.6], {"writer": i}
            )
            for i in range(16)
        )
    )
    winners = [i for i, o in enumerate(outcomes) if o.ok]
    assert len(winners) == 1
    assert all(o.policy_version == 1 for o in outcomes)
    assert await replicas[1].policy_state("r") == (1, f"state-{winners[0]}".encode())
    history = await replicas[2].mixture_history("r")
    assert len(history) == 2 and history[1].meta == {"writer": winners[0]}
    assert await replicas[3].pending("r") == []


# --- locks ----------------------------------------------------------------------------------------


async def test_lock_is_mutually_exclusive_across_replicas(open_replica):
    replicas = [open_replica() for _ in range(3)]
    await replicas[0].create_run("r", CONFIG, INITIAL, b"")
    inside = 0
    most_inside = 0
    entries = 0

    async def critical_section(replica):
        nonlocal inside, most_inside, entries
        async with replica.lock("r", ttl_s=5, wait_s=10):
            inside += 1
            entries += 1
            most_inside = max(most_inside, inside)
            await asyncio.sleep(0.005)
            inside -= 1

    await asyncio.gather(*(critical_section(replicas[i % 3]) for i in range(12)))
    assert (most_inside, entries) == (1, 12)


async def test_locks_of_other_names_or_runs_are_independent(store, run):
    await store.create_run("r2", CONFIG, INITIAL, b"")
    async with store.lock(run):
        async with store.lock(run, "other", wait_s=0.1):
            async with store.lock("r2", wait_s=0.1):
                pass


async def test_lock_wait_runs_out(store, run):
    async with store.lock(run, ttl_s=5):
        with pytest.raises(LockNotAcquired):
            async with store.lock(run, ttl_s=5, wait_s=0.1):
                pass
    async with store.lock(run, wait_s=0.1):  # released: free again
        pass


async def test_lock_expires_and_a_late_release_frees_nothing(open_replica):
    crashed_holder, second, third = open_replica(), open_replica(), open_replica()
    await crashed_holder.create_run("r", CONFIG, INITIAL, b"")
    stuck = crashed_holder.lock("r", ttl_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()  # before the holder's acquire: its ttl cannot run out sooner than 0.2 s from here
    await stuck.__aenter__()
    async with second.lock("r", ttl_s=60, wait_s=30):
        # Not before the holder's ttl ran out: the lock expired, it was not free all along. (The
        # 10 ms allow for Redis's and this process's clocks; no upper bound: waiting is not a race.)
        assert loop.time() - started >= 0.2 - 0.01
        await stuck.__aexit__(None, None, None)  # the old holder wakes up and releases late
        with pytest.raises(LockNotAcquired):  # ... which must not have freed the second's lock
            async with third.lock("r", wait_s=0.1):
                pass
    async with third.lock("r", wait_s=0.5):
        pass


# --- random post sequences against a simple model ------------------------------------------------

post_specs = st.lists(
    st.tuples(
        st.sampled_from(["train", "validation"]),
        st.integers(0, 2),  # step
        st.integers(0, 2),  # rank (modulo the world size)
        st.sampled_from([0, 0, 0, 0, 1]),  # 1: a wrong world_size, which must conflict
        st.dictionaries(
            st.sampled_from(NAMES),
            st.tuples(st.floats(0.0, 20.0, allow_subnormal=False), st.integers(0, 1000)),
            max_size=3,
        ),
    ),
    max_size=40,
)
world_sizes = st.fixed_dictionaries({(split, step): st.integers(1, 3) for split in ("train", "validation") for step in range(3)})


class PostModel:
    """The obvious implementation: remember everything, compute means with exact sums."""

    def __init__(self):
        self.world_size: dict[tuple[str, int], int] = {}
        self.ranks: dict[tuple[str, int], set[int]] = {}
        self.posts: dict[tuple[str, int], list[LossPost]] = {}
        self.train_posts: list[LossPost] = []

    def apply(self, p: LossPost):
        """Returns "conflict", "duplicate", "accepted" or the completed (losses, tokens)."""
        key = p.key
        if self.world_size.setdefault(key, p.world_size) != p.world_size:
            return "conflict"
        if p.rank in self.ranks.setdefault(key, set()):
            return "duplicate"
        self.ranks[key].add(p.rank)
        self.posts.setdefault(key, []).append(p)
        if p.split == "train":
            self.train_posts.append(p)
        if len(self.ranks[key]) < p.world_size:
            return "accepted"
        return weighted(self.posts[key])


def weighted(posts: list[LossPost]) -> tuple[dict[str, float], dict[str, int]]:
    names = {name for p in posts for name in p.losses}
    tokens = {n: sum(p.tokens.get(n, 0) for p in posts) for n in names}
    losses = {
        n: math.fsum(p.losses[n] * p.tokens[n] for p in posts if n in p.losses) / tokens[n]
        for n in names
        if tokens[n] > 0
    }
    return losses, tokens


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=post_specs, sizes=world_sizes)
async def test_random_post_sequences_match_a_model_and_the_reference_store(store, specs, sizes):
    reference = MemoryRunStore()  # for Redis: the two implementations must agree bit for bit
    run = f"h{uuid.uuid4().hex}"  # hypothesis reseeds `random` per example
    await store.create_run(run, CONFIG, INITIAL, b"")
    await reference.create_run(run, CONFIG, INITIAL, b"")
    model = PostModel()
    completed = []
    for split, step, rank, wrong, losses in specs:
        world_size = sizes[(split, step)] + wrong
        p = LossPost(step, rank % world_size, world_size, split,
                     {n: v[0] for n, v in losses.items()}, {n: v[1] for n, v in losses.items()})
        expected = model.apply(p)
        event(expected if isinstance(expected, str) else "completed")
        if expected == "conflict":
            for s in (store, reference):
                with pytest.raises(ConflictError):
                    await s.post_losses(run, p)
            continue
        outcome = await store.post_losses(run, p)
        assert outcome == await reference.post_losses(run, p)
        assert outcome.duplicate == (expected == "duplicate")
        assert (outcome.completed is None) == isinstance(expected, str)
        if outcome.completed is not None:
            assert outcome.completed.losses == pytest.approx(expected[0], rel=1e-12)
            assert outcome.completed.tokens == expected[1]
            completed.append(outcome.completed)
    pending = await store.pending(run)
    assert pending == await reference.pending(run)
    assert pending == sorted(completed, key=lambda a: (a.step, a.split))
    totals = await store.train_totals(run)
    assert totals == await reference.train_totals(run)
    losses, tokens = weighted(model.train_posts)
    assert {n: t["tokens"] for n, t in totals.items()} == tokens
    assert {n: t["mean_loss"] for n, t in totals.items() if t["mean_loss"] is not None} == pytest.approx(losses, rel=1e-12)
    assert {n: t["posts"] for n, t in totals.items()} == {
        n: sum(n in p.losses for p in model.train_posts) for n in tokens
    }
