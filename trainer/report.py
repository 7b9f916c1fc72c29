"""The report of a training job: `report.json` (config, losses, evaluations, throughput, mixture
history) and `report.png` (the mixture's family probabilities over the steps, above the
per-family validation loss at the evaluation steps).

    report = build_report(config=..., run=info, result=train_result, evaluation=..., mixture_history=...)
    json_path, png_path = write_report(report, "runs/demo")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from clients.plot import family_means, mixture_by_family, plot_mixture


def family_of(objectives: list[dict[str, Any]]) -> dict[str, str]:
    """Configuration name -> family, from a run's objectives ([{name, family, ...}])."""
    return {o["name"]: o["family"] for o in objectives}


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
    """report.png: family probabilities over the steps above the per-family validation loss."""
    evaluations = [(v["step"], v["family_losses"]) for v in report["losses"]["validation"]]
    return plot_mixture(path, f"run {report['run']}", report["mixture_history"]["families"], evaluations,
                        report["steps"]["end"])


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.json and report.png into `out_dir`; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return json_path, plot_report(report, out_dir / "report.png")
