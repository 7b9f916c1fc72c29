"""A real redis-server for tests: started from the installed binary on a free loopback port.

It runs with append-only persistence (`appendfsync always` by default, so every acknowledged write
is on disk), which lets a test kill it with SIGKILL, restart it from its append-only file on the
same port and check that nothing was lost. Reused by the store tests and the HTTP tests.

    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        server.kill(); server.start()      # crash and recover from the AOF
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

READY_TIMEOUT_S = 10.0


def redis_server_binary() -> str | None:
    """The redis-server to run: $BIRDIE_REDIS_SERVER if set, else the one on PATH."""
    return os.environ.get("BIRDIE_REDIS_SERVER") or shutil.which("redis-server")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process bound to 127.0.0.1, with its data directory at `directory`.

    `stop()` shuts down gracefully, `kill()` sends SIGKILL (a crash), `start()` starts it again on
    the same port from the same directory (so the same `url` works), `restart()` is stop + start,
    `pause()`/`resume()` freeze and thaw it (SIGSTOP/SIGCONT) to imitate a hung server.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        port: int | None = None,
        appendfsync: str = "always",
        binary: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.binary = binary or redis_server_binary()
        if self.binary is None:
            raise FileNotFoundError("redis-server not found (install it or set BIRDIE_REDIS_SERVER)")
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self.appendfsync = appendfsync
        self._port_chosen_here = port is None
        self.port = port or free_loopback_port()
        self.log_path = self.directory / "redis.log"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",  # AOF only: what a test checks is the append-only file
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        for attempt in range(5):
            self._process = subprocess.Popen(
                self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            try:
                self._wait_ready()
                break
            except RuntimeError as error:
                # Another process may take a free port between choosing and binding it; a port we
                # picked ourselves can be swapped before the first start (a restart keeps its port).
                if not (self._port_chosen_here and "already in use" in str(error)) or attempt == 4:
                    raise
                self.log_path.unlink(missing_ok=True)
                self.port = free_loopback_port()
        self._port_chosen_here = False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._process.returncode}: {self._failure_text()}"
                )
            if self._answers_ping():
                return
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"redis-server not ready after {READY_TIMEOUT_S} s: {self._failure_text()}")

    def _answers_ping(self) -> bool:
        # A raw RESP PING: a LOADING reply (still reading the AOF) is not ready yet.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _failure_text(self) -> str:
        stderr = b""
        if self._process is not None and self._process.stderr is not None and self._process.poll() is not None:
            stderr = self._process.stderr.read() or b""
        log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        return (stderr.decode(errors="replace") + log).strip() or "(no output)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM: redis-server flushes the AOF and exits)."""
        if not self.running:
            return
        self._process.send_signal(signal.SIGTERM)
        self._process.send_signal(signal.SIGCONT)  # a paused server handles SIGTERM only once resumed
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def kill(self) -> None:
        """SIGKILL: a crash, no chance to flush anything not already on disk."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)  # a paused server must not linger
            self._process.kill()
            self._process.wait()
        self._close_pipes()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its port but answers nothing (a hung Redis)."""
        if self.running:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _close_pipes(self) -> None:
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
