"""The agent's HTTP server under half-open and slow-drip connections (issues 13, 24): bounded threads, idle and
slow requests dropped at a deadline, a per-address limit, and the Host/Origin checks against DNS rebinding."""

from __future__ import annotations

import contextlib
import http.client
import select
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


def _drip_connection(port: int, source: str) -> socket.socket:
    """A connection from loopback address ``source`` that has sent the start of a request and no end."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.bind((source, 0))
    client.settimeout(5)
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
    return client


def _closed_by_server(client: socket.socket) -> bool:
    """True once the server closed ``client`` (readable and at end of stream, or reset)."""
    readable, _, _ = select.select([client], [], [], 0)
    if not readable:
        return False
    try:
        return client.recv(1024) == b""
    except OSError:
        return True


def test_a_request_dripped_one_byte_at_a_time_is_closed_at_its_deadline() -> None:
    """Issue 24 finding 8: the timeout is a deadline for the whole request, not one per read."""
    server = HttpServer("127.0.0.1", 0, idle_timeout_s=1.0, max_connections=8)
    server.route("/healthz", lambda request: HttpResponse(200, b"ok\n"))
    server.start()
    # One connection from each of four loopback addresses, so the per-address limit plays no part.
    clients = [_drip_connection(server.port, f"127.0.0.{2 + index}") for index in range(4)]
    closed: set[int] = set()
    try:
        for _ in range(100):  # 20 s at most; each byte well within the 1 s a single read may take
            for index, client in enumerate(clients):
                if index in closed:
                    continue
                if _closed_by_server(client):
                    closed.add(index)
                    continue
                try:
                    client.sendall(b"x")
                except OSError:
                    closed.add(index)
            if len(closed) == len(clients):
                break
            time.sleep(0.2)
        assert len(closed) == len(clients), f"{len(clients) - len(closed)} dripping connections still open"
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_slow_drip_connections_from_one_address_do_not_stop_healthz() -> None:
    """Issue 24 finding 8: 24 slow-drip connections from one address take at most its share of the slots."""
    server = HttpServer("127.0.0.1", 0, idle_timeout_s=1.0, max_connections=8)
    server.route("/healthz", lambda request: HttpResponse(200, b"ok\n"))
    server.start()
    stop = threading.Event()
    attacker_sockets: list[socket.socket] = []

    def attack() -> None:
        # Keeps 24 connections from 127.0.0.2 dripping, reconnecting whatever the server closes; bounded by stop.
        while not stop.is_set():
            for index in range(24):
                if index >= len(attacker_sockets):
                    try:
                        attacker_sockets.append(_drip_connection(server.port, "127.0.0.2"))
                    except OSError:
                        continue
                client = attacker_sockets[index]
                try:
                    if _closed_by_server(client):
                        raise OSError("closed")
                    client.sendall(b"x")
                except OSError:
                    client.close()
                    with contextlib.suppress(OSError):
                        attacker_sockets[index] = _drip_connection(server.port, "127.0.0.2")
            stop.wait(0.2)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    answers: list[int | str] = []
    try:
        time.sleep(1.0)  # the attacker holds what it can
        for _ in range(12):
            try:
                answers.append(_get(server.port, timeout=5))
            except OSError as exc:
                answers.append(type(exc).__name__)
            time.sleep(0.25)
        assert answers == [200] * 12, answers
        assert server.refused_connections > 0  # the attacker was refused, not served
    finally:
        stop.set()
        attacker.join(10)
        for client in attacker_sockets:
            client.close()
        server.stop()


def _status(port: int, method: str, headers: dict[str, str], body: bytes = b"") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.putrequest(method, "/trigger" if method == "POST" else "/healthz", skip_host=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        if method == "POST":
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body or None)
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_foreign_host_or_origin_is_refused_dns_rebinding() -> None:
    """Issue 24 finding 9: a page whose name is rebound to the box names that name in Host and Origin."""
    calls: list[bytes] = []
    server = HttpServer("127.0.0.1", 0)
    server.route("/healthz", lambda request: HttpResponse(200, b"ok\n"))
    server.route_post("/trigger", lambda request: calls.append(request.body) or HttpResponse(202, b"ok\n"))
    server.start()
    port = server.port
    action = {"X-Edge-Agent": "1"}
    try:
        # A rebound name, with the port or without, on GET and POST.
        assert _status(port, "GET", {"Host": f"attacker.example:{port}"}) == 421
        assert _status(port, "POST", {"Host": f"attacker.example:{port}", **action}, b"{}") == 421
        assert _status(port, "POST", {"Host": "attacker.example", **action}, b"{}") == 421
        # An allowed Host, but a POST from another origin.
        foreign = {"Host": f"127.0.0.1:{port}", "Origin": f"http://attacker.example:{port}", **action}
        assert _status(port, "POST", foreign, b"{}") == 403
        other_port = {"Host": f"127.0.0.1:{port}", "Origin": "http://127.0.0.1:1", **action}
        assert _status(port, "POST", other_port, b"{}") == 403
        assert _status(port, "POST", {"Host": f"127.0.0.1:{port}", "Origin": "null", **action}, b"{}") == 403
        assert calls == []
        # The box's own names: IP literals and localhost; same-origin POSTs; POSTs without Origin (a PLC, curl).
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert _status(port, "GET", {"Host": host}) == 200, host
        same = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}", **action}
        assert _status(port, "POST", same, b"{}") == 202
        assert _status(port, "POST", {"Host": f"127.0.0.1:{port}", **action}, b"{}") == 202
        assert len(calls) == 2
        assert _status(port, "GET", {"Host": "edge-box.local"}) == 421
    finally:
        server.stop()
    # A name the operator reaches the box by ([http] allowed_hosts), in any case.
    named = HttpServer("127.0.0.1", 0, allowed_hosts=["edge-box.local"])
    named.route("/healthz", lambda request: HttpResponse(200, b"ok\n"))
    named.start()
    try:
        assert _status(named.port, "GET", {"Host": f"EDGE-BOX.local:{named.port}"}) == 200
        assert _status(named.port, "GET", {"Host": "attacker.example"}) == 421
    finally:
        named.stop()
