"""Pluggable reject outputs: run a command, POST JSON to a URL, or publish to a PLC gateway topic.

Every actuator gets a :class:`FireOrder` and either returns (done) or raises :class:`ActuatorError`,
which says whether another attempt is safe (``retryable``): only when the reject certainly did not
happen (the command said it failed, the connection was refused, the server answered 5xx). A timeout
leaves the outcome unknown, so it is never retried: a second reject could hit the next part.

Command lines are argv lists run without a shell; ``{placeholders}`` (config.FIRE_FIELDS) are
substituted per argument, so a message field can never become shell syntax.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

from edge_agent.relay.config import ActuatorConfig

log = logging.getLogger(__name__)

_STDERR_TAIL = 300


class ActuatorError(RuntimeError):
    """The actuator failed; ``retryable`` when the reject certainly did not happen."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class ActuatorConfigError(ValueError):
    """The actuator cannot work as configured (e.g. the command does not exist)."""


@dataclass(frozen=True)
class FireOrder:
    """One reject to carry out."""

    message_id: str
    device_id: str
    sequence: int
    capture_time: float  # the camera's timestamp, as published
    image_score: float
    regions: int
    planned_time: float  # relay wall clock
    deadline: float
    relay_id: str
    part_id: str = ""  # part messages only

    def fields(self, fired_time: float) -> dict[str, Any]:
        """The values the placeholders and the JSON body carry."""
        return {
            "message_id": self.message_id,
            "device_id": self.device_id,
            "sequence": self.sequence,
            "capture_time": self.capture_time,
            "image_score": self.image_score,
            "regions": self.regions,
            "planned_time": self.planned_time,
            "fired_time": fired_time,
            "lateness_ms": (fired_time - self.planned_time) * 1000.0,
            "relay_id": self.relay_id,
            "part_id": self.part_id,
        }

    def text_fields(self, fired_time: float) -> dict[str, str]:
        """The placeholder values as text (times with microseconds, lateness in ms)."""
        values = self.fields(fired_time)
        text = {key: str(value) for key, value in values.items()}
        for key in ("capture_time", "planned_time", "fired_time"):
            text[key] = f"{values[key]:.6f}"
        text["lateness_ms"] = f"{values['lateness_ms']:.3f}"
        text["image_score"] = f"{values['image_score']:.6g}"
        return text

    def body(self, fired_time: float) -> bytes:
        """The JSON an HTTP or MQTT actuator sends (with the deadline, so a receiver can refuse a late order)."""
        return json.dumps({**self.fields(fired_time), "deadline": self.deadline}).encode("utf-8")


class Actuator(Protocol):
    """A reject output."""

    description: str

    def fire(self, order: FireOrder, fired_time: float) -> None:
        """Carry out the reject now; raise ActuatorError on failure."""
        ...

    def close(self) -> None: ...


class MqttSink(Protocol):
    """What an MQTT actuator needs from the relay's connection."""

    @property
    def connected(self) -> bool: ...

    def publish_order(self, topic: str, payload: bytes, expiry_s: int, timeout_s: float) -> None:
        """Publish at QoS 1 and wait for PUBACK; raise ActuatorError on failure."""
        ...


class CommandActuator:
    """Runs an argv (no shell) with the placeholders substituted; exit status 0 means done."""

    def __init__(self, config: ActuatorConfig) -> None:
        assert config.command
        self.argv = list(config.command)
        self.timeout_s = config.timeout_s
        program = self.argv[0]
        resolved = shutil.which(program) if "/" not in program else program
        if resolved is None or not (os.path.isfile(resolved) and os.access(resolved, os.X_OK)):
            raise ActuatorConfigError(f"actuator.command: {program!r} is not an executable file (or not on PATH)")
        self.description = "command " + " ".join(self.argv)

    def fire(self, order: FireOrder, fired_time: float) -> None:
        values = order.text_fields(fired_time)
        argv = [part.format_map(values) for part in self.argv]
        try:
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ActuatorError(
                f"command did not finish within {self.timeout_s} s (killed; the reject may or may not have happened)",
                retryable=False,
            ) from exc
        except OSError as exc:
            raise ActuatorError(f"cannot run {argv[0]!r}: {exc}", retryable=True) from exc
        if result.returncode != 0:
            tail = result.stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
            raise ActuatorError(f"command exited with status {result.returncode}: {tail}", retryable=True)

    def close(self) -> None:
        return None


class HttpActuator:
    """POSTs the order as JSON; any 2xx answer means done."""

    def __init__(self, config: ActuatorConfig) -> None:
        assert config.url
        self.url = config.url
        self.headers = {"Content-Type": "application/json", "User-Agent": "edge-reject-relay", **config.headers}
        self.timeout_s = config.timeout_s
        self.description = f"http POST {self.url}"

    def fire(self, order: FireOrder, fired_time: float) -> None:
        request = urllib.request.Request(self.url, data=order.body(fired_time), headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            # 5xx: the receiver says it failed, so trying again is safe; 4xx will not get better.
            raise ActuatorError(f"HTTP {exc.code} {exc.reason} from {self.url}", retryable=exc.code >= 500) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise ActuatorError(_timeout_text(self.url, self.timeout_s), retryable=False) from exc
            # Refused, unreachable, name not resolved: nothing was delivered.
            raise ActuatorError(f"cannot reach {self.url}: {exc.reason}", retryable=True) from exc
        except TimeoutError as exc:
            raise ActuatorError(_timeout_text(self.url, self.timeout_s), retryable=False) from exc

    def close(self) -> None:
        return None


class MqttActuator:
    """Publishes the order as JSON at QoS 1 on the relay's broker (a PLC gateway listens there)."""

    def __init__(self, config: ActuatorConfig, sink: MqttSink) -> None:
        assert config.topic
        self.topic = config.topic
        self.sink = sink
        self.timeout_s = config.timeout_s
        self.description = f"mqtt publish {self.topic}"

    def fire(self, order: FireOrder, fired_time: float) -> None:
        if not self.sink.connected:
            # paho would queue it and send it after reconnecting: too late for a reject.
            raise ActuatorError("not connected to the MQTT broker", retryable=True)
        topic = self.topic.format_map(order.text_fields(fired_time))
        problem = topic_problem(topic)
        if problem is not None:
            # A bad topic makes the broker drop the relay's connection, and paho re-sends it after every reconnect:
            # one such order would cut off every other camera's rejects (issue 24, finding 5).
            raise ActuatorError(f"refused to publish to topic {topic[:200]!r}: {problem}", retryable=False)
        # The order dies in the broker once its deadline passed (MQTT 5 expiry, whole seconds, at least 1).
        expiry_s = max(1, round(order.deadline - time.time()))
        self.sink.publish_order(topic, order.body(fired_time), expiry_s, self.timeout_s)

    def close(self) -> None:
        return None


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to (None when it can): empty, a wildcard, a control character, too long."""
    if not topic:
        return "it is empty"
    if "+" in topic or "#" in topic:
        return "it holds an MQTT wildcard (+ or #)"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in topic):
        return "it holds a control character"
    if topic.startswith("$"):
        return "topics starting with $ are the broker's"
    if len(topic.encode("utf-8")) > 65535:
        return "it is longer than 65535 bytes"
    return None


def create_actuator(config: ActuatorConfig, sink: MqttSink | None = None) -> Actuator:
    """The actuator a config section describes (an MQTT actuator needs the relay's connection)."""
    if config.kind == "command":
        return CommandActuator(config)
    if config.kind == "http":
        return HttpActuator(config)
    if sink is None:
        raise ActuatorConfigError("an mqtt actuator needs the relay's MQTT connection")
    return MqttActuator(config, sink)


def _timeout_text(url: str, timeout_s: float) -> str:
    return f"no answer from {url} within {timeout_s} s (the reject may or may not have happened)"
