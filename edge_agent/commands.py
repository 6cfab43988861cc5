"""Commands on ``<prefix>/<device_id>/cmd/<name>``: validated, run one at a time, always answered.

Every message on ``cmd/<name>`` gets exactly one CommandResult on ``cmd/<name>/result`` (with the
request's ``request_id`` when it had a readable one): ok with what was done, or not ok with what was
wrong. Oversized payloads (over MAX_COMMAND_BYTES), payloads that are not a JSON object, unknown
commands, unknown or invalid fields, a full queue, and handlers that fail all get an error reply;
none of them stops the agent or the inspection. An empty payload means ``{}``.

Commands are handled on one worker thread, in arrival order, so a reload never races a threshold
change; the MQTT network thread only checks the size and queues. Commands sent while the agent is
offline are not queued by the broker for it (clean session): a stale reload must not run hours later.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from edge_agent.config import describe_validation_error
from edge_agent.messages import COMMANDS, CommandResult

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

    def register(self, name: str, handler: Handler) -> None:
        """Handle ``cmd/<name>``; its payload model is messages.COMMANDS[name]."""
        if name not in COMMANDS:
            raise ValueError(f"no payload model for command {name!r} in messages.COMMANDS")
        self._handlers[name] = handler

    @property
    def known(self) -> list[str]:
        return sorted(self._handlers)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the command in progress (bounded wait), drop the queued ones."""
        if self._thread is None:
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, leaf: str, payload: bytes) -> None:
        """From the MQTT thread: ``leaf`` is ``cmd/<name>``. Cheap checks here, the rest on the worker."""
        name = leaf.removeprefix("cmd/")
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
        request_id = _request_id(payload)
        handler = self._handlers.get(name)
        if handler is None:
            return self._result(name, request_id, False, f"unknown command {name!r}; known: {', '.join(self.known)}")
        try:
            document = json.loads(payload) if payload.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            return self._result(name, request_id, False, f"payload is not JSON: {exc}")
        if not isinstance(document, dict):
            return self._result(
                name, request_id, False, f"payload must be a JSON object, got {type(document).__name__}"
            )
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
        while (item := self._queue.get()) is not None:
            name, payload = item
            result = self.handle(name, payload)
            self._send(result)

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
        self._on_handled(result.command, result.ok)
        try:
            self._reply(result)
        except Exception as exc:
            log.exception("cannot send a command reply", extra={"event": "command_reply_failed", "error": str(exc)})


def _request_id(payload: bytes) -> str | None:
    """The request id of a payload when it is readable, so even a rejected command's reply carries it."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    value = document.get("request_id") if isinstance(document, dict) else None
    return value[:200] if isinstance(value, str) else None
