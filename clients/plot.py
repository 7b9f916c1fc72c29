"""A run's mixture over training, drawn: family probabilities (stacked, a step function of the
training step) above the per-family validation loss at the evaluation steps.

Used by `birdie mixture RUN --plot FILE.png` (from GET /mixture/history) and by the trainer's
report. Needs matplotlib (imported on use; drawn with the Agg backend, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clients.models import MixtureHistoryResponse


def family_sums(probabilities: Mapping[str, float], families: Mapping[str, str]) -> dict[str, float]:
    """Probability per family: the sum over its configurations."""
    sums: dict[str, float] = {}
    for name, p in probabilities.items():
        sums[families[name]] = sums.get(families[name], 0.0) + float(p)
    return dict(sorted(sums.items()))


def family_means(values: Mapping[str, float], families: Mapping[str, str]) -> dict[str, float]:
    """Mean over each family's configurations (every configuration counts once, as in the
    controller's family reward)."""
    grouped: dict[str, list[float]] = {}
    for name, value in values.items():
        grouped.setdefault(families[name], []).append(float(value))
    return {family: sum(v) / len(v) for family, v in sorted(grouped.items())}


def mixture_by_family(history: Mapping[str, Any], families: Mapping[str, str]) -> list[dict[str, Any]]:
    """The mixture timeline of a /mixture/history body as [{effective_step, version, families}], one
    entry per effective step (the last version published for a step is the one batches use)."""
    by_version = {m["version"]: m for m in history["mixtures"]}
    entries: dict[int, dict[str, Any]] = {}
    for effective_step, version in history["timeline"]:
        mixture = by_version.get(version)
        if mixture is not None:
            entries[effective_step] = {
                "effective_step": effective_step,
                "version": version,
                "families": family_sums(mixture["probabilities"], families),
            }
    return [entries[s] for s in sorted(entries)]


def plot_mixture(
    path: str | Path,
    title: str,
    mixtures: Sequence[Mapping[str, Any]],
    evaluations: Sequence[tuple[int, Mapping[str, float]]],
    end_step: int,
) -> Path:
    """Draw `mixtures` ([{effective_step, families: {family: p}}]) over [0, end_step] above
    `evaluations` ([(step, {family: validation loss})]); write a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    end_step = max(end_step, 1)
    families = sorted({f for m in mixtures for f in m["families"]} | {f for _, losses in evaluations for f in losses})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    if mixtures:
        # Each mixture holds from its effective step to the next one (or the end).
        starts = [min(m["effective_step"], end_step) for m in mixtures] + [end_step]
        steps = np.repeat(starts, 2)[1:-1]
        edge = np.zeros(len(steps))
        for family in families:
            values = np.repeat([m["families"].get(family, 0.0) for m in mixtures], 2)
            top.fill_between(steps, edge, edge + values, color=colours[family], label=family, linewidth=0)
            edge = edge + values
    top.set_ylim(0, 1)
    top.set_ylabel("probability")
    top.set_title(f"{title}: objective families in the mixture")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    for family in families:
        points = [(s, losses[family]) for s, losses in evaluations if family in losses and math.isfinite(losses[family])]
        if points:
            xs, ys = zip(*points)
            bottom.plot(xs, ys, marker="o", markersize=3, color=colours[family], label=family)
    bottom.set_xlabel("training step")
    bottom.set_ylabel("validation loss (family mean)")
    bottom.set_title("per-family validation loss at the evaluation steps")
    bottom.set_xlim(0, end_step)
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_history(history: MixtureHistoryResponse, path: str | Path) -> Path:
    """The picture of a run from its GET /mixture/history."""
    body = history.model_dump()
    families = history.families
    evaluations = [(e.step, family_means(e.losses, families)) for e in history.evaluations]
    end_step = max([history.max_served + 1] + [s for s, _ in evaluations] + [m.effective_step for m in history.mixtures])
    return plot_mixture(path, f"run {history.run}", mixture_by_family(body, families), evaluations, end_step)
