"""The runs this server knows: each run's parsed config, policy and what is cached about its state.

A run lives in the store (config, timeline, mixtures, policy state); a `RunContext` is this
process's view of it. Runs created by another worker or replica are loaded from the store on first
use, so any replica serves any run, provided it generates the run's batches as the server that
created it did: a run's config records the corpus fingerprint and the batch generator revision, and
a server on another corpus or revision refuses it (409) rather than serve different bytes at the
same addresses.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from functools import cached_property

from objective_server.batching import GENERATOR_REVISION, window_count
from objective_server.corpus.store import TokenStore
from objective_server.policies import Policy, make_policy
from objective_server.runs import RunConfig
from objective_server.service.errors import InvalidRequest, RunConflict
from objective_server.store import RunExists, RunStore, Timeline, UnknownRun
from objective_server.store.protocol import is_run_name, to_json


@dataclass(eq=False)
class RunContext:
    config: RunConfig
    policy: Policy
    # The latest timeline seen: addresses at or below its max_served are final, so they can be
    # served from it while the store is unreachable.
    timeline: Timeline | None = None
    # Published mixtures never change: version -> probabilities.
    mixtures: dict[int, list[float]] = field(default_factory=dict)
    # One policy drain at a time in this process (the store lock orders replicas).
    drain_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_drain_check: float = 0.0
    # What this process's drains did with the observations they consumed, newest last: (split, step)
    # -> None (applied) or why not; so a post whose observation another drain here consumed can say.
    outcomes: dict[tuple[str, int], str | None] = field(default_factory=dict)

    def record_outcome(self, key: tuple[str, int], reason: str | None, keep: int = 256) -> None:
        self.outcomes[key] = reason
        while len(self.outcomes) > keep:
            del self.outcomes[next(iter(self.outcomes))]

    @property
    def name(self) -> str:
        return self.config.name

    @cached_property
    def config_json(self) -> str:
        """The stored config as canonical JSON: what the generation workers are given."""
        return to_json("config", self.config.stored())

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.blake2b(self.config_json.encode(), digest_size=8).hexdigest()

    @cached_property
    def names(self) -> list[str]:
        return self.config.names

    @cached_property
    def families(self) -> list[str]:
        return [o.family for o in self.config.objectives]

    @cached_property
    def objective_ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def remember(self, timeline: Timeline) -> None:
        """Keep the newest timeline (both its entries and max_served only ever grow)."""
        old = self.timeline
        if old is None or (
            timeline.max_served >= old.max_served and len(timeline.effective_steps) >= len(old.effective_steps)
        ):
            self.timeline = timeline


def split_tokens(corpus: TokenStore) -> dict[str, int]:
    return {split: corpus.split(split).n_tokens for split in ("train", "validation")}


def check_servable(config: RunConfig, split_tokens: dict[str, int], max_request_tokens: int) -> None:
    """InvalidRequest unless a server with this corpus (`split_tokens`) and batch size limit can
    serve `config`: batches within the limit, and every split of the corpus at least one row long."""
    if config.tokens_per_step > max_request_tokens:
        raise InvalidRequest(
            f"run {config.name!r}: batch_size * seq_len = {config.batch_size} * {config.seq_len} = "
            f"{config.tokens_per_step} tokens per batch, above this server's limit of "
            f"{max_request_tokens} (BIRDIE_MAX_REQUEST_TOKENS)"
        )
    check_splits(config, split_tokens)


def check_splits(config: RunConfig, split_tokens: dict[str, int]) -> None:
    """InvalidRequest unless every split of the corpus (`split_tokens`) holds at least one row."""
    for split, n_tokens in split_tokens.items():
        try:
            window_count(n_tokens, config.seq_len, split)
        except ValueError as error:
            raise InvalidRequest(f"run {config.name!r}: {error}") from None


class RunRegistry:
    def __init__(self, store: RunStore, corpus: TokenStore, max_request_tokens: int) -> None:
        self.store = store
        self.corpus_fingerprint = corpus.fingerprint
        self.split_tokens = split_tokens(corpus)
        self.max_request_tokens = max_request_tokens
        self._runs: dict[str, RunContext] = {}

    def local(self) -> list[RunContext]:
        return list(self._runs.values())

    def _context(self, config: RunConfig) -> RunContext:
        try:
            policy = make_policy(config)
        except (ValueError, TypeError) as error:  # unknown policy name, or options it does not take
            raise InvalidRequest(f"run {config.name!r}: policy {config.policy.name!r}: {error}") from None
        return RunContext(config=config, policy=policy)

    def check_servable(self, config: RunConfig) -> None:
        check_servable(config, self.split_tokens, self.max_request_tokens)

    def _check_origin(self, name: str, corpus: str | None, generator: int | None) -> None:
        """RunConflict unless this server generates a run's batches as the server that created it
        did: the same corpus and the same generator revision (None: a run created before runs
        recorded it, revision 1)."""
        if corpus is not None and corpus != self.corpus_fingerprint:
            raise RunConflict(
                f"run {name!r} reads corpus {corpus}, but this server serves corpus "
                f"{self.corpus_fingerprint} (BIRDIE_CORPUS): its batches would differ; start the server "
                "on the run's corpus, or use another run name or store"
            )
        if (generator or 1) != GENERATOR_REVISION:
            raise RunConflict(
                f"run {name!r} was created by batch generator revision {generator or 1}, and this server "
                f"generates revision {GENERATOR_REVISION}, whose batches differ at the same addresses: serve "
                "it with the version that created it, or start a new run (another name or store namespace)"
            )

    def _check_stored(self, name: str, stored: dict) -> None:
        self._check_origin(name, stored.get("corpus"), stored.get("generator"))

    async def get(self, run: str) -> RunContext:
        """The run's context; loaded from the store if another worker or replica created it."""
        context = self._runs.get(run)
        if context is not None:
            return context
        if not is_run_name(run):
            raise UnknownRun(run)
        stored = await self.store.get_config(run)
        self._check_stored(run, stored)  # before validating it: an older config may not validate now
        config = RunConfig.model_validate(stored)
        # A run created elsewhere, or before the check existed (a batch limit above this server's is
        # the batch route's 413, not a reason to refuse the run).
        check_splits(config, self.split_tokens)
        context = self._context(config)
        return self._runs.setdefault(run, context)

    async def register(self, config: RunConfig) -> tuple[RunContext, bool]:
        """Create the run in the store, or accept it if it exists with the identical config.

        Returns (context, created). `RunConflict` if the stored config differs: a run's batches
        are a function of its config, so changing it under the same name would break replay.
        """
        if config.corpus is not None or config.generator is not None:  # a config that names its origin
            self._check_origin(config.name, config.corpus or self.corpus_fingerprint, config.generator)
        config = config.model_copy(update={"corpus": self.corpus_fingerprint, "generator": GENERATOR_REVISION})
        self.check_servable(config)
        context = self._context(config)
        try:
            await self.store.create_run(
                config.name, config.stored(), config.initial_probabilities, context.policy.initial_state()
            )
            created = True
        except RunExists:
            stored = await self.store.get_config(config.name)
            self._check_stored(config.name, stored)
            if stored != config.stored():
                raise RunConflict(
                    f"run {config.name!r} exists with a different config; a run's config cannot change "
                    "(its batches are a function of it): choose another name"
                ) from None
            created = False
        return self._runs.setdefault(config.name, context), created
