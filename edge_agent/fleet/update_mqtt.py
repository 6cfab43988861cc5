"""The updater's side of MQTT: progress events out, and "reload, then show me healthy inspections" to the agent.

Topics under ``<prefix>/<device_id>/`` (messages.py): the updater publishes ``update`` (UpdateEvent) and
``cmd/reload`` ({"request_id", "version"}); it reads the agent's retained ``status``, its
``cmd/reload/result`` (CommandResult) and its ``inspection`` / ``stats`` messages. The new model is
healthy once the agent has acknowledged the reload and ``health_inspections`` inspections (or a stats
message with frames inspected) carry the new model version. The agent going offline, a failed reload
result, or silence until the timeout are all unhealthy.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTProtocolVersion
from pydantic import BaseModel, ValidationError

from edge_agent.config import MqttConfig
from edge_agent.messages import (
    CommandResult,
    InspectionMessage,
    ModelRef,
    PayloadError,
    StatsMessage,
    UpdateEvent,
    parse_json_object,
    topic,
)
from edge_agent.publish.client import PROTOCOLS, new_client, reason_code

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

STATUS_WAIT_S = 3.0
MAX_PAYLOAD_BYTES = 1 << 20  # an inspection message with thousands of regions still fits


@dataclass(frozen=True)
class HealthResult:
    """What the agent showed after a reload."""

    ok: bool
    message: str
    inspections: int = 0


class AgentControl(Protocol):
    """How the updater reaches the running agent (MQTT by default; the agent may pass its own)."""

    def agent_running(self) -> bool:
        """True when an agent is up and could load the new model now."""
        ...

    def reload(self, version: str, timeout_s: float, inspections: int) -> HealthResult:
        """Ask the agent to reload models/current and wait until it serves ``version`` healthily."""
        ...


EventSink = Callable[[UpdateEvent], None]


def updater_config(config: MqttConfig) -> MqttConfig:
    """The box's MQTT settings with the updater's own user name (``mqtt.updater_username``, default
    ``<username>-updater``): a broker that binds client ids to user names (the shipped
    ``use_username_as_clientid``) would otherwise disconnect the running agent when the updater connects."""
    if not config.username:
        return config
    return config.model_copy(update={"username": config.updater_username or f"{config.username}-updater"})


class MqttLink:
    """The updater's own MQTT connection (client id ``<device_id>-updater``, user ``<username>-updater``)."""

    def __init__(self, config: MqttConfig, device_id: str, recipe: str | None = None) -> None:
        self.config = config
        self.device_id = device_id
        self.recipe = recipe  # reload (and watch) this recipe of [[recipes]] only
        self._connected = threading.Event()
        self._gave_up = threading.Event()
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._status: str | None = None
        self._status_seen = threading.Event()
        # Inspections flow at frame rate; they are queued only while a reload is being watched.
        self._listening = threading.Event()
        self._client = self._new_client()

    def topic(self, leaf: str) -> str:
        return topic(self.config.prefix, self.device_id, leaf)

    # -- connection ---------------------------------------------------------------------------------

    def _new_client(self) -> paho.Client:
        protocol = PROTOCOLS.get(self.config.protocol, MQTTProtocolVersion.MQTTv5)
        client = new_client(updater_config(self.config), f"{self.config.client_id or self.device_id}-updater", protocol)
        client.on_connect = self._on_connect
        client.on_connect_fail = lambda client, userdata: self._gave_up.set()
        client.on_message = self._on_message
        return client

    def connect(self, timeout_s: float = 10.0) -> bool:
        """Connect and subscribe; False (logged) when the broker cannot be reached in time."""
        try:
            self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
            self._client.loop_start()
        except (OSError, ValueError) as exc:
            log.warning("updater cannot reach the MQTT broker: %s", exc, extra={"event": "update_mqtt_unreachable"})
            return False
        deadline = time.monotonic() + timeout_s
        while not self._connected.is_set() and not self._gave_up.is_set() and time.monotonic() < deadline:
            self._connected.wait(0.05)
        if not self._connected.is_set():
            self._client.loop_stop()
            log.warning(
                "updater cannot reach the MQTT broker at %s:%s; update events go to the log only",
                self.config.host,
                self.config.port,
                extra={"event": "update_mqtt_unreachable"},
            )
            return False
        return True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self) -> None:
        """Disconnect once queued events are sent (bounded wait)."""
        if self.connected:
            deadline = time.monotonic() + 5.0
            while self._client.want_write() and time.monotonic() < deadline:
                time.sleep(0.02)
            self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, reason: object, properties: object
    ) -> None:
        if reason_code(reason) != 0:
            log.warning("MQTT broker refused the updater: %s", reason, extra={"event": "update_mqtt_refused"})
            return
        for leaf in ("status", "cmd/reload/result", "inspection", "stats"):
            client.subscribe(self.topic(leaf), qos=1)
        self._connected.set()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        if message.topic == self.topic("status"):
            self._status = message.payload.decode("utf-8", "replace").strip()
            self._status_seen.set()
        if self._listening.is_set():
            self._inbox.put((message.topic, bytes(message.payload)))

    # -- events -------------------------------------------------------------------------------------

    def publish_event(self, event: UpdateEvent) -> None:
        """Send one UpdateEvent (QoS 1); silently skipped while disconnected (the log has it too)."""
        if self.connected:
            self._client.publish(self.topic("update"), event.model_dump_json(), qos=1)

    # -- AgentControl -------------------------------------------------------------------------------

    def agent_running(self) -> bool:
        """The agent's retained status is ``online``."""
        if not self.connected:
            return False
        self._status_seen.wait(STATUS_WAIT_S)
        return self._status == "online"

    def reload(self, version: str, timeout_s: float, inspections: int) -> HealthResult:
        """Publish cmd/reload and wait for the agent to serve ``version`` healthily."""
        if not self.connected:
            return HealthResult(False, "not connected to the MQTT broker, cannot ask the agent to reload")
        self._drain()
        self._listening.set()
        request_id = uuid.uuid4().hex
        request: dict[str, str] = {"request_id": request_id, "version": version}
        if self.recipe is not None:
            request["recipe"] = self.recipe
        payload = json.dumps(request)
        self._client.publish(self.topic("cmd/reload"), payload, qos=1)
        log.info(
            "asked the agent to reload",
            extra={"event": "update_reload_requested", "version": version, "request_id": request_id},
        )
        try:
            return self._wait_healthy(version, request_id, time.monotonic() + timeout_s, inspections)
        finally:
            self._listening.clear()
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                return

    def _wait_healthy(self, version: str, request_id: str, deadline: float, needed: int) -> HealthResult:
        acknowledged = False
        seen = 0
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                leaf_topic, payload = self._inbox.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            leaf = leaf_topic.removeprefix(self.topic(""))
            if leaf == "status" and payload.decode("utf-8", "replace").strip() != "online":
                return HealthResult(
                    False, f"the agent went {payload.decode('utf-8', 'replace')!r} after the reload", seen
                )
            if leaf == "cmd/reload/result":
                result = _parse(CommandResult, payload)
                # Only the answer to this request counts: a reply without (or with another) request id, e.g.
                # forged by another broker client, must not decide a rollback.
                if result is None or result.request_id != request_id:
                    continue
                if not result.ok:
                    return HealthResult(False, f"the agent could not load the new model: {result.message}", seen)
                acknowledged = True
                if self.recipe is not None and result.data.get("active") is False:
                    # Loaded and warmed up, but no frame is judged by it until the recipe is selected.
                    return HealthResult(
                        True, f"recipe {self.recipe} is not the active one: {version} loaded and warmed up", seen
                    )
            elif leaf == "inspection":
                message = _parse(InspectionMessage, payload)
                if message is not None and message.model.version == version and self._ours(message.model):
                    seen += 1
            elif leaf == "stats":
                stats = _parse(StatsMessage, payload)
                if (
                    acknowledged and stats and stats.model and stats.model.version == version
                    and self._ours(stats.model) and stats.fps > 0
                ):  # fmt: skip
                    seen = max(seen, needed)
            if acknowledged and seen >= needed:
                return HealthResult(True, f"the agent runs {version}: {seen} healthy inspections", seen)
        if not acknowledged:
            return HealthResult(
                False, "the agent did not answer cmd/reload in time (is it running this version of edge-agent?)", seen
            )
        return HealthResult(False, f"only {seen} of {needed} inspections with {version} arrived in time", seen)

    def _ours(self, model: ModelRef) -> bool:
        """A message judged by the recipe being updated (any, without one)."""
        return self.recipe is None or model.recipe == self.recipe


def _parse(model: type[M], payload: bytes) -> M | None:
    """The payload as ``model`` through the bounded parser, or None when it is not one."""
    try:
        return model.model_validate(parse_json_object(payload, MAX_PAYLOAD_BYTES))
    except (PayloadError, ValidationError, ValueError):
        return None
