"""The ``[plc]`` section: the OPC UA and Modbus TCP servers a line's controller talks to (docs/plc.md).

Both are off by default. A module of its own beside edge_agent/config.py (which imports it; that file is
long enough) on the config's floor (docs/design.md section 8): it imports nothing from the project.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class PlcConfig(BaseModel):
    """A PLC's native interfaces: OPC UA (secure) and Modbus TCP (no security; bind it to the PLC network only)."""

    model_config = ConfigDict(extra="forbid")

    results_queue: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="results waiting for the PLC's ResultsAck; beyond this the oldest waiting one is dropped and "
        "counted (ResultsOverflow): a PLC that never acks never blocks inspection",
    )
    opcua_enabled: bool = Field(default=False, description="serve the OPC UA address space of docs/plc.md")
    opcua_host: str = Field(
        default="127.0.0.1", description="address the OPC UA server binds to (the PLC network's interface)"
    )
    opcua_port: int = Field(default=4840, ge=1, le=65535, description="OPC UA TCP port (4840 is the standard one)")
    opcua_security: Literal["sign_encrypt", "none"] = Field(
        default="sign_encrypt",
        description="sign_encrypt: only Basic256Sha256 Sign&Encrypt endpoints (needs opcua_cert/opcua_key, "
        "`edge-agent plc cert`); none: plain endpoints, refused unless opcua_host is loopback (a bench)",
    )
    opcua_cert: Path | None = Field(
        default=None, description="server certificate (DER); default <state_dir>/plc/server-cert.der"
    )
    opcua_key: Path | None = Field(
        default=None, description="server private key (PEM, 0600); default <state_dir>/plc/server-key.pem"
    )
    opcua_users_file: Path | None = Field(
        default=None,
        description="user names and scrypt password hashes (`edge-agent plc passwd`); default <state_dir>/plc/users",
    )
    opcua_anonymous: bool = Field(
        default=False, description="allow sessions without a user name (anyone who reaches the port can trigger)"
    )
    opcua_trusted_clients_dir: Path | None = Field(
        default=None,
        description="when set, only client certificates (DER) in this folder may open a secure channel; unset: any "
        "client certificate, the user name and password authenticate",
    )
    opcua_max_sessions: int = Field(
        default=4, ge=1, le=64, description="sessions at once, all users together (one per PLC and user)"
    )
    opcua_max_message_kb: int = Field(
        default=256, ge=16, le=16384, description="largest OPC UA message accepted; a larger one closes the channel"
    )
    modbus_enabled: bool = Field(default=False, description="serve the Modbus TCP map of docs/plc.md (no security)")
    modbus_host: str = Field(
        default="127.0.0.1",
        description="address the Modbus server binds to: one interface (0.0.0.0 or :: refused unless "
        "modbus_allow_all_interfaces)",
    )
    modbus_port: int = Field(
        default=5020, ge=1, le=65535, description="Modbus TCP port (502 needs CAP_NET_BIND_SERVICE; docs/plc.md)"
    )
    modbus_unit_id: int = Field(default=1, ge=1, le=247, description="the unit (slave) id the server answers")
    modbus_allow_all_interfaces: bool = Field(
        default=False, description="force binding Modbus to every interface (it has no authentication at all)"
    )

    @field_validator("opcua_host", "modbus_host")
    @classmethod
    def _host_is_an_address_or_name(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or len(value) > 253:
            raise ValueError(f"not a host address: {value!r}")
        return value

    @model_validator(mode="after")
    def _modbus_binds_one_interface(self) -> PlcConfig:
        if self.modbus_enabled and not self.modbus_allow_all_interfaces and _is_wildcard(self.modbus_host):
            raise ValueError(
                f"plc.modbus_host = {self.modbus_host!r} binds Modbus (no authentication) to every interface; "
                "name the PLC network's address, or set plc.modbus_allow_all_interfaces = true"
            )
        return self

    @model_validator(mode="after")
    def _plain_opcua_on_loopback_only(self) -> PlcConfig:
        if self.opcua_enabled and self.opcua_security == "none" and not _is_loopback(self.opcua_host):
            raise ValueError(
                f"plc.opcua_security = none sends passwords and results in clear text: only on loopback, not on "
                f"{self.opcua_host!r} (use sign_encrypt)"
            )
        return self

    def fill_paths(self, state_dir: Path) -> None:
        """Default file locations under ``<state_dir>/plc``."""
        folder = state_dir / "plc"
        if self.opcua_cert is None:
            self.opcua_cert = folder / "server-cert.der"
        if self.opcua_key is None:
            self.opcua_key = folder / "server-key.pem"
        if self.opcua_users_file is None:
            self.opcua_users_file = folder / "users"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
