"""Fleet update end to end: real HTTP fleet server on loopback, real mosquitto, real ONNX Runtime self-test.

Every failure must leave the old model current and say why; an updater SIGKILLed at any step must leave
``models/`` consistent (current = a complete, verified bundle, old or new) and the next run must finish.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from fleet_helpers import FleetServer, make_bundle, serving
from mqtt_broker import MosquittoBroker, Subscriber
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.bundle import load_bundle
from edge_agent.config import AgentSettings, load_settings
from edge_agent.fleet.models_dir import ModelsDir
from edge_agent.fleet.publish import publish
from edge_agent.fleet.signing import generate_keypair, sign_bytes, verify_bundle_signature
from edge_agent.fleet.update import apply_update

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return generate_keypair(tmp_path_factory.mktemp("keys"))


class Fleet:
    """A fleet directory served over HTTP, plus the bundles published into it."""

    def __init__(self, root: Path, server: FleetServer, private_key: Path) -> None:
        self.root = root
        self.dir = root / "fleet"
        self.server = server
        self.private_key = private_key

    def release(self, version: str, groups: tuple[str, ...] = ("default",), **bundle_kwargs: object) -> Path:
        key = bundle_kwargs.pop("key", self.private_key)
        bundle = make_bundle(self.root / f"src-{version}", version, key, **bundle_kwargs)  # type: ignore[arg-type]
        _, tar = publish(bundle, self.dir, groups, index_key=self.private_key)
        return tar


@pytest.fixture
def fleet(tmp_path: Path, keys) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    (tmp_path / "fleet").mkdir()
    with serving(tmp_path / "fleet") as server:
        yield Fleet(tmp_path, server, keys.private_key)


def make_settings(tmp_path: Path, fleet: Fleet, keys, broker: MosquittoBroker, **update: object) -> AgentSettings:  # type: ignore[no-untyped-def]
    return load_settings(
        None,
        device_id="cam1",
        state_dir=str(tmp_path / "state"),
        log_format="text",
        mqtt={"host": broker.host, "port": broker.port, "prefix": "plant"},
        update={"source": fleet.server.url, "public_key": str(keys.public_key), **update},
    )


def models_of(settings: AgentSettings) -> ModelsDir:
    return ModelsDir(settings.state_dir / "models")


def assert_only(models: ModelsDir, versions: list[str], current: str | None) -> None:
    assert sorted(models.installed_versions()) == sorted(versions)
    assert models.current_version() == current
    leftovers = [p.name for p in models.root.iterdir() if p.name.startswith((".staging-", ".trash-", ".current-"))]
    assert leftovers == []


@pytest.fixture
def mqtt(broker_factory) -> MosquittoBroker:  # type: ignore[no-untyped-def]
    """A real mosquitto on a loopback port for this test."""
    return broker_factory()


@pytest.fixture
def events(mqtt: MosquittoBroker) -> Iterator[Subscriber]:
    subscriber = Subscriber(mqtt, "plant/cam1/update")
    yield subscriber
    subscriber.close()


def steps_of(events: Subscriber) -> list[tuple[str, bool]]:
    return [(m.json()["step"], m.json()["ok"]) for m in events.on("/update")]  # type: ignore[misc]


def test_good_update_applies_and_keeps_the_old_version(tmp_path, fleet, keys, mqtt, events) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    first = apply_update(settings, reload=False)
    assert first.status == "updated" and first.version == "1.0.0" and first.previous is None
    fleet.release("2.0.0")
    second = apply_update(settings, reload=False)
    assert (second.status, second.version, second.previous) == ("updated", "2.0.0", "1.0.0")
    models = models_of(settings)
    assert_only(models, ["1.0.0", "2.0.0"], "2.0.0")
    current = load_bundle(models.current_link)
    assert current.manifest.version == "2.0.0"
    verify_bundle_signature(models.current_link, keys.public_key)
    assert not (models.root / ".pending.json").exists()
    # Every step went out on MQTT, in order.
    assert events.wait_for(lambda msgs: sum(m.json()["step"] == "done" for m in msgs) == 2, timeout=30)
    steps = [s for s, ok in steps_of(events) if ok]
    last_run = steps[steps.index("done") + 1 :]
    assert last_run == [
        "start",
        "fetch_index",
        "download",
        "unpack",
        "verify",
        "load_engine",
        "self_test",
        "install",
        "switch",
        "reload",
        "done",
    ]
    assert all(m.json()["version"] == "2.0.0" for m in events.on("/update")[-10:])
    # Nothing new: no download, nothing changes.
    fleet.server.requests.clear()
    third = apply_update(settings, reload=False)
    assert third.status == "current"
    assert sorted(fleet.server.requests) == ["/latest.json", "/latest.json.sig"], fleet.server.requests


def test_tampered_bundle_is_refused(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    assert apply_update(settings, reload=False).status == "updated"
    tar = fleet.release("2.0.0")
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed on the server
    tar.write_bytes(bytes(data))
    result = apply_update(settings, reload=False)
    assert (result.status, result.step) == ("failed", "download")
    assert "sha256 mismatch" in result.message
    assert_only(models_of(settings), ["1.0.0"], "1.0.0")
    # A corrupt download may be transient: not remembered as a bad version.
    assert models_of(settings).failed_versions() == {}


def test_bundle_signed_with_another_key_is_refused(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    apply_update(settings, reload=False)
    intruder = generate_keypair(tmp_path / "intruder")
    fleet.release("2.0.0", key=intruder.private_key)
    result = apply_update(settings, reload=False)
    assert (result.status, result.step) == ("failed", "verify")
    assert "signature does not match" in result.message and keys.fingerprint in result.message
    assert_only(models_of(settings), ["1.0.0"], "1.0.0")
    # Remembered: the next run does not download it again, and says why.
    fleet.server.requests.clear()
    again = apply_update(settings, reload=False)
    assert again.status == "skipped" and "failed here before at verify" in again.message
    assert not any(r.endswith(".tar") for r in fleet.server.requests)


def test_unsigned_bundle_is_refused(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    apply_update(settings, reload=False)
    bundle = make_bundle(tmp_path / "unsigned", "2.0.0", fleet.private_key)
    (bundle / "signature").unlink()
    # publish() refuses unsigned bundles, so an attacker would hand-craft the tar and index.
    from edge_agent.fleet.publish import write_bundle_tar

    write_bundle_tar(bundle, fleet.dir / "bundles/tile-2.0.0.tar")
    _point_index_at(fleet, "2.0.0", fleet.dir / "bundles/tile-2.0.0.tar")
    result = apply_update(settings, reload=False)
    assert (result.status, result.step) == ("failed", "verify") and "not signed" in result.message
    assert models_of(settings).current_version() == "1.0.0"


def _point_index_at(fleet: Fleet, version: str, tar: Path) -> None:
    import hashlib

    index = json.loads((fleet.dir / "latest.json").read_text())
    entry = {
        "version": version,
        "url": f"bundles/{tar.name}",
        "size": tar.stat().st_size,
        "sha256": hashlib.sha256(tar.read_bytes()).hexdigest(),
    }
    index["releases"] = [entry, *[r for r in index["releases"] if r["version"] != version]]
    index["groups"]["default"] = version
    body = json.dumps(index).encode()
    (fleet.dir / "latest.json").write_bytes(body)
    # The attacker here holds the fleet key for latest.json (it only maps versions to tars); what must stop
    # them is the signature over each bundle's model.json.
    (fleet.dir / "latest.json.sig").write_text(sign_bytes(body, fleet.private_key))


def test_version_mismatch_with_latest_json_is_refused(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    apply_update(settings, reload=False)
    tar = fleet.release("2.0.0", groups=())
    _point_index_at(fleet, "3.0.0", tar)  # an index that relabels a signed 2.0.0 as 3.0.0
    result = apply_update(settings, reload=False)
    assert (result.status, result.step) == ("failed", "verify")
    assert "announces version 3.0.0 but the signed model.json says 2.0.0" in result.message
    assert_only(models_of(settings), ["1.0.0"], "1.0.0")


def test_bundle_failing_its_self_test_is_refused(tmp_path, fleet, keys, mqtt, caplog) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    apply_update(settings, reload=False)
    fleet.release("2.0.0", selftest="defect")
    with caplog.at_level("INFO"):
        result = apply_update(settings, reload=False)
    assert (result.status, result.step) == ("failed", "self_test")
    assert "selftest/good_0.png is a good part but was judged anomalous" in result.message
    assert_only(models_of(settings), ["1.0.0"], "1.0.0")
    assert models_of(settings).failed_versions()["2.0.0"]["step"] == "self_test"
    assert any(getattr(r, "step", "") == "self_test" and not getattr(r, "ok", True) for r in caplog.records)
    # --force retries it (and it fails the same way, still leaving 1.0.0).
    forced = apply_update(settings, reload=False, force=True)
    assert (forced.status, forced.step) == ("failed", "self_test")
    assert models_of(settings).current_version() == "1.0.0"


def test_bundle_without_self_test_images_is_refused_unless_allowed(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0", selftest="none")
    result = apply_update(settings, reload=False)
    assert (result.status, result.step) == ("failed", "self_test") and "lists no self_test images" in result.message
    lenient = make_settings(tmp_path, fleet, keys, mqtt, require_self_test=False)
    assert apply_update(lenient, reload=False, force=True).status == "updated"


def test_model_the_engine_cannot_load_is_refused(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    apply_update(settings, reload=False)
    fleet.release("2.0.0", io_mismatch=True)  # signed, hashes fine, but model.json and model.onnx disagree
    result = apply_update(settings, reload=False)
    assert (result.status, result.step) == ("failed", "load_engine")
    assert "output 'm_0' has shape [1, 16, 16], the manifest says [1, 17, 16]" in result.message
    assert_only(models_of(settings), ["1.0.0"], "1.0.0")


def test_rollout_groups(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    fleet.release("1.0.0", groups=("default",))
    fleet.release("2.0.0", groups=("canary",))
    canary = make_settings(tmp_path / "a", fleet, keys, mqtt, group="canary")
    default = make_settings(tmp_path / "b", fleet, keys, mqtt)
    other = make_settings(tmp_path / "c", fleet, keys, mqtt, group="line9")
    assert apply_update(canary, reload=False).version == "2.0.0"
    assert apply_update(default, reload=False).version == "1.0.0"
    nothing = apply_update(other, reload=False)
    assert nothing.status == "no_release" and models_of(other).current_version() is None
    # Promote 2.0.0 to everyone else.
    publish(fleet.root / "src-2.0.0", fleet.dir, ["default", "*"], index_key=fleet.private_key)
    assert apply_update(default, reload=False).version == "2.0.0"
    assert apply_update(other, reload=False).version == "2.0.0"


def test_a_shadow_gate_holds_a_group_until_the_box_shadowed_the_version(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.fleet.index import ShadowGate
    from edge_agent.inspection.shadow import STATE_NAME, ShadowState, save_state

    fleet.release("1.0.0", groups=("default", "canary"))
    gated = make_settings(tmp_path / "a", fleet, keys, mqtt)
    free = make_settings(tmp_path / "b", fleet, keys, mqtt, group="canary")
    assert apply_update(gated, reload=False).version == "1.0.0"
    bundle = make_bundle(fleet.root / "src-2.0.0", "2.0.0", fleet.private_key)
    publish(bundle, fleet.dir, ["default"], index_key=fleet.private_key, shadow_gate=ShadowGate(hours=2))
    publish(bundle, fleet.dir, ["canary"], index_key=fleet.private_key)
    waiting = apply_update(gated, reload=False)
    assert waiting.status == "skipped" and "has not run as the shadow model" in waiting.message
    assert models_of(gated).current_version() == "1.0.0"
    assert apply_update(free, reload=False).version == "2.0.0"  # canary has no gate
    # Issue 24 finding 13: another model under the same version string (its sha256 differs) does not count,
    # nor do three hours of wall time with less active time, nor too few compared frames.
    now = time.time()
    sha = load_bundle(bundle).onnx_sha256
    active = 3 * 3600.0
    state = ShadowState("2.0.0", "0" * 64, now - active, now, compared=5000, agreed=5000, active_s=active)
    save_state(gated.state_dir / STATE_NAME, state)
    waiting = apply_update(gated, reload=False)
    assert waiting.status == "skipped" and "another model" in waiting.message, waiting.message
    for change in ({"active_s": 3600.0}, {"compared": 999, "agreed": 999}):
        save_state(gated.state_dir / STATE_NAME, replace(state, sha256=sha, **change))
        assert apply_update(gated, reload=False).status == "skipped", change
    assert models_of(gated).current_version() == "1.0.0"
    # The box's agent ran 2.0.0 as its shadow (model.shadow) for three active hours, agreeing on every frame.
    save_state(gated.state_dir / STATE_NAME, replace(state, sha256=sha))
    assert apply_update(gated, reload=False).version == "2.0.0"
    assert models_of(gated).current_version() == "2.0.0"


def test_keeps_the_last_three_versions(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    for n in range(1, 6):
        fleet.release(f"{n}.0.0")
        assert apply_update(settings, reload=False).status == "updated"
    assert_only(models_of(settings), ["3.0.0", "4.0.0", "5.0.0"], "5.0.0")
    two = make_settings(tmp_path, fleet, keys, mqtt, keep_versions=2)
    fleet.release("6.0.0")
    apply_update(two, reload=False)
    assert_only(models_of(settings), ["5.0.0", "6.0.0"], "6.0.0")


def test_lock_keeps_a_second_updater_out(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    with models_of(settings).lock():
        result = apply_update(settings, reload=False)
        assert result.status == "locked" and f"pid {os.getpid()}" in result.message
        config = write_config(tmp_path, settings)
        cli = run_updater(config, env={})
        assert cli.returncode == 75, cli.stderr
        assert "another update is running" in cli.stderr
    assert models_of(settings).current_version() is None
    assert apply_update(settings, reload=False).status == "updated"


def test_missing_source_or_key_is_named(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    no_source = settings.model_copy(update={"update": settings.update.model_copy(update={"source": None})})
    result = apply_update(no_source, reload=False)
    assert (result.status, result.step) == ("failed", "start") and "set update.source" in result.message
    no_key = settings.model_copy(update={"update": settings.update.model_copy(update={"public_key": None})})
    assert "update.public_key is not set" in apply_update(no_key, reload=False).message
    missing = settings.model_copy(update={"update": settings.update.model_copy(update={"public_key": tmp_path / "x"})})
    assert "cannot read fleet public key" in apply_update(missing, reload=False).message


def test_leftovers_of_interrupted_runs_are_cleaned(tmp_path, fleet, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    apply_update(settings, reload=False)
    models = models_of(settings)
    # What a run killed mid-download, mid-prune (version renamed to .trash-*, rmtree not finished) and
    # between creating the new symlink and renaming it over `current` leaves behind.
    (models.root / ".staging-2.0.0-abc" / "bundle").mkdir(parents=True)
    (models.root / ".staging-2.0.0-abc" / "bundle.tar").write_bytes(b"partial")
    (models.root / ".trash-0.9.0-123-456" / "selftest").mkdir(parents=True)
    os.symlink("1.0.0", models.root / ".current-999-1")
    assert apply_update(settings, reload=False).status == "current"
    assert_only(models, ["1.0.0"], "1.0.0")


# -- the agent does not confirm: roll back --------------------------------------------------------------


def test_silent_agent_means_rollback(tmp_path, fleet, keys, mqtt, events) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt, health_timeout_s=2.0)
    fleet.release("1.0.0")
    apply_update(settings, reload=False)
    fleet.release("2.0.0")
    # An agent that is "online" (retained status, as the agent publishes it) but never answers cmd/reload:
    # a hung agent, or one that cannot load the model.
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(mqtt.host, mqtt.port)
    client.loop_start()
    client.publish("plant/cam1/status", "online", qos=1, retain=True).wait_for_publish(5)
    reloads = Subscriber(mqtt, "plant/cam1/cmd/reload")
    try:
        result = apply_update(settings)
    finally:
        client.loop_stop()
        client.disconnect()
    assert (result.status, result.step) == ("rolled_back", "health")
    assert "did not answer cmd/reload in time" in result.message
    assert_only(models_of(settings), ["1.0.0", "2.0.0"], "1.0.0")
    assert models_of(settings).failed_versions()["2.0.0"]["step"] == "health"
    asked = [m.json()["version"] for m in reloads.on("cmd/reload")]
    reloads.close()
    assert asked == ["2.0.0", "1.0.0"]  # the new model, then back to the old one
    assert events.wait_for(lambda msgs: any(m.json()["step"] == "rollback" for m in msgs), timeout=30)
    assert ("health", False) in steps_of(events)


# -- killed at any step ---------------------------------------------------------------------------------

KILL_POINTS = [
    "start",
    "fetch_index",
    "download",
    "download:partial",
    "unpack",
    "verify",
    "load_engine",
    "self_test",
    "install",
    "switch",
    "reload",
    "prune",
]


def write_config(tmp_path: Path, settings: AgentSettings) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "{settings.device_id}"\nstate_dir = "{settings.state_dir}"\nlog_format = "json"\n'
        f'[mqtt]\nhost = "{settings.mqtt.host}"\nport = {settings.mqtt.port}\nprefix = "{settings.mqtt.prefix}"\n'
        f'[update]\nsource = "{settings.update.source}"\npublic_key = "{settings.update.public_key}"\n'
    )
    return path


def run_updater(config: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "update", "--config", str(config), "--no-reload"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **env},
    )


def start_paused_updater(config: Path, step: str, env: dict[str, str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "paused_updater.py"),
            step,
            "update",
            "--config",
            str(config),
            "--no-reload",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()  # type: ignore[union-attr]
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if '"event": "update_paused"' in line:
            return process
    process.kill()
    raise AssertionError(f"updater never paused at {step}:\n{''.join(seen)}")


def assert_consistent(models: ModelsDir, public_key: Path, allowed: set[str]) -> str:
    version = models.current_version()
    assert version in allowed
    bundle = load_bundle(models.current_link)  # every listed file present with its sha256
    verify_bundle_signature(models.current_link, public_key)
    assert bundle.manifest.version == version
    return version  # type: ignore[return-value]


@pytest.mark.parametrize("step", KILL_POINTS)
def test_killed_updater_leaves_a_consistent_models_dir(tmp_path, fleet, keys, mqtt, step) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, fleet, keys, mqtt)
    fleet.release("1.0.0")
    assert apply_update(settings, reload=False).status == "updated"
    fleet.release("2.0.0")
    config = write_config(tmp_path, settings)
    # The subprocess shares the test process's Numba cache (edge_agent/__pycache__): no second compile.
    process = start_paused_updater(config, step, env={})
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    models = models_of(settings)
    seen = assert_consistent(models, keys.public_key, {"1.0.0", "2.0.0"})
    if step in (
        "start",
        "fetch_index",
        "download",
        "download:partial",
        "unpack",
        "verify",
        "load_engine",
        "self_test",
        "install",
        "switch",
    ):
        assert seen == "1.0.0"
    # The next run cleans up and finishes the update.
    rerun = apply_update(settings, reload=False)
    assert rerun.ok and rerun.version == "2.0.0", rerun
    assert_only(models, ["1.0.0", "2.0.0"], "2.0.0")
    assert not (models.root / ".pending.json").exists()
    assert_consistent(models, keys.public_key, {"2.0.0"})


# -- the real model: uflow export --sign, publish, update -------------------------------------------------


@pytest.mark.slow
def test_real_uflow_bundle_signed_at_export_installs(tmp_path, tiny_run_dir, keys, mqtt) -> None:  # type: ignore[no-untyped-def]
    from training.cli import main as uflow

    out = tmp_path / "export" / "bundle"
    missing_key = uflow(["export", "--run", str(tiny_run_dir), "--out", str(out), "--sign", str(tmp_path / "nokey")])
    assert missing_key != 0 and not out.exists()  # refused before spending time on an export
    assert (
        uflow(
            [
                "export",
                "--run",
                str(tiny_run_dir),
                "--out",
                str(out),
                "--version",
                "7.0.0",
                "--sign",
                str(keys.private_key),
            ]
        )
        == 0
    )
    assert verify_bundle_signature(out, keys.public_key) == keys.fingerprint
    assert load_bundle(out).manifest.self_test, "uflow export ships self-test images"
    (tmp_path / "fleet").mkdir()
    with serving(tmp_path / "fleet") as server:
        publish(out, tmp_path / "fleet", ["default"], public_key=keys.public_key, index_key=keys.private_key)
        settings = load_settings(
            None,
            device_id="cam1",
            state_dir=str(tmp_path / "state"),
            log_format="text",
            mqtt={"host": mqtt.host, "port": mqtt.port, "prefix": "plant"},
            update={"source": server.url, "public_key": str(keys.public_key)},
        )
        result = apply_update(settings, reload=False)
    assert (result.status, result.version) == ("updated", "7.0.0"), result.message
    installed = load_bundle(models_of(settings).current_link).manifest
    assert installed.version == "7.0.0" and installed.files == load_bundle(out).manifest.files


# -- against the real running agent -----------------------------------------------------------------------


@pytest.mark.slow
def test_running_agent_reloads_and_confirms_the_new_model(tmp_path, fleet, keys, mqtt, pytestconfig) -> None:  # type: ignore[no-untyped-def]
    import cv2
    import numpy as np
    from contract_bundle import good_frame

    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(3)
    for i in range(20):
        cv2.imwrite(str(frames / f"f{i:02d}.png"), good_frame(rng, 64, 64))
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "cam1"\nstate_dir = "{tmp_path / "state"}"\nlog_format = "json"\n'
        f'[source]\nuri = "{frames}"\nloop = true\nfps_limit = 5\n'
        f'[mqtt]\nhost = "{mqtt.host}"\nport = {mqtt.port}\nprefix = "plant"\n'
        "[http]\nenabled = false\n"
        f'[update]\nsource = "{fleet.server.url}"\npublic_key = "{keys.public_key}"\nhealth_timeout_s = 8.0\n'
    )
    settings = load_settings(config)
    fleet.release("1.0.0")
    assert apply_update(settings, reload=False).status == "updated"
    inspections = Subscriber(mqtt, "plant/cam1/inspection")
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        # The JIT cache the notify tests share: the agent starts in seconds instead of compiling the NFA.
        env={**os.environ, "NUMBA_CACHE_DIR": str(pytestconfig.cache.mkdir("numba-agent"))},
    )
    try:
        assert inspections.wait_for(lambda msgs: len(msgs) >= 2, timeout=120), "the agent never inspected"
        fleet.release("2.0.0")
        result = apply_update(settings)
        # Whatever happened, the agent keeps inspecting with a model that is installed and current.
        assert agent.poll() is None
        assert result.status == "updated", result.message
        assert inspections.wait_for(
            lambda msgs: any(m.json()["model"]["version"] == "2.0.0" for m in msgs),  # type: ignore[index]
            timeout=10,
        )
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        inspections.close()
