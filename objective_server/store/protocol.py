"""The run-state store: its records, its errors and the `RunStore` protocol.

One run's state: its config, the mixture records and their timeline (which mixture version each
step uses), the highest step served so far, the mixture policy's opaque state fenced by a version,
and the loss posts of the trainer ranks, aggregated per (split, step).

Two implementations keep the same semantics and pass the same contract tests: `MemoryRunStore`
(one process) and `RedisRunStore` (shared by every worker and replica).

Why `mark_served` and `commit_policy` are atomic with respect to each other: a batch for step s uses
the mixture effective at s. Marking s served and reading the timeline in one atomic step means any
later publish becomes effective at s + 1 or later, so a batch that was served never changes when it
is asked for again.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

SPLITS = ("train", "validation")
# Most tokens one post may report for one configuration: the stores sum them in int64 (Redis
# HINCRBY), which 2^23 maximal posts of one configuration cannot overflow.
MAX_TOKENS = 1 << 40

# Run names appear in URLs and Redis keys; braces would break the per-run Redis hash tag.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# --- errors -------------------------------------------------------------------------------------


class StoreUnavailable(Exception):
    """The backend cannot be reached (Redis down or timing out); routes answer 503."""


class UnknownRun(KeyError):
    """No run of that name."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return f"unknown run {self.args[0]!r}" if self.args else "unknown run"


class UnknownMixtureVersion(KeyError):
    """The run has no mixture with that version."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown mixture version"


class RunExists(Exception):
    """A run of that name already exists (even with an identical config: the caller decides)."""


class ConflictError(Exception):
    """The request disagrees with the stored state (e.g. another world_size for the same step)."""


class LockNotAcquired(TimeoutError):
    """The lock was still held by someone else when the wait ran out."""


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixtureRecord:
    """One published mixture: probabilities over the run's configurations, in config order."""

    version: int
    probabilities: list[float]
    effective_step: int
    created_at_step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Timeline:
    """Which mixture version each step uses. `effective_steps[v]` is the first step of version v.

    The timeline only grows (a publish appends one version), so a caller that keeps the last one
    it got can pass it as `known` and the store sends only the versions published since.
    Effective steps never decrease. Two publishes before any new step is served share an effective
    step; the later one wins, because nothing was served with the earlier one at that step.
    """

    effective_steps: tuple[int, ...]
    max_served: int  # -1 before the first batch

    @property
    def entries(self) -> tuple[tuple[int, int], ...]:
        """(effective_step, version) pairs, oldest first."""
        return tuple((effective, version) for version, effective in enumerate(self.effective_steps))

    def version_at(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        version = bisect.bisect_right(self.effective_steps, step) - 1
        if version < 0:  # version 0 is effective from step 0, so only a malformed timeline gets here
            raise ValueError(f"no mixture is effective at step {step}")
        return version

    @property
    def latest_version(self) -> int:
        return len(self.effective_steps) - 1


@dataclass(frozen=True)
class LossPost:
    """One rank's losses for one step of one split: mean loss and token count per configuration.

    Checked on construction, so a store never sees (and never half-applies) a malformed post.
    """

    step: int
    rank: int
    world_size: int
    split: str
    losses: Mapping[str, float]
    tokens: Mapping[str, int]

    def __post_init__(self) -> None:
        for name in ("step", "rank", "world_size"):
            _require_int(name, getattr(self, name))
        if self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if set(self.losses) != set(self.tokens):
            raise ValueError(
                "losses and tokens must name the same configurations, got "
                f"{sorted(self.losses)} and {sorted(self.tokens)}"
            )
        losses: dict[str, float] = {}
        tokens: dict[str, int] = {}
        for name in sorted(self.losses):
            if not isinstance(name, str) or not name:
                raise ValueError(f"configuration names must be non-empty strings, got {name!r}")
            loss, count = self.losses[name], self.tokens[name]
            if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
                raise ValueError(f"loss of {name!r} must be a finite number, got {loss!r}")
            _require_int(f"tokens of {name!r}", count)
            if not 0 <= count <= MAX_TOKENS:
                raise ValueError(f"tokens of {name!r} must be in [0, {MAX_TOKENS}], got {count}")
            losses[name], tokens[name] = float(loss), int(count)
        # Own copies, so later changes to the caller's dicts cannot reach the store.
        object.__setattr__(self, "losses", losses)
        object.__setattr__(self, "tokens", tokens)

    @property
    def key(self) -> tuple[str, int]:
        """The (split, step) aggregate this post belongs to."""
        return (self.split, self.step)


@dataclass(frozen=True)
class Aggregate:
    """All `world_size` ranks' posts of one (split, step), token-weighted.

    `losses[name]` = sum(loss * tokens) / sum(tokens) over the ranks; a configuration that had no
    tokens on any rank has no mean loss and appears only in `tokens` (with 0).
    """

    split: str
    step: int
    world_size: int
    losses: dict[str, float]
    tokens: dict[str, int]

    @classmethod
    def from_sums(
        cls,
        split: str,
        step: int,
        world_size: int,
        loss_sums: Mapping[str, float],
        token_sums: Mapping[str, int],
    ) -> Aggregate:
        losses = {
            name: loss_sums[name] / token_sums[name]
            for name in sorted(token_sums)
            if token_sums[name] > 0
        }
        tokens = {name: int(token_sums[name]) for name in sorted(token_sums)}
        return cls(split, step, world_size, losses, tokens)

    @property
    def key(self) -> tuple[str, int]:
        return (self.split, self.step)


@dataclass(frozen=True)
class PostOutcome:
    """What a loss post did: a duplicate changes nothing; the last rank's post completes the set."""

    duplicate: bool
    ranks_posted: int  # ranks of this (split, step) seen so far, including this post
    completed: Aggregate | None = None


@dataclass(frozen=True)
class CommitOutcome:
    """Result of `commit_policy`: on a stale expected_version nothing changed (`ok` is False)."""

    ok: bool
    policy_version: int  # the version now stored (the new one if ok, the current one otherwise)
    mixture_version: int | None = None  # set when the commit published a mixture
    effective_step: int | None = None


# --- the protocol -------------------------------------------------------------------------------


@runtime_checkable
class RunStore(Protocol):
    """Every method of a missing run raises `UnknownRun`; a backend failure raises `StoreUnavailable`."""

    async def ping(self) -> None:
        """Return if the backend answers, else raise `StoreUnavailable`."""

    async def create_run(
        self, run: str, config: dict, initial: Sequence[float], policy_state: bytes
    ) -> None:
        """Create a run with mixture version 0 = `initial`, effective at step 0 (`RunExists` if present)."""

    async def list_runs(self) -> list[str]:
        """Names of all runs, sorted."""

    async def get_config(self, run: str) -> dict:
        """The config the run was created with."""

    async def mark_served(self, run: str, step: int, known: Timeline | None = None) -> Timeline:
        """Atomically raise max_served to at least `step`; return the timeline of that moment.

        `known`: a timeline this store returned earlier for this run; only newer versions are
        then read from the backend (the result is still the whole timeline)."""

    async def timeline(self, run: str, known: Timeline | None = None) -> Timeline:
        """The current timeline and max_served, without serving anything."""

    async def mixture(self, run: str, version: int | None = None) -> MixtureRecord:
        """The mixture with `version` (None: the latest); `UnknownMixtureVersion` if there is none."""

    async def mixture_history(self, run: str) -> list[MixtureRecord]:
        """All mixtures, version 0 first."""

    async def post_losses(self, run: str, post: LossPost) -> PostOutcome:
        """Count one rank's post exactly once; the last rank of (split, step) completes its aggregate.

        Atomic: a repeated (split, step, rank) is a duplicate and changes nothing; a world_size that
        differs from the one already recorded for (split, step) raises `ConflictError`, changing
        nothing. A completed aggregate joins the pending queue and is returned once, to this post.
        """

    async def pending(self, run: str) -> list[Aggregate]:
        """Completed aggregates not yet consumed by a policy commit, by (step, split)."""

    async def evaluations(self, run: str) -> list[Aggregate]:
        """Validation aggregates a policy commit has consumed, in the order they were consumed
        (the run's evaluation history, shown by /mixture/history)."""

    async def policy_state(self, run: str) -> tuple[int, bytes]:
        """(policy_version, opaque policy state)."""

    async def commit_policy(
        self,
        run: str,
        expected_version: int,
        state: bytes,
        consumed: Sequence[tuple[str, int]],
        probabilities: Sequence[float] | None,
        meta: dict | None = None,
        created_at_step: int | None = None,
    ) -> CommitOutcome:
        """Compare-and-set on policy_version; on success store `state`, drop the consumed
        (split, step) aggregates from pending and, if `probabilities` is given, publish a mixture
        effective at max_served + 1 (read in the same atomic step). `ConflictError` (nothing
        changed) if a consumed aggregate is not pending."""

    def lock(
        self, run: str, name: str = "policy", ttl_s: float = 30.0, wait_s: float = 10.0
    ) -> AbstractAsyncContextManager[None]:
        """Mutual exclusion across workers and replicas. The lock expires after `ttl_s` (a crashed
        holder cannot block forever); release only removes our own lock. `LockNotAcquired` if it
        is still held by another after `wait_s`."""

    async def train_totals(self, run: str) -> dict[str, dict]:
        """Per configuration over all training posts: {"tokens", "posts", "mean_loss"}."""

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""


# --- checks and encodings shared by the implementations -----------------------------------------


def _require_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")


def check_new_run_name(run: str) -> None:
    if not isinstance(run, str) or not RUN_NAME.fullmatch(run):
        raise ValueError(
            f"run name must be 1-128 characters of letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit, got {run!r}"
        )


def is_run_name(run: object) -> bool:
    return isinstance(run, str) and RUN_NAME.fullmatch(run) is not None


def check_step(step: int) -> None:
    _require_int("step", step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def check_probabilities(probabilities: Sequence[float]) -> list[float]:
    """A probability vector: non-empty, finite, non-negative, summing to 1 (to 1e-6)."""
    values = list(probabilities)
    if not values:
        raise ValueError("probabilities must not be empty")
    for p in values:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise ValueError(f"probabilities must be finite and >= 0, got {p!r}")
    total = math.fsum(values)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"probabilities must sum to 1, got {total!r}")
    return [float(p) for p in values]


def check_expected_version(expected_version: object) -> int:
    """The compare-and-set version of a policy commit: an int (bool refused)."""
    if isinstance(expected_version, bool) or not isinstance(expected_version, int):
        raise ValueError(f"expected_version must be an integer, got {expected_version!r}")
    return expected_version


def check_consumed(consumed: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    keys = [(split, step) for split, step in consumed]
    for split, step in keys:
        if split not in SPLITS:
            raise ValueError(f"consumed split must be one of {SPLITS}, got {split!r}")
        check_step(step)
    if len(set(keys)) != len(keys):
        raise ValueError(f"consumed names an aggregate twice: {keys}")
    return keys


def to_json(what: str, value: object) -> str:
    """Canonical JSON, so both stores hand back the same thing (tuples become lists, etc.)."""
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} must be JSON-serialisable without NaN/inf: {error}") from None


def encode_mixture_body(
    probabilities: list[float], created_at_step: int | None, meta: dict | None
) -> str:
    """The stored part of a mixture record; version and effective step are stored beside it."""
    if created_at_step is not None:
        check_step(created_at_step)
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    return to_json(
        "mixture", {"probabilities": probabilities, "created_at_step": created_at_step, "meta": meta or {}}
    )


def decode_mixture(version: int, effective_step: int, body: str | bytes) -> MixtureRecord:
    data = json.loads(body)
    return MixtureRecord(
        version=version,
        probabilities=data["probabilities"],
        effective_step=effective_step,
        created_at_step=data["created_at_step"],
        meta=data["meta"],
    )


def totals_view(loss_sums: Mapping[str, float], tokens: Mapping[str, int], posts: Mapping[str, int]) -> dict[str, dict]:
    return {
        name: {
            "tokens": int(tokens[name]),
            "posts": int(posts[name]),
            "mean_loss": loss_sums[name] / tokens[name] if tokens[name] > 0 else None,
        }
        for name in sorted(tokens)
    }
