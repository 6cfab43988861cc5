"""The benches' MQTT observer: one client from the agent's own factory, subscribed before it is used.

bench/recipe.py and bench/plc.py watch the agent's messages with it. The constructor returns only once the
broker has acknowledged the subscription (its SUBACK, paho's ``on_subscribe``): a bench that publishes a
command right after subscribing must not lose the answer because the broker had not taken the subscription
yet. The client comes from edge_agent/publish/client.py's ``new_client``, as every MQTT client of the
project does (docs/design.md section 8), so it gets the same settings (Nagle off) as the agent's.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from paho.mqtt.enums import MQTTProtocolVersion  # noqa: E402

from edge_agent.config import MqttConfig  # noqa: E402
from edge_agent.publish.client import describe_connect_error, new_client, reason_code  # noqa: E402


class MqttObserver:
    """An MQTT client subscribed to ``topics`` (SUBACK received) that hands each message to ``handle``.

    A subclass implements ``handle(topic, body, arrived)``: ``body`` is the JSON-decoded payload, ``arrived``
    ``clock()`` read as the message came in. It runs holding ``cond``, which is notified after it, so the
    bench's thread waits with ``cond.wait_for``. ``client`` publishes (the bench's commands and triggers).
    A subclass sets its own fields before calling this constructor: messages may arrive before it returns.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        topics: Sequence[tuple[str, int]],
        *,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 10.0,
    ) -> None:
        self.cond = threading.Condition()
        self.clock = clock
        subscribed = threading.Event()
        problems: list[str] = []
        config = MqttConfig(host=host, port=port)
        client = new_client(config, client_id, MQTTProtocolVersion.MQTTv311)

        def on_connect(client: Any, userdata: object, flags: object, reason: object, properties: object) -> None:
            if reason_code(reason) == 0:
                client.subscribe(list(topics))  # again after a reconnect: a clean session forgets it
            else:
                problems.append(f"the broker refused the connection ({reason})")
                subscribed.set()

        def on_subscribe(client: Any, userdata: object, mid: int, reasons: list[Any], properties: object) -> None:
            refused = [topic for (topic, _), reason in zip(topics, reasons, strict=True) if reason_code(reason) >= 0x80]
            if refused:
                problems.append(f"the broker refused the subscription to {refused}")
            subscribed.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = self._on_message
        try:
            client.connect(host, port)
        except OSError as exc:
            raise SystemExit(f"{client_id}: {describe_connect_error(exc, config)}") from exc
        client.loop_start()
        if not subscribed.wait(timeout_s) or problems:
            client.loop_stop()
            client.disconnect()
            why = "; ".join(problems) or f"no SUBACK within {timeout_s:g} s"
            raise SystemExit(f"{client_id} could not subscribe to {[t for t, _ in topics]} on {host}:{port}: {why}")
        self.client = client

    def _on_message(self, client: Any, userdata: object, message: Any) -> None:
        arrived = self.clock()
        body = json.loads(message.payload)
        with self.cond:
            self.handle(message.topic, body, arrived)
            self.cond.notify_all()

    def handle(self, topic: str, body: Any, arrived: float) -> None:
        """Record one message (called holding ``cond``)."""
        raise NotImplementedError
