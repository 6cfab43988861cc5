"""Commands on ``<prefix>/<device_id>/cmd/<name>``: validated, run one at a time, always answered.

Every message on ``cmd/<name>`` gets exactly one CommandResult on ``cmd/<name>/result`` (with the
request's ``request_id`` when it had a readable one): ok with what was done, or not ok with what was
wrong. Oversized payloads (over MAX_COMMAND_BYTES), payloads that are not a JSON object, unknown
commands, unknown or invalid fields, a full queue, and handlers that fail all get an error reply;
none of them stops the agent or the inspection. An empty payload means ``{}``. A retained command is
refused (answered, counted in ``retained_refused``): the broker would replay it at every reconnect.

Every payload goes through the one bounded parser (messages.parse_json_object: size and nesting
limits); anything it or a handler raises becomes a not-ok reply, never an exception in a thread.
Commands are handled on one worker thread, in arrival order, so a reload never races a threshold
change; the MQTT network thread only checks the size and queues. Should the worker die anyway, the
next ``submit`` or ``ensure_running`` (the agent's supervisor, every tick) starts a new one, counts
the restart and keeps the reason for /healthz. Commands sent while the agent is
offline are not queued by the broker for it (clean session): a stale reload must not run hours later.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from edge_agent.config_files import describe_validation_error
from edge_agent.messages import COMMANDS, CommandResult, PayloadError, parse_json_object

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
QUEUE_SIZE = 16


class CommandFailed(Exception):
    """A handler could not do what was asked; the message is the reply's ``message``."""


@dataclass(frozen=True)
class Done:
    """What a handler did: the reply's message and data."""

    message: str
    data: dict[str, Any]


Handler = Callable[[Any], Done]
ResultSink = Callable[[CommandResult], None]


class CommandProcessor:
    """Parses, validates and runs commands on a worker thread; every one is answered through ``reply``."""

    def __init__(self, reply: ResultSink, on_handled: Callable[[str, bool], None] | None = None) -> None:
        self._reply = reply
        self._on_handled = on_handled or (lambda name, ok: None)
        self._handlers: dict[str, Handler] = {}
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._started = False
        self._lock = threading.Lock()
        self.restarts = 0
        self.last_crash = ""
        self.retained_refused = 0  # retained commands refused (never run)

    def register(self, name: str, handler: Handler) -> None:
        """Handle ``cmd/<name>``; its payload model is messages.COMMANDS[name]."""
        if name not in COMMANDS:
            raise ValueError(f"no payload model for command {name!r} in messages.COMMANDS")
        self._handlers[name] = handler

    @property
    def known(self) -> list[str]:
        return sorted(self._handlers)

    def start(self) -> None:
        """Start the worker thread."""
        with self._lock:
            self._started = True
            self._thread = threading.Thread(target=self._work, name="commands", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        """False only while started and the worker thread is dead (before start and after stop: True)."""
        return not self._started or (self._thread is not None and self._thread.is_alive())

    def ensure_running(self) -> bool:
        """Start a new worker when the started one died; True when one had to be restarted."""
        with self._lock:
            if not self._started or self._thread is None or self._thread.is_alive():
                return False
            self.restarts += 1
            log.error(
                "command worker died; restarted",
                extra={"event": "command_worker_restarted", "restarts": self.restarts, "error": self.last_crash},
            )
            self._thread = threading.Thread(target=self._work, name="commands", daemon=True)
            self._thread.start()
            return True

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the command in progress (bounded wait), drop the queued ones."""
        with self._lock:
            self._started = False
        if self._thread is None:
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, leaf: str, payload: bytes, retained: bool = False) -> None:
        """From the MQTT thread: ``leaf`` is ``cmd/<name>``. Cheap checks here, the rest on the worker.

        A retained command is refused, counted (``retained_refused``) and answered: the broker would replay it at
        every reconnect, so one ``cmd/threshold`` would run again after each network hiccup (issue 24, finding 14).
        """
        name = leaf.removeprefix("cmd/")
        self.ensure_running()
        if retained:
            self.retained_refused += 1
            request_id = _request_id(payload) if len(payload) <= MAX_COMMAND_BYTES else None
            self._answer(
                name,
                request_id,
                False,
                "refused: a retained command (the broker replays it at every reconnect); publish commands "
                "without the retain flag, and clear this one with an empty retained message on its topic",
            )
            return
        if len(payload) > MAX_COMMAND_BYTES:
            self._answer(
                name, None, False, f"payload is {len(payload)} bytes; commands are limited to {MAX_COMMAND_BYTES}"
            )
            return
        try:
            self._queue.put_nowait((name, payload))
        except queue.Full:
            self._answer(name, _request_id(payload), False, f"busy: {QUEUE_SIZE} commands are already waiting")

    def handle(self, name: str, payload: bytes) -> CommandResult:
        """Parse, validate and run one command; never raises."""
        try:
            return self._handle(name, payload)
        except Exception as exc:  # a bug anywhere here is a reply, never a dead worker
            log.exception("command handling failed", extra={"event": "command_error", "command": name[:100]})
            return self._result(name, None, False, f"malformed: {type(exc).__name__}")

    def _handle(self, name: str, payload: bytes) -> CommandResult:
        request_id = _request_id(payload)
        handler = self._handlers.get(name)
        if handler is None:
            return self._result(
                name, request_id, False, f"unknown command {name[:100]!r}; known: {', '.join(self.known)}"
            )
        try:
            document = parse_json_object(payload, MAX_COMMAND_BYTES)
        except PayloadError as exc:
            return self._result(name, request_id, False, f"malformed payload: {exc}")
        try:
            command: BaseModel = COMMANDS[name].model_validate(document)
        except ValidationError as exc:
            return self._result(name, request_id, False, f"invalid {name} command: {describe_validation_error(exc)}")
        try:
            done = handler(command)
        except CommandFailed as exc:
            return self._result(name, request_id, False, str(exc))
        except Exception as exc:
            log.exception("command failed", extra={"event": "command_error", "command": name, "error": str(exc)})
            return self._result(name, request_id, False, f"internal error: {type(exc).__name__}: {exc}")
        return self._result(name, request_id, True, done.message, done.data)

    def _work(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                name, payload = item
                result = self.handle(name, payload)
                self._send(result)
        except BaseException as exc:
            # Kept for ensure_running's log line and /healthz; the supervisor starts a new worker.
            self.last_crash = f"{type(exc).__name__}: {exc}"[:300]
            raise

    def _answer(self, name: str, request_id: str | None, ok: bool, message: str) -> None:
        self._send(self._result(name, request_id, ok, message))

    def _result(
        self, name: str, request_id: str | None, ok: bool, message: str, data: dict[str, Any] | None = None
    ) -> CommandResult:
        level = logging.INFO if ok else logging.WARNING
        log.log(
            level,
            "command %s: %s",
            name,
            message,
            extra={"event": "command", "command": name, "ok": ok, "request_id": request_id},
        )
        return CommandResult(command=name[:100], ok=ok, request_id=request_id, message=message, data=data or {})

    def _send(self, result: CommandResult) -> None:
        try:
            # Metrics label by registered name only: an unknown name must not create a new series.
            self._on_handled(result.command if result.command in self._handlers else "unknown", result.ok)
            self._reply(result)
        except Exception as exc:
            log.exception("cannot send a command reply", extra={"event": "command_reply_failed", "error": str(exc)})


def _request_id(payload: bytes) -> str | None:
    """The request id of a payload when it is readable, so even a rejected command's reply carries it."""
    try:
        document = parse_json_object(payload, MAX_COMMAND_BYTES)
    except PayloadError:
        return None
    value = document.get("request_id")
    return value[:200] if isinstance(value, str) else None
