"""The LiveServer harness itself: a server is up when its own process answers, not whatever else
holds the port it chose."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import server.live as live
from redis_server import free_loopback_port
from server.conftest import server_env


class AlwaysHealthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args) -> None:
        pass


def test_a_port_taken_before_the_server_binds_it_is_swapped_not_mistaken_for_the_server(
    live_server, corpus_path, run_file, monkeypatch
):
    # Another process holds the port the server chooses first, and answers /healthz with 200.
    impostor = HTTPServer(("127.0.0.1", 0), AlwaysHealthy)
    taken = impostor.server_address[1]
    chosen = iter([taken])
    monkeypatch.setattr(live, "free_loopback_port", lambda: next(chosen, None) or free_loopback_port())
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        server = live_server(server_env(corpus_path, run_file))
        assert server.port != taken
        assert "address already in use" in server.log().lower()  # its first try could not bind
        assert [r["name"] for r in server.get("/runs").json()["runs"]] == ["small"]  # the real server
        port = server.port
        server.restart()  # a restart keeps the port it got
        assert server.port == port and server.get("/runs/small").status_code == 200
    finally:
        impostor.shutdown()
        impostor.server_close()
