"""Reject relay configuration: a TOML file plus EDGE_AGENT_RELAY_* environment variables (which win).

Nested keys use ``__`` in the environment: ``EDGE_AGENT_RELAY_MQTT__HOST=broker``,
``EDGE_AGENT_RELAY_DEVICES__CAM1__DELAY_S=1.4`` (environment names are case-insensitive, so a device id
set this way is lower case). Unknown keys, in the file or the environment, are an error naming the key.
The example with every key explained is ``systemd/reject-relay.toml``.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from edge_agent.config import TlsConfig
from edge_agent.config_files import FileAndEnvSettings, build_settings

ENV_PREFIX = "EDGE_AGENT_RELAY_"
DEFAULT_STATE_DIR = Path("/var/lib/edge-reject-relay")
DEFAULT_TOLERANCE_S = 0.05

# What a command, URL path or MQTT topic may contain as {placeholder}; values come from the message and the plan.
FIRE_FIELDS = (
    "message_id",
    "device_id",
    "sequence",
    "capture_time",
    "image_score",
    "regions",
    "planned_time",
    "fired_time",
    "lateness_ms",
    "relay_id",
    "part_id",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RelayMqttConfig(_Section):
    """The relay's broker connection: a persistent session so nothing queued is lost across restarts."""

    host: str = Field(default="127.0.0.1", description="broker host name or address")
    port: int = Field(default=1883, gt=0, lt=65536, description="broker port (8883 is the usual TLS port)")
    prefix: str = Field(default="uflow", description="the relay publishes <prefix>/relay/<relay_id>/status|stats")
    topics: list[str] = Field(
        default_factory=lambda: ["uflow/+/inspection"],
        min_length=1,
        description="inspection topics to subscribe (QoS 1); MQTT wildcards allowed",
    )
    client_id: str | None = Field(default=None, description="default edge-reject-relay-<relay_id>; must be stable")
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT version (both keep a persistent session; 5 also sets its expiry)"
    )
    session_expiry_s: int = Field(
        default=3600, gt=0, description="the broker keeps the session (and queues messages) this long while away"
    )
    keepalive_s: int = Field(
        default=30, gt=0, description="MQTT keep-alive (s): the broker drops a silent client after 1.5x this"
    )
    username: str | None = Field(default=None, description="broker user name; unset: no authentication")
    password: SecretStr | None = Field(default=None, description="never printed")
    tls: TlsConfig | None = None
    stats_interval_s: float = Field(default=10.0, gt=0, description="seconds between the relay's stats messages")
    reconnect_initial_s: int = Field(default=1, gt=0, description="first wait before reconnecting; doubles")
    reconnect_max_s: int = Field(default=30, gt=0, description="longest wait between reconnect attempts")

    @model_validator(mode="after")
    def _topics_are_filters(self) -> RelayMqttConfig:
        for topic in self.topics:
            if not topic or "#" in topic[:-1] or any(("+" in part and part != "+") for part in topic.split("/")):
                raise ValueError(f"topics: {topic!r} is not a valid MQTT topic filter")
        return self


class TravelConfig(_Section):
    """When a part seen by one camera reaches the actuator. Unset fields inherit from ``[timing]``."""

    delay_s: float | None = Field(default=None, ge=0, description="capture -> actuator travel time")
    distance_m: float | None = Field(default=None, gt=0, description="camera -> actuator distance along the belt")
    speed_m_s: float | None = Field(default=None, gt=0, description="conveyor speed")
    tolerance_s: float | None = Field(
        default=None, ge=0, description="firing later than planned by more than this is a missed reject"
    )
    clock_offset_s: float | None = Field(
        default=None, description="relay clock minus this camera's clock (fixed mode; fallback in estimate mode)"
    )
    decision_distance_m: float | None = Field(
        default=None,
        gt=0,
        description="part messages: distance along the belt from the camera's decision line to the actuator "
        "(fire when the belt has moved this far, less how far the part already was past the line)",
    )

    @model_validator(mode="after")
    def _one_way_to_say_travel(self) -> TravelConfig:
        if self.delay_s is not None and (self.distance_m is not None or self.speed_m_s is not None):
            raise ValueError("set either delay_s or distance_m with speed_m_s, not both")
        return self


@dataclass(frozen=True)
class DeviceTiming:
    """The resolved timing of one camera."""

    travel_s: float
    tolerance_s: float
    clock_offset_s: float
    how: str  # "delay_s=1.2" or "0.9 m / 0.6 m/s", for logs and --check


class ActuatorConfig(_Section):
    """What firing means: run a command, call a URL, or publish to a PLC gateway topic."""

    kind: Literal["command", "http", "mqtt"] = Field(
        description="command: run argv; http: POST the message fields to url; mqtt: publish to topic"
    )
    command: list[str] | None = Field(
        default=None, description='argv, no shell; {placeholders} substituted, e.g. ["gpioset", "gpiochip0", "17=1"]'
    )
    url: str | None = Field(default=None, description="http(s) URL; the message fields are POSTed as JSON")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers")
    topic: str | None = Field(default=None, description="MQTT topic on the relay's broker, e.g. plc/line3/reject")
    timeout_s: float = Field(default=1.0, gt=0, description="one attempt may take this long")
    retries: int = Field(default=1, ge=0, description="more attempts after a failure, only before the deadline")
    retry_delay_s: float = Field(default=0.01, ge=0, description="wait between attempts")

    @model_validator(mode="after")
    def _target_matches_kind(self) -> ActuatorConfig:
        needed = {"command": "command", "http": "url", "mqtt": "topic"}[self.kind]
        if getattr(self, needed) in (None, []):
            raise ValueError(f"kind = {self.kind!r} needs {needed!r}")
        for name in ("command", "url", "topic"):
            if name != needed and getattr(self, name) is not None:
                raise ValueError(f"{name!r} does not apply to kind = {self.kind!r}")
        if self.kind == "http" and not str(self.url).startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https:// (got {self.url!r})")
        if self.kind == "mqtt":
            for char in "+#":
                if char in (self.topic or ""):
                    raise ValueError(f"topic {self.topic!r}: an MQTT wildcard ({char}) cannot be published to")
        for template in self.templates():
            unknown = placeholders(template) - set(FIRE_FIELDS)
            if unknown:
                raise ValueError(
                    f"unknown placeholder(s) {sorted(unknown)} in {template!r} (known: {list(FIRE_FIELDS)})"
                )
        return self

    def templates(self) -> list[str]:
        """Every string that gets {placeholders} substituted."""
        if self.kind == "command":
            return list(self.command or [])
        return [self.topic or ""] if self.kind == "mqtt" else []


class DeviceConfig(TravelConfig):
    """One camera: its travel time and, optionally, its own actuator."""

    actuator: ActuatorConfig | None = None


class ClockConfig(_Section):
    """How capture times (the camera's clock) are mapped onto the relay's clock; docs/reject_relay.md."""

    mode: Literal["estimate", "fixed"] = Field(
        default="estimate",
        description="estimate: measure each camera's offset from arrival times; fixed: use clock_offset_s only",
    )
    window: int = Field(default=64, ge=4, description="recent samples per camera the estimate looks at")
    confirm_samples: int = Field(default=5, ge=1, description="samples that must agree before an estimate is used")
    confirm_spread_s: float = Field(default=0.05, gt=0, description="how close those samples must be to the floor")
    max_age_s: float = Field(default=600.0, gt=0, description="older samples are forgotten (clocks drift)")
    keep_s: float = Field(
        default=3600.0, ge=0, description="after a restart, the last estimate is used for this long until re-confirmed"
    )
    warn_offset_s: float = Field(default=0.1, gt=0, description="warn when the estimate differs more from the config")
    max_sample_offset_s: float = Field(
        default=5.0,
        gt=0,
        allow_inf_nan=False,
        description="a clock sample further than this from the configured clock_offset_s is refused and counted "
        "(a forged or broken message must not move the estimate; set clock_offset_s for a known large skew)",
    )


class BeltConfig(_Section):
    """The belt speed for part messages: configured ([timing] speed_m_s) or live from the PLC."""

    speed_topic: str | None = Field(
        default=None,
        description='MQTT topic with the live belt speed, JSON {"speed_m_s": 0.42}; pending part rejects are '
        "re-planned at every change (a stopped belt holds them)",
    )
    max_speed_m_s: float = Field(
        default=20.0,
        gt=0,
        allow_inf_nan=False,
        description="the belt never runs faster: speed messages above it are refused as malformed, and so is an "
        "encoder reading that would mean a faster belt since the last one (set it to the line's real maximum)",
    )
    max_hold_s: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="a part reject held by a stopped belt (speed 0) this long is counted missed, never fired: parts "
        "on a stopped line are moved by hand, and a wrong 0 must not hold rejects forever",
    )
    encoder_reset_readings: int = Field(
        default=5,
        ge=2,
        description="this many encoder readings in a row that agree with each other but not with the last accepted "
        "count are a counter reset (a PLC restart): followed from there, the position kept continuous",
    )
    encoder_topic: str | None = Field(
        default=None,
        description='MQTT topic with the belt encoder\'s count, JSON {"count": 123456}: part rejects fire when the belt '
        "has moved the distance by the encoder, not by time x speed (wins over speed_topic and speed_m_s)",
    )
    counts_per_m: float | None = Field(default=None, gt=0, description="encoder counts per metre of belt")

    @model_validator(mode="after")
    def _encoder_needs_scale(self) -> BeltConfig:
        if self.encoder_topic is not None and self.counts_per_m is None:
            raise ValueError("encoder_topic needs counts_per_m")
        return self


class LimitsConfig(_Section):
    """What one sender may cost the relay (edge_agent/relay/limits.py): floods are dropped unparsed and counted."""

    messages_per_s: float = Field(
        default=200.0,
        gt=0,
        allow_inf_nan=False,
        description="messages a second per camera (inspection and part messages together) and per belt topic; "
        "beyond it (after a burst) they are dropped before parsing and counted rate_limited",
    )
    burst: int = Field(default=400, ge=1, description="messages a camera or belt topic may send at once")
    log_interval_s: float = Field(
        default=10.0,
        gt=0,
        allow_inf_nan=False,
        description="a warning about refused input (malformed, unknown camera, rate limited) is logged at most this "
        "often per sender, with how many were not logged meanwhile (every one is counted)",
    )


@dataclass(frozen=True)
class PartTiming:
    """The resolved timing of one camera's part messages."""

    distance_m: float  # decision line -> actuator
    speed_m_s: float | None  # configured; None: only the live speed topic
    tolerance_s: float
    clock_offset_s: float


class RelaySettings(FileAndEnvSettings):
    """Everything the reject relay reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    relay_id: str = Field(
        default_factory=lambda: os.uname().nodename,
        json_schema_extra={"doc_default": "the host name"},
        description="this relay in MQTT topics (<prefix>/relay/<relay_id>/) and its default client id",
    )
    state_dir: Path = Field(default=DEFAULT_STATE_DIR, description="the decisions journal lives here")
    journal: Path | None = Field(default=None, description="SQLite decisions journal; default <state_dir>/relay.sqlite")
    retention_h: float = Field(default=24.0, gt=0, description="message ids are remembered this long")
    stop_drain_s: float = Field(default=5.0, ge=0, description="on SIGTERM, still fire rejects due this soon")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="least severe logged")
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line with an event field (journald); text: for people"
    )
    log_good_decisions: bool = Field(
        default=True, description="one line per good frame too; off on busy lines (they are still counted)"
    )

    cameras: list[str] = Field(
        default_factory=list,
        description="the cameras (device ids) this relay acts for, besides those under [devices]; a message from any "
        "other device id is counted (unknown_devices) and never fired: a credential that may publish as some device "
        "must not make this relay fire. The relay does not start without one",
    )
    mqtt: RelayMqttConfig = Field(default_factory=RelayMqttConfig)
    clock: ClockConfig = Field(default_factory=ClockConfig)
    timing: TravelConfig = Field(default_factory=TravelConfig, description="defaults for every camera")
    devices: dict[str, DeviceConfig] = Field(default_factory=dict)
    actuator: ActuatorConfig | None = None
    belt: BeltConfig = Field(default_factory=BeltConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    max_devices: int = Field(
        default=256,
        gt=0,
        description="cameras the relay keeps counters and clock estimates for; messages from further cameras (listed, "
        "but beyond this many) are refused as malformed (bounded memory)",
    )

    @model_validator(mode="after")
    def _every_device_can_fire(self) -> RelaySettings:
        if self.journal is None:
            self.journal = self.state_dir / "relay.sqlite"
        from edge_agent.messages import is_valid_id

        for name in (self.relay_id, *self.devices, *self.cameras):
            if not is_valid_id(name):
                raise ValueError(
                    f"id {name[:64]!r} must match [A-Za-z0-9._-]{{1,64}} and start with a letter or digit "
                    "(it is used in MQTT topics and actuator arguments)"
                )
        for device_id, device in self.devices.items():
            parts = device.decision_distance_m is not None or self.timing.decision_distance_m is not None
            if resolve_travel(device, self.timing, f"devices.{device_id}") is None and not parts:
                raise ValueError(
                    f"devices.{device_id}: no travel time (set delay_s, or distance_m and speed_m_s, here or in [timing])"
                )
            if device.actuator is None and self.actuator is None:
                raise ValueError(f"devices.{device_id}: no actuator (add [actuator] or [devices.{device_id}.actuator])")
        if self.actuator is None and not self.devices:
            raise ValueError("no actuator: add an [actuator] section")
        return self

    def knows(self, device_id: str) -> bool:
        """True for a camera this relay acts for: listed in ``cameras`` or under [devices]."""
        return device_id in self.devices or device_id in self.cameras

    @property
    def known_devices(self) -> list[str]:
        """Every camera this relay acts for."""
        return sorted({*self.devices, *self.cameras})

    @property
    def client_id(self) -> str:
        """The MQTT client id; the broker keeps the persistent session under it."""
        return self.mqtt.client_id or f"edge-reject-relay-{self.relay_id}"

    def timing_for(self, device_id: str) -> DeviceTiming | None:
        """The timing of a camera: its [devices.<id>] section over [timing]; None when nothing says."""
        device = self.devices.get(device_id)
        travel = resolve_travel(device, self.timing, f"devices.{device_id}")
        if travel is None:
            return None
        travel_s, how = travel

        def pick(name: str, default: float) -> float:
            own = getattr(device, name) if device is not None else None
            value = own if own is not None else getattr(self.timing, name)
            return default if value is None else float(value)

        return DeviceTiming(travel_s, pick("tolerance_s", DEFAULT_TOLERANCE_S), pick("clock_offset_s", 0.0), how)

    def part_timing_for(self, device_id: str) -> PartTiming | None:
        """A camera's part timing ([devices.<id>] over [timing]); None without a decision distance."""
        device = self.devices.get(device_id)

        def pick(name: str) -> float | None:
            own: float | None = getattr(device, name) if device is not None else None
            fallback: float | None = getattr(self.timing, name)
            return own if own is not None else fallback

        distance = pick("decision_distance_m")
        if distance is None:
            return None
        tolerance, offset = pick("tolerance_s"), pick("clock_offset_s")
        return PartTiming(
            distance_m=float(distance),
            speed_m_s=pick("speed_m_s"),
            tolerance_s=DEFAULT_TOLERANCE_S if tolerance is None else float(tolerance),
            clock_offset_s=0.0 if offset is None else float(offset),
        )

    def actuator_for(self, device_id: str) -> ActuatorConfig | None:
        """The device's own actuator, else the default one."""
        device = self.devices.get(device_id)
        return device.actuator if device is not None and device.actuator is not None else self.actuator


def resolve_travel(device: TravelConfig | None, default: TravelConfig, where: str) -> tuple[float, str] | None:
    """(seconds from capture to actuator, how it was set), or None when neither section says.

    A device's delay_s wins; a device's distance_m and/or speed_m_s combine with [timing]'s (one belt
    speed for a line, a distance per camera); a device that says nothing uses [timing]. A half-given
    distance/speed pair is a ValueError naming ``where``.
    """
    if device is not None and device.delay_s is not None:
        return device.delay_s, f"delay_s={device.delay_s:g}"
    if device is not None and (device.distance_m is not None or device.speed_m_s is not None):
        distance = device.distance_m if device.distance_m is not None else default.distance_m
        speed = device.speed_m_s if device.speed_m_s is not None else default.speed_m_s
    elif default.delay_s is not None:
        return default.delay_s, f"delay_s={default.delay_s:g}"
    else:
        # [timing] may hold only the belt speed (distances per camera): then it alone says nothing.
        distance, speed = default.distance_m, default.speed_m_s
        if distance is None or speed is None:
            return None
    if distance is None and device is not None and device.decision_distance_m is not None:
        return None  # a parts camera: its speed goes with the decision distance, not a travel time
    if distance is None or speed is None:
        missing = "distance_m" if distance is None else "speed_m_s"
        raise ValueError(f"{where}: {missing} is missing (distance_m and speed_m_s go together)")
    return distance / speed, f"{distance:g} m / {speed:g} m/s"


def placeholders(template: str) -> set[str]:
    """The {names} used in a format string (a malformed one is a ValueError naming the problem)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"{template!r}: {exc} (write {{{{ and }}}} for literal braces)") from exc
    # "{}" (positional) and "{a.b}" / "{a[0]}" (attribute, index) are not allowed: report them as written.
    return {name if name and name.isidentifier() else "{" + name + "}" for name in names}


def load_relay_settings(path: Path | str | None = None, **overrides: Any) -> RelaySettings:
    """Settings from an optional TOML file, EDGE_AGENT_RELAY_* variables and explicit overrides (highest)."""
    return build_settings(RelaySettings, path, overrides)
