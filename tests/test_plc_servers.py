"""The PLC servers in this process over a real handshake and trigger book (no pipeline: an accepted trigger
stays Busy until the test decides its part), driven by real clients: Debian's mbpoll (libmodbus) for Modbus,
asyncua's client for the OPC UA security and bad-input cases (the node-opcua cycle is in test_plc_agent.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import free_port
from plc_helpers import MBPOLL, mbpoll, mbpoll_values

from edge_agent.config import load_settings
from edge_agent.config_plc import PlcConfig
from edge_agent.inspection.triggers import TriggerBook
from edge_agent.messages import PartFrames, PartMessage
from edge_agent.plc.handshake import PlcHandshake, RefusalCode

asyncua = pytest.importorskip("asyncua", reason="the plc extra (asyncua) is not installed")
pytest.importorskip("pymodbus", reason="the plc extra (pymodbus) is not installed")

from asyncua import Client, ua  # noqa: E402
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256  # noqa: E402

from edge_agent.plc.modbus import ModbusServer  # noqa: E402
from edge_agent.plc.opcua import NAMESPACE, OpcUaServer  # noqa: E402
from edge_agent.plc.security import application_uri, make_certificate, set_user  # noqa: E402

USER, PASSWORD = "plc1", "line-4-secret"


def decided(part_id: str, anomalous: bool, log_nfa: float) -> PartMessage:
    return PartMessage(
        device_id="cam1",
        part_id=part_id,
        mode="triggered",
        anomalous=anomalous,
        log_nfa=log_nfa,
        log10_epsilon=0.0,
        first_capture_time=1.0,
        decision_time=1.0,
        frames=PartFrames(count=1, first_sequence=1, last_sequence=1),
        latency_ms=33.25,
    )


# -- Modbus ---------------------------------------------------------------------------------------------


@pytest.fixture
def modbus() -> Iterator[tuple[ModbusServer, PlcHandshake, TriggerBook]]:
    book = TriggerBook(0.0, 5.0)
    handshake = PlcHandshake(book, 4)
    handshake.set_online(True)
    server = ModbusServer(PlcConfig(modbus_enabled=True, modbus_port=free_port()), handshake)
    server.start()
    yield server, handshake, book
    server.stop()


@pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (apt-get install mbpoll; CI installs it)")
def test_mbpoll_trigger_while_busy_is_refused_with_server_busy_and_counted(modbus: Any) -> None:
    server, handshake, book = modbus
    port = server.address[1]
    assert mbpoll(port, "-t", "4:int", "-B", "-r", "0", "127.0.0.1", "123456").returncode == 0
    assert mbpoll(port, "-t", "0", "-r", "0", "127.0.0.1", "1").returncode == 0
    assert book.waiting == 1 and handshake.state().busy
    refused = mbpoll(port, "-t", "0", "-r", "0", "127.0.0.1", "1")
    assert refused.returncode != 0  # exception 06, Server Device Busy
    assert book.waiting == 1
    inputs = mbpoll_values(port, "-t", "1", "-r", "0", "-c", "7")
    assert inputs[0] == 1 and inputs[1] == 0 and inputs[2] == 1  # Online, not TriggerReady, Busy
    registers = mbpoll_values(port, "-t", "3:int", "-B", "-r", "20", "-c", "1")
    assert registers[20] == 1  # TriggerErrors
    assert mbpoll_values(port, "-t", "3", "-r", "26", "-c", "1")[26] == RefusalCode.BUSY


@pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (apt-get install mbpoll; CI installs it)")
def test_mbpoll_reads_the_result_as_the_map_says_and_acks_it(modbus: Any) -> None:
    server, handshake, book = modbus
    port = server.address[1]
    assert mbpoll(port, "-t", "4:int", "-B", "-r", "0", "127.0.0.1", "2000000123").returncode == 0
    assert mbpoll(port, "-t", "0", "-r", "0", "127.0.0.1", "1").returncode == 0
    trigger = book.take(book._pending[0].time + 1)  # the frame the pipeline would take
    handshake.part_decided(trigger, decided("p1", anomalous=True, log_nfa=-12.5))
    assert mbpoll_values(port, "-t", "1", "-r", "3", "-c", "3") == {3: 1, 4: 0, 5: 1}  # ResultsValid, not Pass, Fail
    words = mbpoll_values(port, "-t", "3:int", "-B", "-r", "0", "-c", "2")
    assert words == {0: 1, 2: 2000000123}  # ResultSequence, ResultTriggerId: high word first
    assert mbpoll_values(port, "-t", "3:float", "-B", "-r", "6", "-c", "1") == {6: -12.5}  # LogNfa
    assert mbpoll_values(port, "-t", "3:float", "-B", "-r", "10", "-c", "1") == {10: 33.25}  # ProcessingTimeMs
    assert mbpoll_values(port, "-t", "3:int", "-B", "-r", "18", "-c", "1") == {18: 1}  # NgCount
    assert mbpoll(port, "-t", "0", "-r", "1", "127.0.0.1", "1").returncode == 0  # ResultsAck
    assert mbpoll_values(port, "-t", "1", "-r", "3", "-c", "1") == {3: 0}
    assert mbpoll(port, "-t", "0", "-r", "1", "127.0.0.1", "0").returncode == 0
    assert not handshake.state().results_ack
    assert mbpoll(port, "-t", "4", "-r", "2", "127.0.0.1", "7").returncode != 0  # no recipe 7: Illegal Data Value
    assert mbpoll(port, "-t", "3", "-r", "40", "-c", "1", "127.0.0.1").returncode != 0  # outside the map


def test_modbus_refuses_every_interface_unless_forced() -> None:
    with pytest.raises(ValueError, match="modbus_allow_all_interfaces"):
        PlcConfig(modbus_enabled=True, modbus_host="0.0.0.0")
    with pytest.raises(ValueError, match="modbus_allow_all_interfaces"):
        PlcConfig(modbus_enabled=True, modbus_host="::")
    assert PlcConfig(modbus_enabled=True, modbus_host="0.0.0.0", modbus_allow_all_interfaces=True)
    assert PlcConfig(modbus_enabled=True, modbus_host="192.168.10.5")


def test_plc_servers_need_triggered_parts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="triggered"):
        load_settings(None, state_dir=str(tmp_path), plc={"opcua_enabled": True})


# -- OPC UA ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("plc-credentials")
    paths = {name: folder / name for name in ("server.der", "server.pem", "client.der", "client.pem", "users")}
    make_certificate(paths["server.der"], paths["server.pem"], "cam1", ["127.0.0.1"], days=30)
    make_certificate(paths["client.der"], paths["client.pem"], "client", ["127.0.0.1"], days=30)
    set_user(paths["users"], USER, PASSWORD)
    return paths


def opcua_config(credentials: dict[str, Path], **values: Any) -> PlcConfig:
    defaults: dict[str, Any] = {
        "opcua_enabled": True,
        "opcua_port": free_port(),
        "opcua_cert": credentials["server.der"],
        "opcua_key": credentials["server.pem"],
        "opcua_users_file": credentials["users"],
    }
    return PlcConfig(**{**defaults, **values})


@pytest.fixture
def opcua(credentials: dict[str, Path]) -> Iterator[tuple[OpcUaServer, PlcHandshake, TriggerBook]]:
    book = TriggerBook(0.0, 5.0)
    handshake = PlcHandshake(book, 4)
    handshake.set_online(True)
    server = OpcUaServer(opcua_config(credentials, opcua_max_message_kb=64), handshake, "cam1")
    server.start()
    yield server, handshake, book
    server.stop()


async def connect(
    url: str, credentials: dict[str, Path], user: str | None = USER, password: str | None = PASSWORD
) -> Client:
    client = Client(url, timeout=10)
    client.application_uri = application_uri("client")
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(credentials["client.der"]),
        str(credentials["client.pem"]),
        server_certificate=str(credentials["server.der"]),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    await client.connect()
    return client


async def nodes(client: Client) -> Any:
    index = await client.get_namespace_index(NAMESPACE)
    return lambda name: client.get_node(ua.NodeId(name, index))


async def write_status(node: Any, variant: ua.Variant) -> ua.StatusCode:
    (status,) = await node.session.write(
        ua.WriteParameters(
            NodesToWrite=[
                ua.WriteValue(NodeId=node.nodeid, AttributeId=ua.AttributeIds.Value, Value=ua.DataValue(variant))
            ]
        )
    )
    return status


def test_opcua_refuses_wrong_passwords_and_anonymous_sessions(opcua: Any, credentials: dict[str, Path]) -> None:
    server, _, _ = opcua

    async def scenario() -> None:
        for user, password in ((USER, "wrong"), ("nobody", PASSWORD), (None, None)):
            with pytest.raises(ua.UaError):
                client = await connect(server.endpoint, credentials, user, password)
                await client.disconnect()
        client = await connect(server.endpoint, credentials)
        node = await nodes(client)
        assert await node("Online").read_value() is True
        await client.disconnect()

    asyncio.run(scenario())


def test_opcua_offers_only_basic256sha256_sign_and_encrypt(opcua: Any) -> None:
    server, _, _ = opcua

    async def scenario() -> list[Any]:
        return await Client(server.endpoint, timeout=10).connect_and_get_server_endpoints()

    endpoints = asyncio.run(scenario())
    assert endpoints and {e.SecurityPolicyUri for e in endpoints} == {SecurityPolicyBasic256Sha256.URI}
    assert {e.SecurityMode for e in endpoints} == {ua.MessageSecurityMode.SignAndEncrypt}
    tokens = {t.TokenType for e in endpoints for t in e.UserIdentityTokens}
    assert ua.UserTokenType.Anonymous not in tokens and ua.UserTokenType.UserName in tokens


def test_opcua_bad_writes_are_refused_and_change_nothing(opcua: Any, credentials: dict[str, Path]) -> None:
    server, handshake, book = opcua

    async def scenario() -> None:
        client = await connect(server.endpoint, credentials)
        node = await nodes(client)
        # Malformed: wrong types on the command nodes, a write to a read-only node.
        assert not (await write_status(node("TriggerId"), ua.Variant("42", ua.VariantType.String))).is_good()
        assert not (await write_status(node("Trigger"), ua.Variant(1, ua.VariantType.Int32))).is_good()
        assert not (await write_status(node("ResultsValid"), ua.Variant(True, ua.VariantType.Boolean))).is_good()
        assert not (await write_status(node("OkCount"), ua.Variant(99, ua.VariantType.UInt32))).is_good()
        assert book.waiting == 0 and handshake.state().counters.ok == 0
        # Oversized: one write far past opcua_max_message_kb closes that channel, nothing else.
        with pytest.raises(Exception):  # noqa: B017 - the client sees a closed channel or a bad status
            status = await write_status(node("PartId"), ua.Variant("x" * 2_000_000, ua.VariantType.String))
            assert status.is_good()
        with contextlib.suppress(Exception):
            await client.disconnect()
        again = await connect(server.endpoint, credentials)
        node = await nodes(again)
        assert await node("PartId").read_value() == ""
        # The cycle still works: trigger with an id, busy refused with the reason, the result echoes the id.
        await node("TriggerId").write_value(ua.Variant(77, ua.VariantType.UInt32))
        assert (await write_status(node("Trigger"), ua.Variant(True, ua.VariantType.Boolean))).is_good()
        refused = await write_status(node("Trigger"), ua.Variant(True, ua.VariantType.Boolean))
        assert refused.value == ua.StatusCodes.BadInvalidState
        assert "busy" in await node("LastError").read_value()
        assert await node("TriggerErrors").read_value() == 1 and await node("Trigger").read_value() is False
        trigger = book.take(book._pending[0].time + 1)
        handshake.part_decided(trigger, decided("p77", anomalous=False, log_nfa=0.25))
        for _ in range(200):
            if await node("ResultsValid").read_value():
                break
            await asyncio.sleep(0.02)
        assert await node("ResultTriggerId").read_value() == 77 and await node("Pass").read_value() is True
        assert await node("PartId").read_value() == "p77"
        assert (await write_status(node("RecipeSelect"), ua.Variant(3, ua.VariantType.UInt16))).value == (
            ua.StatusCodes.BadOutOfRange
        )
        await again.disconnect()

    asyncio.run(scenario())


def test_opcua_one_session_per_user_the_newest_wins(opcua: Any, credentials: dict[str, Path]) -> None:
    server, _, _ = opcua

    async def scenario() -> None:
        first = await connect(server.endpoint, credentials)
        node = await nodes(first)
        assert await node("Online").read_value() is True
        second = await connect(server.endpoint, credentials)
        node2 = await nodes(second)
        assert await node2("Online").read_value() is True
        await asyncio.sleep(0.5)
        with pytest.raises(Exception):  # noqa: B017 - the older session is closed by the server
            await node("Online").read_value()
        await second.disconnect()
        with contextlib.suppress(Exception):
            await first.disconnect()

    asyncio.run(scenario())


def test_opcua_trusted_clients_only_when_configured(credentials: dict[str, Path], tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    handshake = PlcHandshake(TriggerBook(0.0, 1.0), 2)
    server = OpcUaServer(opcua_config(credentials, opcua_trusted_clients_dir=trusted), handshake, "cam1")
    server.start()
    try:
        with pytest.raises(Exception):  # noqa: B017 - BadCertificateUntrusted, or the channel closed
            asyncio.run(connect(server.endpoint, credentials))
    finally:
        server.stop()
    shutil.copy(credentials["client.der"], trusted / "client.der")
    server = OpcUaServer(opcua_config(credentials, opcua_trusted_clients_dir=trusted), handshake, "cam1")
    server.start()
    try:

        async def trusted_ok() -> None:
            client = await connect(server.endpoint, credentials)
            await client.disconnect()

        asyncio.run(trusted_ok())
    finally:
        server.stop()


def test_opcua_without_certificate_or_users_is_a_config_error_naming_the_command(
    credentials: dict[str, Path], tmp_path: Path
) -> None:
    from edge_agent.config_files import ConfigError

    handshake = PlcHandshake(TriggerBook(0.0, 1.0), 2)
    missing = opcua_config(credentials, opcua_cert=tmp_path / "none.der")
    with pytest.raises(ConfigError, match="edge-agent plc cert"):
        OpcUaServer(missing, handshake, "cam1").start()
    no_users = opcua_config(credentials, opcua_users_file=tmp_path / "users")
    with pytest.raises(ConfigError, match="edge-agent plc passwd"):
        OpcUaServer(no_users, handshake, "cam1").start()


def test_plain_opcua_is_refused_off_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        PlcConfig(opcua_enabled=True, opcua_security="none", opcua_host="192.168.10.5")
    assert PlcConfig(opcua_enabled=True, opcua_security="none", opcua_host="127.0.0.1")


def test_the_plc_command_makes_the_certificate_once_and_hashes_passwords(tmp_path: Path) -> None:
    import stat

    from plc_helpers import plc_cli

    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    assert plc_cli(config, "cert", "--host", "10.0.0.5").returncode == 0
    cert, key = tmp_path / "state" / "plc" / "server-cert.der", tmp_path / "state" / "plc" / "server-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and cert.stat().st_size > 0
    first = cert.read_bytes()
    again = plc_cli(config, "cert")
    assert again.returncode != 0 and "--force" in again.stderr and cert.read_bytes() == first
    assert plc_cli(config, "cert", "--force").returncode == 0 and cert.read_bytes() != first
    from cryptography import x509

    names = x509.load_der_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert application_uri(load_settings(config).device_id) in names.value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert plc_cli(config, "passwd", "--user", "plc1", stdin="pw-one\n").returncode == 0
    assert plc_cli(config, "passwd", "--user", "bad/name", stdin="x\n").returncode != 0
    assert plc_cli(config, "passwd", "--user", "plc2", stdin="\n").returncode != 0  # empty password
    users = (tmp_path / "state" / "plc" / "users").read_text()
    assert users.startswith("plc1:scrypt$") and "pw-one" not in users
    assert stat.S_IMODE((tmp_path / "state" / "plc" / "users").stat().st_mode) == 0o600
