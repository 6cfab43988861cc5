"""How the agent meets parts (``[parts] mode``, docs/parts.md): the tracker of a free-running camera, or
the trigger book of a triggered one with its sources (MQTT ``trigger``, HTTP ``POST /trigger``, a GPIO line).

The pipeline runs the tracker and serves triggers on the frame path; this object sets them up around the
agent (subscriptions, routes, the GPIO thread), reports triggers that got no frame in time (one
``no_frame`` part message each), and gives the counters to stats, the status line and the preview.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from edge_agent.config import AgentSettings, ConfigError
from edge_agent.inspection.parts import TrackedParts
from edge_agent.inspection.triggers import (
    GpioTrigger,
    Trigger,
    TriggerBook,
    TriggerRefused,
    missed_message,
    open_gpio,
)
from edge_agent.messages import PartMessage
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.service.agent_snapshot import PartFigures
from edge_agent.service.http_server import HttpRequest, HttpResponse, HttpServer

log = logging.getLogger(__name__)


class PartInputs:
    """The ``[parts]`` side of one agent: ``attach_http()``, ``start()``, ``tick()`` now and then, ``stop()``,
    ``figures()`` and ``problems()`` (see ``AgentPart`` in loop.py)."""

    def __init__(self, settings: AgentSettings, publisher: MqttPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.parts: TrackedParts | None = None
        self.triggers: TriggerBook | None = None
        self.gpio: GpioTrigger | None = None
        # Told of every missed trigger after its part message is out (the PLC handshake: edge_agent/plc/).
        self.missed_observers: list[Callable[[Trigger, PartMessage], None]] = []
        config = settings.parts
        if config.mode == "tracked":
            self.parts = TrackedParts(config, settings.device_id)
        elif config.mode == "triggered":
            self.triggers = TriggerBook(config.trigger_delay_s, config.trigger_timeout_s)
            if "mqtt" in config.triggers:
                publisher.subscribe("trigger", self._mqtt_trigger)

    def attach_http(self, http: HttpServer | None) -> None:
        """``POST /trigger`` when HTTP triggers are configured (the config refuses them without a server)."""
        if http is not None and self.triggers is not None and "http" in self.settings.parts.triggers:
            http.route_post("/trigger", self._http_trigger)

    def start(self) -> None:
        """Open the GPIO line when one is configured; ConfigError when it cannot be requested."""
        parts = self.settings.parts
        if self.triggers is None or "gpio" not in parts.triggers:
            return
        try:
            request = open_gpio(parts.gpio_chip, parts.gpio_line, parts.gpio_edge)
        except (ImportError, OSError, ValueError) as exc:
            raise ConfigError(
                f"parts.triggers has gpio but line {parts.gpio_line} of {parts.gpio_chip} cannot be requested: {exc} "
                "(install python3-libgpiod / pip install gpiod >= 2; the user needs access to /dev/gpiochip*)"
            ) from exc
        self.gpio = GpioTrigger(request, self.triggers, f"{parts.gpio_chip} line {parts.gpio_line}")
        self.gpio.start()

    def tick(self) -> None:
        """Triggers that got no frame in time: a part message each (status no_frame) and an error line."""
        if self.triggers is None:
            return
        for trigger in self.triggers.expired():
            log.error(
                "trigger got no frame in time",
                extra={
                    "event": "trigger_missed",
                    "source": trigger.source,
                    "trigger_time": trigger.time,
                    "trigger_id": trigger.trigger_id,
                    "waited_s": round(time.time() - trigger.time, 3),
                },
            )
            message = missed_message(self.settings.device_id, trigger)
            self.publisher.publish_part(message)
            for observer in self.missed_observers:
                try:
                    observer(trigger, message)
                except Exception as exc:
                    log.exception(
                        "missed-trigger observer failed", extra={"event": "observer_failed", "error": str(exc)}
                    )

    def stop(self) -> None:
        """Close the GPIO line and report what is still waiting past its time."""
        if self.gpio is not None:
            self.gpio.stop()
        self.tick()

    def problems(self) -> list[str]:
        """/healthz sentences: none (a missed trigger is a part message and a counter, not a degraded agent)."""
        return []

    def figures(self) -> PartFigures:
        """The parts and trigger counters (None where that mode is off), for the agent's snapshot."""
        mode, parts, book = self.settings.parts.mode, self.parts, self.triggers
        decided = anomalous = noise = None
        if parts is not None:
            decided, anomalous, noise = parts.counters.decided, parts.counters.anomalous, parts.counters.noise
        if book is None:
            return PartFigures(mode, decided, anomalous, noise)
        t = book.counters
        return PartFigures(
            mode, decided, anomalous, noise, t.received, t.served, t.missed, t.storm, t.refused, book.waiting
        )

    def _mqtt_trigger(self, leaf: str, payload: bytes, retained: bool = False) -> None:
        assert self.triggers is not None
        if retained:  # the broker replays it at every reconnect: one trigger would inspect again each time
            self.triggers.refuse()
            self._log_refused("retained: clear it with an empty retained message on the trigger topic")
            return
        try:
            self.triggers.parse_and_add(payload, "mqtt")
        except TriggerRefused as exc:
            self._log_refused(str(exc))

    def _log_refused(self, reason: str) -> None:
        """A refused MQTT trigger's WARNING, at the 1st, 10th, 100th and every 1000th (all are counted): a flood of
        bad triggers must not flood the log."""
        assert self.triggers is not None
        refused = self.triggers.counters.refused
        if refused in (1, 10, 100) or refused % 1000 == 0:
            log.warning(
                "trigger refused: %s", reason, extra={"event": "trigger_refused", "source": "mqtt", "refused": refused}
            )

    def _http_trigger(self, request: HttpRequest) -> HttpResponse:
        assert self.triggers is not None
        try:
            trigger = self.triggers.parse_and_add(request.body, "http")
        except TriggerRefused as exc:
            return HttpResponse(400, f"{exc}\n".encode())
        body = json.dumps({"accepted": True, "time": trigger.time, "trigger_id": trigger.trigger_id}).encode() + b"\n"
        return HttpResponse(202, body, "application/json")
