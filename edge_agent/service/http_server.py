"""A small HTTP server for the agent: a table of GET routes, each a function of the request.

The agent registers ``/metrics`` and ``/healthz``; other parts (a live preview page) add their own with
``route()``. Each request runs on its own thread (ThreadingHTTPServer), so a slow client never holds up
another, and a handler that raises answers 500 and is logged, never taking the server down. Standard
library only: the device needs no web framework.

Hostile or broken clients are bounded: every request must arrive whole (request line, headers, body)
within ``idle_timeout_s`` of the server starting to wait for it, a deadline over the whole request rather
than per read, so a client dripping one byte at a time is closed as surely as a silent one (slowloris).
At most ``max_connections`` are served at once, and at most ``max_per_address`` from one client address;
further ones are closed at once, so half-open connections cannot pile up threads and file descriptors that
the MQTT client and the camera need, and one client cannot take every slot.

DNS rebinding: a page of another site whose name is made to resolve to this box would be same-origin with
it. Its requests carry that name in ``Host``, so a ``Host`` that is neither an IP literal, ``localhost`` nor
one of ``allowed_hosts`` is refused (421) on every request, and a POST whose ``Origin`` is not this server's own
is refused (403).
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 10.0
MAX_POST_BYTES = 4096  # POST routes take small JSON bodies (a trigger)
MAX_CONNECTIONS = 32
MAX_PER_ADDRESS = 8
# Names a browser may always use for this server besides IP literals (an IP literal cannot be rebound).
LOCAL_NAMES = ("localhost",)
# Every POST is an action and must carry this header: a form or fetch that another site's page sends through
# an operator's browser cannot add it without a CORS preflight, which this server never grants.
ACTION_HEADER = "x-edge-agent"


@dataclass(frozen=True)
class HttpRequest:
    """What a route handler gets."""

    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    method: str = "GET"
    body: bytes = b""


@dataclass(frozen=True)
class HttpResponse:
    """What a route handler returns."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[HttpRequest], HttpResponse]


class HttpServer:
    """GET routes on host:port, served from a daemon thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        max_per_address: int | None = None,
        allowed_hosts: tuple[str, ...] | list[str] = (),
    ) -> None:
        """``idle_timeout_s`` is the deadline for one whole request; ``max_per_address`` defaults to a quarter
        of ``max_connections`` (at least 1); ``allowed_hosts`` are the host names (besides IP literals and
        ``localhost``) that ``Host`` and a POST's ``Origin`` may name."""
        self.host = host
        self.requested_port = port
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.max_per_address = max_per_address or max(1, max_connections // 4)
        self.allowed_hosts = frozenset(name.lower().rstrip(".") for name in (*LOCAL_NAMES, *allowed_hosts))
        self.refused_connections = 0
        self.refused_hosts = 0
        self._routes: dict[str, Route] = {}
        self._post_routes: dict[str, Route] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def route(self, path: str, handler: Route) -> None:
        """Serve ``handler`` for GET (and HEAD) on ``path`` (exact match; later registrations replace)."""
        if not path.startswith("/"):
            raise ValueError(f"route paths start with '/': {path!r}")
        self._routes[path] = handler

    def route_post(self, path: str, handler: Route) -> None:
        """Serve ``handler`` for POST on ``path``; the body (at most MAX_POST_BYTES) is in ``request.body``."""
        if not path.startswith("/"):
            raise ValueError(f"route paths start with '/': {path!r}")
        self._post_routes[path] = handler

    @property
    def routes(self) -> list[str]:
        return sorted(self._routes)

    @property
    def port(self) -> int:
        """The port really listened on (``http.port = 0`` picks a free one)."""
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve; raises OSError when the address cannot be bound (e.g. the port is taken)."""
        server = _BoundedHTTPServer((self.host, self.requested_port), self._handler_class(), self)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
        self._thread.start()
        log.info(
            "HTTP server listening",
            extra={"event": "http_listening", "host": self.host, "port": self.port, "routes": self.routes},
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def dispatch(self, request: HttpRequest) -> HttpResponse:
        """The response for one request (404 lists the routes; a failing handler gives 500)."""
        refusal = self._foreign(request)
        if refusal is not None:
            self.refused_hosts += 1
            log.warning(
                "HTTP request refused: %s",
                refusal,
                extra={"event": "http_foreign_host", "path": request.path, "refused": self.refused_hosts},
            )
            status = HTTPStatus.FORBIDDEN if refusal.startswith("Origin") else HTTPStatus.MISDIRECTED_REQUEST
            return HttpResponse(status, f"{refusal}\n".encode())
        handler = (self._post_routes if request.method == "POST" else self._routes).get(request.path)
        if request.method == "POST" and handler is not None and ACTION_HEADER not in request.headers:
            body = f"actions need the {ACTION_HEADER} header (any value)\n"
            return HttpResponse(HTTPStatus.FORBIDDEN, body.encode())
        if handler is None:
            body = "not found; routes: " + ", ".join(self.routes) + "\n"
            return HttpResponse(HTTPStatus.NOT_FOUND, body.encode())
        try:
            return handler(request)
        except Exception as exc:
            log.exception("HTTP handler failed", extra={"event": "http_handler_failed", "path": request.path})
            return HttpResponse(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}\n".encode())

    def host_allowed(self, host: str) -> bool:
        """True for an IP literal or a name in ``allowed_hosts`` (``host`` without its port)."""
        name = host.strip("[]").lower().rstrip(".")
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in self.allowed_hosts

    def _foreign(self, request: HttpRequest) -> str | None:
        """Why the request comes through a name this server does not answer to, or None (DNS rebinding)."""
        host = request.headers.get("host")
        if host is not None and not self.host_allowed(_hostname(host)):
            return "Host not allowed (add the name to [http] allowed_hosts)"
        origin = request.headers.get("origin")
        if request.method == "POST" and origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not self.host_allowed(parts.hostname or ""):
                return "Origin not allowed"
            if host is not None and parts.netloc.lower() != host.lower():
                return "Origin is not this server"
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = server.idle_timeout_s  # socket timeout: an idle or half-sent request is dropped
            _deadline = 0.0

            def setup(self) -> None:
                super().setup()
                # Every read of the request goes through the deadline of the request being read.
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection, lambda: self._deadline))

            def handle_one_request(self) -> None:
                # The whole next request (or the idle wait for it) must arrive within idle_timeout_s.
                self._deadline = time.monotonic() + server.idle_timeout_s
                super().handle_one_request()

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_POST_BYTES:
                    self.close_connection = True  # the unread body must not be taken for the next request
                    self._send(HttpResponse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"body too large or unreadable\n"))
                    return
                self._answer(send_body=True, method="POST", body=self.rfile.read(length) if length else b"")

            def _answer(self, send_body: bool, method: str = "GET", body: bytes = b"") -> None:
                parts = urlsplit(self.path)
                request = HttpRequest(
                    parts.path, parse_qs(parts.query), {k.lower(): v for k, v in self.headers.items()}, method, body
                )
                self._send(server.dispatch(request), send_body)

            def _send(self, response: HttpResponse, send_body: bool = True) -> None:
                self.connection.settimeout(server.idle_timeout_s)  # the answer: a per-write timeout again
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(response.body)))
                self.send_header("Cache-Control", "no-store")
                for name, value in response.headers.items():
                    self.send_header(name, value)
                try:
                    self.end_headers()
                    if send_body:
                        self.wfile.write(response.body)
                except ConnectionError:
                    # The client went away mid-answer (a closed tab): nothing to report.
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http %s", format % args, extra={"event": "http_request"})

        return Handler


def _hostname(host: str) -> str:
    """The name in a Host header, without its port (``[::1]:9108`` -> ``::1``)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _DeadlineReader(io.RawIOBase):
    """A socket's reads bounded by one absolute deadline: a client that drips bytes cannot hold it longer."""

    def __init__(self, sock: socket.socket, deadline: Callable[[], float]) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline() - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive whole in time")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that serves at most ``owner.max_connections`` connections at once, and at most
    ``owner.max_per_address`` from one client address."""

    # A deeper listen backlog than socketserver's 5: excess connections reach process_request (and are closed
    # there at once) instead of waiting half-open in the kernel.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: HttpServer) -> None:
        self._owner = owner
        self._slots = threading.BoundedSemaphore(owner.max_connections)
        self._per_address: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__(address, handler)

    def _take(self, address: str) -> str | None:
        """Take a slot for ``address``; why not, or None when taken."""
        with self._lock:
            if self._per_address.get(address, 0) >= self._owner.max_per_address:
                return f"{self._owner.max_per_address} already open from this address"
            if not self._slots.acquire(blocking=False):
                return f"{self._owner.max_connections} already open"
            self._per_address[address] = self._per_address.get(address, 0) + 1
            return None

    def _give(self, address: str) -> None:
        with self._lock:
            left = self._per_address.pop(address, 1) - 1
            if left > 0:
                self._per_address[address] = left
            self._slots.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        why = self._take(address)
        if why is not None:
            self._owner.refused_connections += 1
            if self._owner.refused_connections in (1, 100) or self._owner.refused_connections % 1000 == 0:
                log.warning(
                    "HTTP connection refused: %s",
                    why,
                    extra={"event": "http_connection_refused", "refused": self._owner.refused_connections},
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._give(address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._give(str(client_address[0]) if isinstance(client_address, tuple) else str(client_address))
