"""Objective-server throughput and latency over real HTTP, against in-process generation.

    python bench/server.py [--seconds 5] [--clients 1 4 16] [--formats arrow json]
                           [--stores memory redis] [--redis-workers 2] [--executor auto]

For each store a `birdie-server serve` process is started on this machine: the in-process store
with one uvicorn worker (generating in a process pool), Redis with --redis-workers workers
(generating in a thread each). For each wire format and number of concurrent clients a fresh run
(the birdie preset, B = 8, L = 2048, fixed mixture) is created; each client is one trainer rank
(world_size = clients) that walks its steps for --seconds, asking for the next batch as soon as it
has read the last one.

Printed per row: batch positions (B * L) per second over all clients, p50/p99 latency of one
request, the server's CPU time per batch served (all its processes), generation in this process on
one thread measured just before the row and the throughput ratio to it (target >= 0.8), and the
p99 of /healthz asked meanwhile (how long the event loop stalls). Then loss-post latency: training
posts, and validation posts that complete an evaluation.

The clients run here too and take CPU from the server, as they would not in training (trainers
read batches on other hosts), so on a small machine the HTTP figures are a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the redis-server fixture doubles as the bench's Redis

from redis_server import RedisServer, free_loopback_port, redis_server_binary  # noqa: E402

BATCH_SIZE, SEQ_LEN = 8, 2048


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in a process group (Linux /proc)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is the process group
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


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


def clients_walk(
    server: Server, run: str, clients: int, wire_format: str, seconds: float
) -> tuple[float, np.ndarray, float, np.ndarray]:
    """(batch positions per second, per-request latencies in s, server CPU ms per batch, /healthz
    latencies in s) of `clients` concurrent ranks, one thread and one keep-alive connection each,
    while one more thread asks /healthz every 20 ms (a stalled event loop shows there).

    The clients use the standard library's http.client: it reads a 400 KB body with about a third
    of httpx's CPU time, and on a small machine every client cycle is taken from the server.
    """
    def get(connection: http.client.HTTPConnection, query: dict) -> bytes:
        connection.request("GET", "/batch?" + urlencode(query))
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"/batch answered {response.status}: {body[:200]!r}")
        return body

    def rank(r: int, start: threading.Barrier, until: list[float]) -> tuple[int, list[float]]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        query = {"run": run, "rank": r, "world_size": clients, "format": wire_format}
        get(connection, {**query, "step": 10**6})  # warm-up: connection, run parsed in the workers
        start.wait()
        step, latencies = 0, []
        while time.perf_counter() < until[0]:
            began = time.perf_counter()
            get(connection, {**query, "step": step})
            latencies.append(time.perf_counter() - began)
            step += 1
        connection.close()
        return step, latencies

    def probe(start: threading.Barrier, until: list[float]) -> list[float]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        start.wait()
        latencies = []
        while time.perf_counter() < until[0]:
            began = time.perf_counter()
            connection.request("GET", "/healthz")
            connection.getresponse().read()
            latencies.append(time.perf_counter() - began)
            time.sleep(0.02)
        connection.close()
        return latencies

    until = [float("inf")]
    barrier = threading.Barrier(clients + 2)
    with ThreadPoolExecutor(clients + 1) as pool:
        futures = [pool.submit(rank, r, barrier, until) for r in range(clients)]
        probed = pool.submit(probe, barrier, until)
        barrier.wait()
        cpu = group_cpu_seconds(server.process.pid)
        start = time.perf_counter()
        until[0] = start + seconds
        results = [f.result() for f in futures]
        elapsed = time.perf_counter() - start
        served = sum(steps for steps, _ in results)
        # Prefetched batches of the last steps are generated but not served: counted, slightly.
        cpu_ms = (group_cpu_seconds(server.process.pid) - cpu) * 1000 / served
    latencies = np.concatenate([np.asarray(l) for _, l in results])
    return served * BATCH_SIZE * SEQ_LEN / elapsed, latencies, cpu_ms, np.asarray(probed.result())


async def loss_post_latency(url: str, run: str, names: list[str], posts: int) -> dict[str, np.ndarray]:
    """Latency of training posts (each completes its step: world_size 1) and of validation posts
    that complete an evaluation (the policy update runs before the answer)."""
    out: dict[str, list[float]] = {"train": [], "validation": []}
    losses = {n: 2.0 + i / 100 for i, n in enumerate(names)}
    tokens = {n: 1000 for n in names}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        # The server takes losses only for steps the run has trained: serve them first (not timed).
        served = await http.get("/batch", params={"run": run, "step": posts - 1})
        served.raise_for_status()
        for split in out:
            for step in range(posts):
                body = {"run": run, "step": step, "split": split, "losses": losses, "tokens": tokens}
                started = time.perf_counter()
                response = await http.post("/losses", json=body)
                out[split].append(time.perf_counter() - started)
                response.raise_for_status()
    return {k: np.asarray(v) for k, v in out.items()}


def _generate_for(seconds: float, corpus_path: str, first_step: int) -> tuple[int, float]:
    """(batches, CPU seconds) of generate_batch for the bench run, single-threaded, for `seconds`."""
    from objective_server.batching import generate_batch
    from objective_server.corpus.store import TokenStore
    from objective_server.runs import RunConfig

    corpus = TokenStore.open(corpus_path)
    config = RunConfig.model_validate(run_config("in-process"))
    tokens, special = corpus.split("train").tokens, corpus.special
    objectives, probabilities = config.objectives, config.initial_probabilities

    def one(step: int) -> None:
        generate_batch(objectives, probabilities, tokens, special, seed=0, batch_size=BATCH_SIZE,
                       seq_len=SEQ_LEN, rank=0, world_size=1, step=step)

    one(10**6)  # warm: parses, first memory-map reads
    steps = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 5:
        one(first_step + steps)
        steps += 1
    return steps, time.process_time() - cpu


def in_process_generation(corpus_path: str, seconds: float) -> tuple[float, float]:
    """(batch positions per second, CPU ms per batch) of generate_batch in this process, one thread."""
    start = time.perf_counter()
    steps, cpu = _generate_for(seconds, corpus_path, 0)
    elapsed = time.perf_counter() - start
    return steps * BATCH_SIZE * SEQ_LEN / elapsed, cpu * 1000 / steps


def ms(values: np.ndarray, q: float) -> str:
    return f"{np.percentile(values, q) * 1000:8.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per row (default: %(default)s)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16],
                    help="concurrent clients (trainer ranks) asking for batches, one table row per value (default: %(default)s)")
    ap.add_argument("--formats", nargs="+", default=["arrow", "json"], choices=["arrow", "json"],
                    help="wire formats to time (default: %(default)s)")
    ap.add_argument("--stores", nargs="+", default=["memory", "redis"], choices=["memory", "redis"],
                    help="run stores to time; redis starts a redis-server (default: %(default)s)")
    ap.add_argument("--redis-workers", type=int, default=2,
                    help="uvicorn workers of the Redis-backed server (the in-process store serves one; "
                         "default: %(default)s)")
    ap.add_argument("--generation-workers", type=int, default=2,
                    help="batch-generation workers per server process (default: %(default)s)")
    ap.add_argument("--executor", default="auto", choices=["auto", "process", "thread"],
                    help="generation pool; auto: processes for one worker, threads for several (default: auto)")
    ap.add_argument("--prefetch-depth", type=int, default=2,
                    help="steps of the same rank the server generates ahead of each one asked (default: %(default)s)")
    ap.add_argument("--loss-posts", type=int, default=50,
                    help="POST /losses calls timed per store (default: %(default)s)")
    ap.add_argument("--corpus", help="a prepared token store (default: the embedded default corpus)")
    args = ap.parse_args()

    from objective_server.corpus.default import default_store
    from objective_server.corpus.store import TokenStore

    corpus = TokenStore.open(args.corpus) if args.corpus else default_store(progress=True)
    workdir = Path(tempfile.mkdtemp(prefix="birdie-bench-"))
    print(f"corpus {corpus.path} ({corpus.split('train').n_tokens:,} train tokens); {os.cpu_count()} cores; "
          f"server: in-process store with 1 uvicorn worker, Redis with {args.redis_workers}; generation pool "
          f"{args.executor} ({args.generation_workers} per worker); prefetch {args.prefetch_depth}; logs in {workdir}")
    print(f"birdie preset (55 configurations), B = {BATCH_SIZE}, L = {SEQ_LEN}; {args.seconds:g} s per row; "
          f"load average {os.getloadavg()[0]:.1f} (other work on this machine skews every figure)\n")

    rows = []
    baseline_seconds = max(1.5, args.seconds / 2)
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
            redis = RedisServer(workdir / "redis", appendfsync="always")  # as in docker-compose.yml
            redis.start()
            env["BIRDIE_REDIS_URL"] = redis.url
        workers = args.redis_workers if store == "redis" else 1
        server = Server(env, workers, workdir / f"server-{store}.log")
        try:
            for wire_format in args.formats:
                for clients in args.clients:
                    run = f"bench-{wire_format}-{clients}"
                    httpx.post(server.url + "/runs", json=run_config(run), timeout=60).raise_for_status()
                    # The baseline right before the row, so both see the same machine load.
                    baseline, baseline_cpu = in_process_generation(str(corpus.path), baseline_seconds)
                    throughput, latencies, cpu_ms, health = clients_walk(server, run, clients, wire_format,
                                                                         args.seconds)
                    rows.append((store, wire_format, clients, throughput, latencies, cpu_ms, health, baseline,
                                 baseline_cpu))
                    print(f"{store:7} {wire_format:6} {clients:3} clients: {throughput / 1e6:6.2f} M positions/s  "
                          f"p50 {ms(latencies, 50)} ms  p99 {ms(latencies, 99)} ms  server CPU {cpu_ms:5.2f} ms/batch  "
                          f"/healthz p99 {ms(health, 99)} ms  (in-process {baseline / 1e6:.2f} M positions/s, "
                          f"{baseline_cpu:.2f} ms CPU/batch)", flush=True)
            run = "bench-losses"
            info = httpx.post(server.url + "/runs", json=run_config(run), timeout=60).json()
            names = [o["name"] for o in info["objectives"]]
            latencies = asyncio.run(loss_post_latency(server.url, run, names, args.loss_posts))
            post_rows.append((store, latencies))
        finally:
            server.stop()
            if redis is not None:
                redis.kill()

    print("\nM pos/s: batch positions served per second over all clients; CPU ms: server CPU per batch "
          "(all its processes);\nin-proc: generate_batch on one thread in this process just before the row; "
          "x in-proc: the throughput ratio (target >= 0.8)\n")
    print(f"{'store':8}{'format':8}{'clients':>8}{'M pos/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms':>8}"
          f"{'in-proc':>9}{'(CPU ms)':>10}{'x in-proc':>11}{'healthz p99':>13}")
    for store, wire_format, clients, throughput, latencies, cpu_ms, health, baseline, baseline_cpu in rows:
        print(f"{store:8}{wire_format:8}{clients:8d}{throughput / 1e6:10.2f}{ms(latencies, 50):>9}"
              f"{ms(latencies, 99):>9}{cpu_ms:8.2f}{baseline / 1e6:9.2f}{baseline_cpu:10.2f}"
              f"{throughput / baseline:11.2f}{ms(health, 99):>13}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print(f"\nloss posts ({len(names)} configurations each), one client, sequential:")
    print(f"{'store':8}{'split':12}{'p50 ms':>9}{'p99 ms':>9}")
    for store, latencies in post_rows:
        for split, values in latencies.items():
            print(f"{store:8}{split:12}{ms(values, 50):>9}{ms(values, 99):>9}")


if __name__ == "__main__":
    main()
