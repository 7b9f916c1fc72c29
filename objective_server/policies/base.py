"""The mixture-policy interface: a small state machine whose state lives in the run store.

    decision = policy.update(state, observation)

`state` is the policy's own serialised state (bytes, opaque to everyone else), so any replica can
continue a run another one started, and a restart loses nothing. `update` is pure: the same state
and observation give the same decision (all randomness is keyed or carried in the state). The
server calls it exactly once per completed observation (every rank's validation losses of one
evaluation, or every rank's training losses of one step), under the run's lock, and commits the
decision with a version check.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from objective_server.runs import RunConfig
from objective_server.store.protocol import Aggregate


@dataclass(frozen=True)
class Decision:
    """What a policy does with one observation: its next state, and maybe a new mixture."""

    state: bytes
    probabilities: list[float] | None = None  # None: keep the current mixture
    meta: dict[str, Any] = field(default_factory=dict)  # shown by /mixture with the new mixture


class Policy(ABC):
    name: ClassVar[str]
    # Which completed observations the policy wants: "validation", "train" or both.
    observes: ClassVar[tuple[str, ...]] = ("validation",)

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    @abstractmethod
    def initial_state(self) -> bytes:
        """The state a new run starts from."""

    @abstractmethod
    def update(self, state: bytes, observation: Aggregate) -> Decision:
        """Fold one completed observation into the state; maybe choose a new mixture."""

    def describe(self, state: bytes) -> dict[str, Any]:
        """What /mixture shows about the policy's current state."""
        return {}
