"""Objective-server throughput and latency over real HTTP, against in-process generation.

    python bench/server.py [--seconds 6] [--clients 1 4 16] [--formats arrow json]
                           [--stores memory redis] [--workers 1] [--generation-workers 2]

For each store (in-process, Redis) a `birdie-server serve` process is started on this machine, and
for each wire format and number of concurrent clients a fresh run (the birdie preset, B = 8,
L = 2048, fixed mixture) is created; each client is one trainer rank (world_size = clients) that
walks its steps for --seconds, requesting the next batch as soon as it has read the last one.
Printed per row: batch positions (B * L) per second over all clients, and p50/p99 latency of one
request; then the same generation in this process, single-threaded, for the ratio (target >= 0.8),
and loss-post latency (training posts, and validation posts that complete an evaluation).

The clients run in this process and share the machine with the server, as they would not in
training (trainers read batches on other hosts), so the HTTP figures are a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the redis-server fixture doubles as the bench's Redis

from redis_server import RedisServer, free_loopback_port, redis_server_binary  # noqa: E402

BATCH_SIZE, SEQ_LEN = 8, 2048


def run_config(name: str) -> dict:
    return {"name": name, "preset": "birdie", "seq_len": SEQ_LEN, "batch_size": BATCH_SIZE, "seed": 0,
            "policy": {"name": "fixed"}, "total_steps": 100_000, "eval_steps": [1_000_000 - 1]}


class Server:
    """`birdie-server serve` in a subprocess (its own process group), up until `stop()`."""

    def __init__(self, env: dict[str, str], workers: int, log: Path) -> None:
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).parent / "birdie-server"), "serve", "--port", str(self.port),
                   "--workers", str(workers)]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after 120 s; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


async def clients_walk(url: str, run: str, clients: int, wire_format: str, seconds: float) -> tuple[float, np.ndarray]:
    """(batch positions per second, per-request latencies in s) of `clients` concurrent ranks."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        async def rank(r: int, until: float) -> int:
            step = served = 0
            while time.perf_counter() < until:
                params = {"run": run, "rank": r, "world_size": clients, "step": step, "format": wire_format}
                started = time.perf_counter()
                response = await http.get("/batch", params=params)
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                step += 1
                served += 1
            return served

        # Warm-up: the first batch of every rank (opens connections, parses the run in the workers).
        await asyncio.gather(*(http.get("/batch", params={"run": run, "rank": r, "world_size": clients,
                                                         "step": 10**6, "format": wire_format})
                               for r in range(clients)))
        latencies.clear()
        start = time.perf_counter()
        served = await asyncio.gather(*(rank(r, start + seconds) for r in range(clients)))
        elapsed = time.perf_counter() - start
    return sum(served) * BATCH_SIZE * SEQ_LEN / elapsed, np.asarray(latencies)


async def loss_post_latency(url: str, run: str, names: list[str], posts: int) -> dict[str, np.ndarray]:
    """Latency of training posts (each completes its step: world_size 1) and of validation posts
    that complete an evaluation (the policy update runs before the answer)."""
    out: dict[str, list[float]] = {"train": [], "validation": []}
    losses = {n: 2.0 + i / 100 for i, n in enumerate(names)}
    tokens = {n: 1000 for n in names}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for split in out:
            for step in range(posts):
                body = {"run": run, "step": step, "split": split, "losses": losses, "tokens": tokens}
                started = time.perf_counter()
                response = await http.post("/losses", json=body)
                out[split].append(time.perf_counter() - started)
                response.raise_for_status()
    return {k: np.asarray(v) for k, v in out.items()}


def in_process_generation(corpus, seconds: float) -> float:
    """Batch positions per second of generate_batch for the same run, single-threaded."""
    from objective_server.batching import generate_batch
    from objective_server.runs import RunConfig

    config = RunConfig.model_validate(run_config("in-process"))
    tokens, special = corpus.split("train").tokens, corpus.special
    objectives, probabilities = config.objectives, config.initial_probabilities
    generate_batch(objectives, probabilities, tokens, special, seed=0, batch_size=BATCH_SIZE, seq_len=SEQ_LEN,
                   rank=0, world_size=1, step=10**6)
    step = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or step < 5:
        generate_batch(objectives, probabilities, tokens, special, seed=0, batch_size=BATCH_SIZE,
                       seq_len=SEQ_LEN, rank=0, world_size=1, step=step)
        step += 1
    return step * BATCH_SIZE * SEQ_LEN / elapsed


def ms(values: np.ndarray, q: float) -> str:
    return f"{np.percentile(values, q) * 1000:8.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per row")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--formats", nargs="+", default=["arrow", "json"], choices=["arrow", "json"])
    ap.add_argument("--stores", nargs="+", default=["memory", "redis"], choices=["memory", "redis"])
    ap.add_argument("--workers", type=int, default=1, help="uvicorn workers (more than 1 needs Redis)")
    ap.add_argument("--generation-workers", type=int, default=2)
    ap.add_argument("--executor", default="process", choices=["process", "thread"])
    ap.add_argument("--prefetch-depth", type=int, default=2)
    ap.add_argument("--loss-posts", type=int, default=50)
    ap.add_argument("--corpus", help="a prepared token store (default: the embedded default corpus)")
    args = ap.parse_args()

    from objective_server.corpus.default import default_store
    from objective_server.corpus.store import TokenStore

    corpus = TokenStore.open(args.corpus) if args.corpus else default_store(progress=True)
    workdir = Path(tempfile.mkdtemp(prefix="birdie-bench-"))
    print(f"corpus {corpus.path} ({corpus.split('train').n_tokens:,} train tokens); {os.cpu_count()} cores; "
          f"server: {args.workers} uvicorn worker(s), {args.generation_workers} generation {args.executor}(es), "
          f"prefetch {args.prefetch_depth}; logs in {workdir}")
    print(f"birdie preset (55 configurations), B = {BATCH_SIZE}, L = {SEQ_LEN}; {args.seconds:g} s per row\n")

    baseline = in_process_generation(corpus, args.seconds)
    rows = []
    post_rows = []
    for store in args.stores:
        redis = None
        env = {
            "BIRDIE_CORPUS": str(corpus.path), "BIRDIE_GENERATION_EXECUTOR": args.executor,
            "BIRDIE_GENERATION_WORKERS": str(args.generation_workers),
            "BIRDIE_PREFETCH_DEPTH": str(args.prefetch_depth), "BIRDIE_LOG_LEVEL": "warning",
            "BIRDIE_MAX_BODY_BYTES": str(4 << 20),
        }
        if store == "redis":
            if redis_server_binary() is None:
                print("redis-server not installed: skipping the Redis rows")
                continue
            redis = RedisServer(workdir / "redis", appendfsync="everysec")  # as in docker-compose.yml
            redis.start()
            env["BIRDIE_REDIS_URL"] = redis.url
        elif args.workers > 1:
            print("the in-process store serves one worker: skipping the memory rows")
            continue
        server = Server(env, args.workers, workdir / f"server-{store}.log")
        try:
            for wire_format in args.formats:
                for clients in args.clients:
                    run = f"bench-{wire_format}-{clients}"
                    httpx.post(server.url + "/runs", json=run_config(run), timeout=60).raise_for_status()
                    throughput, latencies = asyncio.run(
                        clients_walk(server.url, run, clients, wire_format, args.seconds))
                    rows.append((store, wire_format, clients, throughput, latencies))
                    print(f"{store:7} {wire_format:6} {clients:3} clients: {throughput / 1e6:6.2f} M positions/s  "
                          f"p50 {ms(latencies, 50)} ms  p99 {ms(latencies, 99)} ms  "
                          f"({throughput / baseline:4.2f} x in-process)", flush=True)
            run = "bench-losses"
            info = httpx.post(server.url + "/runs", json=run_config(run), timeout=60).json()
            names = [o["name"] for o in info["objectives"]]
            latencies = asyncio.run(loss_post_latency(server.url, run, names, args.loss_posts))
            post_rows.append((store, latencies))
        finally:
            server.stop()
            if redis is not None:
                redis.kill()

    print(f"\nin-process generate_batch, 1 thread: {baseline / 1e6:.2f} M positions/s "
          f"({baseline / (BATCH_SIZE * SEQ_LEN):.1f} batches/s)\n")
    print(f"{'store':8}{'format':8}{'clients':>8}{'M pos/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x in-proc':>11}")
    for store, wire_format, clients, throughput, latencies in rows:
        print(f"{store:8}{wire_format:8}{clients:8d}{throughput / 1e6:10.2f}{ms(latencies, 50):>9}"
              f"{ms(latencies, 99):>9}{throughput / baseline:11.2f}")
    print(f"\nloss posts ({len(names)} configurations each), one client, sequential:")
    print(f"{'store':8}{'split':12}{'p50 ms':>9}{'p99 ms':>9}")
    for store, latencies in post_rows:
        for split, values in latencies.items():
            print(f"{store:8}{split:12}{ms(values, 50):>9}{ms(values, 99):>9}")


if __name__ == "__main__":
    main()
