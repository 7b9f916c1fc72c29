"""Mixture policies by name; a run chooses one in its config (`policy: {name: ..., options: ...}`)."""

from __future__ import annotations

from objective_server.policies.base import Decision, Policy
from objective_server.policies.birdie import BirdiePolicy
from objective_server.policies.exp3 import Exp3Policy
from objective_server.policies.fixed import FixedPolicy
from objective_server.runs import RunConfig

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (FixedPolicy, BirdiePolicy, Exp3Policy)}


def make_policy(config: RunConfig) -> Policy:
    try:
        cls = POLICIES[config.policy.name]
    except KeyError:
        raise ValueError(f"unknown policy {config.policy.name!r}; known: {sorted(POLICIES)}") from None
    return cls(config, **config.policy.options)


__all__ = ["Decision", "Policy", "POLICIES", "make_policy"]
