"""The Modbus TCP server (pymodbus) over the handshake: the map of docs/plc.md, in its own thread.

Modbus has no authentication and no encryption: anyone who reaches the port can trigger and ack. The
server binds one configured interface (the config refuses 0.0.0.0 unless forced; docs/security.md).

Every read is answered from the handshake's state at that instant (pymodbus calls our action before it
reads the block, and we fill the block then), so there is nothing to keep in sync. Writes: coil 0
(Trigger, self-clearing) triggers, refused with exception 06 Server Device Busy (busy) or 04 Server
Device Failure (offline) and counted; coil 1 is ResultsAck; holding registers 0-1 are the TriggerId,
register 2 RecipeSelect (an index into [[recipes]]; no such recipe: exception 03 Illegal Data Value).

32-bit values are two registers, **high word first** (big-endian words, "ABCD"; mbpoll's ``-B``);
floats are IEEE 754 single precision.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import threading
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simutils import SimUtils

from edge_agent.config_files import ConfigError
from edge_agent.config_plc import PlcConfig
from edge_agent.plc.handshake import PlcHandshake, PlcRefused, PlcState, RefusalCode

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
COIL_TRIGGER, COIL_ACK = 0, 1
DI_NAMES = ("Online", "TriggerReady", "Busy", "ResultsValid", "Pass", "Fail", "ResultsAck")
HR_TRIGGER_ID, HR_RECIPE_SELECT, HR_COUNT = 0, 2, 3
IR_COUNT = 32
# Input registers: (address, name, kind); u32 and f32 take two registers (high word first).
IR_MAP: tuple[tuple[int, str, str], ...] = (
    (0, "ResultSequence", "u32"),
    (2, "ResultTriggerId", "u32"),
    (4, "Status", "u16"),
    (5, "Pass", "u16"),
    (6, "LogNfa", "f32"),
    (8, "RegionCount", "u32"),
    (10, "ProcessingTimeMs", "f32"),
    (12, "ResultsQueued", "u32"),
    (14, "TriggerCount", "u32"),
    (16, "OkCount", "u32"),
    (18, "NgCount", "u32"),
    (20, "TriggerErrors", "u32"),
    (22, "MissedTriggers", "u32"),
    (24, "ResultsOverflow", "u32"),
    (26, "LastErrorCode", "u16"),
    (27, "RecipeActive", "u16"),
    (28, "Flags", "u16"),  # the discrete inputs as bits 0-6, for register-only PLCs
)
FC_COILS, FC_DI, FC_HR, FC_IR = (1, 5, 15), (2,), (3, 6, 16, 22, 23), (4,)


def discrete_inputs(state: PlcState) -> list[bool]:
    """The discrete inputs 0-6 (DI_NAMES order)."""
    result = state.result
    passed = bool(result and state.results_valid and result.passed)
    failed = bool(result and state.results_valid and not result.passed)
    return [state.online, state.trigger_ready, state.busy, state.results_valid, passed, failed, state.results_ack]


def input_registers(state: PlcState) -> list[int]:
    """The input registers 0..IR_COUNT-1 for ``state``."""
    result, c = state.result, state.counters
    log_nfa = result.log_nfa if result else 0.0
    values: dict[str, float | int] = {
        "ResultSequence": result.sequence if result else 0,
        "ResultTriggerId": result.trigger_id if result else 0,
        "Status": int(result.status) if result else 0,
        "Pass": int(bool(result and result.passed)),
        "LogNfa": log_nfa if math.isfinite(log_nfa) else -3.0e38,
        "RegionCount": result.regions if result else 0,
        "ProcessingTimeMs": result.processing_ms if result else 0.0,
        "ResultsQueued": state.queued,
        "TriggerCount": c.triggers,
        "OkCount": c.ok,
        "NgCount": c.ng,
        "TriggerErrors": c.trigger_errors,
        "MissedTriggers": c.missed,
        "ResultsOverflow": c.overflow,
        "LastErrorCode": int(state.last_error_code),
        "RecipeActive": state.recipe_active,
        "Flags": sum(1 << i for i, bit in enumerate(discrete_inputs(state)) if bit),
    }
    registers = [0] * IR_COUNT
    for address, name, kind in IR_MAP:
        value = values[name]
        if kind == "u16":
            registers[address] = int(value) & 0xFFFF
        elif kind == "u32":
            registers[address], registers[address + 1] = divmod(int(value) & 0xFFFF_FFFF, 0x10000)
        else:
            high, low = struct.unpack(">HH", struct.pack(">f", max(-3.0e38, min(3.0e38, float(value)))))
            registers[address], registers[address + 1] = high, low
    return registers


class ModbusServer:
    """``start()`` (ConfigError when it cannot bind), ``stop()``."""

    def __init__(self, config: PlcConfig, handshake: PlcHandshake) -> None:
        self.config = config
        self.handshake = handshake
        self.address = (config.modbus_host, config.modbus_port)
        self._holding = [0] * HR_COUNT  # what the PLC wrote (TriggerId words, RecipeSelect)
        self._thread = threading.Thread(target=self._run, name="plc-modbus", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ModbusTcpServer | None = None

    def start(self) -> None:
        """Serve in a thread; returns once listening."""
        logging.getLogger("pymodbus").setLevel(logging.ERROR)  # it warns about its own deprecations
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise ConfigError(f"the Modbus server did not start within {START_TIMEOUT_S:.0f} s")
        if self._error is not None:
            host, port = self.address
            raise ConfigError(f"the Modbus server cannot listen on {host}:{port}: {self._error}") from self._error
        log.info("Modbus TCP server listening on %s:%s (no security)", *self.address, extra={"event": "plc_modbus_listening", "unit_id": self.config.modbus_unit_id})  # fmt: skip

    def stop(self) -> None:
        """Close the port and the connections."""
        loop, server = self._loop, self._server
        if loop is not None and server is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(server.shutdown(), loop)
        if self._thread.ident is not None:  # started
            self._thread.join(10.0)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("Modbus server failed", extra={"event": "plc_modbus_failed", "error": str(exc)})
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        device = SimDevice(
            id=self.config.modbus_unit_id,
            simdata=(
                [SimData(0, count=1, values=0, datatype=DataType.BITS)],  # coils 0-15
                [SimData(0, count=1, values=0, datatype=DataType.BITS)],  # discrete inputs 0-15
                [SimData(0, count=HR_COUNT, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=IR_COUNT, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )
        server = ModbusTcpServer(device, address=self.address)
        self._server = server
        await server.serve_forever(background=True)
        self._ready.set()
        await server.serving

    async def _action(
        self,
        func_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Called by pymodbus before each access: handle a write, then fill the block from the state."""
        try:
            if values is not None:
                refused = self._write(func_code, address, list(values))
                if refused is not None:
                    return refused
            self._fill(func_code, registers)
        except Exception as exc:  # a request must never take the server (or the agent) down
            log.exception("Modbus request failed", extra={"event": "plc_modbus_request_failed", "error": str(exc)})
            return ExcCodes.DEVICE_FAILURE
        return None

    def _write(self, func_code: int, address: int, values: list[Any]) -> ExcCodes | None:
        if func_code in FC_COILS:
            for offset, value in enumerate(values):
                coil = address + offset
                if coil == COIL_TRIGGER and value:
                    trigger_id = (self._holding[HR_TRIGGER_ID] << 16) | self._holding[HR_TRIGGER_ID + 1]
                    try:
                        self.handshake.trigger(trigger_id, "modbus")
                    except PlcRefused as exc:
                        return ExcCodes.DEVICE_BUSY if exc.code == RefusalCode.BUSY else ExcCodes.DEVICE_FAILURE
                elif coil == COIL_ACK:
                    self.handshake.ack(bool(value))
        elif func_code in FC_HR:
            for offset, value in enumerate(values):
                register = address + offset
                if register == HR_RECIPE_SELECT:
                    try:
                        self.handshake.select_recipe(int(value))
                    except PlcRefused:
                        return ExcCodes.ILLEGAL_VALUE
                self._holding[register] = int(value) & 0xFFFF
        return None

    def _fill(self, func_code: int, registers: list[int]) -> None:
        state = self.handshake.state()
        if func_code in FC_COILS:
            bits = [False] * 16  # Trigger reads 0 (self-clearing)
            bits[COIL_ACK] = state.results_ack
            registers[:1] = SimUtils.bitsToRegisters(bits)
        elif func_code in FC_DI:
            bits = discrete_inputs(state) + [False] * (16 - len(DI_NAMES))
            registers[:1] = SimUtils.bitsToRegisters(bits)
        elif func_code in FC_HR:
            registers[:HR_COUNT] = self._holding
        elif func_code in FC_IR:
            registers[:IR_COUNT] = input_registers(state)
