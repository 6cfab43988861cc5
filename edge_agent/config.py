"""Agent configuration: a TOML file plus EDGE_AGENT_* environment variables (which win).

Nested keys use ``__`` in the environment: ``EDGE_AGENT_MQTT__HOST=broker``. Unknown keys, in the file
or the environment, are an error that names the key: a typo must not silently fall back to a default
(the reading itself is ``edge_agent.config_files``, shared with the relay's settings).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from edge_agent.config_files import ConfigError as ConfigError  # re-exported: every caller's error type
from edge_agent.config_files import FileAndEnvSettings, build_settings
from edge_agent.config_plc import PlcConfig
from edge_agent.config_recipes import MAX_RECIPES, RecipeConfig

ENV_PREFIX = "EDGE_AGENT_"
# Programs whose variables share the agent's prefix (the reject relay: edge_agent/relay/config.py).
OTHER_ENV_PREFIXES = ("EDGE_AGENT_RELAY_",)
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


# A device, relay or message id: safe in topics, file names and argv. It starts with a letter or digit (no "-" for
# option injection, no "." or ".." for paths); Python code matches it with fullmatch (``$`` alone would let a
# trailing newline through: messages.is_valid_id).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """Which bundle to run and on what."""

    bundle: Path | None = Field(default=None, description="bundle directory; default <state_dir>/models/current")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        default="auto",
        description="auto: TensorRT where its Python package imports and a GPU opens, else ONNX Runtime on the CPU; "
        "tensorrt: an error when it cannot run (docs/tensorrt.md)",
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(
        default="fp32",
        description="which model of the bundle runs: fp32 is model.onnx, fp16/int8 the variant the bundle lists "
        "(uflow calibrate; docs/precision.md)",
    )
    threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads; 0 = chosen for this machine's cores and the source "
        "(edge-agent doctor says what and why; docs/agent.md, Threads)",
    )
    spinning: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="ONNX Runtime threads spin while waiting for work (session.intra_op/inter_op.allow_spinning); "
        "auto: chosen with threads (off where other stages share the cores)",
    )
    engine_cache_dir: Path | None = Field(default=None, description="TensorRT plans; default <state_dir>/engines")
    tensorrt_workspace_mb: int = Field(default=1024, ge=64, description="TensorRT builder workspace (build-engine)")
    shadow: Path | None = Field(
        default=None,
        description="a candidate bundle judged next to the live one on a share of frames, with spare time only; "
        "agreement in stats and /metrics (docs/operations.md)",
    )
    shadow_share: float = Field(
        default=0.1, gt=0, le=1, description="share of live frames offered to the shadow model (skipped when busy)"
    )


class SourceConfig(_Section):
    """Where frames come from."""

    uri: str = Field(
        default="0",
        description="camera index, video file, image folder, rtsp/http URL, or GStreamer pipeline",
    )
    kind: Literal["auto", "camera", "file", "folder", "stream", "gstreamer"] = Field(
        default="auto",
        description="auto: from the uri (a number or /dev/videoN: camera; '!': GStreamer; rtsp/http/...: stream; "
        "a directory: folder; else file)",
    )
    loop: bool = Field(default=False, description="restart a file or folder at its end")
    drop_policy: Literal["auto", "latest", "every"] = Field(
        default="auto",
        description="auto: latest frame wins for live sources, every frame for files and folders",
    )
    fps_limit: float = Field(default=0.0, ge=0.0, description="0 = as fast as the source delivers")
    roi: tuple[int, int, int, int] | None = Field(default=None, description="x, y, w, h crop in source pixels")
    rotate: Literal[0, 90, 180, 270] = Field(
        default=0, description="turn every frame clockwise by this many degrees, before roi"
    )
    width: int | None = Field(default=None, gt=0, description="requested capture width (cameras)")
    height: int | None = Field(default=None, gt=0, description="requested capture height (cameras)")
    open_timeout_s: float = Field(default=10.0, gt=0, description="opening the camera/stream/file must finish within")
    read_timeout_s: float = Field(default=5.0, gt=0, description="one read must return within (else: reopen)")
    stall_timeout_s: float = Field(
        default=20.0, gt=0, description="watchdog: no frame for this long -> reopen (files: error)"
    )
    reconnect_initial_s: float = Field(default=0.5, gt=0, description="first wait before reopening a lost source")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="longest wait between reopen attempts (doubling)")


class NfaConfig(_Section):
    """The a-contrario decision; unset values come from the bundle."""

    log10_epsilon: float | None = Field(default=None, description="anomalous when a region has log10 NFA below this")
    min_region_area: int | None = Field(default=None, ge=0, description="ignore smaller regions (source pixels)")
    null_model: Literal["bundle", "polyomino", "fitted"] = Field(
        default="bundle",
        description="the NFA's null model: the bundle's choice, the paper's exact polyomino NFA, or the null "
        "fitted on good validation latents (needs a bundle that ships one; docs/nfa.md)",
    )
    mask_fraction: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="tighten each detected region to where the anomaly map reaches this fraction of its peak "
        "(0: the NFA's regions as they are; unset: the bundle's, 0 under the paper's polyomino NFA)",
    )
    command_band: float = Field(
        default=2.0,
        ge=0,
        allow_inf_nan=False,
        description="cmd/threshold may set log10_epsilon only within this many decades of the bundle's value "
        "(a broker client must not be able to silence or flood rejects)",
    )
    command_max_region_area: int = Field(
        default=10_000, ge=0, description="cmd/threshold may set min_region_area at most this (source pixels)"
    )


class TlsConfig(_Section):
    """TLS to the broker: the section's presence turns it on (the broker's certificate chain is always verified)."""

    ca_file: Path | None = Field(
        default=None, description="CA certificate(s) that signed the broker's certificate; default the system's CAs"
    )
    cert_file: Path | None = Field(default=None, description="client certificate (PEM), for a broker that requires one")
    key_file: Path | None = Field(
        default=None, description="the client certificate's private key; default: in cert_file"
    )
    insecure: bool = Field(default=False, description="skip hostname verification (test rigs only)")


class MqttConfig(_Section):
    """Broker connection and publishing policy."""

    host: str = Field(default="127.0.0.1", description="broker host name or address")
    port: int = Field(default=1883, gt=0, lt=65536, description="broker port (8883 is the usual TLS port)")
    prefix: str = Field(default="uflow", description="topics are <prefix>/<device_id>/<leaf>")
    client_id: str | None = Field(default=None, description="default edge-agent-<device_id>; unique per broker")
    protocol: Literal["5", "3.1.1", "auto"] = Field(
        default="auto", description="MQTT version; auto: 5, falling back to 3.1.1 when the broker refuses 5"
    )
    keepalive_s: int = Field(
        default=30, gt=0, description="MQTT keep-alive (s): the broker drops a silent client after 1.5x this"
    )
    username: str | None = Field(default=None, description="broker user name; unset: no authentication")
    password: SecretStr | None = Field(default=None, description="never printed (config --show shows **********)")
    updater_username: str | None = Field(
        default=None,
        description="user name of `edge-agent update`'s own connection (same password); default "
        "<username>-updater. The shipped broker config binds a client id to its user name, so the agent and its "
        "updater, connected at once, need two",
    )
    tls: TlsConfig | None = None
    publish: Literal["all", "anomalous", "none"] = Field(
        default="all",
        description="which frames get an inspection message: every one, only anomalous ones, or none (with [parts] "
        "mode on, the part messages carry the verdicts)",
    )
    message_expiry_s: int = Field(default=30, ge=0, description="MQTT 5 expiry of inspection messages; 0 = never")
    stats_interval_s: float = Field(
        default=10.0, gt=0, description="seconds between stats messages (and one at once on a source state change)"
    )
    reconnect_initial_s: int = Field(default=1, gt=0, description="first wait before reconnecting; doubles")
    reconnect_max_s: int = Field(default=30, gt=0, description="longest wait between reconnect attempts")
    drain_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="on a clean stop, wait this long for the broker to acknowledge the queued messages; "
        "then the final status (published last) gets what is left, at least 2 s (or this, if shorter)",
    )


class SpoolConfig(_Section):
    """Store-and-forward of QoS 1 messages until the broker acknowledges them."""

    path: Path | None = Field(default=None, description="SQLite file; default <state_dir>/spool.sqlite")
    max_messages: int = Field(default=100_000, gt=0, description="beyond this the oldest are dropped and counted")
    commit_interval_s: float = Field(
        default=0.05, gt=0, le=5.0, description="batch writes; a SIGKILL or power cut loses at most this window"
    )
    synchronous: Literal["normal", "full"] = Field(
        default="normal", description="full: fsync every commit (survives power loss, costs flash writes)"
    )


class HttpConfig(_Section):
    """/metrics, /healthz and the optional live preview."""

    enabled: bool = Field(default=True, description="serve /metrics and /healthz (and /preview when enabled)")
    host: str = Field(default="127.0.0.1", description="address to listen on; 0.0.0.0 exposes it to the network")
    port: int = Field(default=9108, ge=0, lt=65536, description="TCP port; 0 = any free port (logged at start)")
    preview: bool = Field(
        default=False,
        description="live preview page at /preview (frame, anomaly map, NFA regions); keep host on 127.0.0.1 "
        "and reach it with ssh -L",
    )
    review: bool = Field(
        default=False,
        description="review page at /review: kept frames with overlays, 'mark as good' / 'confirmed defect' "
        "([keep]); keep host on 127.0.0.1",
    )
    preview_max_fps: float = Field(
        default=1.0, gt=0, le=30, description="the preview draws and encodes at most this many frames a second"
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="host names (besides IP literals and localhost) that requests may name in Host, and POSTs "
        "in Origin; any other is refused, so a page whose name is rebound to this box (DNS rebinding) cannot "
        "use it. Add the box's DNS name when browsers or Prometheus reach it by name",
    )
    request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="a whole request (or the idle wait for the next one) must arrive within this, however slowly "
        "it drips",
    )
    max_connections_per_address: int = Field(
        default=8, ge=1, le=32, description="connections served at once from one client address (32 in all)"
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, names: list[str]) -> list[str]:
        for name in names:
            # A bare name: "box.example", not a URL or host:port (the port is not compared).
            if not name or not all(c.isalnum() or c in ".-" for c in name) or name.startswith(("-", ".")):
                raise ValueError("allowed_hosts: host names only (letters, digits, '.', '-'), no scheme or port")
        return names


class UpdateConfig(_Section):
    """Fleet updates."""

    source: str | None = Field(default=None, description="https URL or directory holding latest.json")
    public_key: Path | None = Field(default=None, description="fleet ed25519 public key (PEM or raw)")
    group: str = Field(
        default="default", description="rollout group: the version latest.json names for it is installed"
    )
    keep_versions: int = Field(default=3, ge=1, description="installed versions kept for rollback, current included")
    health_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="after the reload the agent must serve the new model healthily within this, else rollback",
    )
    health_inspections: int = Field(
        default=3, ge=1, description="inspections with the new model the agent must publish after a reload"
    )
    require_self_test: bool = Field(default=True, description="refuse bundles that list no self-test images")
    timeout_s: float = Field(default=30.0, gt=0, description="network timeout of each fleet request")
    max_bundle_mb: int = Field(default=2048, gt=0, description="refuse larger downloads and unpacked bundles")
    ca_file: Path | None = Field(default=None, description="CA bundle for an https fleet source with a private CA")


class SnapshotConfig(_Section):
    """Limits on cmd/snapshot: any broker client may send it, and the files share a disk with the spool."""

    min_interval_s: float = Field(default=10.0, ge=0, description="at most one snapshot this often")
    max_count: int = Field(default=200, ge=1, description="refuse new snapshots while snapshot_dir holds this many")
    max_total_mb: float = Field(default=500.0, gt=0, description="refuse new snapshots above this total size")
    min_free_mb: float = Field(
        default=1024.0, ge=0, description="refuse new snapshots when the file system has less free space than this"
    )


TriggerSource = Literal["mqtt", "http", "gpio"]


def _default_triggers() -> list[TriggerSource]:
    return ["mqtt", "http"]


class PartsConfig(_Section):
    """One verdict per part (docs/parts.md): triggered or tracked inspection and the ``part`` message."""

    mode: Literal["off", "triggered", "tracked"] = Field(
        default="off",
        description="off: frames only; triggered: one inspection per trigger; tracked: parts followed along the "
        "belt by a free-running camera, one verdict each",
    )
    direction: Literal["right_to_left", "left_to_right"] = Field(
        default="right_to_left", description="tracked: the way the belt runs through the image (along x)"
    )
    decision_line: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="tracked: a part is decided when its trailing edge crosses this line, a fraction of the width "
        "from the exit edge (0: when it has left the view)",
    )
    speed_px_s: float | None = Field(
        default=None,
        ge=0,
        description="tracked: belt speed in image pixels per second; unset: measured from the images (phase "
        "correlation)",
    )
    px_per_m: float | None = Field(
        default=None, gt=0, description="image pixels per metre of belt, to report positions in metres to the relay"
    )
    background_frames: int = Field(
        default=5, ge=1, description="tracked: frames of empty belt at start-up the belt model is learned from"
    )
    threshold_sigma: float = Field(
        default=4.0,
        gt=0,
        description="tracked: a pixel is part when it differs from its row's belt level by this many spreads ...",
    )
    min_contrast: float = Field(default=12.0, ge=0, description="tracked: ... and by this many grey levels")
    column_fill: float = Field(
        default=0.25, gt=0, lt=1, description="tracked: a column is part when this fraction of its rows is part"
    )
    min_part_px: int = Field(default=12, ge=1, description="tracked: shorter parts (along the belt) are noise")
    min_frames: int = Field(default=2, ge=1, description="tracked: a part seen in fewer frames is noise, not decided")
    candidate_slack: float = Field(
        default=1.0,
        ge=0,
        description="regions up to this many decades above log10 epsilon in one frame are candidate places whose "
        "evidence is combined over the part's frames",
    )
    triggers: list[TriggerSource] = Field(
        default_factory=_default_triggers,
        description="triggered: where triggers come from: <prefix>/<device_id>/trigger, POST /trigger, a GPIO line",
    )
    trigger_delay_s: float = Field(
        default=0.0, ge=0, description="triggered: the part is in place this long after its trigger"
    )
    trigger_timeout_s: float = Field(
        default=1.0, gt=0, description="triggered: a trigger with no frame by trigger + delay + this is reported missed"
    )
    gpio_chip: str = Field(default="/dev/gpiochip0", description="triggered, gpio: the chip of the photo-eye line")
    gpio_line: int = Field(default=0, ge=0, description="triggered, gpio: line offset on the chip")
    gpio_edge: Literal["rising", "falling"] = Field(default="rising", description="triggered, gpio: which edge")


class KeepConfig(_Section):
    """Frames kept on disk for review (edge_agent/service/keep.py): written off the inspection path."""

    flagged: bool = Field(
        default=False,
        description="keep every anomalous frame with its maps, NFA mask and message (with [parts] on: every "
        "anomalous part, with the frame that decided it)",
    )
    good_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of good frames kept too (0.01: one in a hundred)"
    )
    dir: Path | None = Field(default=None, description="where kept frames go; default <state_dir>/kept")
    training_dir: Path | None = Field(
        default=None,
        description="review decisions go here (good/, defect/); default <state_dir>/training (docs/operations.md)",
    )
    max_total_mb: float = Field(default=2000.0, gt=0, description="disk quota: the oldest kept frames are removed")
    min_free_mb: float = Field(
        default=1024.0,
        ge=0,
        description="keep nothing, record nothing (cmd/record, edge-agent record) and move no reviewed frame into "
        "training_dir while the file system has less free space (the spool first)",
    )
    training_max_total_mb: float = Field(
        default=5000.0,
        gt=0,
        description="quota of training_dir (recordings and reviewed frames): a recording stops and a review "
        "decision is refused beyond it; nothing is removed",
    )
    queue: int = Field(
        default=8, ge=1, le=256, description="frames waiting for the writer; beyond, skipped and counted"
    )


class DriftConfig(_Section):
    """Drift check against the bundle's training statistics (edge_agent/inspection/drift.py, docs/agent.md)."""

    enabled: bool = Field(default=True, description="watch drift when the bundle carries a reference")
    window: int = Field(default=100, ge=2, le=100_000, description="sampled frames in the sliding window")
    min_frames: int = Field(default=30, ge=1, description="no verdict before the window holds this many")
    max_distance: float = Field(
        default=0.5, gt=0, le=1, description="Kolmogorov-Smirnov distance to the training images that is drift"
    )
    min_relative_shift: float = Field(
        default=0.05, ge=0, description="and the window median must have moved by this share of the training median"
    )
    sample_every_s: float = Field(
        default=1.0, ge=0, description="at most one frame per this many seconds feeds the window (0: every frame)"
    )

    @model_validator(mode="after")
    def _min_within_window(self) -> DriftConfig:
        if self.min_frames > self.window:
            raise ValueError(f"min_frames ({self.min_frames}) must not exceed window ({self.window})")
        return self


class AgentSettings(FileAndEnvSettings):
    """Everything the agent reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    device_id: str = Field(
        default_factory=lambda: os.uname().nodename,
        json_schema_extra={"doc_default": "the host name"},
        pattern=ID_PATTERN,
        description="this box in MQTT topics (and its broker user name): letters, digits, . _ - (1-64, starting "
        "with a letter or digit)",
    )
    state_dir: Path = Field(
        default=DEFAULT_STATE_DIR, description="models, engine plans, spool, snapshots and the Numba cache live here"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="least severe logged")
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line with an event field (journald); text: for people"
    )
    snapshot_dir: Path | None = Field(default=None, description="default <state_dir>/snapshots")
    snapshot: SnapshotConfig = Field(default_factory=SnapshotConfig)

    model: ModelConfig = Field(default_factory=ModelConfig)
    source: SourceConfig = Field(default_factory=SourceConfig)
    nfa: NfaConfig = Field(default_factory=NfaConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    update: UpdateConfig = Field(default_factory=UpdateConfig)
    parts: PartsConfig = Field(default_factory=PartsConfig)
    keep: KeepConfig = Field(default_factory=KeepConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    plc: PlcConfig = Field(default_factory=PlcConfig)
    recipe: str | None = Field(
        default=None,
        description="the recipe inspected at start (a name in [[recipes]]); default the first. Unset without "
        "[[recipes]]: the box runs [model] bundle as its one recipe (docs/recipes.md)",
    )
    recipes: list[RecipeConfig] = Field(
        default_factory=list,
        max_length=MAX_RECIPES,
        description="the products this box inspects, each a preloaded bundle switched at a frame boundary by "
        "cmd/recipe, edge-agent recipe or the PLC's RecipeSelect (its index in this list)",
    )

    @property
    def bundle_dir(self) -> Path:
        """The bundle the agent loads: ``model.bundle``, by default <state_dir>/models/current."""
        return self.model.bundle or self.state_dir / "models" / "current"

    @model_validator(mode="after")
    def _http_triggers_need_http(self) -> AgentSettings:
        if self.parts.mode == "triggered" and "http" in self.parts.triggers and not self.http.enabled:
            raise ValueError('parts.triggers has "http" but http.enabled is false: POST /trigger would not exist')
        return self

    @model_validator(mode="after")
    def _plc_triggers_need_triggered_parts(self) -> AgentSettings:
        if (self.plc.opcua_enabled or self.plc.modbus_enabled) and self.parts.mode != "triggered":
            raise ValueError('plc.opcua_enabled/modbus_enabled need parts.mode = "triggered" (the PLC triggers)')
        return self

    @model_validator(mode="after")
    def _recipes_named_once(self) -> AgentSettings:
        names = [r.name for r in self.recipes]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"recipes: each name once; {', '.join(doubled)} appear(s) more than once")
        if self.recipe is not None and self.recipe not in names:
            known = ", ".join(names) if names else "none: there is no [[recipes]] list"
            raise ValueError(f"recipe = {self.recipe!r} is not one of the [[recipes]] names ({known})")
        return self

    @model_validator(mode="after")
    def _fill_state_paths(self) -> AgentSettings:
        if self.model.bundle is None:
            self.model.bundle = self.state_dir / "models" / "current"
        if self.model.engine_cache_dir is None:
            self.model.engine_cache_dir = self.state_dir / "engines"
        if self.spool.path is None:
            self.spool.path = self.state_dir / "spool.sqlite"
        if self.snapshot_dir is None:
            self.snapshot_dir = self.state_dir / "snapshots"
        if self.keep.dir is None:
            self.keep.dir = self.state_dir / "kept"
        if self.keep.training_dir is None:
            self.keep.training_dir = self.state_dir / "training"
        self.plc.fill_paths(self.state_dir)
        return self


def load_settings(path: Path | str | None = None, **overrides: Any) -> AgentSettings:
    """Settings from an optional TOML file, the environment and explicit overrides (highest)."""
    return build_settings(AgentSettings, path, overrides, ignore_env_prefixes=OTHER_ENV_PREFIXES)
