"""The updater's MQTT link trusts only the answer to its own request (issue 13), against a real mosquitto."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as paho
from mqtt_broker import MosquittoBroker
from paho.mqtt.enums import CallbackAPIVersion
from relay_helpers import MODEL, inspection

from edge_agent.config import MqttConfig
from edge_agent.fleet.update_mqtt import MqttLink


class FakeAgent:
    """Answers cmd/reload like the agent (ok, same request id) after a forger has answered first."""

    def __init__(self, mqtt: MosquittoBroker, forge: bool) -> None:
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.forge = forge
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("uflow/cam1/cmd/reload", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(mqtt.host, mqtt.port)
        self.client.loop_start()
        assert self.subscribed.wait(10)
        self.client.publish("uflow/cam1/status", "online", qos=1, retain=True).wait_for_publish(5)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        request = json.loads(message.payload)
        result = "uflow/cam1/cmd/reload/result"
        if self.forge:  # another broker client, faster than the agent, with no (or a wrong) request id
            client.publish(result, json.dumps({"command": "reload", "ok": False, "message": "forged"}), qos=1)
            forged = {"command": "reload", "ok": False, "request_id": "not-yours", "message": "forged"}
            client.publish(result, json.dumps(forged), qos=1)
        time.sleep(0.2)
        answer = {"command": "reload", "ok": True, "request_id": request["request_id"], "message": "reloaded"}
        client.publish(result, json.dumps(answer), qos=1)
        for sequence in range(3):
            message = inspection("cam1", sequence, anomalous=False)
            message = message.model_copy(update={"model": MODEL.model_copy(update={"version": request["version"]})})
            client.publish("uflow/cam1/inspection", message.to_json(), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_forged_reload_result_does_not_roll_back(broker: MosquittoBroker) -> None:
    agent = FakeAgent(broker, forge=True)
    link = MqttLink(MqttConfig(host=broker.host, port=broker.port), "cam1")
    try:
        assert link.connect(10)
        assert link.agent_running()
        health = link.reload("2.0.0", timeout_s=20, inspections=2)
        assert health.ok, health.message
    finally:
        link.close()
        agent.close()
