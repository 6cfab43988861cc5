"""The agent's HTTP server under half-open connections (issue 13): bounded threads, idle ones dropped."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

from edge_agent.service.http_server import HttpResponse, HttpServer

HALF_OPEN = 100  # below the server's listen backlog, so all reach it promptly


def _get(port: int, path: str = "/healthz", timeout: float = 5.0) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return int(response.status)


def test_half_open_connections_are_capped_and_time_out() -> None:
    server = HttpServer("127.0.0.1", 0, idle_timeout_s=1.0, max_connections=8)
    server.route("/healthz", lambda request: HttpResponse(200, b"ok\n"))
    server.start()
    baseline = threading.active_count()
    sockets: list[socket.socket] = []
    try:
        for _ in range(HALF_OPEN):  # a request line, never the blank line that ends the headers
            client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            sockets.append(client)
        # The kernel hands the connections over as its accept queue drains (client retransmits): watch the
        # thread count until a good share of them reached the server.
        most = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and getattr(server, "refused_connections", 0) < HALF_OPEN - 8:
            most = max(most, threading.active_count() - baseline)
            if most > 8:
                break
            time.sleep(0.05)
        assert most <= 8, f"{most} threads for half-open connections"
        assert server.refused_connections >= HALF_OPEN - 8
        # The idle ones are closed after idle_timeout_s; then the server answers again.
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            try:
                status = _get(server.port, timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        assert status == 200
        assert threading.active_count() - baseline <= 8
    finally:
        for client in sockets:
            client.close()
        server.stop()


def test_an_idle_keep_alive_connection_is_closed() -> None:
    server = HttpServer("127.0.0.1", 0, idle_timeout_s=0.5)
    server.route("/healthz", lambda request: HttpResponse(200, b"ok\n"))
    server.start()
    try:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        started = time.monotonic()
        assert client.recv(1024) == b""  # closed by the server, not by our 10 s timeout
        assert time.monotonic() - started < 9
        client.close()
    finally:
        server.stop()


def test_a_post_without_the_action_header_is_refused_before_its_handler() -> None:
    # A page of another site can make the operator's browser POST here, but cannot add a custom header.
    calls: list[bytes] = []
    server = HttpServer("127.0.0.1", 0)
    server.route_post("/trigger", lambda request: calls.append(request.body) or HttpResponse(202, b"ok\n"))
    server.start()
    try:

        def post(headers: dict[str, str]) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{server.port}/trigger", data=b"{}", method="POST", headers=headers
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert post({"Content-Type": "text/plain"}) == 403
        assert calls == []
        assert post({"X-Edge-Agent": "plc"}) == 202
        assert calls == [b"{}"]
    finally:
        server.stop()
