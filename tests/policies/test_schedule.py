"""Birdie's evaluation schedule and control step, scaled for short runs (runs.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from objective_server.runs import control_step, evaluation_schedule

from .simulation import run_config


def test_full_length_runs_use_the_papers_steps() -> None:
    assert evaluation_schedule(20_000)[:9] == [10, 50, 250, 500, 1000, 1500, 2000, 3000, 4000]
    assert evaluation_schedule(20_000)[-1] == 20_000
    steps = evaluation_schedule(35_500)
    assert steps[-3:] == [33_000, 34_000, 35_000]
    assert all(b - a == 1000 for a, b in zip(steps[6:], steps[7:]))
    assert control_step(20_000) == control_step(50_000) == 250


def test_short_runs_scale_proportionally() -> None:
    assert evaluation_schedule(10_000)[:8] == [5, 25, 125, 250, 500, 750, 1000, 1500]
    assert control_step(10_000) == 125
    assert control_step(2000) == 25


def test_tiny_runs_keep_two_evaluations_before_control() -> None:
    # Scaled naively, 10, 50 and 250 would all round to step 1 in a 100-step run.
    steps = evaluation_schedule(100)
    assert steps[:5] == [1, 2, 3, 4, 5]
    assert control_step(100) == steps[2]
    assert evaluation_schedule(1) == [1]
    assert control_step(1) == 2  # never reached
    with pytest.raises(ValueError):
        evaluation_schedule(0)


@given(st.integers(1, 60_000))
def test_schedule_is_strictly_increasing_within_the_run(total: int) -> None:
    steps = evaluation_schedule(total)
    assert steps and steps[0] >= 1 and steps[-1] <= total
    assert all(a < b for a, b in zip(steps, steps[1:]))
    if total >= 3:
        assert control_step(total) == steps[2]


def test_run_config_uses_the_schedule_unless_given_steps() -> None:
    assert run_config("fixed", total_steps=2000).evaluation_steps == evaluation_schedule(2000)
    assert run_config("fixed", total_steps=400, eval_steps=[10, 500]).evaluation_steps == [10]
