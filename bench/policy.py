"""Time one Birdie policy update on one CPU thread.

For K = 8, 32, 128 objective configurations and a history of 10, 50, 200 evaluations, it builds a
policy state with that history (synthetic falling losses, trained reward-model weights and
optimiser state included), then times one more update with the paper's defaults (2048 candidates,
top 8, 200 AdamW steps, width 256, 4 layers) on the exploiting path, which is the expensive one.
Columns: the whole update (best and median wall seconds over --repeat tries, and the best CPU
seconds: on a shared machine neighbours' memory traffic moves these by 20 % or more from minute to
minute, so take the best of several tries, and compare versions interleaved); the same with
train_steps=0 (candidate ranking and (de)serialisation only); the state size. Prints numbers;
asserts nothing.

    python bench/policy.py [--configs 8 32 128] [--history 10 50 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from objective_server.policies.birdie import BirdiePolicy, decode_header, encode_state
from objective_server.runs import RunConfig
from objective_server.store.protocol import Aggregate

FAMILIES = ("copying", "next_token", "deshuffling.frac50", "deshuffling.frac100")
EXPLOIT = {"control_step": 0, "explore_max": 0.0, "explore_min": 0.0, "explore_full_fraction": 0.0}


def run_config(configs: int, total_steps: int) -> RunConfig:
    # Distinct configurations over four families; lengths only make the names distinct.
    names = [f"{FAMILIES[i % len(FAMILIES)]}.len{64 + i}" for i in range(configs)]
    return RunConfig(
        name="bench", arms=[{"objective": n, "probability": 1.0} for n in names], total_steps=total_steps
    )


def observation(config: RunConfig, step: int, rng: np.random.Generator) -> Aggregate:
    losses = {n: float(1.0 + 3.0 * np.exp(-step / 500.0) + 0.01 * rng.random()) for n in config.names}
    return Aggregate("validation", step, 1, losses, {n: 1000 for n in config.names})


def state_with_history(config: RunConfig, evaluations: int) -> bytes:
    """A state after `evaluations` evaluations, with reward-model weights and optimiser state."""
    rng = np.random.default_rng(0)
    k = len(config.names)
    warm = BirdiePolicy(config, train_steps=1, candidates=8, top_k=1, **EXPLOIT)
    header, _ = decode_header(warm.initial_state())
    for t in range(evaluations - 1):
        step = 10 * (t + 1)
        losses = list(observation(config, step, rng).losses.values())
        action = rng.dirichlet(np.ones(k)).tolist()
        if header["losses"]:
            header["rewards"].append(rng.uniform(-1, 1, k).tolist())
        for key, value in (("steps", step), ("losses", losses), ("actions", action), ("exploration", 0.0),
                           ("explored", False), ("predicted", None)):
            header[key].append(value)
    # One cheap real update creates the model and optimiser state the timed update restores.
    return warm.update(encode_state(header, None), observation(config, 10 * evaluations, rng)).state


def time_update(config: RunConfig, state: bytes, step: int, repeat: int, **options) -> tuple[float, float, float]:
    """(best wall, median wall, best CPU) seconds of one update over `repeat` tries."""
    policy = BirdiePolicy(config, **EXPLOIT, **options)
    rng = np.random.default_rng(1)
    walls, cpus = [], []
    for _ in range(repeat):
        obs = observation(config, step, rng)
        start, start_cpu = time.perf_counter(), time.process_time()
        decision = policy.update(state, obs)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
        assert decision.probabilities is not None
    return min(walls), float(np.median(walls)), min(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, nargs="+", default=[8, 32, 128],
                        help="numbers of objective configurations K (default: %(default)s)")
    parser.add_argument("--history", type=int, nargs="+", default=[10, 50, 200],
                        help="evaluations in the policy's history (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="updates per cell: best and median shown (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread")
    print(f"{'K':>5} {'evaluations':>11} {'rows':>5} {'update wall s':>13} {'median wall s':>13} "
          f"{'update cpu s':>12} {'no-train cpu s':>14} {'state MB':>9}")
    for configs in args.configs:
        for evaluations in args.history:
            config = run_config(configs, total_steps=10 * (evaluations + 10))
            state = state_with_history(config, evaluations)
            step = 10 * (evaluations + 1)
            wall, median, cpu = time_update(config, state, step, args.repeat)
            *_, choose_cpu = time_update(config, state, step, args.repeat, train_steps=0)
            rows = evaluations  # completed rows the timed update trains on
            print(f"{configs:>5} {evaluations:>11} {rows:>5} {wall:>13.2f} {median:>13.2f} {cpu:>12.2f} "
                  f"{choose_cpu:>14.2f} {len(state) / 1e6:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
