"""The OPC UA server (asyncua) over the handshake: the address space of docs/plc.md, in its own thread.

The server runs an asyncio loop in a daemon thread. The handshake's state reaches the nodes through one
queue, in order, and within one state the result values are written before ResultsValid, so a client
that reads on ResultsValid's notification reads that result. Client writes to the four command nodes
(Trigger, TriggerId, ResultsAck, RecipeSelect) go through asyncua's own checks first (access level, data
type: a malformed write is refused there) and then to the handshake; a refused trigger answers
BadInvalidState and sets LastError. Every other node is read-only to clients.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.connection import TransportLimits
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_session import InternalSession

from edge_agent.config_files import ConfigError
from edge_agent.config_plc import PlcConfig
from edge_agent.plc.handshake import PlcHandshake, PlcRefused, PlcState
from edge_agent.plc.security import SessionUsers, UsersFileError, application_uri, read_users

log = logging.getLogger(__name__)

NAMESPACE = "urn:uflow-edge:plc"
START_TIMEOUT_S = 20.0
V = ua.VariantType
ADMIN = User(role=UserRole.Admin)  # asyncua's default for internal writes

# name -> (type, writable by clients). The order is the order of docs/plc.md's node table.
NODES: dict[str, tuple[ua.VariantType, bool]] = {
    "Trigger": (V.Boolean, True),
    "TriggerId": (V.UInt32, True),
    "TriggerReady": (V.Boolean, False),
    "Busy": (V.Boolean, False),
    "Online": (V.Boolean, False),
    "ResultsValid": (V.Boolean, False),
    "ResultsAck": (V.Boolean, True),
    "ResultSequence": (V.UInt32, False),
    "ResultTriggerId": (V.UInt32, False),
    "PartId": (V.String, False),
    "Status": (V.UInt16, False),
    "Pass": (V.Boolean, False),
    "Fail": (V.Boolean, False),
    "LogNfa": (V.Double, False),
    "RegionCount": (V.UInt32, False),
    "ProcessingTimeMs": (V.Double, False),
    "ResultsQueued": (V.UInt32, False),
    "TriggerCount": (V.UInt32, False),
    "OkCount": (V.UInt32, False),
    "NgCount": (V.UInt32, False),
    "TriggerErrors": (V.UInt32, False),
    "MissedTriggers": (V.UInt32, False),
    "ResultsOverflow": (V.UInt32, False),
    "LastError": (V.String, False),
    "LastErrorCode": (V.UInt16, False),
    "RecipeSelect": (V.UInt16, True),
    "RecipeActive": (V.UInt16, False),
}
# Written last, in this order: a client woken by ResultsValid finds the result and counters already there.
FLAGS_LAST = ("Busy", "Online", "TriggerReady", "ResultsValid")
EMPTY: dict[str, Any] = {
    "ResultSequence": 0, "ResultTriggerId": 0, "PartId": "", "Status": 0, "Pass": False, "Fail": False,
    "LogNfa": 0.0, "RegionCount": 0, "ProcessingTimeMs": 0.0,
}  # fmt: skip


def node_values(state: PlcState) -> dict[str, Any]:
    """Every read-only node's value for ``state``, result and counters first, ResultsValid last."""
    result = state.result
    values: dict[str, Any] = dict(EMPTY)
    if result is not None:
        values.update(
            ResultSequence=result.sequence,
            ResultTriggerId=result.trigger_id,
            PartId=result.part_id,
            Status=int(result.status),
            Pass=result.passed,
            Fail=not result.passed,
            LogNfa=result.log_nfa if math.isfinite(result.log_nfa) else -1e308,
            RegionCount=result.regions,
            ProcessingTimeMs=result.processing_ms,
        )
    c = state.counters
    values.update(
        ResultsQueued=state.queued,
        TriggerCount=c.triggers,
        OkCount=c.ok,
        NgCount=c.ng,
        TriggerErrors=c.trigger_errors,
        MissedTriggers=c.missed,
        ResultsOverflow=c.overflow,
        LastError=state.last_error,
        LastErrorCode=int(state.last_error_code),
        RecipeActive=state.recipe_active,
        Busy=state.busy,
        Online=state.online,
        TriggerReady=state.trigger_ready,
        ResultsValid=state.results_valid,
    )
    return values


@dataclass
class _Command:
    handler: Callable[[Any], Awaitable[ua.StatusCode]]


class OpcUaServer:
    """``start()`` (ConfigError when it cannot serve), ``stop()``; ``endpoint`` once started."""

    def __init__(self, config: PlcConfig, handshake: PlcHandshake, device_id: str) -> None:
        self.config = config
        self.handshake = handshake
        self.device_id = device_id
        self.endpoint = f"opc.tcp://{_url_host(config.opcua_host)}:{config.opcua_port}/uflow"
        self._thread = threading.Thread(target=self._run, name="plc-opcua", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._states: asyncio.Queue[PlcState] | None = None
        self._server: Server | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._commands: dict[ua.NodeId, _Command] = {}
        self._shown: dict[str, Any] = {}
        self._trigger_id = 0

    def start(self) -> None:
        """Serve in a thread; returns once listening, ConfigError (with the reason) when it cannot."""
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise ConfigError(f"the OPC UA server did not start within {START_TIMEOUT_S:.0f} s")
        if self._error is not None:
            if isinstance(self._error, ConfigError):
                raise self._error
            raise ConfigError(f"the OPC UA server cannot serve {self.endpoint}: {self._error}") from self._error
        log.info("OPC UA server listening on %s", self.endpoint, extra={"event": "plc_opcua_listening", "security": self.config.opcua_security, "anonymous": self.config.opcua_anonymous})  # fmt: skip

    def stop(self) -> None:
        """Close the sessions and the port."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        if self._thread.ident is not None:  # started
            self._thread.join(10.0)

    # -- the server's thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(), or logged when it fails later
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("OPC UA server failed", extra={"event": "plc_opcua_failed", "error": str(exc)})
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._states = asyncio.Queue()
        server = await self._make_server()
        self._server = server
        async with server:
            applier = asyncio.create_task(self._apply_states())
            self.handshake.listen(self._on_state)
            self._ready.set()
            await self._stop.wait()
            applier.cancel()

    async def _make_server(self) -> Server:
        config = self.config
        logging.getLogger("asyncua").setLevel(logging.WARNING)  # its INFO is per request
        users = self._users()
        server = Server(user_manager=SessionUsers(users, config.opcua_anonymous, self._on_login))  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"uflow-edge {self.device_id}")
        await server.set_application_uri(application_uri(self.device_id))
        size = config.opcua_max_message_kb * 1024
        buffer = min(65535, size)
        server.limits = TransportLimits(
            max_recv_buffer=buffer,
            max_send_buffer=65535,
            max_chunk_count=max(1, math.ceil(size / buffer)),
            max_message_size=size,
        )
        # asyncua counts sessions on a class attribute: one server per process, so this is ours.
        InternalSession.max_connections = config.opcua_max_sessions
        server.iserver.max_connections = config.opcua_max_sessions * 2  # sockets, incl. ones being set up
        tokens: list[type] = [ua.UserNameIdentityToken]
        if config.opcua_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        if config.opcua_security == "sign_encrypt":
            await self._load_certificate(server)
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            if config.opcua_trusted_clients_dir is not None:
                server.set_certificate_validator(_trusted_clients(config.opcua_trusted_clients_dir))
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        await self._build_nodes(server)
        return server

    def _users(self) -> dict[str, str]:
        path = self.config.opcua_users_file
        assert path is not None
        if not path.exists():
            if self.config.opcua_anonymous:
                return {}
            raise ConfigError(
                f"plc.opcua_users_file {path} does not exist and anonymous is off: add a user with "
                f"`edge-agent plc passwd --user NAME` (docs/plc.md)"
            )
        try:
            return read_users(path)
        except (OSError, UsersFileError) as exc:
            raise ConfigError(f"plc.opcua_users_file: {exc}") from exc

    async def _load_certificate(self, server: Server) -> None:
        cert, key = self.config.opcua_cert, self.config.opcua_key
        assert cert is not None and key is not None
        if not cert.exists() or not key.exists():
            raise ConfigError(
                f"plc.opcua_security is sign_encrypt but {cert if not cert.exists() else key} is missing: make them "
                "with `edge-agent plc cert` (docs/plc.md)"
            )
        try:
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"plc.opcua_cert/opcua_key cannot be loaded: {exc}") from exc

    async def _build_nodes(self, server: Server) -> None:
        index = await server.register_namespace(NAMESPACE)
        camera = await server.nodes.objects.add_object(_node_id("Camera", index), ua.QualifiedName("Camera", index))
        initial = node_values(self.handshake.state())
        for name, (vtype, writable) in NODES.items():
            value = initial.get(
                name, 0 if vtype not in (V.Boolean, V.String) else (False if vtype == V.Boolean else "")
            )
            node = await camera.add_variable(
                _node_id(name, index), ua.QualifiedName(name, index), ua.Variant(value, vtype), datatype=None
            )
            if writable:
                await node.set_writable()
            self._nodes[name] = node.nodeid
            self._shown[name] = value
        self._commands = {
            self._nodes["Trigger"]: _Command(self._write_trigger),
            self._nodes["TriggerId"]: _Command(self._write_trigger_id),
            self._nodes["ResultsAck"]: _Command(self._write_ack),
            self._nodes["RecipeSelect"]: _Command(self._write_recipe),
        }
        service = server.iserver.attribute_service
        checked_write = service.write

        async def write(params: ua.WriteParameters, user: User = ADMIN) -> list[ua.StatusCode]:
            # One value at a time, in the request's order: TriggerId then Trigger in one request works.
            results = []
            for item in params.NodesToWrite:
                (status,) = await checked_write(ua.WriteParameters(NodesToWrite=[item]), user)
                command = self._commands.get(item.NodeId) if item.AttributeId == ua.AttributeIds.Value else None
                if command is not None and status.is_good():
                    value = item.Value.Value.Value if item.Value is not None and item.Value.Value is not None else None
                    status = await command.handler(value)
                results.append(status)
            return results

        # asyncua has no per-node write hook that can refuse with a status code; wrapping the service
        # keeps its access and type checks and adds ours after them.
        service.write = write  # type: ignore[method-assign]

    async def _write_trigger(self, value: Any) -> ua.StatusCode:
        if value is not True:
            return ua.StatusCode()
        try:
            self.handshake.trigger(self._trigger_id, "opcua")
            status = ua.StatusCode()
        except PlcRefused:
            status = _bad(ua.StatusCodes.BadInvalidState)
        await self._set("Trigger", False)  # self-clearing: every write of True is one trigger
        return status

    async def _write_trigger_id(self, value: Any) -> ua.StatusCode:
        self._trigger_id = int(value)
        return ua.StatusCode()

    async def _write_ack(self, value: Any) -> ua.StatusCode:
        self.handshake.ack(bool(value))
        return ua.StatusCode()

    async def _write_recipe(self, value: Any) -> ua.StatusCode:
        try:
            self.handshake.select_recipe(int(value))
            return ua.StatusCode()
        except PlcRefused:
            await self._set("RecipeSelect", self.handshake.state().recipe_active)
            return _bad(ua.StatusCodes.BadOutOfRange)

    def _on_state(self, state: PlcState) -> None:
        loop, queue = self._loop, self._states
        if loop is not None and queue is not None and not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, state)

    async def _apply_states(self) -> None:
        assert self._states is not None
        while True:
            state = await self._states.get()
            values = node_values(state)
            for name, value in values.items():
                if name not in FLAGS_LAST:
                    await self._show(name, value)
            for name in FLAGS_LAST:
                await self._show(name, values[name])

    async def _show(self, name: str, value: Any) -> None:
        if self._shown.get(name) != value:
            await self._set(name, value)

    async def _set(self, name: str, value: Any) -> None:
        assert self._server is not None
        self._shown[name] = value
        variant = ua.Variant(value, NODES[name][0])
        await self._server.write_attribute_value(self._nodes[name], ua.DataValue(variant))

    def _on_login(self, username: str) -> None:
        """After ``username``'s session activates: close that user's older sessions (one session per PLC)."""
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def close_older() -> None:
            sessions = [
                s
                for s in list(getattr(server.iserver, "_external_sessions", {}).values())
                if getattr(getattr(s, "user", None), "name", None) == username
            ]
            sessions.sort(key=lambda s: getattr(s, "_last_activity", 0.0))
            for old in sessions[:-1]:  # the newest (the one just activated) stays
                log.warning("OPC UA session of %s replaced by a newer one", username, extra={"event": "plc_session_replaced", "user": username})  # fmt: skip
                await old.close_session(True)

        loop.call_soon(lambda: asyncio.ensure_future(close_older()))


def _trusted_clients(folder: Path) -> Callable[[Any, Any], Awaitable[None]]:
    """A certificate validator accepting only client certificates (DER) found in ``folder`` (read at start)."""
    from cryptography.hazmat.primitives import serialization

    trusted = {hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.der"))}

    async def validate(certificate: Any, app_description: Any) -> None:
        fingerprint = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
        if fingerprint not in trusted:
            log.warning("OPC UA client certificate not trusted", extra={"event": "plc_client_untrusted", "fingerprint": fingerprint, "application": str(getattr(app_description, "ApplicationUri", ""))})  # fmt: skip
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    return validate


def _node_id(name: str, index: int) -> ua.NodeId:
    """A string node id (asyncua types its arguments as its own NewTypes)."""
    return ua.NodeId(ua.String(name), ua.Int16(index))


def _bad(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
