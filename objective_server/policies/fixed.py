"""`fixed`: the mixture never changes (any preset or given probabilities). The baseline."""

from __future__ import annotations

import json
from typing import Any

from objective_server.policies.base import Decision, Policy
from objective_server.store.protocol import Aggregate


class FixedPolicy(Policy):
    name = "fixed"

    def initial_state(self) -> bytes:
        return json.dumps({"evaluations": 0, "last_losses": {}}).encode()

    def update(self, state: bytes, observation: Aggregate) -> Decision:
        s = json.loads(state)
        s["evaluations"] += 1
        s["last_losses"] = observation.losses
        s["last_step"] = observation.step
        return Decision(state=json.dumps(s, sort_keys=True).encode())

    def describe(self, state: bytes) -> dict[str, Any]:
        return json.loads(state)
