"""Mixture policies that publish (the shipped `fixed` one never does), for the server tests.

`rotating` records every observation it is given in its state and publishes a new mixture each
time, so a test can count policy updates exactly and see mixtures change mid-run; with `hold_at`
its update for those steps waits at the run's `Gate` until the test opens it, so a test can order
concurrent requests around a policy update without sleeping. `app()` is a
uvicorn factory that registers these policies and builds the real app from the environment, so a
test server process (and each of its workers) knows them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from objective_server.policies import POLICIES, Decision, Policy
from objective_server.runs import RunConfig
from objective_server.store import Aggregate


# How long a held update waits for its gate before failing (a test that never opens it).
GATE_TIMEOUT_S = 60.0


@dataclass
class Gate:
    """Where a held policy update of one run waits: it sets `entered`, then waits for `release`."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


GATES: dict[str, Gate] = {}


def new_gate(run: str) -> Gate:
    """A fresh (closed) gate for the run's held updates, replacing any earlier test's."""
    GATES[run] = Gate()
    return GATES[run]


class RotatingPolicy(Policy):
    """Every observation: append (split, step) to the state and move the mixture's weight on."""

    name = "rotating"
    observes = ("validation",)

    def __init__(
        self,
        config: RunConfig,
        delay_s: float = 0.0,
        fail_at: tuple[int, ...] = (),
        nan_at: tuple[int, ...] = (),
        hold_at: tuple[int, ...] = (),
    ) -> None:
        super().__init__(config)
        self.delay_s = delay_s  # widens the window in which concurrent posts could double-apply
        self.fail_at = tuple(fail_at)  # steps whose observation makes the policy raise
        self.nan_at = tuple(nan_at)  # steps whose observation makes it propose an invalid mixture
        self.hold_at = tuple(hold_at)  # steps whose update waits at the run's gate (see new_gate)

    def initial_state(self) -> bytes:
        return json.dumps({"observed": []}).encode()

    def update(self, state: bytes, observation: Aggregate) -> Decision:
        time.sleep(self.delay_s)
        if observation.step in self.hold_at:
            gate = GATES.setdefault(self.config.name, Gate())
            gate.entered.set()
            if not gate.release.wait(GATE_TIMEOUT_S):
                raise RuntimeError(f"the gate of run {self.config.name!r} never opened")
        if observation.step in self.fail_at:
            raise RuntimeError(f"no update for step {observation.step} (fail_at)")
        s = json.loads(state)
        s["observed"].append([observation.split, observation.step])
        probabilities = rotated(len(self.config.arms), len(s["observed"]))
        if observation.step in self.nan_at:
            probabilities[0] = float("nan")
        return Decision(
            state=json.dumps(s).encode(),
            probabilities=probabilities,
            meta={"observations": len(s["observed"])},
        )

    def describe(self, state: bytes) -> dict[str, Any]:
        s = json.loads(state)
        return {**s, "evaluations": len(s["observed"])}


class RotatingTrainPolicy(RotatingPolicy):
    """The same, for a step-wise policy that observes every training step."""

    name = "rotating-train"
    observes = ("train",)


def rotated(k: int, n: int) -> list[float]:
    """Half the weight on configuration n mod k, the rest spread evenly."""
    if k == 1:
        return [1.0]
    p = [0.5 / (k - 1)] * k
    p[n % k] = 0.5
    return p


def register() -> None:
    for cls in (RotatingPolicy, RotatingTrainPolicy):
        POLICIES.setdefault(cls.name, cls)


def app():
    """uvicorn factory: the real app (settings from BIRDIE_*), with the test policies known."""
    from objective_server.app import app_from_env

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    register()
    return app_from_env()
