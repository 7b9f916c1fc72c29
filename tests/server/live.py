"""A real objective server in a subprocess: `birdie-server serve` (or uvicorn with a test factory)
on a free loopback port, reached over real HTTP with httpx.

    with LiveServer(env={"BIRDIE_REDIS_URL": url, ...}, log_dir=tmp_path) as server:
        server.get("/batch", params=...)
        server.restart()                  # graceful stop + start on the same port
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from redis_server import free_loopback_port

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60.0
PORT_TRIES = 5


class PortTaken(RuntimeError):
    """The server could not bind its port: another process holds it."""


class LiveServer:
    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        factory: str | None = None,
        workers: int = 1,
        token: str | None = None,
        name: str = "server",
    ) -> None:
        """`factory`: a uvicorn app factory "module:function" importable from tests/server; None:
        the `birdie-server serve` command."""
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BIRDIE_")}
        # Tests name their runs; the shipped preset runs (the default) only when a test asks.
        self.env["BIRDIE_PRESETS"] = ""
        self.env.update(env)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.factory = factory
        self.workers = workers
        self.token = token
        self.port = free_loopback_port()
        self._port_chosen_here = True  # until the first start binds it; a restart keeps its port
        self._process: subprocess.Popen | None = None
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.factory is None:
            return [str(BIN / "birdie-server"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--workers", str(self.workers)]
        return [sys.executable, "-m", "uvicorn", "--factory", self.factory, "--app-dir", str(HERE),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
                "--no-access-log"]

    def start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError("server already running")
        for attempt in range(PORT_TRIES):
            try:
                self._start_once()
                break
            except PortTaken:
                # Another process took the free port between choosing and binding it: a port we
                # picked ourselves can be swapped before the first start (a restart keeps its port).
                if not self._port_chosen_here or attempt == PORT_TRIES - 1:
                    raise
                self.port = free_loopback_port()
        self._port_chosen_here = False

    def _start_once(self) -> None:
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers and pool processes form one group we can signal
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                output = self.log_path.read_text(errors="replace")[log_start:]
                if "address already in use" in output.lower():
                    raise PortTaken(f"port {self.port} was taken before the server bound it:\n{output[-2000:]}")
                raise RuntimeError(f"server exited with {self._process.returncode}:\n{self.log()}")
            # Up when our own process listens on the port and answers: a 200 from whatever else
            # holds the port (a server of another test that took it first) does not count.
            if self._listening():
                try:
                    if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not up after {START_TIMEOUT_S} s:\n{self.log()}")

    def _listening(self) -> bool:
        """Whether the server's process holds a listening TCP socket on our port (Linux /proc; where
        there is none, whether the process is alive)."""
        tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
        if not tables[0].exists():
            return self._process.poll() is None
        inodes = set()
        for table in tables:
            try:
                rows = table.read_text().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()  # sl local_address rem_address st ... inode
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == self.port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
        try:
            fds = list(Path(f"/proc/{self._process.pid}/fd").iterdir())
        except OSError:
            return False  # exited meanwhile
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return True
            except OSError:
                continue
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server's process group: graceful shutdown."""
        self._close_client()
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self._close_client()
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._client = httpx.Client(base_url=self.url, timeout=30.0, headers=headers)
        return self._client

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def __enter__(self) -> LiveServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
