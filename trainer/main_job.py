"""The main job: a small Birdie run from start to finish on one machine, no GPU needed.

    python -m trainer.main_job            # what `make run` does; about 3-6 minutes on 2 cores

1. Starts the objective server (`birdie-server serve`) as a subprocess on a free loopback port,
   with the in-process store and the embedded default corpus (prepared on the first start).
2. Creates a run: the `birdie` preset (all seven objective families), short rows, the Birdie
   reward-driven policy (or --policy).
3. Trains a small bidirectional Hawk on it with `trainer.train` (progress bar on stderr),
   posting training losses every step and validation losses at the evaluation steps, so the
   controller re-chooses the mixture while it trains.
4. Evaluates it (`trainer.evaluate`): validation loss and accuracy per configuration, copying
   and selective-copying accuracy, phone-book lookup before and after a short fine-tune.
5. Writes runs/<name>/report.json and runs/<name>/report.png and prints where they are.

A model this small, trained for minutes, learns the easy objectives (copying first) and little
else; the point is the whole system working end to end, with numbers that show it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SERVER_START_TIMEOUT_S = 600.0  # the first start prepares the default corpus (about a minute)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`birdie-server serve` in a subprocess on a free loopback port, stopped on exit.

    The in-process store and the default corpus unless `env` says otherwise (BIRDIE_* settings);
    BIRDIE_* variables of the caller's environment are not passed on (but BIRDIE_CACHE, where
    the default corpus is kept), so a stray BIRDIE_REDIS_URL cannot turn a local job into one
    against a shared store."""

    def __init__(self, log_path: str | Path, env: dict[str, str] | None = None, port: int | None = None,
                 start_timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        self.log_path = Path(log_path)
        self.chosen_port = port is None  # ours to change if another process binds it first
        self.port = port or free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BIRDIE_") or k == "BIRDIE_CACHE"}
        self.env.update(env or {})
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, bind_attempts: int = 5) -> LocalServer:
        """Start and wait until it answers. A free port another process takes before the server
        binds it is replaced by another (when the port was not given)."""
        for attempt in range(bind_attempts):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start_once()
            except RuntimeError:
                lost_port = "address already in use" in self.log_tail(since=log_start).lower()
                if not (lost_port and self.chosen_port and attempt + 1 < bind_attempts):
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> LocalServer:
        import httpx

        # This interpreter, so the server runs with the caller's packages whether installed or not.
        command = [sys.executable, "-m", "objective_server", "serve",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Its own session: the server's worker processes form one group we can stop together.
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the objective server exited with status {self.process.returncode}:\n{self.log_tail()}")
            try:
                # Still ours: a server that failed to bind must not pass for one that answers there.
                if httpx.get(self.url + "/healthz", timeout=2.0).status_code == 200 and self.process.poll() is None:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the objective server did not answer within {self.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000, since: int = 0) -> str:
        """The end of the server's log, from byte `since` on."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server's process group (graceful), SIGKILL if it does not end in time."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def evaluation_steps(total_steps: int, count: int) -> list[int]:
    """`count` evaluation steps, denser early (roughly geometric), the last at total_steps: the
    controller needs a few early evaluations to see losses fall, and each one costs a pass over
    every configuration's validation batch."""
    if count < 1 or total_steps < 1:
        raise ValueError("need count >= 1 and total_steps >= 1")
    first = min(10, total_steps)
    if count == 1 or first == total_steps:
        return [total_steps]
    ratios = [(total_steps / first) ** (i / (count - 1)) for i in range(count)]
    steps = sorted({min(total_steps, max(1, round(first * r))) for r in ratios})
    if steps[-1] != total_steps:
        steps.append(total_steps)
    return steps


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.main_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="demo", help="run name; the report goes to OUT/NAME (default: %(default)s)")
    parser.add_argument("--out", default="runs", help="folder for run outputs (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=240, help="training steps (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256,
                        help="the run's row length in tokens (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="the run's rows per step (default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=128, help="Hawk's width (default: %(default)s)")
    parser.add_argument("--n-layers", type=int, default=4, help="number of Hawk blocks (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--policy", default="birdie",
                        help="the run's mixture policy: birdie, exp3 or fixed, checked by the server "
                             "(default: %(default)s)")
    parser.add_argument("--evaluations", type=int, default=7,
                        help="evaluation steps during training (default: %(default)s)")
    parser.add_argument("--validation-rows", type=int, default=2,
                        help="rows of each validation batch scored (of batch-size; fewer is faster on a CPU) "
                             "(default: %(default)s)")
    parser.add_argument("--finetune-steps", type=int, default=30,
                        help="phone-book fine-tune steps (0: none) (default: %(default)s)")
    parser.add_argument("--finetune-numbers", default="1,2,4",
                        help="question sizes of the fine-tune's phone books (default: %(default)s)")
    parser.add_argument("--phone-book-numbers", default="1,2,4",
                        help="question sizes of the phone-book lookup; empty: none (default: %(default)s)")
    parser.add_argument("--phone-book-entries", type=int, default=6,
                        help="entries per phone book (default: %(default)s)")
    parser.add_argument("--phone-book-examples", type=int, default=6,
                        help="books per question size (default: %(default)s)")
    parser.add_argument("--server-url", help="use this running server instead of starting one; an API token, if it "
                                             "wants one, comes from $BIRDIE_API_TOKEN (default: start one)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: one less than the cores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model's initialisation, the run's data and the phone books "
                             "(default: %(default)s)")
    return parser.parse_args(argv)


def run_job(args: argparse.Namespace) -> tuple[Path, Path]:
    from clients import BirdieClient
    from trainer.evaluate import EvaluationOptions, evaluate_run, print_summary
    from trainer.report import build_report, write_report
    from trainer.train import TrainConfig, train

    out_dir = Path(args.out) / args.name
    # A fresh run each time (the embedded server forgets runs when it stops): clear what this job
    # wrote before, so metrics do not append to an older run's and nothing resumes by accident.
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    for stale in ("metrics.jsonl", "report.json", "report.png"):
        (out_dir / stale).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    server = None
    if args.server_url:
        url = args.server_url
    else:
        print("starting the objective server (its first start prepares the default corpus: about a minute) ...",
              file=sys.stderr)
        server = LocalServer(out_dir / "server.log").start()
        url = server.url
        print(f"objective server on {url} (log: {server.log_path})", file=sys.stderr)
    try:
        config = TrainConfig(
            model="hawk", d_model=args.d_model, n_layers=args.n_layers, bidirectional=True, init_seed=args.seed,
            server_url=url, run_name=args.name, create_run=True, preset="birdie", seq_len=args.seq_len,
            batch_size=args.batch_size, run_seed=args.seed, policy=args.policy,
            eval_steps=evaluation_steps(args.steps, args.evaluations), validation_rows=args.validation_rows,
            steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 20),
            checkpoint_dir=str(out_dir / "checkpoints"), metrics_file=str(out_dir / "metrics.jsonl"),
            device="cpu" if server is not None else "auto",
            # The server generates batches and updates the policy on the same cores.
            threads=args.threads or max(1, (os.cpu_count() or 2) - 1),
        )
        result = train(config)
        print(f"trained {result.end_step} steps in {result.seconds:.0f} s: loss "
              f"{result.history[0]['loss']:.3f} -> {result.final_loss:.3f}", file=sys.stderr)
        options = EvaluationOptions(
            validation_rows=args.validation_rows,
            phone_book_numbers=int_list(args.phone_book_numbers), phone_book_entries=args.phone_book_entries,
            phone_book_examples=args.phone_book_examples, finetune_steps=args.finetune_steps,
            finetune_numbers=int_list(args.finetune_numbers), seed=args.seed,
        )
        with BirdieClient(url) as client:
            evaluation = evaluate_run(result.model, client, args.name, options)
            run_info = client.run(args.name).model_dump()
            history = client.mixture_history(args.name).model_dump()
            mixture = client.mixture(args.name).model_dump()
        print_summary(evaluation)
    finally:
        if server is not None:
            server.stop()
    report = build_report(
        config=config, run=run_info, result=result, evaluation=evaluation, mixture_history=history,
        extra={"final_mixture": {"policy": mixture["policy"], "version": mixture["version"], "families": mixture["families"]},
               "seconds_total": time.perf_counter() - started},
    )
    return write_report(report, out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    json_path, png_path = run_job(parse_args(argv))
    print(f"report: {json_path.resolve()}\n        {png_path.resolve()}")


if __name__ == "__main__":
    main()
