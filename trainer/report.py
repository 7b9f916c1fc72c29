"""The report of a training job: `report.json` (config, losses, evaluations, throughput, mixture
history) and `report.png` (the mixture's family probabilities over the steps, above the
per-family validation loss at the evaluation steps).

    report = build_report(config=..., run=info, result=train_result, evaluation=..., mixture_history=...)
    json_path, png_path = write_report(report, "runs/demo")
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from trainer.evaluate import family_means


def family_of(objectives: list[dict[str, Any]]) -> dict[str, str]:
    """Configuration name -> family, from a run's objectives ([{name, family, ...}])."""
    return {o["name"]: o["family"] for o in objectives}


def family_sums(probabilities: dict[str, float], families: dict[str, str]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for name, p in probabilities.items():
        sums[families[name]] = sums.get(families[name], 0.0) + float(p)
    return dict(sorted(sums.items()))


def mixture_by_family(history: dict[str, Any], families: dict[str, str]) -> list[dict[str, Any]]:
    """The mixture timeline as [{effective_step, version, families: {family: probability}}], one
    entry per effective step (the last version published for a step is the one batches use)."""
    by_version = {m["version"]: m for m in history["mixtures"]}
    entries: dict[int, dict[str, Any]] = {}
    for effective_step, version in history["timeline"]:
        mixture = by_version.get(version)
        if mixture is None:
            continue
        entries[effective_step] = {
            "effective_step": effective_step,
            "version": version,
            "families": family_sums(mixture["probabilities"], families),
        }
    return [entries[s] for s in sorted(entries)]


def throughput(history: list[dict[str, Any]], num_params: int, flops_per_token: float, skip: int = 2) -> dict[str, Any]:
    """Means over the training steps (the first `skip` steps warm up and are left out when there
    are enough of them)."""
    steady = history[skip:] if len(history) > 2 * skip else history
    if not steady:
        return {}
    tokens_per_s = float(np.mean([r["tokens_per_s"] for r in steady]))
    return {
        "tokens_per_s": tokens_per_s,
        "data_wait": float(np.mean([r["data_wait"] for r in steady])),
        "step_seconds": float(np.mean([r["step_seconds"] for r in steady])),
        "model_flops_per_s": tokens_per_s * flops_per_token,
        "parameters": num_params,
        "flops_per_token": flops_per_token,
    }


def build_report(
    *,
    config: Any,
    run: dict[str, Any],
    result: Any,
    evaluation: dict[str, Any] | None,
    mixture_history: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-ready report. `config`: the TrainConfig (a dataclass); `run`: RunInfo as a dict;
    `result`: a TrainResult; `evaluation`: an `evaluate_run` result; `mixture_history`: the
    server's GET /mixture/history as a dict."""
    families = family_of(run["objectives"])
    validations = [
        {"step": v["step"], "losses": v["losses"], "family_losses": family_means(v["losses"], families)}
        for v in result.validations
    ]
    report = {
        "run": run["name"],
        "config": {"train": dataclasses.asdict(config), "run": run["config"]},
        "model": {"name": config.model, "parameters": result.num_params, "flops_per_token": result.flops_per_token},
        "steps": {"start": result.start_step, "end": result.end_step, "seconds": result.seconds},
        "losses": {
            "train": [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in result.history],
            "train_family": [
                {"step": r["step"], "families": family_means(r["losses"], families)} for r in result.history
            ],
            "validation": validations,
            "first_train_loss": result.history[0]["loss"] if result.history else None,
            "final_train_loss": result.final_loss,
        },
        "evaluation": evaluation,
        "throughput": throughput(result.history, result.num_params, result.flops_per_token),
        "mixture_history": {
            "families": mixture_by_family(mixture_history, families),
            "timeline": mixture_history["timeline"],
            "final": mixture_history["mixtures"][-1]["probabilities"] if mixture_history["mixtures"] else {},
        },
        "failed_loss_posts": result.failed_posts,
    }
    if extra:
        report.update(extra)
    return report


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """report.png: family probabilities (stacked, a step function of the training step) above the
    per-family validation loss at the evaluation steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixture = report["mixture_history"]["families"]
    validation = report["losses"]["validation"]
    end_step = max(report["steps"]["end"], 1)
    families = sorted({f for m in mixture for f in m["families"]} | {f for v in validation for f in v["family_losses"]})
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [1, 1]})
    if mixture:
        # Each mixture holds from its effective step to the next one (or the end of training).
        starts = [min(m["effective_step"], end_step) for m in mixture] + [end_step]
        steps = np.repeat(starts, 2)[1:-1]
        bottom_edge = np.zeros(len(steps))
        for family in families:
            values = np.repeat([m["families"].get(family, 0.0) for m in mixture], 2)
            top.fill_between(steps, bottom_edge, bottom_edge + values, color=colours[family], label=family, linewidth=0)
            bottom_edge = bottom_edge + values
    top.set_ylim(0, 1)
    top.set_ylabel("probability")
    top.set_title(f"run {report['run']}: objective families in the mixture")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")

    for family in families:
        points = [(v["step"], v["family_losses"][family]) for v in validation if family in v["family_losses"]]
        points = [(s, loss) for s, loss in points if math.isfinite(loss)]
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


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.json and report.png into `out_dir`; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return json_path, plot_report(report, out_dir / "report.png")
