"""What the agent calls (edge_agent/service/agent.py): the handshake and the enabled PLC servers.

Inputs: the agent's trigger book (PLC triggers join the MQTT, HTTP and GPIO ones), every decided part
(a pipeline observer's ``on_part``: the trigger that asked for it rides on the FrameJob, so the PLC's
TriggerId is echoed without changing the part message) and every missed trigger (PartInputs).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from edge_agent.config_files import ConfigError
from edge_agent.inspection.triggers import Trigger, TriggerBook
from edge_agent.messages import PartMessage
from edge_agent.plc.handshake import PlcHandshake

if TYPE_CHECKING:
    from edge_agent.config import AgentSettings
    from edge_agent.inspection.pipeline import FrameJob

log = logging.getLogger(__name__)

INSTALL_HINT = "install the plc extra: pip install 'uflow-edge[plc]' (asyncua, pymodbus)"


class _Server(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class PlcBridge:
    """``start()`` after the pipeline starts (Online rises), ``stop()`` when the agent stops."""

    def __init__(self, settings: AgentSettings, book: TriggerBook) -> None:
        self.settings = settings
        self.handshake = PlcHandshake(book, settings.plc.results_queue)
        self.servers: list[_Server] = []

    @classmethod
    def create(cls, settings: AgentSettings, book: TriggerBook | None) -> PlcBridge | None:
        """The bridge, or None when no PLC server is enabled."""
        if not (settings.plc.opcua_enabled or settings.plc.modbus_enabled):
            return None
        assert book is not None  # the config requires parts.mode = "triggered" with a PLC server
        return cls(settings, book)

    def start(self) -> None:
        """Open the servers (ConfigError with the reason when one cannot), then go Online."""
        self.servers = self._make_servers()
        started: list[_Server] = []
        try:
            for server in self.servers:
                server.start()
                started.append(server)
        except BaseException:
            for server in started:
                server.stop()
            raise
        self.handshake.set_online(True)

    def _make_servers(self) -> list[_Server]:
        config = self.settings.plc
        servers: list[_Server] = []
        if config.opcua_enabled:
            try:
                from edge_agent.plc.opcua import OpcUaServer
            except ImportError as exc:
                raise ConfigError(f"plc.opcua_enabled needs asyncua ({exc}): {INSTALL_HINT}") from exc
            servers.append(OpcUaServer(config, self.handshake, self.settings.device_id))
        if config.modbus_enabled:
            try:
                from edge_agent.plc.modbus import ModbusServer
            except ImportError as exc:
                raise ConfigError(f"plc.modbus_enabled needs pymodbus ({exc}): {INSTALL_HINT}") from exc
            servers.append(ModbusServer(config, self.handshake))
        return servers

    def stop(self) -> None:
        """Offline first (a trigger now is refused), then close the servers."""
        self.handshake.set_online(False)
        for server in self.servers:
            try:
                server.stop()
            except Exception as exc:
                log.exception("PLC server did not stop cleanly", extra={"event": "plc_stop_failed", "error": str(exc)})

    def part_decided(self, job: FrameJob, message: PartMessage) -> None:
        """A pipeline part observer."""
        self.handshake.part_decided(job.trigger, message)

    def trigger_missed(self, trigger: Trigger, message: PartMessage) -> None:
        """A PartInputs missed-trigger observer."""
        self.handshake.trigger_missed(trigger, message)
