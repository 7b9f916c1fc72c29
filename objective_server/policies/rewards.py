"""Birdie's reward: how much each configuration's validation loss fell between two evaluations,
and how configurations are weighted by family (birdie-method.md §4).

    d = (new - old) / (old + 1e-8),  s = sqrt(old * new)
    reward = clip(-100 * e * tanh(e * s * d**3), -1, 1),  NaN -> 0

The cube makes small relative changes nearly worthless (a 1 % fall at loss 3 earns 0.002) and
saturates at a fall of several percent, so a configuration whose loss has flattened earns ~0
however often it is sampled. A family's reward is
the mean of its configurations' rewards and the total is the sum over families, i.e. configuration
i is weighted by 1 / size of its family: a family split into many configurations counts once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def loss_reward(old: Sequence[float] | np.ndarray, new: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-configuration rewards (float64, in [-1, 1]) for validation losses going `old` -> `new`."""
    old_losses = np.asarray(old, dtype=np.float64)
    new_losses = np.asarray(new, dtype=np.float64)
    if old_losses.shape != new_losses.shape:
        raise ValueError(f"old and new losses differ in shape: {old_losses.shape} vs {new_losses.shape}")
    with np.errstate(all="ignore"):  # negative or zero losses give NaN, which counts as no reward
        relative_change = (new_losses - old_losses) / (old_losses + 1e-8)
        scale = np.sqrt(old_losses * new_losses)
        reward = -100.0 * np.e * np.tanh(np.e * scale * relative_change**3)
    return np.clip(np.nan_to_num(reward, nan=0.0), -1.0, 1.0)


def family_weights(families: Sequence[str]) -> np.ndarray:
    """Weight 1 / (size of its family) for each configuration, in order."""
    if len(families) == 0:
        raise ValueError("no configurations")
    sizes: dict[str, int] = {}
    for family in families:
        sizes[family] = sizes.get(family, 0) + 1
    return np.array([1.0 / sizes[family] for family in families], dtype=np.float64)


def family_rewards(rewards: Sequence[float] | np.ndarray, families: Sequence[str]) -> dict[str, float]:
    """Mean reward of each family's configurations, families in order of first appearance."""
    values = np.asarray(rewards, dtype=np.float64)
    if values.shape != (len(families),):
        raise ValueError(f"{values.shape[0] if values.ndim else 0} rewards for {len(families)} configurations")
    members: dict[str, list[int]] = {}
    for index, family in enumerate(families):
        members.setdefault(family, []).append(index)
    return {family: float(values[indices].mean()) for family, indices in members.items()}


def total_reward(rewards: Sequence[float] | np.ndarray, families: Sequence[str]) -> float:
    """Sum over families of each family's mean reward."""
    values = np.asarray(rewards, dtype=np.float64)
    if values.shape != (len(families),):
        raise ValueError(f"{values.shape[0] if values.ndim else 0} rewards for {len(families)} configurations")
    return float(family_weights(families) @ values)
