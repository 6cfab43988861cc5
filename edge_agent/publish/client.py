"""The one place a paho-mqtt client is made: the agent's publisher, the updater and the reject relay.

Every client gets the same checks and settings: TLS files are checked before paho sees them (a missing
CA file is a ``ConfigError`` naming the key, not an SSL traceback at the first connect), the broker's
certificate is always verified, credentials come from the config (the password only leaves its
``SecretStr`` here), Nagle is off (a reject order must not wait ~40 ms for a TCP ACK), and a failed
connect is described in words a plant engineer can act on (``describe_connect_error``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import SecretStr

from edge_agent.config import ConfigError

PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


class TlsSettings(Protocol):
    """What the factory reads of a ``[mqtt.tls]`` section."""

    # Read-only properties: a protocol's plain attributes are invariant, and a pydantic section's
    # nested model (TlsConfig) must match as a subtype.
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def cert_file(self) -> Path | None: ...
    @property
    def key_file(self) -> Path | None: ...
    @property
    def insecure(self) -> bool: ...


class BrokerSettings(Protocol):
    """What the factory reads of an ``[mqtt]`` section (the agent's, the updater's or the relay's)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> SecretStr | None: ...
    @property
    def tls(self) -> TlsSettings | None: ...
    @property
    def reconnect_initial_s(self) -> int: ...
    @property
    def reconnect_max_s(self) -> int: ...


def check_tls_files(config: BrokerSettings) -> None:
    """Raise ConfigError naming every TLS file that is configured but missing or unreadable."""
    tls = config.tls
    if tls is None:
        return
    if tls.key_file is not None and tls.cert_file is None:
        raise ConfigError("mqtt.tls.key_file is set but mqtt.tls.cert_file is not (the client certificate)")
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name)
        if path is None:
            continue
        if not path.is_file():
            raise ConfigError(f"mqtt.tls.{name} {path} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"mqtt.tls.{name} {path} is not readable by this user (uid {os.getuid()})")


def describe_connect_error(exc: BaseException, config: BrokerSettings) -> str:
    """What a failed connect means, in words a plant engineer can act on."""
    where = f"{config.host}:{config.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the certificate of {where} was rejected ({exc.verify_message}); check mqtt.tls.ca_file and "
            "that mqtt.host is a name or address in the broker's certificate"
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS handshake with {where} failed ({exc.reason or exc}): is it a TLS listener, and does the "
            "broker require a client certificate (mqtt.tls.cert_file/key_file)?"
        )
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {where} refused: no broker listens there"
    if config.tls is not None and isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        # A broker that wants a client certificate may just drop the handshake, without an alert.
        return (
            f"TLS connection to {where} closed during the handshake ({exc}): does the broker require a client "
            "certificate (mqtt.tls.cert_file/key_file)?"
        )
    return f"{where}: {exc}"


def reason_code(reason: object) -> int:
    """The numeric MQTT reason code of a paho callback's ``reason`` (a ReasonCode, or an int under 3.1.1)."""
    value = getattr(reason, "value", reason)
    return value if isinstance(value, int) else -1


def new_client(
    config: BrokerSettings,
    client_id: str,
    protocol: MQTTProtocolVersion,
    *,
    will_topic: str | None = None,
    paho_reconnects: bool = True,
    persistent_session: bool = False,
    manual_ack: bool = False,
) -> paho.Client:
    """A paho 2.x client (callback API 2) set up from ``config``; callbacks are the caller's to attach.

    ``will_topic`` gets a retained ``offline`` Will. ``paho_reconnects`` lets paho's loop reconnect with
    the config's backoff (the agent's publisher reconnects itself, with a fresh client per session).
    ``persistent_session`` keeps the broker-side session under MQTT 3.1.1 (MQTT 5 asks for it at connect).
    """
    check_tls_files(config)
    kwargs: dict[str, Any] = {}
    if persistent_session and protocol == MQTTProtocolVersion.MQTTv311:
        kwargs["clean_session"] = False
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        reconnect_on_failure=paho_reconnects,
        manual_ack=manual_ack,
        **kwargs,
    )
    if will_topic is not None:
        client.will_set(will_topic, "offline", qos=1, retain=True)
    if paho_reconnects:
        client.reconnect_delay_set(config.reconnect_initial_s, config.reconnect_max_s)
    if config.username:
        client.username_pw_set(config.username, config.password.get_secret_value() if config.password else None)
    if config.tls is not None:
        tls = config.tls
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(tls.insecure)
    client.on_socket_open = _no_delay
    return client


def _no_delay(client: paho.Client, userdata: object, sock: Any) -> None:
    """Disable Nagle: a PUBACK still waiting for its TCP ACK must not hold back a reject order for ~40 ms."""
    # A socket wrapper without the option (websockets) is slower, still correct.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
